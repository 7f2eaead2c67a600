"""Round trips of ``repack`` on real files: engine-named, single-file and standard (indexed) inputs
written by the ``safetensors`` library, outputs read back with ``safe_open`` byte for byte; shard limits,
the index, aux files, ``verify``, ``--overwrite`` semantics, and a hypothesis property over random
tensor sets, dtypes, shapes, file splits and shard limits."""

from __future__ import annotations

import itertools
import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file

from builders import INDEX, expected_bytes, random_tensor, save_engine_checkpoint, save_standard_checkpoint
from normalize_core import Checkpoint, NormalizeError, plan_shards, repack
from normalize_core.sample import sample_tensors
from repack_util import TORCH_DTYPES, assert_standard_output, leftover_partials, read_raw_header

KB = 1000


def llama_like_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small two-layer model in mixed dtypes (bf16 weights, f32 norms, an i64 buffer)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"model.embed_tokens.weight": torch.randn(64, 32, generator=g).bfloat16()}
    for i in range(2):
        p = f"model.layers.{i}"
        tensors |= {
            f"{p}.input_layernorm.weight": torch.rand(32, generator=g),
            f"{p}.self_attn.q_proj.weight": torch.randn(32, 32, generator=g).bfloat16(),
            f"{p}.self_attn.k_proj.weight": torch.randn(16, 32, generator=g).bfloat16(),
            f"{p}.self_attn.v_proj.weight": torch.randn(16, 32, generator=g).bfloat16(),
            f"{p}.self_attn.o_proj.weight": torch.randn(32, 32, generator=g).bfloat16(),
            f"{p}.mlp.gate_proj.weight": torch.randn(96, 32, generator=g).bfloat16(),
            f"{p}.mlp.up_proj.weight": torch.randn(96, 32, generator=g).bfloat16(),
            f"{p}.mlp.down_proj.weight": torch.randn(32, 96, generator=g).bfloat16(),
        }
    tensors |= {
        "model.norm.weight": torch.rand(32, generator=g),
        "model.rotary.inv_freq_steps": torch.arange(16, dtype=torch.int64),
        "lm_head.weight": torch.randn(64, 32, generator=g).bfloat16(),
    }
    return tensors


