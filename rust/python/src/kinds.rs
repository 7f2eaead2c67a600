//! Named values that cross the binding, each mirrored by a `StrEnum` of `normalize_core.kinds`.
//!
//! An argument of one of these types accepts the Python member or its string value; anything
//! else raises `ValueError` naming the allowed values. A result is the Python member itself
//! (a `str` subclass, so `entry.dtype == "BF16"` holds), looked up once per enum and cached.
//! The first use of an enum checks that both sides list the same values.

use std::collections::BTreeSet;
use std::fmt;

use normalize_core::dtype::ALL_DTYPES;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyString;

/// The Python module holding the enums.
const KINDS_MODULE: &str = "normalize_core.kinds";

/// The Python members of one enum, in the order of the Rust variants, and their values.
struct Members {
    objects: Vec<Py<PyAny>>,
    values: Vec<String>,
}

/// A Rust type whose values are the members of the `StrEnum` `CLASS` in `normalize_core.kinds`.
trait Kind: Copy + 'static {
    /// The enum's class name in `normalize_core.kinds`.
    const CLASS: &'static str;
    /// Number of variants.
    const COUNT: usize;
    /// The variant at `index` (0 ≤ index < COUNT).
    fn from_index(index: usize) -> Self;
    /// This variant's position, the inverse of `from_index`.
    fn index(self) -> usize;
    /// The string value of this variant's Python member.
    fn value(self) -> String;
    /// Where the members are cached.
    fn members_cell() -> &'static PyOnceLock<Members>;
}

/// The cached members of `K`, resolved on first use.
fn members<K: Kind>(py: Python<'_>) -> PyResult<&'static Members> {
    K::members_cell().get_or_try_init(py, || {
        let class = py.import(KINDS_MODULE)?.getattr(K::CLASS)?;
        let values: Vec<String> = (0..K::COUNT).map(|i| K::from_index(i).value()).collect();
        let declared = class
            .try_iter()?
            .map(|member| member?.getattr("value")?.extract::<String>())
            .collect::<PyResult<BTreeSet<String>>>()?;
        let known: BTreeSet<String> = values.iter().cloned().collect();
        if declared != known {
            return Err(PyRuntimeError::new_err(format!(
                "{KINDS_MODULE}.{} and the binding disagree: only in Python {:?}, only in the binding {:?}",
                K::CLASS,
                declared.difference(&known).collect::<Vec<_>>(),
                known.difference(&declared).collect::<Vec<_>>(),
            )));
        }
        let objects = values
            .iter()
            .map(|value| class.call1((value,)).map(Bound::unbind))
            .collect::<PyResult<_>>()?;
        Ok(Members { objects, values })
    })
}

/// The Python member for `kind`.
fn to_member<'py, K: Kind>(py: Python<'py>, kind: K) -> PyResult<Bound<'py, PyAny>> {
    Ok(members::<K>(py)?.objects[kind.index()].bind(py).clone())
}

/// The variant whose member is `obj` or whose value equals the string `obj`.
fn from_member<K: Kind>(obj: &Bound<'_, PyAny>) -> PyResult<K> {
    let members = members::<K>(obj.py())?;
    if let Some(index) = members.objects.iter().position(|m| obj.is(m)) {
        return Ok(K::from_index(index));
    }
    if let Ok(text) = obj.cast::<PyString>() {
        let text = text.to_str()?;
        if let Some(index) = members.values.iter().position(|v| v == text) {
            return Ok(K::from_index(index));
        }
    }
    let allowed: Vec<String> = members.values.iter().map(|v| format!("'{v}'")).collect();
    Err(PyValueError::new_err(format!(
        "{} is not a valid {}; expected one of: {}",
        obj.repr()?,
        K::CLASS,
        allowed.join(", ")
    )))
}

/// `FromPyObject` and `IntoPyObject` for a `Kind`: Python members (or their values) in and out.
macro_rules! py_conversions {
    ($name:ty) => {
        impl<'a, 'py> FromPyObject<'a, 'py> for $name {
            type Error = PyErr;

            fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
                from_member(&obj)
            }
        }

        impl<'py> IntoPyObject<'py> for $name {
            type Target = PyAny;
            type Output = Bound<'py, PyAny>;
            type Error = PyErr;

            fn into_pyobject(self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
                to_member(py, self)
            }
        }
    };
}

