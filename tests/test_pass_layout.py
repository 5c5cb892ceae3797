"""The layout pass: convolution activations channels-last where nothing else
depends on their strides."""

from __future__ import annotations

import torch

from retrograd.passes import buffer_reuse
from retrograd.runtime.executor import FxExecutable
from pass_helpers import assert_program_matches, context, fuse, run_gm
from pass_helpers import seeded  # noqa: F401  (autouse: each test from seed 0)


def _convolution_program():
    """relu -> conv -> relu: the conv's input and output are generated temporaries."""
    import torch.nn.functional as F
    x, k = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)

    def fn(x, k):
        return (F.conv2d(x.relu(), k, padding=1).relu() * 2,)
    return fuse(fn, x, k), (x, k)


def test_layout_makes_convolution_activations_channels_last():
    from retrograd.codegen import generate_sources
    from retrograd.passes import layout
    from retrograd.runtime.executor import GeneratedExecutable
    (program, _, gm), inputs = _convolution_program()
    stats = layout.run(program, context()).stats
    [conv] = [k for k in program.kernels if k.op == "aten.convolution.default"]
    source, result = conv.inputs[0], conv.outputs[0]
    for name in (source, result):
        assert program.buffers[name].strides == layout.channels_last_strides(
            program.buffers[name].shape)
    assert stats == {"convolutions": 1, "channels_last_buffers": 2, "buffers": [source, result],
                     "inputs_in_forward_layout": []}
    assert program.buffers[program.outputs[0]].strides == (144, 36, 6, 1)   # outputs keep theirs
    buffer_reuse.run(program, context())
    assert_program_matches(program, gm, inputs)
    kernels, wrapper = generate_sources(program, interpreted=True)
    got = GeneratedExecutable(program, wrapper, kernels, True)(list(inputs))
    torch.testing.assert_close(got[0], run_gm(gm, inputs)[0])
    # torch returned the channels-last result the plan predicts: nothing was copied
    assert f"{result} = rt.layout({result}, (2, 4, 6, 6), (144, 1, 24, 4))" in wrapper
    real = torch.ops.aten.convolution(inputs[0].relu().contiguous(
        memory_format=torch.channels_last), inputs[1], None, [1, 1], [1, 1], [1, 1], False,
        [0, 0], 1)
    assert real.stride() == (144, 1, 24, 4)


def test_layout_leaves_buffers_a_view_reads():
    import torch.nn.functional as F
    from retrograd.passes import layout
    x, k, w = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3), torch.randn(108, 5)

    def fn(x, k, w):
        h = x.relu()    # read by the convolution and, through a view, by a product
        return (F.conv2d(h, k, padding=1), h.flatten(1) @ w)
    program, _, gm = fuse(fn, x, k, w)
    assert any(k.kind == "view" and "relu" in k.inputs for k in program.kernels)
    assert layout.run(program, context()).stats["channels_last_buffers"] == 0
    assert_program_matches(program, gm, [x, k, w])


def _forward_saving_convolution_input():
    """relu -> conv, the relu saved for a backward: outputs (user's, saved)."""
    import torch.nn.functional as F
    x, k = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)

    def fn(x, k):
        h = x.relu()
        return (F.conv2d(h, k, padding=1).sum(), h)
    return fuse(fn, x, k), (x, k)


def test_a_saved_convolution_input_is_channels_last_and_handed_to_the_backward():
    """Across the split: the forward lays out the activation its convolution
    reads (and the backward's convolution will read again) channels-last,
    although it escapes as a saved value; ``saved_layouts`` tells the backward."""
    from retrograd.passes import layout
    (program, _, gm), inputs = _forward_saving_convolution_input()
    user, saved = program.outputs
    ctx = context()
    ctx.num_fwd_outputs = 1
    stats = layout.run(program, ctx).stats
    channels_last = layout.channels_last_strides((2, 3, 6, 6))
    assert program.buffers[saved].strides == channels_last
    assert saved in stats["buffers"]
    assert program.buffers[user].strides == ()                  # the user's output keeps its
    assert layout.saved_layouts(program, 1) == {saved: channels_last}
    buffer_reuse.run(program, context())
    assert_program_matches(program, gm, inputs)


