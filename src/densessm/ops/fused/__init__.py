"""Fused CPU decode steps, compiled at first use: each layer's state read once and written once per token.

``step.cpp`` holds the kernels (retention; DenseMamba's conv window and selective scan with the shallow
read-outs). :func:`fused_ops` builds them with ``torch.utils.cpp_extension`` (g++/OpenMP, ninja) into a user
cache folder the first time, and later loads that build in well under a second. The build is keyed by the
source, the torch version, the flags and this CPU, since it is compiled for the CPU it runs on. Without a
compiler, or when the build fails, it returns None after a one-line notice (logged once per process), and
the callers keep the pure-PyTorch step, which stays the tested reference.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from torch.utils import cpp_extension

SOURCE = Path(__file__).with_name("step.cpp")
NAMESPACE = "densessm_fused"
BUILD_LOCK = "densessm-build.lock"
logger = logging.getLogger(__name__)


def _flags() -> list[str]:
    tuned = ["-march=native"] if platform.machine() in ("x86_64", "AMD64") else ["-mcpu=native"]
    return ["-O3", "-fopenmp", "-fno-trapping-math", *tuned]


def build_root() -> Path:
    """Where builds live: ``$DENSESSM_EXTENSIONS_DIR``, else ``$XDG_CACHE_HOME/densessm/extensions`` (default
    ``~/.cache``)."""
    explicit = os.environ.get("DENSESSM_EXTENSIONS_DIR")
    if explicit:
        return Path(explicit).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "densessm" / "extensions"


def _cpu_signature() -> str:
    """The CPU the build is tuned for (``-march=native``): its model and feature flags where Linux tells them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(dict.fromkeys(line for line in lines if line.split(":")[0].strip() in wanted))


def extension_name() -> str:
    """The build's name: a digest of everything that makes it this build."""
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__, " ".join(_flags()), _cpu_signature()):
        digest.update(part if isinstance(part, bytes) else part.encode())
    return f"{NAMESPACE}_{digest.hexdigest()[:16]}"


def compiler() -> str | None:
    """The C++ compiler torch's build would run (``$CXX``, default ``c++``), or None if there is none."""
    return shutil.which(os.environ.get("CXX", "c++"))


def _find_ninja() -> bool:
    """Whether torch's build finds ``ninja`` on the PATH; the ``ninja`` package's binary (a dependency) is put
    there when the environment's scripts folder is not (a virtual environment run without activating it)."""
    if shutil.which("ninja"):
        return True
    try:
        import ninja  # the PyPI package: its binary lives in ninja.BIN_DIR
    except ImportError:
        return False
    os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
    return shutil.which("ninja") is not None


_LOADED: set[str] = set()
"""Build folders whose library this process loaded: a second load would register its ops twice, which aborts."""


@functools.cache
def fused_ops() -> Any | None:
    """``torch.ops.densessm_fused`` (built on first use, loaded from the cache after), or None with a notice."""
    if compiler() is None:
        return _unavailable(f"no C++ compiler found ({os.environ.get('CXX', 'c++')})")
    if not _find_ninja():
        return _unavailable("ninja is not installed (pip install ninja)")
    name = extension_name()
    folder = build_root() / name
    if str(folder) in _LOADED:  # the memo above was cleared (tests do), the library stays loaded
        return getattr(torch.ops, NAMESPACE)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # torch's own guard is a file ("lock") that a killed process leaves behind, after which every later
        # load waits on it forever; a lock the OS releases with its holder serialises the loads instead, so a
        # "lock" found while holding it is stale
        lock = FileLock(folder / BUILD_LOCK)
        try:
            lock.acquire(timeout=0)
        except Timeout:  # said, not a silent wait of up to a minute
            logger.warning("waiting for another process that is building the fused CPU decode step in %s", folder)
            lock.acquire()
        try:
            (folder / "lock").unlink(missing_ok=True)
            if not (folder / f"{name}.so").exists():
                logger.info("building the fused CPU decode step in %s (first use only, under a minute)", folder)
            cpp_extension.load(
                name,
                [str(SOURCE)],
                extra_cflags=_flags(),
                extra_ldflags=["-fopenmp"],
                build_directory=str(folder),
                is_python_module=False,
                verbose=False,
            )
        finally:
            lock.release()
    except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as error:
        reason = str(error).strip().splitlines()[0].rstrip(".") if str(error).strip() else type(error).__name__
        return _unavailable(f"its build failed: {reason}")
    _LOADED.add(str(folder))
    return getattr(torch.ops, NAMESPACE)


def _unavailable(reason: str) -> None:
    logger.warning("fused CPU decode step unavailable, %s; decoding keeps the PyTorch step", reason)
    return None


__all__ = ["build_root", "compiler", "extension_name", "fused_ops"]
