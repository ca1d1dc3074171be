"""The on-disk cache: where it lives, and how a directory or file enters it atomically."""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path


def cache_root() -> Path:
    """$TOKMODEL_CACHE, else $XDG_CACHE_HOME/tokmodel, else ~/.cache/tokmodel."""
    if os.environ.get("TOKMODEL_CACHE"):
        return Path(os.environ["TOKMODEL_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "tokmodel"


@contextlib.contextmanager
def atomic_path(final: Path, is_dir: bool) -> Iterator[Path]:
    """Yield a scratch path beside `final`; rename it onto `final` only if the block succeeds.

    A reader therefore sees either nothing or a complete entry: a killed writer leaves only a
    scratch path, which the next writer of the same entry sweeps away.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    _sweep_dead_scratch(final)
    # Not tempfile's mkdtemp/mkstemp: their 0700/0600 modes would stick to the cache entry.
    scratch = final.parent / f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}"
    if is_dir:
        scratch.mkdir()
    try:
        yield scratch
        try:
            os.rename(scratch, final)
        except OSError:
            # Another process finished the same entry first; its copy is as good as ours.
            if not final.exists():
                raise
    finally:
        _remove(scratch)


def _sweep_dead_scratch(final: Path) -> None:
    for scratch in final.parent.glob(f".{final.name}.*"):
        pid = scratch.name[len(final.name) + 2:].split(".")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            _remove(scratch)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
