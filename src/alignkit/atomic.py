"""Atomic output: every file the product writes appears whole or not at all.

A file is written to `NAME.tmp-PID` beside it and renamed over NAME with `os.replace`, which POSIX makes
atomic within one file system: a command that fails or is killed mid-write leaves the previous NAME
intact (and at worst a stray `*.tmp-PID`). A directory (a checkpoint, a model) is written into a
temporary directory and renamed into place the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator


def temporary_name(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path to write PATH's new content to (with any writer: safetensors, savefig,
    yaml); on success it replaces PATH, on an exception it is removed and PATH is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        with open(tmp, "rb") as handle:  # on disk before the rename: a power cut leaves the old or the new file
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, payload, indent: int | None = 1) -> Path:
    return write_text(path, json.dumps(payload, indent=indent, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """One JSON object per line; the rows may be a generator (written as they come, renamed at the end)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return Path(path)


def replace_dir(new: Path, target: Path) -> None:
    """Put directory `new` at `target`. An existing target is first renamed aside and removed after, so at
    every instant either the old or the new directory is complete at `target` (or, for the instant
    between the two renames, at `target.old-PID`)."""
    old = target.with_name(f"{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path, tmp: str | Path | None = None) -> Iterator[Path]:
    """Yields an empty temporary directory to fill; on success it becomes PATH (replacing an old one), on
    an exception it is removed. `tmp` names it when several processes must agree on it."""
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed attempt
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def move_contents(source: Path, target: Path) -> None:
    """Move each file and folder of `source` into `target` (each rename atomic, replacing what is there),
    then remove `source`. Used to publish a model saved into a temporary folder inside `target`."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in sorted(source.iterdir()):
        if entry.is_dir():
            replace_dir(entry, target / entry.name)
        else:
            os.replace(entry, target / entry.name)
    shutil.rmtree(source, ignore_errors=True)
