"""Output folders and atomic file writes shared by the command-line tools.

Never overwrite a user's results silently: a folder that already holds results is refused unless the caller
passes ``overwrite=True``. Files are written to a temporary name in the same folder and renamed into place,
so a crash never leaves a half-written PNG, JSON or archive behind.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import OutputExistsError, W2SDError


def new_run_dir(parent: str | os.PathLike, prefix: str = "run") -> Path:
    """Create and return a fresh, uniquely named folder ``parent/prefix_YYYYmmdd-HHMMSS[_n]``."""
    parent = Path(parent)
    _ensure_writable_dir(parent)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        path = parent / (f"{prefix}_{stamp}" + (f"_{n}" if n else ""))
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise OutputExistsError(f"could not create a new run folder under {parent}")


def prepare_output_dir(path: str | os.PathLike, result_names: Iterable[str], overwrite: bool = False) -> Path:
    """Make sure ``path`` is a writable folder that would not lose existing results.

    Raises :class:`OutputExistsError` naming the files if any of ``result_names`` already exists there and
    ``overwrite`` is false.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise W2SDError(f"output path {path} exists and is not a folder")
    _ensure_writable_dir(path)
    existing = sorted(name for name in result_names if (path / name).exists())
    if existing and not overwrite:
        shown = ", ".join(existing[:5]) + (f" (+{len(existing) - 5} more)" if len(existing) > 5 else "")
        raise OutputExistsError(f"output folder {path} already holds results ({shown}); pass --overwrite to replace them")
    return path


def _ensure_writable_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise W2SDError(f"cannot create output folder {path}: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise W2SDError(f"output folder {path} is not writable")


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], Any]) -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it onto ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    data = (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


def atomic_save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically."""
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight"))
