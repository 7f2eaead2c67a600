//! Property tests against the reference `safetensors` crate: encoded headers parse back (with our
//! parser and the reference one) to what was encoded, and repack plans of random checkpoints keep
//! every planner invariant and copy every tensor byte for byte.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use normalize_core::checkpoint::standard_shard_name;
use normalize_core::dtype::{alignment, byte_size, ALL_DTYPES};
use normalize_core::format::HEADER_ALIGN;
use normalize_core::header::{
    encode_header, entry_size_bound, parse_header, HeaderEntry, LEN_PREFIX,
};
use normalize_core::plan::{ShardKind, TensorSource, PAGE_SIZE};
use normalize_core::{execute_plan, plan_repack, write_index, Checkpoint, ExecuteOptions};
use proptest::prelude::*;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

/// A tensor description: name, dtype, shape; only ones with a whole byte size.
fn tensor_specs(max: usize) -> impl Strategy<Value = Vec<(String, Dtype, Vec<u64>)>> {
    let spec = (
        "[a-z\"\\\\ é.]{1,8}[0-9]{0,2}",
        proptest::sample::select(ALL_DTYPES.to_vec()),
        proptest::collection::vec(0u64..7, 0..4),
    );
    proptest::collection::vec(spec, 1..max).prop_map(|specs| {
        let mut seen = HashSet::new();
        specs
            .into_iter()
            .filter(|(name, dtype, shape)| {
                byte_size(*dtype, shape).is_some() && seen.insert(name.clone())
            })
            .collect()
    })
}

