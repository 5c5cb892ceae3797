"""retrograd: a backward-pass compiler for PyTorch training.

Public names only; ``import retrograd.ir`` stays light because nothing heavy
is imported here until a name is used.

Example:
    >>> import torch, retrograd
    >>> model = retrograd.compile(torch.nn.Linear(8, 8))
    >>> model(torch.randn(4, 8)).sum().backward()
    >>> model.reports["backward"]["kernels"]
"""

from __future__ import annotations

__all__ = ["compile", "grad", "value_and_grad", "compile_step", "Options",
           "UnsupportedError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("compile", "grad", "value_and_grad"):
        from retrograd import api
        return getattr(api, name)
    if name == "compile_step":
        from retrograd.step import compile_step
        return compile_step
    if name == "UnsupportedError":
        from retrograd.errors import UnsupportedError
        return UnsupportedError
    if name == "Options":
        from retrograd.options import Options
        return Options
    raise AttributeError(f"module 'retrograd' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The lazy public names too (``dir(retrograd)``, tab completion), which
    ``__getattr__`` provides but the module's namespace does not yet hold."""
    return sorted((set(globals()) - {"annotations"}) | set(__all__))
