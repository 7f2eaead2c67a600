//! `ShardWriter` on real files: what it refuses (a tensor written twice, the wrong byte count, an
//! unknown name, a shard finished with a tensor missing, a source that changed), that a refused or
//! dropped shard leaves no file behind, and that a finished one reads back with the reference crate.
//! `execute_plan` on a subset of shards, reporting each one once it is in place, the planned
//! header bytes of each shard, and hard-linked shards (never of a source changed since planning).

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use normalize_core::dtype::Dtype;
use normalize_core::{
    execute_plan, plan_repack, planned_header, Checkpoint, ExecuteOptions, OutputPlan,
    OutputTensor, PlanBuilder, ShardNaming, ShardWriter, TensorGroup,
};
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;

/// A source checkpoint of two files: `a.safetensors` holds `norm` (F32 [4]), `b.safetensors`
/// holds `bias` (BF16 [8]).
fn source(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    std::fs::create_dir(&src).unwrap();
    let norm: Vec<u8> = (0..16).collect();
    let bias: Vec<u8> = (100..116).collect();
    for (file, name, dtype, shape, data) in [
        ("a.safetensors", "norm", Dtype::F32, vec![4], &norm),
        ("b.safetensors", "bias", Dtype::BF16, vec![8], &bias),
    ] {
        let view = TensorView::new(dtype, shape, data).unwrap();
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file([(name, view)], Some(meta), &src.join(file)).unwrap();
    }
    src
}

