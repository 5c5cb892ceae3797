"""``retrograd env``: the versions and machine a bug report needs.

Printed as ``torch.utils.collect_env`` prints its own (``Name: value`` lines),
so the two can be pasted together. Nothing here compiles or imports the
compiler: it must work where compiling does not.

Example:
    >>> from retrograd.environment import describe
    >>> print(describe())            # doctest: +SKIP
    retrograd version: 0.1.0 (git 1a2b3c4d5e6f, local changes)
    PyTorch version: 2.13.0+cpu
    ...
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

__all__ = ["describe", "fields", "git_commit"]


def git_commit(folder: Path) -> str | None:
    """``HEAD``'s hash (``+ local changes`` when the tree differs) of the git
    checkout holding ``folder``; None outside one or without git."""
    def git(*arguments: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(folder), *arguments], capture_output=True,
                                  text=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--short=12", "HEAD")
    if not commit:
        return None
    changed = git("status", "--porcelain", "--untracked-files=no")
    return f"git {commit}, local changes" if changed else f"git {commit}"


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical CPUs"


def _gpus(torch) -> str:
    if not torch.cuda.is_available():
        return "none visible"
    return "; ".join(f"{index}: {torch.cuda.get_device_name(index)}"
                     for index in range(torch.cuda.device_count()))


def fields() -> list[tuple[str, str]]:
    """(name, value) pairs: retrograd, torch, triton, Python, OS, CPU, GPU, CUDA."""
    import retrograd
    import torch
    where = Path(retrograd.__file__).resolve().parent
    # only retrograd's own checkout (compiler/ sits at its root), never a git
    # repository that happens to hold an installed copy
    commit = git_commit(where.parent) if (where.parent / ".git").exists() else None
    return [
        ("retrograd version", retrograd.__version__ + (f" ({commit})" if commit else "")),
        ("retrograd location", str(where)),
        ("PyTorch version", torch.__version__),
        ("Triton version", _version("triton")),
        ("transformers version", _version("transformers")),
        ("Python version",
         f"{sys.version.split()[0]} ({sys.maxsize.bit_length() + 1}-bit runtime)"),
        ("Python platform", platform.platform()),
        ("OS", f"{platform.system()} {platform.release()}"),
        ("CPU", _cpu()),
        ("Is CUDA available", str(torch.cuda.is_available())),
        ("CUDA used to build PyTorch", str(torch.version.cuda)),
        ("GPU models", _gpus(torch)),
        ("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "unset")),
    ]


def describe() -> str:
    """The report as ``Name: value`` lines, as ``torch.utils.collect_env`` prints."""
    return "\n".join(f"{name}: {value}" for name, value in fields())
