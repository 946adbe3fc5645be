"""Which implementation of an op runs: PyTorch, our Triton kernels, or flash-linear-attention's.

Every path computes the same function (the tests compare them), so the choice is about speed only:

- CUDA tensors: ``fla`` for chunkwise retention when it is installed, else our Triton kernels when Triton
  is installed, else PyTorch (plain-Mamba layers whose states nobody reads keep ``mamba_ssm``'s fused kernel
  when it is installed: :mod:`densessm.ops.scan.kernels`);
- other devices: PyTorch (Triton needs a GPU, or its interpreter).

``DENSESSM_KERNELS=torch|triton|fla`` forces a path, for debugging and for tests (``auto`` or unset: the
choice above). Forcing ``triton`` on CPU tensors runs the kernels through Triton's interpreter, which has to be
switched on before the kernels are first used (``TRITON_INTERPRET=1`` in the environment: it is read when they
load); that is how the CPU tests reach the kernels through the models. ``fla`` covers only chunkwise retention;
the other ops then take their automatic path. Ops without a kernel of the forced kind (parallel retention)
keep PyTorch. Each choice is logged once (logger ``densessm.kernels``). Inside ``torch.compile`` the PyTorch
form is traced whatever the setting: the compiler generates its own fused kernels from it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
from types import ModuleType

import torch

from densessm.errors import UsageError

ENV = "DENSESSM_KERNELS"
PATHS = ("torch", "triton", "fla")

logger = logging.getLogger("densessm.kernels")


def forced_path() -> str | None:
    """The path ``DENSESSM_KERNELS`` forces, or None for the automatic choice (unset, empty or ``auto``)."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in PATHS:
        raise UsageError(f"{ENV}={os.environ[ENV]!r} is not a kernel path: use one of auto, {', '.join(PATHS)}")
    return value


TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
"""Triton is installed (the ``gpu`` extra), found without importing it."""


def interpreter_on() -> bool:
    """Triton's interpreter is requested for this process (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


@functools.cache
def _log_once(op: str, path: str, device: str) -> None:
    logger.info("%s runs on the %s path (%s tensors)", op, path, device)


def kernel_path(op: str, x: torch.Tensor, fla: bool | None = None, triton: bool = True) -> str:
    """The path ``op`` takes for tensors like ``x``: ``"torch"``, ``"triton"`` or ``"fla"``.

    ``fla`` says whether flash-linear-attention can run this call (None: it has no kernel for this op),
    ``triton`` whether our kernel covers it (e.g. not when a gradient is asked of a constant the kernel does not
    differentiate). A forced path that cannot run this call is a :class:`UsageError` naming why, never a silent
    fallback to another path.
    """
    if torch.compiler.is_compiling():  # the compiler makes its own kernels of the PyTorch form
        return "torch"
    forced = forced_path()
    if forced is None or (forced == "fla" and fla is None):  # fla has no kernel for this op: the automatic path
        path = _auto(x, bool(fla), triton)
    elif forced == "fla":
        if not fla:
            raise UsageError(
                f"{ENV}=fla: flash-linear-attention cannot run {op} here (it needs CUDA tensors and "
                "pip install flash-linear-attention)"
            )
        path = "fla"
    elif forced == "triton":
        _require_triton(op, x, triton)
        path = "triton"
    else:
        path = "torch"
    _log_once(op, path, x.device.type)
    return path


def load_kernels(op: str) -> ModuleType:
    """The Triton module of an op (``"retention"``, ``"scan"``), imported on first use: Triton is optional, and
    loading the kernels fixes for the whole process whether they run on the GPU or through the interpreter."""
    return importlib.import_module(f"densessm.ops.{op}.triton")


def _auto(x: torch.Tensor, fla: bool, triton: bool) -> str:
    if not x.is_cuda:
        return "torch"
    if fla:
        return "fla"
    return "triton" if triton and TRITON_INSTALLED else "torch"


def _require_triton(op: str, x: torch.Tensor, covered: bool) -> None:
    if not TRITON_INSTALLED:
        raise UsageError(f"{ENV}=triton: Triton is not installed (pip install 'densessm[gpu]')")
    if not (x.is_cuda or (x.device.type == "cpu" and interpreter_on())):
        raise UsageError(
            f"{ENV}=triton on {x.device.type} tensors needs a CUDA GPU or Triton's interpreter (set "
            "TRITON_INTERPRET=1 before starting Python)"
        )
    if not covered:
        raise UsageError(f"{ENV}=triton: the Triton kernel of {op} does not cover this call (see the op's docs)")


__all__ = ["ENV", "PATHS", "TRITON_INSTALLED", "forced_path", "interpreter_on", "kernel_path", "load_kernels"]
