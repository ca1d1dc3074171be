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
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tokmodel" / "cpu-kernels"


@cache
def load(name: str) -> ctypes.CDLL | None:
    """The library built from <name>.c, or None (logged once) when no C compiler can build it here."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.warning("no C compiler found (cc, gcc or $CC): the CPU uses the PyTorch reference attention")
        return None
    source = SOURCE_DIR / f"{name}.c"
    headers = b"".join(path.read_bytes() for path in sorted(SOURCE_DIR.glob("*.h")))
    key = hashlib.sha256(source.read_bytes() + headers + " ".join((compiler, *FLAGS)).encode() + _cpu_id().encode())
    library = cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
    if not library.exists():
        try:
            _compile(compiler, source, library)
        except (OSError, subprocess.CalledProcessError) as error:
            detail = getattr(error, "stderr", "") or error
            logger.warning("building %s failed, the CPU uses the PyTorch reference: %s", source.name, detail)
            return None
    return ctypes.CDLL(str(library))


def _compile(compiler: str, source: Path, library: Path) -> None:
    library.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name, then renamed: processes building at once never load a half-written file.
    with tempfile.NamedTemporaryFile(dir=library.parent, suffix=".so", delete=False) as partial:
        pass
    try:
        subprocess.run([compiler, *FLAGS, str(source), "-o", partial.name, "-lm"], check=True, capture_output=True,
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