/// One shard: both source tensors copied, plus a provided `w` (F8_E4M3 [2, 3]) and its
/// `w_scale_inv` (F32 [1, 1]).
fn plan(checkpoint: &Checkpoint) -> Arc<OutputPlan> {
    let (mut builder, bases) = PlanBuilder::new(&[checkpoint]);
    let copied = |name: &str| OutputTensor::copied(checkpoint.tensor(name).unwrap(), bases[0]);
    let group = TensorGroup {
        tensors: vec![
            copied("norm"),
            copied("bias"),
            OutputTensor::provided("w".into(), Dtype::F8_E4M3, vec![2, 3]).unwrap(),
            OutputTensor::provided("w_scale_inv".into(), Dtype::F32, vec![1, 1]).unwrap(),
        ],
        home_file: bases[0],
    };
    builder.pack_greedy(vec![group], 1 << 30);
    Arc::new(builder.finish(ShardNaming::Standard).unwrap())
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

struct Setup {
    _dir: tempfile::TempDir,
    src: PathBuf,
    out: PathBuf,
    plan: Arc<OutputPlan>,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let plan = plan(&Checkpoint::open(&src).unwrap());
    Setup {
        _dir: dir,
        src,
        out,
        plan,
    }
}

#[test]
fn a_complete_shard_reads_back_with_the_reference_crate() {
    let s = setup();
    let writer = ShardWriter::create(Arc::clone(&s.plan), 0, &s.out).unwrap();
    assert_eq!(writer.provided_tensors(), ["w_scale_inv", "w"]);
    writer.copy_sources(&|_| true).unwrap();
    writer.write_tensor("w", &[1, 2, 3, 4, 5, 6]).unwrap();
    writer
        .write_tensor("w_scale_inv", &[0, 0, 128, 63])
        .unwrap();
    let path = writer.finish().unwrap();

    assert_eq!(entries(&s.out), ["model-00001-of-00001.safetensors"]);
    let bytes = std::fs::read(path).unwrap();
    let reference = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(
        reference.tensor("norm").unwrap().data(),
        (0..16).collect::<Vec<u8>>()
    );
    assert_eq!(
        reference.tensor("bias").unwrap().data(),
        (100..116).collect::<Vec<u8>>()
    );
    assert_eq!(reference.tensor("w").unwrap().data(), [1, 2, 3, 4, 5, 6]);
    assert_eq!(reference.tensor("w").unwrap().dtype(), Dtype::F8_E4M3);
    assert_eq!(
        reference.tensor("w_scale_inv").unwrap().data(),
        1.0f32.to_le_bytes()
    );
}

#[test]
fn a_tensor_written_twice_is_refused() {
    let s = setup();
    let writer = ShardWriter::create(Arc::clone(&s.plan), 0, &s.out).unwrap();
    writer.write_tensor("w", &[0; 6]).unwrap();
    let err = writer.write_tensor("w", &[0; 6]).unwrap_err();
    assert_eq!(err.kind(), "write_rejected");
    assert_eq!(err.tensor(), Some("w"));
    assert!(
        err.to_string().ends_with("tensor 'w': written twice"),
        "{err}"
    );
}

#[test]
fn the_wrong_byte_count_and_unknown_names_are_refused() {
    let s = setup();
    let writer = ShardWriter::create(Arc::clone(&s.plan), 0, &s.out).unwrap();
    let err = writer.write_tensor("w", &[0; 5]).unwrap_err();
    assert!(
        err.to_string()
            .ends_with("tensor 'w': got 5 bytes, planned 6 (F8_E4M3 [2, 3])"),
        "{err}"
    );
    let err = writer.write_tensor("norm", &[0; 16]).unwrap_err();
    assert!(
        err.to_string()
            .ends_with("tensor 'norm': this shard has no provided tensor of that name"),
        "{err}"
    );
    // A refused write does not count as written: the right bytes are still accepted.
    writer.write_tensor("w", &[0; 6]).unwrap();
}

#[test]
fn finishing_with_a_tensor_missing_fails_and_leaves_no_file() {
    let s = setup();
    let writer = ShardWriter::create(Arc::clone(&s.plan), 0, &s.out).unwrap();
    assert_eq!(
        entries(&s.out).len(),
        1,
        "the temporary file exists while writing"
    );
    writer.copy_sources(&|_| true).unwrap();
    writer.write_tensor("w", &[0; 6]).unwrap();
    let err = writer.finish().unwrap_err();
    assert_eq!(err.kind(), "tensor_not_written");
    assert_eq!(err.tensor(), Some("w_scale_inv"));
    assert!(entries(&s.out).is_empty(), "{:?}", entries(&s.out));
}

#[test]
fn a_dropped_or_cancelled_writer_leaves_no_file() {
    let s = setup();
    drop(ShardWriter::create(Arc::clone(&s.plan), 0, &s.out).unwrap());
    assert!(entries(&s.out).is_empty());

    let writer = ShardWriter::create(Arc::clone(&s.plan), 0, &s.out).unwrap();
    let err = writer.copy_sources(&|_| false).unwrap_err();
    assert_eq!(err.kind(), "cancelled");
    drop(writer);
    assert!(entries(&s.out).is_empty());
}

#[test]
fn a_source_rewritten_after_copying_is_not_committed() {
    let s = setup();
    let writer = ShardWriter::create(Arc::clone(&s.plan), 0, &s.out).unwrap();
    writer.write_tensor("w", &[0; 6]).unwrap();
    writer.write_tensor("w_scale_inv", &[0; 4]).unwrap();
    writer.copy_sources(&|_| true).unwrap();
    let victim = s.src.join("b.safetensors");
    let len = std::fs::metadata(&victim).unwrap().len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&victim)
        .unwrap();
    file.write_all_at(&[0xEE], len - 1).unwrap();

    let err = writer.finish().unwrap_err();

    assert_eq!(err.kind(), "source_changed");
    assert_eq!(err.file(), Some(victim.as_path()));
    assert!(entries(&s.out).is_empty());
}

#[test]
fn a_source_changed_before_the_writer_opens_it_is_refused() {
    let s = setup();
    let victim = s.src.join("a.safetensors");
    let len = std::fs::metadata(&victim).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&victim)
        .unwrap()
        .set_len(len + 8)
        .unwrap();
    let err = ShardWriter::create(Arc::clone(&s.plan), 0, &s.out)
        .err()
        .unwrap();
    assert_eq!(err.kind(), "source_changed");
    assert_eq!(err.file(), Some(victim.as_path()));
    assert!(entries(&s.out).is_empty());
}

