"""The layout pass: convolution activations channels-last where nothing else
depends on their strides."""

from __future__ import annotations

import torch

from retrograd.passes import buffer_reuse
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
