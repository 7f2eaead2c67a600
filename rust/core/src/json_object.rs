//! A JSON object read in document order that keeps a repeated key instead of silently keeping
//! the last value, as `serde_json::Map` would. Headers and indexes both need this: a tensor named
//! twice is an error, not a choice to make quietly.

use std::collections::HashSet;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};

/// The members of one JSON object, in the order they appear, repeated keys included.
pub(crate) struct OrderedObject<V> {
    pub entries: Vec<(String, V)>,
}

impl<V> OrderedObject<V> {
    /// The first key that appears more than once, if any.
    pub fn first_duplicate(&self) -> Option<&str> {
        let mut seen = HashSet::with_capacity(self.entries.len());
        self.entries
            .iter()
            .map(|(key, _)| key.as_str())
            .find(|key| !seen.insert(*key))
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for OrderedObject<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(OrderedObjectVisitor(PhantomData))
    }
}

struct OrderedObjectVisitor<V>(PhantomData<V>);

impl<'de, V: Deserialize<'de>> Visitor<'de> for OrderedObjectVisitor<V> {
    type Value = OrderedObject<V>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OrderedObject<V>, A::Error> {
        let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
        while let Some(key) = map.next_key::<String>()? {
            let value: V = map.next_value()?;
            entries.push((key, value));
        }
        Ok(OrderedObject { entries })
    }
}