#[test]
fn execute_plan_notices_a_source_rewritten_during_the_copy() {
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    let checkpoint = Checkpoint::open(&src).unwrap();
    let plan = Arc::new(normalize_core::plan_repack(&checkpoint, 1 << 30).unwrap());
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let victim = src.join("a.safetensors");
    let rewritten = AtomicBool::new(false);
    // Progress is reported after each copied run: the first report rewrites a source in place,
    // same size, as another process might.
    let rewrite_once = |_: u64| {
        if !rewritten.swap(true, Ordering::Relaxed) {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&victim)
                .unwrap();
            let len = file.metadata().unwrap().len();
            file.write_all_at(&[0xAB], len - 1).unwrap();
        }
        true
    };
    let options = ExecuteOptions {
        jobs: 1,
        hardlink: false,
    };

    let all: Vec<usize> = (0..plan.shards.len()).collect();
    let err = execute_plan(&plan, &out, &all, options, &rewrite_once, &|_| {}).unwrap_err();

    assert!(rewritten.load(Ordering::Relaxed));
    assert_eq!(err.kind(), "source_changed");
    assert_eq!(err.file(), Some(victim.as_path()));
    assert!(entries(&out).is_empty(), "{:?}", entries(&out));
}

/// The repack plan of `source`'s checkpoint with every tensor in a shard of its own (two shards),
/// and an empty output directory.
fn two_shards(dir: &Path) -> (Arc<OutputPlan>, PathBuf) {
    let checkpoint = Checkpoint::open(&source(dir)).unwrap();
    let plan = plan_repack(&checkpoint, 1).unwrap();
    assert_eq!(plan.shards.len(), 2);
    let out = dir.join("out");
    std::fs::create_dir(&out).unwrap();
    (Arc::new(plan), out)
}

const ONE_JOB: ExecuteOptions = ExecuteOptions {
    jobs: 1,
    hardlink: false,
};

#[test]
fn execute_plan_writes_only_the_given_shards_and_reports_each_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let (plan, out) = two_shards(dir.path());
    let done = Mutex::new(Vec::new());
    let on_done = |shard: usize| {
        // Reported only once the shard has its final name and its full size.
        let spec = &plan.shards[shard];
        let len = std::fs::metadata(out.join(&spec.file_name)).unwrap().len();
        assert_eq!(len, spec.file_len);
        done.lock().unwrap().push(shard);
    };
    execute_plan(&plan, &out, &[1], ONE_JOB, &|_| true, &on_done).unwrap();
    assert_eq!(done.into_inner().unwrap(), [1]);
    assert_eq!(entries(&out), [plan.shards[1].file_name.clone()]);
    let written = std::fs::read(out.join(&plan.shards[1].file_name)).unwrap();
    assert!(written.ends_with(&(100..116).collect::<Vec<u8>>()));
}

#[test]
fn execute_plan_keeps_the_shards_reported_done_when_a_later_one_fails() {
    let dir = tempfile::tempdir().unwrap();
    let (plan, out) = two_shards(dir.path());
    let done = Mutex::new(Vec::new());
    // The first shard's copy passes; the second one's is refused.
    let budget = AtomicUsize::new(1);
    let progress = |_n: u64| budget.fetch_sub(1, Ordering::Relaxed) > 0;
    let on_done = |shard: usize| done.lock().unwrap().push(shard);
    let error = execute_plan(&plan, &out, &[0, 1], ONE_JOB, &progress, &on_done).unwrap_err();
    assert_eq!(error.kind(), "cancelled");
    assert_eq!(done.into_inner().unwrap(), [0]);
    assert_eq!(entries(&out), [plan.shards[0].file_name.clone()]);
}

