"""One training step (forward, backward, optimizer) of a GPT-2-like model under
eager PyTorch, torch.compile's default backend, retrograd's torch.compile
backend and ``retrograd.compile_step`` (the whole step as one program), in
one run.

Reports the median step time and the peak of ``torch.cuda.max_memory_allocated``
for each, as ratios against eager, plus a gradient check of retrograd's
compiled CUDA kernels against eager on a tiny GPT-2. Needs CUDA; on a CPU-only
machine it says so and exits (``--smoke`` runs a tiny configuration anywhere,
to check the script itself).

    python benchmarks/step.py --out results.json          # GPT-2 small: 12 layers, 768 wide
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import traceback

import torch


def gpt2(layers: int, width: int, heads: int, length: int, vocab: int, attention: str):
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, n_positions=length,
                        vocab_size=vocab, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0)
    config._attn_implementation = attention
    return GPT2LMHeadModel(config)


def gradient_check(device: str) -> dict:
    """retrograd's kernels on ``device`` against eager, fp32, tiny GPT-2."""
    from retrograd.numerics import relative_error     # the measure verify and the tests use
    torch.manual_seed(0)
    model = gpt2(2, 64, 4, 32, 128, "eager").to(device)
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 128, (2, 32), device=device)
    compiled = torch.compile(model, backend="retrograd")
    compiled(ids, labels=ids).loss.backward()
    reference(ids, labels=ids).loss.backward()
    errors = [relative_error(p.grad, r.grad) for p, r in
              zip(model.parameters(), reference.parameters())]
    return {"max_relative_grad_error": max(errors), "parameters": len(errors)}


def measure(name: str, model, step_model, ids, steps: int, warmup: int, autocast) -> dict:
    """Median time of ``steps`` training steps after ``warmup`` (compile included there).

    ``step_model`` is a wrapped model, or ``"compile_step"``: the whole step,
    AdamW included, compiled by ``retrograd.compile_step`` as one program.
    """
    if step_model == "compile_step":
        import retrograd
        compiled = retrograd.compile_step(
            model, lambda m, ids: m(ids, labels=ids).loss,
            torch.optim.AdamW(model.parameters(), lr=1e-4))

        def step():
            with autocast():
                return compiled(ids)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=ids.is_cuda)

        def step():
            with autocast():
                loss = step_model(ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

    start = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronize(ids)
    warm_seconds = time.perf_counter() - start
    if ids.is_cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        synchronize(ids)
        begin = time.perf_counter()
        loss = step()
        synchronize(ids)
        times.append(time.perf_counter() - begin)
    peak = torch.cuda.max_memory_allocated() if ids.is_cuda else None
    return {"name": name, "median_ms": 1e3 * statistics.median(times), "peak_bytes": peak,
            "warmup_seconds": warm_seconds, "loss": loss.item()}


def synchronize(ids):
    if ids.is_cuda:
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=None, help="write results as JSON here")
    parser.add_argument("--smoke", action="store_true", help="tiny configuration, any device")
    args = parser.parse_args()
    if args.smoke:
        args.layers, args.width, args.heads, args.length, args.vocab = 1, 32, 2, 16, 64
        args.batch, args.steps, args.warmup = 2, 2, 1
    elif not torch.cuda.is_available():
        print("benchmarks/step.py needs CUDA (use --smoke to check the script on CPU)")
        return 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from retrograd.backend import register
    register()   # the entry point does this once installed; harmless twice
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "torch": torch.__version__, "config": vars(args), "runs": []}
    try:
        import triton
        results["triton"] = triton.__version__
    except ImportError:
        pass

    def save():
        if args.out:
            with open(args.out, "w") as file:
                json.dump(results, file, indent=2)

    try:
        results["gradient_check"] = gradient_check(device)
    except Exception:
        results["gradient_check"] = {"error": traceback.format_exc()[-3000:]}
    print("gradient check:", json.dumps(results["gradient_check"])[:2000], flush=True)
    save()

    torch.manual_seed(0)
    base = gpt2(args.layers, args.width, args.heads, args.length, args.vocab, "sdpa").to(device)
    ids = torch.randint(0, args.vocab, (args.batch, args.length), device=device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def autocast():
        return torch.autocast(device, dtype=dtype, enabled=device == "cuda")

    variants = [("eager", lambda m: m),
                ("torch.compile default", lambda m: torch.compile(m)),
                ("retrograd", lambda m: torch.compile(m, backend="retrograd")),
                ("retrograd compile_step", lambda m: "compile_step")]
    for name, wrap in variants:
        torch._dynamo.reset()
        model = copy.deepcopy(base)
        try:
            run = measure(name, model, wrap(model), ids, args.steps, args.warmup, autocast)
        except Exception:
            run = {"name": name, "error": traceback.format_exc()[-3000:]}
        results["runs"].append(run)
        print(json.dumps(run)[:3000], flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        save()

    print_table(results)
    return 0


def print_table(results: dict) -> None:
    eager = next((r for r in results["runs"] if r["name"] == "eager" and "median_ms" in r), None)
    print(f"\n{results['device']}, torch {results['torch']}, config {results['config']}")
    print(f"{'variant':24s} {'median ms':>10s} {'x eager':>8s} {'peak MiB':>10s} {'x eager':>8s}")
    for run in results["runs"]:
        if "median_ms" not in run:
            print(f"{run['name']:24s} failed: {run['error'].splitlines()[-1]}")
            continue
        speed = eager["median_ms"] / run["median_ms"] if eager else float("nan")
        peak = run["peak_bytes"]
        memory = peak / eager["peak_bytes"] if eager and peak else float("nan")
        mib = f"{peak / 2**20:10.0f}" if peak else f"{'-':>10s}"
        print(f"{run['name']:24s} {run['median_ms']:10.2f} {speed:8.2f} {mib} {memory:8.2f}")


if __name__ == "__main__":
    sys.exit(main())