/// Declares a fieldless enum mirrored by `normalize_core.kinds.<class>`, with its conversions.
macro_rules! kind_enum {
    ($(#[$doc:meta])* $name:ident = $class:literal {
        $($(#[$variant_doc:meta])* $variant:ident => $value:literal,)+
    }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[$variant_doc])* $variant,)+
        }

        impl $name {
            const ALL: &'static [$name] = &[$($name::$variant,)+];
        }

        impl Kind for $name {
            const CLASS: &'static str = $class;
            const COUNT: usize = $name::ALL.len();

            fn from_index(index: usize) -> Self {
                $name::ALL[index]
            }

            fn index(self) -> usize {
                self as usize
            }

            fn value(self) -> String {
                self.to_string()
            }

            fn members_cell() -> &'static PyOnceLock<Members> {
                static MEMBERS: PyOnceLock<Members> = PyOnceLock::new();
                &MEMBERS
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(match self {
                    $($name::$variant => $value,)+
                })
            }
        }

        py_conversions!($name);
    };
}

kind_enum! {
    /// How output shards are named (`PlanBuilder.finish`).
    Naming = "Naming" {
        /// `model-{i:05d}-of-{n:05d}.safetensors`.
        Standard => "standard",
        /// Each shard keeps its source file's name.
        Source => "source",
    }
}

kind_enum! {
    /// How a checkpoint's tensors were found (`Checkpoint.layout`).
    Layout = "Layout" {
        Indexed => "indexed",
        SingleFile => "single_file",
        Unindexed => "unindexed",
    }
}

kind_enum! {
    /// How FP8 scales are rounded: any float, or powers of two (`scale_fmt: ue8m0`).
    ScaleFormat = "ScaleFormat" {
        Float => "float",
        Ue8m0 => "ue8m0",
    }
}

kind_enum! {
    /// How FP8 scales are stored.
    ScaleDtype = "ScaleDtype" {
        Float32 => "float32",
        Bfloat16 => "bfloat16",
    }
}

kind_enum! {
    /// What an output shard is (`ShardPlan.kind`).
    ShardKind = "ShardKind" {
        /// A new header and tensors.
        Assembled => "assembled",
        /// A source file re-emitted as is.
        WholeFile => "whole_file",
    }
}

kind_enum! {
    /// How serious a problem is (`Checkpoint.problems`).
    Severity = "Severity" {
        Error => "error",
        Warning => "warning",
    }
}

impl From<Naming> for normalize_core::ShardNaming {
    fn from(naming: Naming) -> Self {
        match naming {
            Naming::Standard => normalize_core::ShardNaming::Standard,
            Naming::Source => normalize_core::ShardNaming::SourceNames,
        }
    }
}

impl From<normalize_core::Layout> for Layout {
    fn from(layout: normalize_core::Layout) -> Self {
        match layout {
            normalize_core::Layout::Indexed => Layout::Indexed,
            normalize_core::Layout::SingleFile => Layout::SingleFile,
            normalize_core::Layout::Unindexed => Layout::Unindexed,
        }
    }
}

impl From<&normalize_core::plan::ShardKind> for ShardKind {
    fn from(kind: &normalize_core::plan::ShardKind) -> Self {
        match kind {
            normalize_core::plan::ShardKind::Assembled { .. } => ShardKind::Assembled,
            normalize_core::plan::ShardKind::WholeFile { .. } => ShardKind::WholeFile,
        }
    }
}

impl From<normalize_core::verify::Severity> for Severity {
    fn from(severity: normalize_core::verify::Severity) -> Self {
        match severity {
            normalize_core::verify::Severity::Error => Severity::Error,
            normalize_core::verify::Severity::Warning => Severity::Warning,
        }
    }
}

/// A safetensors dtype (`TensorEntry.dtype`), the Python `Dtype` member of the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dtype(pub normalize_core::dtype::Dtype);

impl Kind for Dtype {
    const CLASS: &'static str = "Dtype";
    const COUNT: usize = ALL_DTYPES.len();

    fn from_index(index: usize) -> Self {
        Dtype(ALL_DTYPES[index])
    }

    fn index(self) -> usize {
        ALL_DTYPES
            .iter()
            .position(|d| *d == self.0)
            .expect("ALL_DTYPES lists every dtype a header can hold")
    }

    fn value(self) -> String {
        self.0.to_string()
    }

    fn members_cell() -> &'static PyOnceLock<Members> {
        static MEMBERS: PyOnceLock<Members> = PyOnceLock::new();
        &MEMBERS
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

py_conversions!(Dtype);