def split(tensors: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    """``tensors`` in order, cut into ``parts`` consecutive pieces."""
    names = list(tensors)
    step = -(-len(names) // parts)
    return [{n: tensors[n] for n in names[i : i + step]} for i in range(0, len(names), step)]


def write_aux_files(directory: Path, shared: Path) -> None:
    """Config, tokenizer files, a sub-folder, and things never copied: hidden files and a symlink to a file
    outside the source (skipped and reported, never followed)."""
    (directory / "config.json").write_text('{"model_type": "llama"}\n')
    (directory / "tokenizer.json").write_text('{"version": "1.0"}\n')
    (directory / "tokenizer").mkdir()
    (directory / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    (directory / "tokenizer" / ".cache").write_text("hidden\n")
    shared.mkdir(parents=True, exist_ok=True)
    (shared / "tokenizer.model").write_bytes(b"\x00sentencepiece\xff")
    (directory / "tokenizer.model").symlink_to(shared / "tokenizer.model")
    (directory / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (directory / ".cache").mkdir()
    (directory / ".cache" / "x").write_text("x")


SHARD_LIMITS = [20 * KB, 7 * KB, 1]  # several shards; mostly oversize singletons; one tensor per shard


@pytest.mark.parametrize("limit", SHARD_LIMITS)
def test_engine_named_shards_round_trip(tmp_path: Path, limit: int):
    tensors = llama_like_tensors()
    parts = split(tensors, 3)
    files = {f"model-language-000{r + 1}-fused-save_rank{r}.safetensors": part for r, part in enumerate(parts)}
    source = save_engine_checkpoint(tmp_path / "engine", files)
    write_aux_files(source, tmp_path / "shared")

    result = repack(source, tmp_path / "out", max_shard_bytes=limit)

    assert_standard_output(tmp_path / "out", expected_bytes(tensors), limit)
    assert result.tensors == len(tensors)
    assert result.ignored_files == []
    assert result.aux_files == ["config.json", "tokenizer", "tokenizer.json"]
    outside = (tmp_path / "shared" / "tokenizer.model").resolve()
    assert result.skipped_aux == [("tokenizer.model", f"symlink to {outside}, outside the source directory")]
    out = tmp_path / "out"
    assert (out / "config.json").read_text() == '{"model_type": "llama"}\n'
    assert (out / "tokenizer" / "vocab.txt").read_text() == "a\nb\n"
    assert not (out / "tokenizer" / ".cache").exists()
    assert not (out / "tokenizer.model").exists()
    assert not (out / "tokenizer.model").is_symlink()
    assert not (out / ".gitattributes").exists()
    assert not (out / ".cache").exists()


def test_a_limit_of_one_gives_every_tensor_its_own_shard(tmp_path: Path):
    tensors = llama_like_tensors()
    source = save_engine_checkpoint(tmp_path / "engine", {"a.safetensors": tensors})
    repack(source, tmp_path / "out", max_shard_bytes=1)
    index = json.loads((tmp_path / "out" / INDEX).read_text())
    assert len(set(index["weight_map"].values())) == len(tensors)


def test_greedy_packing_fills_shards_in_source_order(tmp_path: Path):
    """Consecutive source tensors share a shard until the next would exceed the limit."""
    tensors = {f"t{i:02d}": torch.full((1000,), i, dtype=torch.uint8) for i in range(10)}
    source = save_engine_checkpoint(tmp_path / "engine", {"a.safetensors": tensors})
    repack(source, tmp_path / "out", max_shard_bytes=3500)
    weight_map = json.loads((tmp_path / "out" / INDEX).read_text())["weight_map"]
    shard_of = [int(weight_map[f"t{i:02d}"][6:11]) for i in range(10)]
    assert shard_of == sorted(shard_of)
    assert shard_of == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4]
    assert_standard_output(tmp_path / "out", expected_bytes(tensors), 3500)


def test_single_model_safetensors_round_trips(tmp_path: Path):
    tensors = llama_like_tensors(seed=1)
    source = save_engine_checkpoint(tmp_path / "single", {"model.safetensors": tensors})
    (source / "config.json").write_text("{}")
    result = repack(source, tmp_path / "out", max_shard_bytes=15 * KB)
    assert len(result.shards) > 1
    assert_standard_output(tmp_path / "out", expected_bytes(tensors), 15 * KB)
    assert (tmp_path / "out" / "config.json").read_text() == "{}"


def test_single_file_written_by_the_numpy_saver_round_trips(tmp_path: Path):
    import numpy as np

    rng = np.random.default_rng(3)
    arrays = {
        "f32": rng.standard_normal((7, 5)).astype(np.float32),
        "f64": rng.standard_normal(9),
        "i16": rng.integers(-300, 300, (4, 4), dtype=np.int16),
        "c64": (rng.standard_normal(6) + 1j * rng.standard_normal(6)).astype(np.complex64),
        "flags": rng.integers(0, 2, 5).astype(bool),
    }
    source = tmp_path / "single"
    source.mkdir()
    save_numpy(arrays, source / "model.safetensors")
    repack(source, tmp_path / "out", max_shard_bytes=100)
    expected = {name: expected_bytes({name: torch.from_numpy(a.copy())})[name] for name, a in arrays.items()}
    assert_standard_output(tmp_path / "out", expected, 100)


def test_standard_input_reshards_and_drops_stale_weight_files(tmp_path: Path):
    tensors = llama_like_tensors(seed=2)
    source = save_standard_checkpoint(tmp_path / "standard", split(tensors, 4))
    (source / "config.json").write_text("{}")
    save_engine_checkpoint(source, {"old-unreferenced.safetensors": {"stale": torch.zeros(3)}})
    (source / "consolidated.safetensors.index.json").write_text("{}")

    result = repack(source, tmp_path / "out", max_shard_bytes=40 * KB)

    assert_standard_output(tmp_path / "out", expected_bytes(tensors), 40 * KB)
    assert result.ignored_files == ["old-unreferenced.safetensors"]
    assert not (tmp_path / "out" / "old-unreferenced.safetensors").exists()
    assert not (tmp_path / "out" / "consolidated.safetensors.index.json").exists()


def test_standard_input_is_read_in_index_order(tmp_path: Path):
    """An indexed checkpoint is read in index order (sorted keys), not in shard-file order."""
    tensors = {name: torch.full((100,), i, dtype=torch.uint8) for i, name in enumerate("abcd")}
    source = save_standard_checkpoint(
        tmp_path / "standard", [{"b": tensors["b"], "c": tensors["c"]}, {"a": tensors["a"], "d": tensors["d"]}]
    )
    repack(source, tmp_path / "out", max_shard_bytes=1)
    weight_map = json.loads((tmp_path / "out" / INDEX).read_text())["weight_map"]
    assert [weight_map[n][6:11] for n in "abcd"] == ["00001", "00002", "00003", "00004"]
    assert_standard_output(tmp_path / "out", expected_bytes(tensors), 1)


class TestOverwrite:
    """``overwrite=True`` replaces what this tool writes and nothing else."""

    def source(self, tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
        tensors = llama_like_tensors(seed=5)
        source = save_engine_checkpoint(tmp_path / "engine", {"a.safetensors": tensors})
        (source / "config.json").write_text('{"fresh": true}')
        return source, tensors

    def test_non_empty_output_is_refused_and_left_untouched(self, tmp_path: Path):
        source, _ = self.source(tmp_path)
        out = tmp_path / "out"
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        with pytest.raises(NormalizeError) as err:
            repack(source, out)
        assert err.value.kind == "output_not_empty"
        assert str(out) in str(err.value)
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    def test_replaces_tool_files_removes_stale_shards_keeps_user_files(self, tmp_path: Path):
        source, tensors = self.source(tmp_path)
        out = tmp_path / "out"
        first = repack(source, out, max_shard_bytes=5 * KB)
        assert len(first.shards) > 3
        (out / "notes.txt").write_text("mine")
        (out / "extra").mkdir()
        (out / "extra" / "eval.json").write_text("[]")
        (out / "config.json").write_text('{"edited": true}')
        (out / ".model-00001-of-00002.safetensors.partial-999").write_bytes(b"half")

        with pytest.raises(NormalizeError) as err:
            repack(source, out, max_shard_bytes=40 * KB)
        assert err.value.kind == "output_not_empty"

        second = repack(source, out, max_shard_bytes=40 * KB, overwrite=True)

        assert len(second.shards) < len(first.shards)
        assert sorted(second.removed_stale) == sorted(set(first.shards) - set(second.shards))
        assert (out / "notes.txt").read_text() == "mine"
        assert (out / "extra" / "eval.json").read_text() == "[]"
        assert (out / "config.json").read_text() == '{"fresh": true}'
        assert_standard_output(out, expected_bytes(tensors), 40 * KB)

    def test_stale_shards_of_another_run_are_removed(self, tmp_path: Path):
        source, tensors = self.source(tmp_path)
        out = tmp_path / "out"
        out.mkdir()
        (out / "model-00007-of-00009.safetensors").write_bytes(b"stale")
        (out / "model.safetensors").write_bytes(b"stale")
        (out / INDEX).write_text("{}")
        result = repack(source, out, max_shard_bytes=40 * KB, overwrite=True)
        assert result.removed_stale == ["model-00007-of-00009.safetensors", "model.safetensors"]
        assert_standard_output(out, expected_bytes(tensors), 40 * KB)


#: What the property test draws from: every dtype torch saves but the exotic 8- and 4-bit floats.
EXOTIC = (torch.float8_e8m0fnu, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.float4_e2m1fn_x2)
HYPOTHESIS_DTYPES = [d for d in TORCH_DTYPES if d not in EXOTIC]


@st.composite
def checkpoints(draw) -> tuple[list[dict[str, torch.Tensor]], int]:
    """Random engine checkpoints: 1–12 tensors of random dtypes and shapes (0-d and empty included),
    spread over 1–4 files, and a shard limit from one byte to everything-in-one-shard."""
    count = draw(st.integers(1, 12))
    names = draw(st.lists(st.from_regex(r"[a-z]{1,3}(\.[0-9]{1,2}){0,2}", fullmatch=True), min_size=count,
                          max_size=count, unique=True))  # fmt: skip
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    tensors = {}
    for name in names:
        dtype = draw(st.sampled_from(HYPOTHESIS_DTYPES))
        shape = tuple(draw(st.lists(st.integers(0, 6), max_size=3)))
        tensors[name] = random_tensor(dtype, shape, generator)
    cuts = sorted(draw(st.lists(st.integers(1, max(1, count - 1)), max_size=3, unique=True)))
    bounds = [0, *[c for c in cuts if c < count], count]
    files = [{n: tensors[n] for n in names[a:b]} for a, b in itertools.pairwise(bounds) if b > a]
    limit = draw(st.integers(1, 4000))
    return files, limit


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(checkpoints())
def test_random_checkpoints_round_trip_byte_for_byte(case):
    files, limit = case
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = save_engine_checkpoint(root / "src", {f"rank{i}.safetensors": f for i, f in enumerate(files)})
        repack(source, root / "out", max_shard_bytes=limit)
        expected = {name: data for f in files for name, data in expected_bytes(f).items()}
        assert_standard_output(root / "out", expected, limit)
        assert not leftover_partials(root / "out")


def test_sample_checkpoint_fixture_round_trips(engine_checkpoint: Path, tmp_path: Path):
    """The built-in sample (written without torch), loaded with safetensors, survives a repack."""
    from safetensors.torch import load_file

    source_tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(engine_checkpoint.glob("*.safetensors")):
        source_tensors |= load_file(shard)
    assert set(source_tensors) == set(sample_tensors())
    repack(engine_checkpoint, tmp_path / "out", max_shard_bytes=300 * KB)
    assert_standard_output(tmp_path / "out", expected_bytes(source_tensors), 300 * KB)


def save_with_header_length(path: Path, tensors: dict[str, torch.Tensor], header_length: int) -> None:
    """``save_file`` with a metadata filler sized so the header is exactly ``header_length`` bytes (a
    multiple of 8): each filler character adds one byte before the padding to 8."""
    save_file(tensors, path, metadata={"format": "pt", "filler": ""})
    unfilled = read_raw_header(path)[0]
    save_file(tensors, path, metadata={"format": "pt", "filler": "x" * (header_length - unfilled)})
    assert read_raw_header(path)[0] == header_length


def test_page_alignment_padding_respects_the_shard_limit(tmp_path: Path):
    """A shard whose longest source run is ≥ 1 MiB gets header padding so the run keeps its page offset
    (copy_file_range is fastest between equal offsets modulo the page size), but only when the padded
    shard still fits the limit. The source run starts 8 bytes into a page, so padding costs almost a
    page; planned for every limit around the threshold, written for a few."""
    tensors = {"a": torch.full((100,), 1, dtype=torch.uint8)}
    tensors |= {name: torch.full((1_200_000,), i, dtype=torch.uint8) for i, name in enumerate("bc")}
    source = tmp_path / "engine"
    source.mkdir()
    save_with_header_length(source / "rank0.safetensors", tensors, 4096)
    checkpoint = Checkpoint.open(source)
    assert checkpoint.tensor("a").file_offset % 4096 == 8

    padded, unpadded = set(), set()
    for limit in range(1_200_100, 1_200_100 + 4400, 8):
        for shard in plan_shards(checkpoint, limit).shards:
            assert shard.file_len <= limit or len(shard.tensor_names) == 1
            if shard.tensor_names[:2] == ["a", "b"]:
                header = shard.file_len - shard.data_len
                (padded if header % 4096 == 8 else unpadded).add(limit)
    assert padded and unpadded, "the limits tried must reach both sides of the padding threshold"
    assert max(unpadded) < min(padded)

    for limit in (min(unpadded), max(unpadded), min(padded)):
        out = tmp_path / f"limit-{limit}"
        repack(source, out, max_shard_bytes=limit)
        assert_standard_output(out, expected_bytes(tensors), limit)