fn deterministic_bytes(len: u64, seed: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 3) as u8)
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn encoded_headers_parse_back(
        specs in tensor_specs(12),
        metadata in proptest::collection::btree_map("[a-z_]{1,6}", "[ -~]{0,10}", 0..3),
        residue in proptest::option::of((0u64..PAGE_SIZE / 8).prop_map(|r| r * 8)),
    ) {
        let mut offset = 0;
        let mut entries = Vec::new();
        for (name, dtype, shape) in &specs {
            let len = byte_size(*dtype, shape).unwrap();
            entries.push(HeaderEntry { name, dtype: *dtype, shape, data_offsets: (offset, offset + len) });
            offset += len;
        }
        let metadata: Vec<(String, String)> = metadata.into_iter().collect();
        let mut file = encode_header(&entries, &metadata, residue);
        let data_start = file.len() as u64;
        prop_assert_eq!(data_start % 8, 0);
        if let Some(r) = residue {
            prop_assert_eq!(data_start % PAGE_SIZE, r);
        }
        let header_len = u64::from_le_bytes(file[..8].try_into().unwrap());
        prop_assert_eq!(header_len, data_start - LEN_PREFIX);
        file.extend(deterministic_bytes(offset, 1));

        let parsed = parse_header(Path::new("x.safetensors"), &file[8..data_start as usize], file.len() as u64).unwrap();
        prop_assert_eq!(&parsed.metadata, &metadata);
        prop_assert_eq!(parsed.tensors.len(), specs.len());
        for (tensor, (name, dtype, shape)) in parsed.tensors.iter().zip(&specs) {
            prop_assert_eq!(&tensor.name, name);
            prop_assert_eq!(tensor.dtype, *dtype);
            prop_assert_eq!(&tensor.shape, shape);
        }

        let reference = SafeTensors::deserialize(&file).unwrap();
        for (entry, (name, dtype, shape)) in entries.iter().zip(&specs) {
            let view = reference.tensor(name).unwrap();
            prop_assert_eq!(view.dtype(), *dtype);
            let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
            prop_assert_eq!(view.shape(), shape.as_slice());
            let (begin, end) = entry.data_offsets;
            prop_assert_eq!(view.data(), &file[(data_start + begin) as usize..(data_start + end) as usize]);
        }
    }

    /// The planner sizes a shard's header before its offsets are known, from a bound per entry:
    /// whatever the offsets (any `u64`s, 20 digits at most), the encoded header never exceeds
    /// the empty header plus its padding plus the entries' bounds.
    #[test]
    fn entry_bounds_cover_headers_with_any_offsets(
        specs in tensor_specs(12),
        offsets in proptest::collection::vec((any::<u64>(), any::<u64>()), 12),
        metadata in proptest::collection::btree_map("[a-z_]{1,6}", "[ -~]{0,10}", 0..3),
    ) {
        let metadata: Vec<(String, String)> = metadata.into_iter().collect();
        let entries: Vec<HeaderEntry<'_>> = specs
            .iter()
            .zip(&offsets)
            .map(|((name, dtype, shape), &data_offsets)| HeaderEntry { name, dtype: *dtype, shape, data_offsets })
            .collect();
        let bounds: u64 = entries.iter().map(|e| entry_size_bound(e.name, e.dtype, e.shape)).sum();
        let empty = encode_header(&[], &metadata, None).len() as u64;
        let encoded = encode_header(&entries, &metadata, None).len() as u64;
        prop_assert!(encoded <= empty + HEADER_ALIGN + bounds, "{} > {} + {} + {}", encoded, empty, HEADER_ALIGN, bounds);
    }

    #[test]
    fn repack_plans_keep_invariants_and_bytes(
        files in proptest::collection::vec(tensor_specs(6), 1..4),
        limit in 1u64..3000,
        jobs in 1usize..4,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("src");
        std::fs::create_dir(&source).unwrap();
        let mut expected: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> = BTreeMap::new();
        for (f, specs) in files.iter().enumerate() {
            let specs: Vec<_> = specs.iter().filter(|(name, ..)| !expected.contains_key(name)).collect();
            let mut buffers = Vec::new();
            for (i, (name, dtype, shape)) in specs.iter().enumerate() {
                let bytes = deterministic_bytes(byte_size(*dtype, shape).unwrap(), (f * 100 + i) as u64);
                let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
                expected.insert(name.clone(), (*dtype, shape.clone(), bytes.clone()));
                buffers.push((name.clone(), *dtype, shape, bytes));
            }
            let views: Vec<(String, TensorView<'_>)> = buffers
                .iter()
                .map(|(name, dtype, shape, bytes)| (name.clone(), TensorView::new(*dtype, shape.clone(), bytes).unwrap()))
                .collect();
            let info = HashMap::from([("format".to_string(), "pt".to_string())]);
            safetensors::serialize_to_file(views, Some(info), &source.join(format!("rank{f}.safetensors"))).unwrap();
        }
        prop_assume!(!expected.is_empty());
        let checkpoint = Checkpoint::open(&source).unwrap();
        let plan = plan_repack(&checkpoint, limit).unwrap();

        // Planner invariants.
        let n = plan.shards.len();
        let mut planned = Vec::new();
        for (i, shard) in plan.shards.iter().enumerate() {
            prop_assert_eq!(&shard.file_name, &standard_shard_name(i + 1, n));
            prop_assert!(shard.file_len <= limit || shard.tensors.len() == 1, "{} bytes over {}", shard.file_len, limit);
            prop_assert!(!shard.tensors.is_empty());
            let ShardKind::Assembled { header } = &shard.kind else { panic!("repack assembles every shard") };
            prop_assert_eq!(header.len() as u64, shard.data_start());
            prop_assert_eq!(shard.data_start() % 8, 0);
            let mut offset = 0;
            for placed in &shard.tensors {
                prop_assert_eq!(placed.data_offsets.0, offset);
                prop_assert_eq!(placed.data_offsets.1 - placed.data_offsets.0, placed.tensor.nbytes);
                prop_assert_eq!(placed.data_offsets.0 % alignment(placed.tensor.dtype), 0);
                let copied = matches!(placed.tensor.source, TensorSource::Copy { .. });
                prop_assert!(copied, "repack copies every tensor");
                offset = placed.data_offsets.1;
                planned.push((i, placed.tensor.name.clone()));
            }
        }
        prop_assert_eq!(plan.total_size(), checkpoint.total_size());
        // Greedy packing in checkpoint order: a tensor never lands in an earlier shard than one
        // that precedes it in the checkpoint.
        let shard_of: HashMap<&str, usize> = planned.iter().map(|(i, name)| (name.as_str(), *i)).collect();
        prop_assert_eq!(shard_of.len(), checkpoint.tensors.len());
        let order: Vec<usize> = checkpoint.tensors.iter().map(|t| shard_of[t.name.as_str()]).collect();
        prop_assert!(order.windows(2).all(|w| w[0] <= w[1]), "{:?}", order);

        // Bytes, read back with the reference crate.
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let plan = Arc::new(plan);
        let all: Vec<usize> = (0..plan.shards.len()).collect();
        execute_plan(&plan, &out, &all, ExecuteOptions { jobs, hardlink: false }, &|_| true, &|_| {}).unwrap();
        write_index(&plan, &out).unwrap();
        let mut found = BTreeMap::new();
        for shard in &plan.shards {
            let bytes = std::fs::read(out.join(&shard.file_name)).unwrap();
            prop_assert_eq!(bytes.len() as u64, shard.file_len);
            let reference = SafeTensors::deserialize(&bytes).unwrap();
            for (name, view) in reference.tensors() {
                found.insert(name, (view.dtype(), view.shape().to_vec(), view.data().to_vec()));
            }
        }
        prop_assert_eq!(found, expected);
        let index: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("model.safetensors.index.json")).unwrap()).unwrap();
        prop_assert_eq!(index["metadata"]["total_size"].as_u64(), Some(checkpoint.total_size()));
        prop_assert_eq!(index["weight_map"].as_object().unwrap().len(), checkpoint.tensors.len());
    }
}
