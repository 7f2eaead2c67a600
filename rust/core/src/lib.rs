//! # normalize-core
//!
//! The pure-Rust core of model-normalize: it reads safetensors checkpoints through their
//! headers alone, plans output shards before any byte moves, and streams tensor bytes into new
//! shards inside the kernel.
//!
//! The pipeline, one module per stage:
//!
//! ```text
//! source dir ─► checkpoint (index + headers) ─► plan (shards, headers, offsets)
//!            ─► writer (copy_file_range / provided bytes, fsync, rename) ─► index last
//! ```
//!
//! Support modules: [`format`] holds the file-format constants and naming rules (a leaf every
//! other module may use), [`header`] and [`index`] parse and encode the on-disk formats (through
//! `json_object`, which refuses a repeated key), [`dtype`] knows element sizes,
//! [`regular_file`] opens and reads sources safely and notices when they change, [`copy`]
//! moves byte ranges, [`atomic_file`] makes files appear only when complete, [`digest`] names
//! headers and run identities by their SHA-256, [`output_dir`] guards the destination,
//! [`aux_files`] copies non-tensor files, [`verify`] reports problems,
//! [`scale_values`] checks the values of FP8 scale tensors, [`fp8`] and [`dequantize`] are the
//! CPU kernels of to-fp8 and to-bf16, [`stripes`] is the block-stripe threading both share, and
//! [`error`] is the one error type.

pub mod atomic_file;
pub mod aux_files;
pub mod checkpoint;
pub mod copy;
pub mod dequantize;
pub mod digest;
pub mod dtype;
pub mod error;
pub mod format;
pub mod fp8;
pub mod header;
pub mod index;
mod json_object;
pub mod output_dir;
pub mod plan;
pub mod regular_file;
pub mod scale_values;
pub mod stripes;
pub mod verify;
pub mod writer;

pub use checkpoint::{Checkpoint, Layout, TensorEntry};
pub use error::{Error, Result};
pub use plan::{
    plan_repack, OutputPlan, OutputTensor, PlanBuilder, ShardNaming, ShardPlan, TensorGroup,
};
pub use writer::{execute_plan, planned_header, write_index, ExecuteOptions, ShardWriter};
