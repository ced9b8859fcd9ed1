"""Writes that never leave a half-written file or folder behind: write to a temporary name, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from evomerge.errors import EvomergeError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so a reader (or a crash) sees the old file or the new, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def refuse_existing(out_dir: Path, *, overwrite: bool) -> None:
    """The check to run before any work: an existing output folder is kept unless told otherwise."""
    if out_dir.exists() and not overwrite:
        raise EvomergeError(
            f"output folder '{out_dir}' already exists",
            "choose a new folder, or pass --overwrite to replace it (it is replaced only once the new one is complete)",
        )


@contextlib.contextmanager
def atomic_folder(out_dir: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; it becomes ``out_dir`` only if the block completes.

    With ``overwrite`` the old folder is moved aside first and deleted only after the new one is in
    place, so an interruption at any point leaves either the old folder or the new one.
    """
    refuse_existing(out_dir, overwrite=overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".partial"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.old")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
