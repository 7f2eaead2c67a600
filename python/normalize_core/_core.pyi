"""Type stubs of the Rust extension ``normalize_core._core`` (see rust/python/src).

``tests/test_stubs.py`` compares them with the built module: names, members and parameters.
"""

from collections.abc import Buffer, Callable
from os import PathLike
from pathlib import Path

from normalize_core.kinds import Dtype, Layout, Naming, ScaleDtype, ScaleFormat, Severity, ShardKind

__version__: str

_Path = str | PathLike[str]
_Progress = Callable[[int], object] | None

class NormalizeError(Exception):
    """A checkpoint, plan or write problem: one readable line naming the file and tensor."""

    kind: str
    file: str | None
    tensor: str | None

class TensorEntry:
    name: str
    dtype: Dtype
    shape: list[int]
    file: str
    data_offsets: tuple[int, int]
    file_offset: int
    nbytes: int

class TensorView(Buffer):
    """One tensor's bytes, read into memory the view owns (read-only buffer protocol)."""

    name: str
    dtype: str
    shape: list[int]
    nbytes: int
    def __len__(self) -> int: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...

class ShardHeader:
    path: Path
    file_len: int
    header_len: int
    data_start: int
    metadata: dict[str, str]
    tensors: list[TensorEntry]

class Checkpoint:
    @staticmethod
    def open(path: _Path) -> Checkpoint: ...
    @property
    def dir(self) -> Path: ...
    @property
    def layout(self) -> Layout: ...
    @property
    def files(self) -> list[str]: ...
    @property
    def tensors(self) -> list[TensorEntry]: ...
    def names(self) -> list[str]: ...
    def tensor(self, name: str) -> TensorEntry: ...
    def __len__(self) -> int: ...
    def __contains__(self, name: str) -> bool: ...
    @property
    def total_size(self) -> int: ...
    @property
    def total_parameters(self) -> int: ...
    @property
    def dtypes(self) -> dict[Dtype, int]: ...
    @property
    def has_standard_names(self) -> bool: ...
    @property
    def unreferenced_files(self) -> list[str]: ...
    @property
    def index_total_size(self) -> int | None: ...
    def file_metadata(self, file: str) -> dict[str, str]: ...
    def problems(self) -> list[tuple[Severity, str]]: ...
    def view(self, name: str) -> TensorView: ...
    def read_into(self, name: str, buffer: Buffer) -> None: ...
    def prefetch(self, names: list[str]) -> None: ...
    def scale_properties(self, names: list[str]) -> list[ScaleProperties]: ...

class ScaleProperties:
    """What holds for every value of one F32 or BF16 scale tensor."""

    finite_positive: bool
    powers_of_two: bool

class OutputTensor:
    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> Dtype: ...
    @property
    def shape(self) -> list[int]: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def is_provided(self) -> bool: ...

class TensorGroup: ...

class ShardPlan:
    file_name: str
    kind: ShardKind
    file_len: int
    data_len: int
    tensor_names: list[str]
    provided: list[str]

class ShardWriter:
    @property
    def file_name(self) -> str: ...
    @property
    def provided(self) -> list[str]: ...
    def copy_sources(self, progress: _Progress = None) -> None: ...
    def write(self, name: str, data: Buffer) -> None: ...
    def finish(self) -> Path: ...
    def abort(self) -> None: ...

class OutputPlan:
    @property
    def shards(self) -> list[ShardPlan]: ...
    def __len__(self) -> int: ...
    @property
    def total_size(self) -> int: ...
    @property
    def total_parameters(self) -> int: ...
    @property
    def total_file_bytes(self) -> int: ...
    def weight_map(self) -> dict[str, str]: ...
    def execute(
        self,
        output_dir: _Path,
        jobs: int = 1,
        hardlink: bool = False,
        progress: _Progress = None,
        shards: list[int] | None = None,
        on_shard_done: Callable[[int], object] | None = None,
    ) -> dict[str, object]: ...
    def shard_header(self, index: int) -> bytes: ...
    def open_shard(self, index: int, output_dir: _Path) -> ShardWriter: ...
    def write_index(self, output_dir: _Path) -> Path: ...

