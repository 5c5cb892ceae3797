"""Device check of the matmul templates and the Cut Cross-Entropy kernels.

    python benchmarks/matmul_templates_check.py            # on a CUDA machine (~3-4 min)
    python benchmarks/matmul_templates_check.py --smoke    # tiny shapes, the CPU interpreter

What has only run under Triton's interpreter so far (tests/test_matmul_template.py,
tests/test_cce.py) is run once on the GPU:

1. a GELU MLP (forward + backward) with ``matmul_templates=True`` in float32
   and bf16 autocast: values and gradients against eager (float64 reference
   for float32); the templates formed, by half;
2. the same with ``matmul_templates=None``: the autotune's records (extern
   ms, each config's ms, the winner), then a second compile that must read
   them from the cache;
3. a language-model head (linear + cross-entropy, vocabulary 128x the width)
   with the CCE kernels forced, against eager; then the default choice's
   record (chunked against CCE);
4. batched products (bmm templates, the batch as grid dimension 1), forward
   and backward: ``gelu(bmm(x, y) * 0.5 + r)``, ``relu(baddbmm(r, x, y,
   alpha=0.125))`` and attention's heads merge ``(w @ v).transpose(1, 2)
   .reshape(...)`` (the transposed copy as the epilogue), forced in float32
   and bf16 autocast against float64 eager, then the default choice twice
   (the autotune's records, the second from the cache).

Prints one JSON object (and writes it to ``--out`` if given). No timing here
is a benchmark: the autotune's milliseconds are do_bench medians of one
shape, reported as the choice's evidence. Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch
import torch.nn.functional as F

import retrograd


def _stage(compiled, half: str, name: str) -> dict:
    return next(p["stats"] for p in compiled.reports[half]["passes"] if p["name"] == name)


def _error(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def _mlp(x, w1, b1, w2):
    return F.gelu(x @ w1.t() + b1) @ w2.t()


def _run_mlp(device, sizes, dtype, options) -> dict:
    torch.manual_seed(0)
    rows, width, hidden = sizes
    tensors = [torch.randn(rows, width), torch.randn(hidden, width) / width ** 0.5,
               torch.randn(hidden), torch.randn(width, hidden) / hidden ** 0.5]
    mine = [t.to(device).clone().requires_grad_() for t in tensors]
    wide = [t.double().to(device).requires_grad_() for t in tensors]
    compiled = retrograd.compile(_mlp, **options)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = compiled(*mine)
    out.float().square().sum().backward()
    ref = _mlp(*wide)
    ref.square().sum().backward()
    return {"dtype": str(dtype), "output_error": _error(out, ref),
            "grad_errors": [_error(a.grad, b.grad) for a, b in zip(mine, wide)],
            "templates": {half: _stage(compiled, half, "matmul_templates")["choices"]
                          for half in compiled.reports}}


def _bmm_epilogue(x, y, r):
    return F.gelu(torch.bmm(x, y) * 0.5 + r)


def _baddbmm(x, y, r):
    return torch.relu(torch.baddbmm(r, x, y, alpha=0.125))


def _heads_merge(w, v):
    batch, heads, tokens, width = v.shape
    return (w @ v).transpose(1, 2).reshape(batch, tokens, heads * width)


def _bmm_shapes(cuda: bool) -> dict:
    """Each case's function and input shapes: GPT-2-small-like attention on
    CUDA (4 x 12 heads, 512 tokens, 64 wide), tiny under the interpreter."""
    heads, tokens, width = (48, 512, 64) if cuda else (3, 5, 4)
    x, y, r = (heads, tokens, width), (heads, width, tokens), (heads, tokens, tokens)
    w, v = (heads // 3, 3, tokens, tokens), (heads // 3, 3, tokens, width)
    return {"bmm_epilogue": (_bmm_epilogue, (x, y, r)), "baddbmm": (_baddbmm, (x, y, r)),
            "heads_merge": (_heads_merge, (w, v))}


def _run_bmm(device, case, dtype, options) -> dict:
    """One case forward and backward against float64 eager, with its choices."""
    fn, shapes = case
    torch.manual_seed(0)
    tensors = [torch.randn(shape) for shape in shapes]
    mine = [t.to(device).clone().requires_grad_() for t in tensors]
    wide = [t.double().to(device).requires_grad_() for t in tensors]
    compiled = retrograd.compile(fn, **options)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = compiled(*mine)
    out.float().square().sum().backward()
    ref = fn(*wide)
    ref.square().sum().backward()
    return {"dtype": str(dtype), "output_error": _error(out, ref),
            "grad_errors": [_error(a.grad, b.grad) for a, b in zip(mine, wide)],
            "templates": {half: _stage(compiled, half, "matmul_templates")["choices"]
                          for half in compiled.reports}}


def _head(h, w, y):
    return F.cross_entropy(h @ w.t(), y, ignore_index=-100)


def _run_head(device, sizes, options) -> dict:
    torch.manual_seed(0)
    rows, width = sizes
    vocab = 128 * width
    h = torch.randn(rows, width, device=device, requires_grad=True)
    w = (torch.randn(vocab, width, device=device) / width ** 0.5).requires_grad_()
    y = torch.randint(0, vocab, (rows,), device=device)
    y[::7] = -100
    compiled = retrograd.compile(_head, **options)
    loss = compiled(h, w, y)
    loss.backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = _head(h64, w64, y)
    ref.backward()
    return {"loss_error": _error(loss, ref), "grad_errors": [_error(h.grad, h64.grad),
                                                             _error(w.grad, w64.grad)],
            "kernels": _stage(compiled, "forward", "linear_cross_entropy")["kernels"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; CPU interpreter")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("needs CUDA (or --smoke)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    os.environ.setdefault("RETROGRAD_CACHE_DIR", tempfile.mkdtemp(prefix="rg-mm-check-"))
    base = {} if cuda else {"executor": "interpret"}
    mlp_sizes, head_sizes = ((1024, 768, 3072), (2048, 256)) if cuda else ((6, 5, 7), (9, 4))
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu (interpreter)"}
    results["mlp_forced"] = [_run_mlp(device, mlp_sizes, dtype, {**base, "matmul_templates":
                                                                  True})
                             for dtype in (torch.float32, torch.bfloat16)]
    results["mlp_autotune"] = [_run_mlp(device, mlp_sizes, torch.bfloat16, base)
                               for _ in range(2)]   # the second must hit the cache
    results["head_cce"] = _run_head(device, head_sizes, {**base, "matmul_templates": True})
    results["head_default"] = _run_head(device, head_sizes, base)
    bmm_runs = []
    for name, case in _bmm_shapes(cuda).items():
        forced = [_run_bmm(device, case, dtype, {**base, "matmul_templates": True})
                  for dtype in (torch.float32, torch.bfloat16)]
        tuned = [_run_bmm(device, case, torch.bfloat16, base) for _ in range(2)]
        results[f"bmm_{name}"] = {"forced": forced, "autotune": tuned}
        bmm_runs += forced + tuned
        if not any(c["chosen"] == "template" for c in forced[0]["templates"]["forward"]):
            results.setdefault("failures_early", []).append(f"bmm {name}: no template formed")
    failures = results.pop("failures_early", [])
    for run in results["mlp_forced"] + results["mlp_autotune"] + bmm_runs:
        limit = 1e-4 if run["dtype"] == "torch.float32" else 3e-2
        if max([run["output_error"], *run["grad_errors"]]) > limit:
            failures.append(f"mlp/bmm {run['dtype']}: errors above {limit}")
    for name in ("head_cce", "head_default"):
        if max([results[name]["loss_error"], *results[name]["grad_errors"]]) > 1e-4:
            failures.append(f"{name}: errors above 1e-4")
    results["failures"] = failures
    text = json.dumps(results, indent=1, default=str)
    print(text)
    if args.out:
        with open(args.out, "w") as file:
            file.write(text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
