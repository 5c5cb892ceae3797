"""Kernel families on CUDA: retrograd's generated kernels against eager PyTorch
and torch.compile's default, on the same inputs, in one run.

For each family (a pointwise chain, softmax, layer norm and cross-entropy,
forward and backward) it times the whole compiled call with
``triton.testing.do_bench`` (median) and reports achieved bandwidth: the
least bytes the op must move (inputs read once, outputs written once) over
the time, next to the card's measured copy bandwidth. Needs CUDA; on a
CPU-only machine it says so and exits.

    python benchmarks/kernels.py --out kernels.json
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

import torch
import torch.nn.functional as F


def families(device: str, scale: int):
    """(name, function, inputs, bytes moved forward, bytes moved backward)."""
    rows, width, vocab = 2048 * scale, 4096, 32768
    x = torch.randn(rows, width, device=device)
    y = torch.randn(rows, width, device=device)
    weight = torch.randn(width, device=device)
    bias = torch.randn(width, device=device)
    logits = torch.randn(rows, vocab, device=device)
    targets = torch.randint(0, vocab, (rows,), device=device)
    size = x.numel() * 4
    return [
        ("pointwise chain (x * sigmoid(x) + y) * 0.5",
         lambda a, b: (a * torch.sigmoid(a) + b) * 0.5,
         (x, y), 3 * size, 4 * size),
        ("softmax", lambda a: torch.softmax(a, dim=-1), (x,), 2 * size, 3 * size),
        ("layer_norm", lambda a, w, b: F.layer_norm(a, (width,), w, b), (x, weight, bias),
         2 * size, 3 * size),
        ("cross_entropy", lambda a, t: F.cross_entropy(a, t), (logits, targets),
         logits.numel() * 4, 2 * logits.numel() * 4),
    ]


def copy_bandwidth(device: str) -> float:
    from triton.testing import do_bench
    source = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    ms = do_bench(lambda: target.copy_(source), return_mode="median")
    return 2 * source.numel() / ms / 1e6   # GB/s, bytes read plus bytes written


def time_family(function, inputs, compiler) -> tuple[float, float]:
    """Median milliseconds of forward, and of backward (grad of every float input)."""
    from triton.testing import do_bench
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    compiled = compiler(function)
    out = compiled(*leaves)
    forward = do_bench(lambda: compiler_call(compiled, leaves), return_mode="median")
    wanted = [t for t in leaves if t.requires_grad]
    upstream = torch.randn_like(out)

    def backward():
        return torch.autograd.grad(out, wanted, upstream, retain_graph=True)

    backward()
    return forward, do_bench(backward, return_mode="median")


def compiler_call(compiled, leaves):
    with torch.no_grad():
        return compiled(*leaves)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=4, help="rows = 2048 * scale")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs CUDA; nothing to measure on this machine")
        return 0
    import retrograd
    from retrograd.backend import register
    register()
    device = "cuda"
    bandwidth = copy_bandwidth(device)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "copy_GBps": bandwidth, "families": []}
    compilers = {"eager": lambda f: f,
                 "torch.compile": lambda f: torch.compile(f),
                 "retrograd": lambda f: retrograd.compile(f)}
    for name, function, inputs, forward_bytes, backward_bytes in families(device, args.scale):
        row = {"family": name}
        for label, compiler in compilers.items():
            torch._dynamo.reset()
            try:
                forward, backward = time_family(function, inputs, compiler)
                row[label] = {"forward_ms": forward, "backward_ms": backward,
                              "forward_GBps": forward_bytes / forward / 1e6,
                              "backward_GBps": backward_bytes / backward / 1e6}
            except Exception:
                row[label] = {"error": traceback.format_exc()[-2000:]}
        results["families"].append(row)
        print(json.dumps(row)[:1500], flush=True)
    if args.out:
        with open(args.out, "w") as file:
            json.dump(results, file, indent=2)
    print(f"\n{results['device']}: copy bandwidth {bandwidth:.0f} GB/s")
    print(f"{'family':44s} {'variant':14s} {'fwd ms':>8s} {'fwd GB/s':>9s} {'bwd ms':>8s} "
          f"{'bwd GB/s':>9s}")
    for row in results["families"]:
        for label in compilers:
            cell = row[label]
            if "error" in cell:
                print(f"{row['family']:44s} {label:14s} failed: {cell['error'].splitlines()[-1]}")
                continue
            print(f"{row['family']:44s} {label:14s} {cell['forward_ms']:8.3f} "
                  f"{cell['forward_GBps']:9.0f} {cell['backward_ms']:8.3f} "
                  f"{cell['backward_GBps']:9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
