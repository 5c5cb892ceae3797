"""The zoo's LoRA fine-tune (tests/zoo.py): frozen base weights, rank-4
adapters on the attention projections. Its loss and gradients match eager's
on both faces with default options (tests/test_models.py runs every zoo
model: ``test_loss_and_gradients_match_eager[lora-*]``); here: no gradient
of a frozen weight is ever computed, counted on the backward program itself."""

from __future__ import annotations

from unittest import mock

import retrograd
import torch
from retrograd.passes import buffer_reuse
from zoo import ZOO, LoRATransformer, clone_inputs, forward_backward_peak


MATMULS = ("aten.mm.default", "aten.addmm.default", "aten.bmm.default")


def _backward_program(model):
    """The backward Program of one training step of ``model`` (executor "fx":
    the passes decide what is computed; codegen is not needed to count it)."""
    programs = []
    original = buffer_reuse.run

    def run(program, ctx):
        programs.append((ctx.graph_name, program))
        return original(program, ctx)

    entry = ZOO["lora"]
    with mock.patch.object(buffer_reuse, "run", run):
        compiled = retrograd.compile(model, executor="fx")
        entry.run(compiled, clone_inputs(entry.inputs())).backward()
    [program] = [p for name, p in programs if name.endswith("-backward")]
    return program


def _products(program) -> list[tuple[int, ...]]:
    """Shapes of every matrix product's result, and of every other extern result
    (the fused linear + cross-entropy backward would return the head's gradient)."""
    shapes = []
    for kernel in program.kernels:
        if kernel.kind == "extern":
            shapes += [program.buffers[name].shape for name in kernel.outputs]
    return shapes


def _frozen_shapes(model) -> set[tuple[int, ...]]:
    return {tuple(p.shape) for p in model.parameters() if not p.requires_grad and p.dim() == 2}


def test_only_the_adapters_train():
    model = ZOO["lora"].model()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(name.rsplit(".", 1)[-1] in ("lora_a", "lora_b")
                             for name in trainable)
    assert len(trainable) == 2 * 4 * len(model.blocks)


def test_no_gradient_of_a_frozen_base_weight_is_computed():
    """No extern result of the backward has a frozen weight's shape, and the
    number of matrix products is what the adapters need. Unfreezing one base
    weight adds exactly its gradient's product: the count can tell."""
    torch.manual_seed(0)
    model = LoRATransformer(layers=1)     # one block: half the compile time
    program = _backward_program(model)
    frozen = _frozen_shapes(model)
    assert not [shape for shape in _products(program) if shape in frozen]
    matmuls = sum(kernel.op in MATMULS for kernel in program.kernels)

    torch.manual_seed(0)
    unfrozen = LoRATransformer(layers=1)
    unfrozen.blocks[0].q.base.weight.requires_grad_(True)
    control = _backward_program(unfrozen)
    assert sum(kernel.op in MATMULS for kernel in control.kernels) == matmuls + 1
    assert (32, 32) in _products(control)



def test_the_cpu_default_peaks_below_eager():
    """Under the torch program (the CPU default) LoRA's forward + backward
    peaked at 1.15x eager's (73,996 against 64,200 bytes): the frozen MLP's
    GELU, fused with its derivative, ran as twelve torch calls holding five
    hidden-sized values. Written in place and in the order that holds the
    fewest (codegen/torch_liveness.py, torch_order.py), it holds three."""
    entry = ZOO["lora"]
    torch.manual_seed(0)
    model, inputs = entry.model(), entry.inputs()
    eager = forward_backward_peak(entry, model, model, inputs)
    compiled = retrograd.compile(model, executor="torch")
    assert forward_backward_peak(entry, model, compiled, inputs) <= eager
