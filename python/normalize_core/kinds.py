"""The named values of the API and the Rust binding, as string enums.

Each member *is* its string: ``Dtype.F8_E4M3 == "F8_E4M3"``, ``"indexed" in {Layout.INDEXED}``,
and ``json.dumps`` writes ``"F8_E4M3"``, so code and output that use plain strings keep working.
The binding returns these members (``TensorEntry.dtype``, ``Checkpoint.layout``,
``ShardPlan.kind``, the severities of ``Checkpoint.problems()``) and accepts a member or its
string where it takes one; on first use of an enum it checks that both sides list the same values.

An API function checks such an argument once, on entry, by calling the enum::

    >>> ScaleFormat("ue8m0")
    <ScaleFormat.UE8M0: 'ue8m0'>
    >>> ScaleFormat("UE8M0")
    Traceback (most recent call last):
    ValueError: 'UE8M0' is not a valid ScaleFormat; expected one of: 'float', 'ue8m0'

This module imports nothing from the package, so the binding can import it at any time.
"""

from __future__ import annotations

from enum import StrEnum


class Kind(StrEnum):
    """Base of the enums below: an unknown value raises ``ValueError`` naming the allowed values."""

    @classmethod
    def _missing_(cls, value: object) -> Kind:
        allowed = ", ".join(repr(member.value) for member in cls)
        raise ValueError(f"{value!r} is not a valid {cls.__name__}; expected one of: {allowed}")


class Naming(Kind):
    """How output shards are named."""

    #: ``model-{i:05d}-of-{n:05d}.safetensors``.
    STANDARD = "standard"
    #: Each shard keeps the name of the source file it was built from.
    SOURCE = "source"


class Layout(Kind):
    """How a checkpoint's tensors were found."""

    #: Through ``model.safetensors.index.json``.
    INDEXED = "indexed"
    #: A lone ``model.safetensors``, no index.
    SINGLE_FILE = "single_file"
    #: ``*.safetensors`` files without an index (engine-named shards).
    UNINDEXED = "unindexed"


class Dtype(Kind):
    """A safetensors dtype, spelled as in file headers."""

    BOOL = "BOOL"
    U8 = "U8"
    I8 = "I8"
    I16 = "I16"
    U16 = "U16"
    F16 = "F16"
    BF16 = "BF16"
    I32 = "I32"
    U32 = "U32"
    F32 = "F32"
    F64 = "F64"
    I64 = "I64"
    U64 = "U64"
    F8_E4M3 = "F8_E4M3"
    F8_E5M2 = "F8_E5M2"
    F8_E8M0 = "F8_E8M0"
    F8_E4M3FNUZ = "F8_E4M3FNUZ"
    F8_E5M2FNUZ = "F8_E5M2FNUZ"
    C64 = "C64"
    F4 = "F4"
    F6_E2M3 = "F6_E2M3"
    F6_E3M2 = "F6_E3M2"


class ScaleFormat(Kind):
    """How FP8 block scales are rounded."""

    #: Any float32 value.
    FLOAT = "float"
    #: Rounded up to a power of two; declared as ``scale_fmt: "ue8m0"`` in ``config.json``.
    UE8M0 = "ue8m0"


class ScaleDtype(Kind):
    """How FP8 block scales are stored."""

    FLOAT32 = "float32"
    #: Rounded up to the next bfloat16 (as Qwen's FP8 releases store them).
    BFLOAT16 = "bfloat16"


class ShardKind(Kind):
    """What a planned output shard is."""

    #: A new header and tensors.
    ASSEMBLED = "assembled"
    #: A source file re-emitted byte for byte.
    WHOLE_FILE = "whole_file"


class Severity(Kind):
    """How serious a finding about a checkpoint is."""

    #: Loaders fail or load the wrong data.
    ERROR = "error"
    #: Loads, but is not what a clean checkpoint looks like.
    WARNING = "warning"
