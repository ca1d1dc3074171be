"""The installed package's version, which /version and `tokmodel --version` report."""
from __future__ import annotations

from importlib import metadata


def package_version() -> str:
    try:
        return metadata.version("tokmodel")
    except metadata.PackageNotFoundError:  # running from a checkout that was never installed
        return "dev"
