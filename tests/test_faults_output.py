"""Symlinks around aux files and the output: a copy never reads through a link out of the source, never
widens a file's permissions, and never writes through a link in the output. Each test keeps a file
outside the trees it names, which must come out untouched."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from builders import snapshot
from normalize_core import repack

#: What a run must never copy or change: a directory and a private file outside every tree it is given.
SECRET = "not for the output\n"


def outside_tree(root: Path) -> tuple[Path, Path]:
    """``root/outside/`` holding ``data.txt`` and a 0600 ``secret``; returns (folder, secret)."""
    folder = root / "outside"
    folder.mkdir()
    (folder / "data.txt").write_text("outside data\n")
    secret = folder / "secret"
    secret.write_text(SECRET)
    secret.chmod(0o600)
    return folder, secret


def test_aux_symlinks_out_of_the_source_are_skipped_and_reported(engine_checkpoint: Path, tmp_path: Path):
    """Item 7.9: ``assets -> /usr`` used to copy /usr; a link to a private file made a 0644 copy of it."""
    folder, secret = outside_tree(tmp_path)
    before = snapshot(folder)
    (engine_checkpoint / "assets").symlink_to(folder)
    (engine_checkpoint / "special_tokens.json").symlink_to(secret)
    (engine_checkpoint / "stale.json").symlink_to(tmp_path / "gone.json")
    output = tmp_path / "out"

    result = repack(engine_checkpoint, output)

    assert result.skipped_aux == [
        ("assets", f"symlink to {folder.resolve()}, outside the source directory"),
        ("special_tokens.json", f"symlink to {secret.resolve()}, outside the source directory"),
        ("stale.json", "dangling symlink"),
    ]
    assert result.aux_files == ["config.json", "generation_config.json", "tokenizer_config.json"]
    for name in ("assets", "special_tokens.json", "stale.json"):
        assert not os.path.lexists(output / name)
    assert SECRET not in "".join(p.read_text() for p in output.iterdir() if p.suffix == ".json")
    assert snapshot(folder) == before


def test_aux_symlinks_inside_the_source_stay_symlinks(engine_checkpoint: Path, tmp_path: Path):
    """Item 7.9: a link that resolves inside the source is copied as a (relative) link."""
    (engine_checkpoint / "assets").mkdir()
    (engine_checkpoint / "assets" / "vocab.txt").write_text("a\nb\n")
    (engine_checkpoint / "vocab.txt").symlink_to(engine_checkpoint / "assets" / "vocab.txt")
    (engine_checkpoint / "assets" / "config.json").symlink_to("../config.json")
    output = tmp_path / "out"

    result = repack(engine_checkpoint, output)

    assert result.skipped_aux == []
    assert "vocab.txt" in result.aux_files
    assert os.readlink(output / "vocab.txt") == "assets/vocab.txt"
    assert os.readlink(output / "assets" / "config.json") == "../config.json"
    assert (output / "vocab.txt").read_text() == "a\nb\n"
    assert (output / "assets" / "config.json").read_text() == (output / "config.json").read_text()


def test_copies_keep_the_source_files_permissions(engine_checkpoint: Path, tmp_path: Path):
    """Item 7.9: a 0600 file used to come out 0644 (the umask default)."""
    (engine_checkpoint / "private_notes.txt").write_text("private\n")
    (engine_checkpoint / "private_notes.txt").chmod(0o600)
    (engine_checkpoint / "run.sh").write_text("#!/bin/sh\n")
    (engine_checkpoint / "run.sh").chmod(0o750)
    output = tmp_path / "out"

    repack(engine_checkpoint, output)

    assert stat.S_IMODE((output / "private_notes.txt").stat().st_mode) == 0o600
    assert stat.S_IMODE((output / "run.sh").stat().st_mode) == 0o750


def test_overwrite_replaces_output_symlinks_instead_of_writing_through_them(engine_checkpoint: Path, tmp_path: Path):
    """Item 7.10: a symlinked sub-directory (and file) in the output used to be written through."""
    folder, secret = outside_tree(tmp_path)
    before = snapshot(folder)
    (engine_checkpoint / "tokenizer").mkdir()
    (engine_checkpoint / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    output = tmp_path / "out"
    output.mkdir()
    (output / "tokenizer").symlink_to(folder)
    (output / "config.json").symlink_to(secret)

    repack(engine_checkpoint, output, overwrite=True)

    assert snapshot(folder) == before
    assert not (output / "tokenizer").is_symlink()
    assert (output / "tokenizer" / "vocab.txt").read_text() == "a\nb\n"
    assert not (output / "config.json").is_symlink()
    assert (output / "config.json").read_text() == (engine_checkpoint / "config.json").read_text()
