//! A JSON object read in document order that remembers a repeated key instead of silently keeping
//! the last value, as `serde_json::Map` would. Headers and indexes both need this: a tensor named
//! twice is an error, not a choice to make quietly.

use std::collections::HashSet;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;

/// The members of one JSON object, in the order they appear.
pub(crate) struct OrderedObject {
    pub entries: Vec<(String, Value)>,
    /// The first key that appeared more than once, if any.
    pub duplicate: Option<String>,
}

impl<'de> Deserialize<'de> for OrderedObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(OrderedObjectVisitor)
    }
}

struct OrderedObjectVisitor;

impl<'de> Visitor<'de> for OrderedObjectVisitor {
    type Value = OrderedObject;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OrderedObject, A::Error> {
        let mut seen = HashSet::with_capacity(map.size_hint().unwrap_or(0));
        let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
        let mut duplicate = None;
        while let Some(key) = map.next_key::<String>()? {
            let value: Value = map.next_value()?;
            if seen.insert(key.clone()) {
                entries.push((key, value));
            } else if duplicate.is_none() {
                duplicate = Some(key);
            }
        }
        Ok(OrderedObject { entries, duplicate })
    }
}