def test_without_the_split_known_every_output_keeps_its_strides():
    from retrograd.passes import layout
    (program, _, _), _ = _forward_saving_convolution_input()
    saved = program.outputs[1]
    assert layout.run(program, context()).stats["buffers"] == []
    assert program.buffers[saved].strides == (108, 36, 6, 1)


def _backward_program(read_by_view: bool):
    """A convolution backward whose ``input`` is a program input (a saved
    activation) and whose grad_output a generated kernel writes."""
    x, g, k = torch.randn(2, 3, 6, 6), torch.randn(2, 4, 6, 6), torch.randn(4, 3, 3, 3)

    def fn(x, g, k):
        grads = torch.ops.aten.convolution_backward.default(
            g * 2, x, k, [4], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False])
        extra = (x.flatten(1).sum(1),) if read_by_view else ()
        return (grads[0].relu(), grads[1]) + extra
    return fuse(fn, x, g, k), (x, g, k)


def test_the_backward_adopts_the_saved_layout_and_copies_nothing():
    from retrograd.passes import layout
    from retrograd.runtime.executor import check_inputs
    (program, _, gm), inputs = _backward_program(read_by_view=False)
    saved = program.inputs[0]
    channels_last = layout.channels_last_strides((2, 3, 6, 6))
    ctx = context()
    ctx.input_layouts = {saved: channels_last}
    stats = layout.run(program, ctx).stats
    assert stats["inputs_in_forward_layout"] == [saved]
    assert program.buffers[saved].strides == channels_last
    [conv] = [k for k in program.kernels if k.op == "aten.convolution_backward.default"]
    grad_output = conv.inputs[0]      # the generated g * 2 follows the input's layout
    assert program.buffers[grad_output].strides == layout.channels_last_strides((2, 4, 6, 6))
    arriving = [inputs[0].contiguous(memory_format=torch.channels_last), *inputs[1:]]
    args = list(arriving)
    check_inputs(program, args)
    assert args[0] is arriving[0]      # no copy at entry
    buffer_reuse.run(program, context())
    assert_program_matches(program, gm, arriving)


def test_the_backward_keeps_the_traced_layout_of_an_input_a_view_reads():
    from retrograd.passes import layout
    (program, _, gm), inputs = _backward_program(read_by_view=True)
    saved = program.inputs[0]
    ctx = context()
    ctx.input_layouts = {saved: layout.channels_last_strides((2, 3, 6, 6))}
    assert layout.run(program, ctx).stats["inputs_in_forward_layout"] == []
    assert program.buffers[saved].strides == (108, 36, 6, 1)
    arriving = [inputs[0].contiguous(memory_format=torch.channels_last), *inputs[1:]]
    got = FxExecutable(program)(arriving)      # copied back at entry: still right
    for value, expected in zip(got, run_gm(gm, inputs)):
        torch.testing.assert_close(value, expected)


def test_the_zoo_cnn_hands_its_backward_a_channels_last_activation():
    """End to end (standalone face, fx executor): the max-pooled activation the
    second convolution reads is saved channels-last, its backward adopts it, and
    the gradients still match eager's."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    import retrograd
    from zoo import ZOO, assert_parity, training_step
    entry = ZOO["cnn"]
    model, inputs = entry.model(), entry.inputs()
    compiled = retrograd.compile(model, executor="fx")
    got = training_step(entry, compiled, model, inputs)
    stats = {half: next(p["stats"] for p in compiled.reports[half]["passes"]
                        if p["name"] == "layout") for half in ("forward", "backward")}
    adopted = stats["backward"]["inputs_in_forward_layout"]
    assert adopted and set(adopted) <= set(stats["forward"]["buffers"])
    reference = entry.model()
    reference.load_state_dict(model.state_dict())
    assert_parity(got, training_step(entry, reference, reference, inputs))
