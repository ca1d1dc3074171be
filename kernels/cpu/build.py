"""Builds the CPU kernels in this folder (plain C with OpenMP) into a shared library on first use, and loads it.

No torch headers: a C compiler builds each in about a second, so the engine can build them at start-up where it
runs (-march=native: the library fits the machine's vector units) and keep them in the user's cache, keyed by the
source, the flags and the CPU. Without a compiler there is no library, and the engine keeps the PyTorch
reference (kernels/reference.py)."""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

logger = logging.getLogger("tokmodel.kernels")
SOURCE_DIR = Path(__file__).resolve().parent
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-strict-aliasing", "-fno-trapping-math", "-fno-math-errno",
         "-shared", "-fPIC", "-std=c11")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"  # empty counts as unset, as XDG says
    return Path(base) / "tokmodel" / "cpu-kernels"


@cache
def load(name: str) -> ctypes.CDLL | None:
    """The library built from <name>.c, or None (logged once) when no C compiler can build it here."""
    compiler = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or shutil.which("gcc")]  # "ccache gcc"
    if compiler[0] is None:
        logger.warning("no C compiler found (cc, gcc or $CC): the CPU uses the PyTorch reference ops")
        return None
    source = SOURCE_DIR / f"{name}.c"
    headers = b"".join(path.read_bytes() for path in sorted(SOURCE_DIR.glob("*.h")))
    key = hashlib.sha256(source.read_bytes() + headers + " ".join((*compiler, *FLAGS)).encode() + _cpu_id().encode())
    library = cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
    try:
        if not library.exists():
            _compile(compiler, source, library)
        return ctypes.CDLL(str(library))
    # A failed or timed-out build, or a library the OS will not load (a noexec cache, another user's file).
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or error
        logger.warning("building or loading %s failed, the CPU uses the PyTorch reference: %s", source.name, detail)
        return None


def _compile(compiler: list[str], source: Path, library: Path) -> None:
    library.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name, then renamed: processes building at once never load a half-written file.
    with tempfile.NamedTemporaryFile(dir=library.parent, suffix=".so", delete=False) as partial:
        pass
    try:
        subprocess.run([*compiler, *FLAGS, str(source), "-o", partial.name, "-lm"], check=True, capture_output=True,
                       text=True, timeout=120)
        os.replace(partial.name, library)
    finally:
        Path(partial.name).unlink(missing_ok=True)


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        return next((line for line in info.splitlines() if line.startswith("flags")), info[:4096])
    except OSError:
        return platform.processor() or platform.machine()
