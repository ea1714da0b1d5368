"""Where cloudkvm keeps what it can rebuild: downloaded packages, built guests, decompressed kernels."""
import os
from pathlib import Path


def cache_dir() -> Path:
    """$CLOUDKVM_CACHE, else $XDG_CACHE_HOME/cloudkvm, else ~/.cache/cloudkvm."""
    if os.environ.get("CLOUDKVM_CACHE"):
        return Path(os.environ["CLOUDKVM_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "cloudkvm"
    return Path.home() / ".cache" / "cloudkvm"
