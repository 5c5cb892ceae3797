"""One training step (forward, backward, optimizer) of a GPT-2 or a LLaMA-shaped
model under eager PyTorch, torch.compile's default and max-autotune modes,
retrograd's torch.compile backend and ``retrograd.compile_step`` (the whole
step as one program).

Reports the median step time and the peak of ``torch.cuda.max_memory_allocated``
for each, as ratios against eager and against Inductor (torch.compile
default), plus a gradient check of retrograd's compiled CUDA kernels against
eager on tiny models. Needs CUDA; on a CPU-only machine it says so and exits
(``--smoke`` runs a tiny configuration anywhere, to check the script itself).
``benchmarks/gpu_session.py`` runs every configuration once under a time
budget (the one command of a GPU session); this file measures one model.

    python benchmarks/step.py --out results.json          # GPT-2 small: 12 layers, 768 wide
    python benchmarks/step.py --model llama --variants eager,retrograd
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
import traceback

import torch

# Full-size configurations (issue 15, "Measure") and the tiny ones of --smoke.
PRESETS = {
    "gpt2": {"layers": 12, "width": 768, "heads": 12, "length": 1024, "vocab": 50257, "batch": 8},
    "llama": {"layers": 8, "width": 1024, "heads": 16, "kv_heads": 4, "ffn": 2816,
              "length": 1024, "vocab": 32000, "batch": 8},
}
SMOKE = {
    "gpt2": {"layers": 1, "width": 32, "heads": 2, "length": 16, "vocab": 64, "batch": 2},
    "llama": {"layers": 1, "width": 32, "heads": 4, "kv_heads": 2, "ffn": 64, "length": 16,
              "vocab": 64, "batch": 2},
}
# key -> name in tables and JSON (the names of the 2026-11-26 JSON kept)
VARIANTS = {
    "eager": "eager",
    "inductor": "torch.compile default",
    "max-autotune": "torch.compile max-autotune",
    "retrograd": "retrograd",
    "compile_step": "retrograd compile_step",
    "compile_step-nographs": "retrograd compile_step, cudagraphs=False",
}
DEFAULT_VARIANTS = ("eager", "inductor", "retrograd", "compile_step")


def gpt2(layers: int, width: int, heads: int, length: int, vocab: int, attention: str,
         **_):
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, n_positions=length,
                        vocab_size=vocab, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0)
    config._attn_implementation = attention
    return GPT2LMHeadModel(config)


def llama(layers: int, width: int, heads: int, kv_heads: int, ffn: int, length: int,
          vocab: int, attention: str, **_):
    """LLaMA-shaped (GQA, RMSNorm, SwiGLU, rotary) from a config, random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=ffn,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=length,
                         attention_dropout=0.0, tie_word_embeddings=False,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    config._attn_implementation = attention
    return LlamaForCausalLM(config)


BUILDERS = {"gpt2": gpt2, "llama": llama}


def gradient_check(device: str, model_name: str = "gpt2") -> dict:
    """retrograd's kernels on ``device`` against eager, fp32, a tiny model."""
    from retrograd.numerics import relative_error, tolerance  # what verify and tests use
    torch.manual_seed(0)
    sizes = dict(SMOKE[model_name], layers=2, width=64, heads=4, length=32, vocab=128)
    model = BUILDERS[model_name](attention="eager", **sizes).to(device)
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 128, (2, 32), device=device)
    compiled = torch.compile(model, backend="retrograd")
    compiled(ids, labels=ids).loss.backward()
    reference(ids, labels=ids).loss.backward()
    errors = [relative_error(p.grad, r.grad) for p, r in
              zip(model.parameters(), reference.parameters())]
    limit = 10 * tolerance(torch.float32)
    return {"max_relative_grad_error": max(errors), "parameters": len(errors),
            "limit": limit, "passed": max(errors) <= limit}


def wrap(variant: str, model):
    """The model as ``measure`` steps it: a module, or ``"compile_step"``."""
    if variant == "eager":
        return model
    if variant == "inductor":
        return torch.compile(model)
    if variant == "max-autotune":
        return torch.compile(model, mode="max-autotune")
    if variant == "retrograd":
        return torch.compile(model, backend="retrograd")
    if variant.startswith("compile_step"):
        return variant
    raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")


def measure(name: str, model, step_model, ids, steps: int, warmup: int, autocast) -> dict:
    """Median time of ``steps`` training steps after ``warmup`` (compile included there).

    ``step_model`` is a wrapped model, or ``"compile_step"``: the whole step,
    AdamW included, compiled by ``retrograd.compile_step`` as one program
    (``"compile_step-nographs"``: with ``cudagraphs=False``).
    """
    compiled = None
    if isinstance(step_model, str) and step_model.startswith("compile_step"):
        import retrograd
        options = {"cudagraphs": False} if step_model.endswith("-nographs") else {}
        compiled = retrograd.compile_step(
            model, lambda m, ids: m(ids, labels=ids).loss,
            torch.optim.AdamW(model.parameters(), lr=1e-4), **options)

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
            "warmup_seconds": warm_seconds, "loss": loss.item(),
            **({"cudagraphs": graph_state(compiled)} if compiled is not None else {})}