#[test]
fn planned_header_is_what_each_shard_starts_with() {
    let dir = tempfile::tempdir().unwrap();
    let (plan, out) = two_shards(dir.path());
    execute_plan(&plan, &out, &[0, 1], ONE_JOB, &|_| true, &|_| {}).unwrap();
    for (i, spec) in plan.shards.iter().enumerate() {
        let header = planned_header(&plan, i).unwrap();
        assert_eq!(header.len() as u64, spec.data_start());
        assert!(std::fs::read(out.join(&spec.file_name))
            .unwrap()
            .starts_with(&header));
    }
    // A whole-file shard's header is its source file's.
    let checkpoint = Checkpoint::open(&dir.path().join("src")).unwrap();
    let (mut builder, bases) = PlanBuilder::new(&[&checkpoint]);
    let norm = OutputTensor::copied(checkpoint.tensor("norm").unwrap(), bases[0]);
    builder.whole_file(0, vec![norm]);
    let whole = builder.finish(ShardNaming::Standard).unwrap();
    let header = planned_header(&whole, 0).unwrap();
    let source = std::fs::read(dir.path().join("src/a.safetensors")).unwrap();
    assert_eq!(header.len() as u64, whole.shards[0].data_start());
    assert_eq!(&source[..header.len()], header.as_slice());
}

/// A plan re-emitting the source's `a.safetensors` whole, as merge does with base shards, and an
/// empty output directory.
fn whole_file_plan(dir: &Path) -> (Arc<OutputPlan>, PathBuf, PathBuf) {
    let src = source(dir);
    let checkpoint = Checkpoint::open(&src).unwrap();
    let (mut builder, bases) = PlanBuilder::new(&[&checkpoint]);
    let position = checkpoint
        .files
        .iter()
        .position(|f| f.name == "a.safetensors")
        .unwrap();
    let norm = OutputTensor::copied(checkpoint.tensor("norm").unwrap(), bases[0]);
    builder.whole_file(bases[0] + position, vec![norm]);
    let plan = Arc::new(builder.finish(ShardNaming::Standard).unwrap());
    let out = dir.join("out");
    std::fs::create_dir(&out).unwrap();
    (plan, out, src.join("a.safetensors"))
}

const LINK: ExecuteOptions = ExecuteOptions {
    jobs: 1,
    hardlink: true,
};

#[test]
fn a_hard_linked_shard_shares_the_source_file() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let (plan, out, source) = whole_file_plan(dir.path());
    let report = execute_plan(&plan, &out, &[0], LINK, &|_| true, &|_| {}).unwrap();
    assert_eq!(report.linked, 1);
    let linked = std::fs::metadata(out.join(&plan.shards[0].file_name)).unwrap();
    assert_eq!(linked.ino(), std::fs::metadata(&source).unwrap().ino());
}

#[test]
fn a_source_replaced_or_rewritten_after_planning_is_never_hard_linked() {
    let dir = tempfile::tempdir().unwrap();
    for (case, change) in [
        (
            "replaced",
            "a new file of the same size under the same name",
        ),
        ("rewritten", "the same file rewritten in place, same size"),
    ] {
        let case_dir = dir.path().join(case);
        std::fs::create_dir(&case_dir).unwrap();
        let (plan, out, source) = whole_file_plan(&case_dir);
        let mut bytes = std::fs::read(&source).unwrap();
        *bytes.last_mut().unwrap() ^= 0xFF;
        // Both get a later mtime than the planned version's, as any write does.
        std::thread::sleep(std::time::Duration::from_millis(10));
        if case == "replaced" {
            let other = case_dir.join("other");
            std::fs::write(&other, &bytes).unwrap();
            std::fs::rename(&other, &source).unwrap();
        } else {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&source)
                .unwrap();
            file.write_all_at(&bytes[bytes.len() - 1..], bytes.len() as u64 - 1)
                .unwrap();
        }

        let err = execute_plan(&plan, &out, &[0], LINK, &|_| true, &|_| {}).unwrap_err();

        assert_eq!(err.kind(), "source_changed", "{change}: {err}");
        assert_eq!(err.file(), Some(source.as_path()), "{change}");
        assert!(entries(&out).is_empty(), "{change}: {:?}", entries(&out));
    }
}
