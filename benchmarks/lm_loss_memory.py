"""Memory of a logits-dominated language model's training step: eager,
torch.compile (Inductor) and retrograd, with and without the fused linear +
cross-entropy (passes/linear_cross_entropy.py).

The model: transformers' GPT-2 from a ``GPT2Config`` with random weights,
vocabulary 128x its width (4096 / 32), 2 layers, batch 2 x 32 tokens, the
model's own loss (``labels=``), only the loss returned (so the logits do not
escape the compiled graph). Two figures per compiler, each measured in a
fresh process after two warm-up steps:

- saved bytes: distinct storages autograd saves during the forward, seen by
  ``torch.autograd.graph.saved_tensors_hooks`` (parameters and inputs left
  out), measured, not taken from retrograd's report;
- peak: the peak of live torch CPU memory during one forward + backward, from
  ``torch.profiler``'s allocation events (as benchmarks/memory.py measures it).

    python benchmarks/lm_loss_memory.py [--out results.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import warnings

import torch

WIDTH, VOCAB, LAYERS, BATCH, TOKENS = 32, 4096, 2, 2, 32
LABELS = ("eager", "inductor", "retrograd", "retrograd_unfused")


def _model_and_batch():
    import transformers
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=WIDTH, n_layer=LAYERS, n_head=4,
                                     n_positions=TOKENS, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"   # transformers' one-time warning would break dynamo's graph
    ids = torch.randint(0, VOCAB, (BATCH, TOKENS))
    return model, {"input_ids": ids, "labels": ids}


def _compiled(label, loss_fn):
    import retrograd
    if label == "eager":
        return loss_fn
    if label == "inductor":
        return torch.compile(loss_fn)
    disable = ("linear_cross_entropy",) if label == "retrograd_unfused" else ()
    return retrograd.compile(loss_fn, disable=disable)


def _saved_bytes(model, run) -> int:
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from measuring import saved_storage_bytes
    return saved_storage_bytes(run, model.parameters())


def _peak(run) -> int:
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from measuring import profiled_peak
    return profiled_peak(lambda: run().backward())


def measure(label: str) -> dict:
    """One compiler's saved bytes and step peak (run in a fresh process)."""
    warnings.filterwarnings("ignore")
    model, batch = _model_and_batch()
    compiled = _compiled(label, lambda **kw: model(**kw).loss)

    def run():
        return compiled(**{k: v.clone() for k, v in batch.items()})
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        run().backward()
    model.zero_grad(set_to_none=True)
    saved = _saved_bytes(model, run)
    model.zero_grad(set_to_none=True)
    return {"compiler": label, "saved_bytes": saved, "peak_bytes": _peak(run)}


def _isolated(label: str) -> dict:
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(measure, label).result()


def markdown(rows: list[dict]) -> str:
    by = {r["compiler"]: r for r in rows}
    lines = ["| compiler | saved bytes | x eager | x Inductor | step peak | x eager | x Inductor |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(
            f"| {r['compiler']} | {r['saved_bytes']:,} "
            f"| {r['saved_bytes'] / by['eager']['saved_bytes']:.2f} "
            f"| {r['saved_bytes'] / by['inductor']['saved_bytes']:.2f} "
            f"| {r['peak_bytes']:,} | {r['peak_bytes'] / by['eager']['peak_bytes']:.2f} "
            f"| {r['peak_bytes'] / by['inductor']['peak_bytes']:.2f} |")
    logits = BATCH * (TOKENS - 1) * VOCAB * 4
    lines.append(f"\nGPT-2, width {WIDTH}, vocabulary {VOCAB}, {LAYERS} layers, batch "
                 f"{BATCH} x {TOKENS}: the float32 logits are {logits:,} bytes.")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    rows = [_isolated(label) for label in LABELS]
    print(markdown(rows))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(rows, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