def graph_state(compiled) -> dict:
    """compile_step's CUDA-graph decision (report) and what happened at run time
    (captures, replays, copied inputs, calls run without the graph), and how
    many kernels the block autotune tuned, changed from the rule and read
    from the cache."""
    codegen = [p["stats"] for p in compiled.reports.get("step", {}).get("passes", [])
               if p["name"] == "codegen"]
    executable = compiled.entries[compiled.last][0] if compiled.last else None
    tuning = codegen[0].get("autotune") if codegen else None
    records = (tuning or {}).get("kernels", {}).values()
    return {"decision": codegen[0].get("cudagraphs") if codegen else None,
            "run": dict(getattr(executable, "status", None) or {}) or None,
            "autotune": None if tuning is None else {
                "enabled": tuning["enabled"], "reason": tuning["reason"],
                "kernels": len(records),
                "changed": sum(1 for r in records
                               if "default" in r and r["config"] != r["default"]),
                "cache_hits": sum(1 for r in records if r.get("cache") == "hit")}}


def synchronize(ids):
    if ids.is_cuda:
        torch.cuda.synchronize()


def run_variant(model_name: str, variant: str, sizes: dict, steps: int, warmup: int) -> dict:
    """Build ``model_name`` at ``sizes`` (seed 0) and measure ``variant`` on it."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch._dynamo.reset()
    gc.collect()
    before = torch.cuda.memory_allocated() if device == "cuda" else None
    torch.manual_seed(0)
    model = BUILDERS[model_name](attention="sdpa", **sizes).to(device)
    ids = torch.randint(0, sizes["vocab"], (sizes["batch"], sizes["length"]), device=device)

    def autocast():
        return torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    try:
        run = measure(VARIANTS[variant], model, wrap(variant, model), ids, steps, warmup,
                      autocast)
    finally:
        del model
        torch._dynamo.reset()
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    # allocated before the model was built: what an earlier job left behind (in the peak too)
    return {"model": model_name, "variant": variant, **run, "allocated_before_bytes": before}


def with_ratios(runs: list[dict]) -> list[dict]:
    """Each run with time and peak as ratios to eager's and Inductor's of its
    model (run / reference: lower is better; None where either is missing)."""
    out = []
    for run in runs:
        run = dict(run)
        for reference in ("eager", "inductor"):
            base = next((r for r in runs if r.get("model") == run.get("model")
                         and r.get("variant") == reference and "median_ms" in r), None)
            for key, field in (("time", "median_ms"), ("peak", "peak_bytes")):
                ok = base and run.get(field) and base.get(field)
                run[f"{key}_x_{reference}"] = run[field] / base[field] if ok else None
        out.append(run)
    return out


def markdown_table(runs: list[dict]) -> str:
    """The runs as a BENCHMARKS.md table (ratios: run / reference, lower is better)."""
    lines = [("| model | variant | median step | time x eager | time x Inductor | "
              "peak memory | peak x eager | peak x Inductor | warm-up (compile) |"),
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def ratio(value):
        return f"{value:.2f}x" if value is not None else "-"

    for run in with_ratios(runs):
        head = f"| {run.get('model', '-')} | {run['name']} |"
        if "median_ms" not in run:
            why = ("skipped: " + run["skipped"] if "skipped" in run else
                   "failed: " + run.get("error", "?").strip().splitlines()[-1])
            lines.append(f"{head} {why[:120].replace('|', '/')} | | | | | | |")
            continue
        peak = run["peak_bytes"]
        mib = f"{peak / 2**20:.0f} MiB" if peak else "-"
        lines.append(f"{head} {run['median_ms']:.2f} ms | {ratio(run['time_x_eager'])} | "
                     f"{ratio(run['time_x_inductor'])} | {mib} | {ratio(run['peak_x_eager'])} | "
                     f"{ratio(run['peak_x_inductor'])} | {run['warmup_seconds']:.1f} s |")
    return "\n".join(lines)


def sizes_for(args) -> dict:
    sizes = dict((SMOKE if args.smoke else PRESETS)[args.model])
    for key in sizes:
        if getattr(args, key, None) is not None:
            sizes[key] = getattr(args, key)
    return sizes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(BUILDERS), default="gpt2")
    for key in ("layers", "width", "heads", "kv_heads", "ffn", "length", "vocab", "batch"):
        parser.add_argument("--" + key.replace("_", "-"), dest=key, type=int, default=None,
                            help="default: the model's preset")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=None, help="write results as JSON here")
    parser.add_argument("--smoke", action="store_true", help="tiny configuration, any device")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.warmup = 2, 1
    elif not torch.cuda.is_available():
        print("benchmarks/step.py needs CUDA (use --smoke to check the script on CPU)")
        return 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from retrograd.backend import register
    register()   # the entry point does this once installed; harmless twice
    sizes = sizes_for(args)
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "torch": torch.__version__, "model": args.model, "sizes": sizes,
               "config": vars(args), "runs": []}

    def save():
        if args.out:
            with open(args.out, "w") as file:
                json.dump(results, file, indent=2)

    try:
        results["gradient_check"] = gradient_check(device, args.model)
    except Exception:  # noqa: BLE001  (recorded: a benchmark reports every failure)
        results["gradient_check"] = {"error": traceback.format_exc()[-3000:]}
    print("gradient check:", json.dumps(results["gradient_check"])[:2000], flush=True)
    save()
    for variant in args.variants.split(","):
        try:
            run = run_variant(args.model, variant, sizes, args.steps, args.warmup)
        except Exception:  # noqa: BLE001  (recorded, and the next variant runs)
            run = {"model": args.model, "variant": variant, "name": VARIANTS.get(variant, variant),
                   "error": traceback.format_exc()[-3000:]}
        results["runs"].append(run)
        print(json.dumps(run)[:3000], flush=True)
        save()
    results["runs"] = with_ratios(results["runs"])
    save()
    print(f"\n{results['device']}, torch {results['torch']}, {args.model} {sizes}")
    print(markdown_table(results["runs"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