class PlanBuilder:
    def __init__(self, checkpoints: list[Checkpoint]) -> None: ...
    def copied(self, name: str, checkpoint: int = 0) -> OutputTensor: ...
    def provided(self, name: str, dtype: Dtype | str, shape: list[int]) -> OutputTensor: ...
    def group(self, tensors: list[OutputTensor], home: str | None = None, checkpoint: int = 0) -> TensorGroup: ...
    def pack_greedy(self, groups: list[TensorGroup], max_shard_bytes: int) -> None: ...
    def pack_by_source_file(self, groups: list[TensorGroup]) -> None: ...
    def whole_file(self, file_name: str, checkpoint: int = 0) -> None: ...
    def finish(self, naming: Naming | str = Naming.STANDARD) -> OutputPlan: ...

def read_header(path: _Path) -> ShardHeader: ...
def plan_shards(checkpoint: Checkpoint, max_shard_bytes: int) -> OutputPlan: ...
def quantize_fp8_blocks(
    tensor: str,
    input: Buffer,
    dtype: Dtype | str,
    batch: int,
    rows: int,
    cols: int,
    fp8_out: Buffer,
    scale_out: Buffer,
    block: int = 128,
    scale_fmt: ScaleFormat | str = ScaleFormat.FLOAT,
    scale_dtype: ScaleDtype | str = ScaleDtype.FLOAT32,
    threads: int = 1,
) -> None: ...
def quantize_fp8_tensor(
    checkpoint: Checkpoint,
    tensor: str,
    batch: int,
    rows: int,
    cols: int,
    fp8_out: Buffer,
    scale_out: Buffer,
    block: int = 128,
    scale_fmt: ScaleFormat | str = ScaleFormat.FLOAT,
    scale_dtype: ScaleDtype | str = ScaleDtype.FLOAT32,
    threads: int = 1,
) -> None: ...
def dequantize_fp8_blocks(
    tensor: str,
    fp8: Buffer,
    scales: Buffer,
    scale_dtype: Dtype | str,
    batch: int,
    rows: int,
    cols: int,
    out: Buffer,
    out_dtype: Dtype | str,
    block_rows: int = 128,
    block_cols: int = 128,
    threads: int = 1,
) -> None: ...
def dequantize_fp8_tensor(
    checkpoint: Checkpoint,
    tensor: str,
    scale: str,
    batch: int,
    rows: int,
    cols: int,
    out: Buffer,
    out_dtype: Dtype | str,
    block_rows: int = 128,
    block_cols: int = 128,
    threads: int = 1,
) -> None: ...
def check_separate(sources: list[_Path], output: _Path) -> None: ...
def list_aux_files(dir: _Path) -> list[str]: ...

class AuxCopy:
    copied: list[str]
    skipped: list[tuple[str, str]]

def copy_aux_files(source: _Path, output: _Path) -> AuxCopy: ...
def remove_temporaries(output: _Path) -> list[str]: ...
def remove_stale_shards(output: _Path, keep: list[str]) -> list[str]: ...
def copy_file(source: _Path, dest: _Path, progress: _Progress = None) -> None: ...

INDEX_FILE: str
SINGLE_FILE: str
#: Bytes of a safetensors file's little-endian header length.
LEN_PREFIX: int
#: The reference reader's cap on a header's JSON.
MAX_HEADER_LEN: int

def read_index(path: _Path) -> tuple[dict[str, str], int | None]: ...
def write_atomically(path: _Path, data: bytes, sync: bool = True) -> None: ...
def sync_dir(path: _Path) -> None: ...
def temp_path_for(path: _Path) -> Path: ...
def read_regular_file(path: _Path, max_bytes: int) -> bytes: ...
def files_equal(first: _Path, second: _Path) -> bool: ...
