"""Where generated kernels run: compiled Triton on CUDA, or Triton's interpreter.

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated, not when it is
imported (../shared/TRITON_ON_CPU.md), so the loader sets it around loading
a kernel module, through ``interpreter_mode``; a user never sets it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Sequence

import torch

__all__ = ["choose_executor", "interpreter_mode", "device_of"]


def device_of(tensors: Sequence[object]) -> torch.device:
    """The device of the first tensor argument (CPU when there is none)."""
    for value in tensors:
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


def choose_executor(requested: str, device: torch.device) -> str:
    """Resolve ``"auto"`` and refuse combinations that cannot work."""
    if requested == "auto":
        return "triton" if device.type == "cuda" else "interpret"
    if requested == "triton" and device.type != "cuda":
        raise ValueError(
            f"retrograd: executor='triton' needs CUDA tensors, got tensors on {device}; "
            f"use executor='interpret' (or 'auto') to run the kernels on the CPU")
    if requested == "interpret" and device.type != "cpu":
        raise ValueError(
            f"retrograd: executor='interpret' runs on CPU tensors, got tensors on {device}")
    return requested


@contextlib.contextmanager
def interpreter_mode(enabled: bool) -> Iterator[None]:
    """Set TRITON_INTERPRET while kernels are being decorated."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if enabled else "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous
