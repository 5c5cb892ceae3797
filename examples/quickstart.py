"""Train a small transformer for a few steps with retrograd as torch.compile's backend.

Run it with ``python examples/quickstart.py``. On a GPU the fused kernels run
as compiled Triton; on a machine without one, the CPU default writes the same
program out as straight-line torch calls (the torch program; ``--executor
interpret`` runs the generated Triton kernels in Triton's interpreter
instead). It prints the loss going down, how many fused kernels one training
step runs and how, and where the pass-by-pass dump landed (open its index.html).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    """A pre-norm transformer block: causal self-attention, then a GELU MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=-1)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attention.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """Token and position embeddings, two blocks, a language-model head."""

    def __init__(self, vocab: int = 64, width: int = 32, heads: int = 2, length: int = 16):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, width), nn.Embedding(length, width)
        self.blocks = nn.Sequential(Block(width, heads), Block(width, heads))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.tokens(ids) + self.positions(positions)
        return self.head(self.norm(self.blocks(x)))


#: How each executor (the report's codegen stats) runs a fused kernel.
HOW = {"triton": "compiled Triton", "interpret": "Triton kernels in Triton's interpreter",
       "torch": "written out as torch calls, the CPU default", "fx": "fx nodes one by one"}


def _codegen(report: dict) -> dict:
    return next(p["stats"] for p in report["passes"] if p["name"] == "codegen")


def _counted(ops: dict) -> str:
    """``{"aten.gelu.default": 2}`` as ``gelu x2``."""
    return ", ".join(f"{op.removeprefix('aten.').removesuffix('.default')} x{count}"
                     for op, count in ops.items())


def describe(report: dict) -> str:
    """One graph's kernels in a line: how many fused kernels, how many of the
    pointwise ops they took (the CPU default keeps GELU and layer norm's
    backward whole, as single torch calls), and the extern calls."""
    kernels = report["kernels"]
    fused, pointwise = kernels["pointwise_ops_in_triton"], kernels["pointwise_ops"]
    whole = kernels.get("pointwise_ops_extern", {})
    taken = (f"all {pointwise} pointwise ones" if fused == pointwise else
             f"{fused} of the {pointwise} pointwise ones (the other {pointwise - fused} run "
             f"whole as extern calls: {_counted(whole)})")
    return (f"{report['graph_id']}: {kernels['triton']} fused kernels cover "
            f"{kernels['ops_in_triton']} aten ops, {taken}; {kernels['extern']} extern calls "
            f"in all: {_counted(kernels['extern_ops'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--dump", default=None, help="dump folder (default: a temporary one)")
    parser.add_argument("--executor", default="auto", choices=["auto", *HOW],
                        help="how the program runs (default: Triton on CUDA, torch calls on CPU)")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dump = Path(args.dump or tempfile.mkdtemp(prefix="retrograd-quickstart-"))

    model = TinyLM().to(device)
    compiled = torch.compile(model, backend="retrograd", options={"dump_dir": str(dump),
                                                                "executor": args.executor})
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 64, (4, 16), device=device)   # one batch, learned by heart

    for step in range(args.steps):
        logits = compiled(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step}: loss {loss.item():.4f}")

    reports = [json.loads(path.read_text()) for path in sorted(dump.glob("*/report.json"))]
    for report in reports:
        print(describe(report))
    per_step = sum(report["kernels"]["triton"] for report in reports)
    ran = {_codegen(report)["executor"] for report in reports}
    print(f"one training step runs {per_step} fused kernels ({', '.join(map(HOW.get, ran))})")
    print(f"dump: {dump} (open */index.html)")


if __name__ == "__main__":
    main()
