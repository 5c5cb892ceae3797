"""End to end: every zoo model trains to the same numbers as eager PyTorch.

For each model of ``tests/zoo.py`` and each face (``retrograd.compile`` and
``torch.compile(backend="retrograd")``, each with generated kernels and with
``executor="fx"``), one forward and backward runs eagerly on a deep copy and
compiled on the original, on the same inputs; the loss, every parameter
gradient and every input gradient must agree to a relative error below 1e-5
(fp32), and a gradient present on one side only (a frozen parameter) fails.
A float64 copy of each model gives the truth that shows the compiled fp32
result is as close to it as eager's fp32 result is. On CPU the kernels run
under Triton's interpreter.
"""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

import retrograd
from zoo import ZOO, assert_parity, clone_inputs, errors, training_step

pytestmark = pytest.mark.usefixtures("fresh_dynamo", "no_dump_env")

FP32_EPS = torch.finfo(torch.float32).eps

#: Each way a user reaches retrograd, as a function of the model.
FACES = {
    "standalone": lambda model: retrograd.compile(model),
    "standalone-fx": lambda model: retrograd.compile(model, executor="fx"),
    "torch.compile": lambda model: torch.compile(model, backend="retrograd"),
    "torch.compile-fx": lambda model: torch.compile(model, backend="retrograd",
                                                    options={"executor": "fx"}),
}


def _model_and_inputs(name: str):
    torch.manual_seed(0)
    entry = ZOO[name]
    return entry, entry.model(), entry.inputs()


def _compiled_halves(records) -> set[str]:
    """Which halves the ``retrograd`` logger reported compiling ("forward", "backward")."""
    halves = set()
    for record in records:
        if record.name == "retrograd" and "Triton kernels" in record.getMessage():
            halves.add(record.getMessage().split(":")[0].rsplit("-", 1)[-1])
    return halves


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("name", ZOO)
def test_loss_and_gradients_match_eager(name, face, caplog):
    caplog.set_level(logging.INFO, logger="retrograd")
    entry, model, inputs = _model_and_inputs(name)
    reference = copy.deepcopy(model)
    expected = training_step(entry, reference, reference, inputs)

    got = training_step(entry, FACES[face](model), model, inputs)

    assert_parity(got, expected, tolerance=1e-5)
    assert any(g is not None for k, g in got.items() if k.startswith("grad "))
    assert _compiled_halves(caplog.records) == {"forward", "backward"}, \
        "retrograd did not compile both halves: the numbers came from somewhere else"


def test_frozen_parameters_get_no_gradient_but_the_input_does():
    entry, model, inputs = _model_and_inputs("mlp_frozen")
    got = training_step(entry, retrograd.compile(model), model, inputs)
    frozen = {f"grad {n}" for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(got[name] is None for name in frozen)
    assert got["grad input 0"] is not None
    assert all(got[name] is not None for name in got if name not in frozen)


@pytest.mark.parametrize("name", ["mlp", "cnn", "attention_block", "gpt2_tiny"])
def test_fp32_is_as_close_to_fp64_truth_as_eager(name):
    """Relative to a float64 run, compiled fp32 errs about as much as eager fp32.

    The bound (4x eager's error plus two units of fp32 rounding) allows a
    different summation order, and fails on any real mistake. (GPT-2's loss
    is computed in fp32 even in the float64 copy, so there eager's error is 0.)
    """
    entry, model, inputs = _model_and_inputs(name)
    truth_model = copy.deepcopy(model).double()
    truth = training_step(entry, truth_model, truth_model, clone_inputs(inputs, torch.float64))
    reference = copy.deepcopy(model)
    eager_errors = errors(training_step(entry, reference, reference, inputs), truth)

    compiled_errors = errors(training_step(entry, retrograd.compile(model), model, inputs), truth)

    worse = {key: (compiled_errors[key], eager_errors[key]) for key in truth
             if not compiled_errors[key] <= 4 * eager_errors[key] + 2 * FP32_EPS}
    assert not worse, "compiled vs eager error against float64: " + ", ".join(
        f"{key}: {a:.3g} vs {b:.3g}" for key, (a, b) in worse.items())


@pytest.mark.parametrize("name", ["mlp", "cnn", "attention_block"])
def test_float64_model_matches_eager_float64(name):
    """Kernels computing in float64 agree with eager float64 to float64 rounding."""
    entry, model, inputs = _model_and_inputs(name)
    model = model.double()
    inputs = clone_inputs(inputs, torch.float64)
    reference = copy.deepcopy(model)
    expected = training_step(entry, reference, reference, inputs)
    compiled = retrograd.compile(model)

    got = training_step(entry, compiled, model, inputs)

    assert_parity(got, expected, tolerance=1e-12)
    assert compiled.reports["backward"]["kernels"]["triton"] > 0


def _assert_pointwise_ops_all_in_triton(report: dict) -> None:
    """The acceptance criterion: every pointwise aten op runs in a generated kernel,
    and fusion puts several of them in one kernel."""
    kernels = report["kernels"]
    assert kernels["pointwise_ops"] > 0, report["graph_id"]
    assert kernels["pointwise_ops_in_triton"] == kernels["pointwise_ops"], report["graph_id"]
    assert kernels["pointwise_ops_extern"] == {}, report["graph_id"]
    assert 0 < kernels["triton"] < kernels["pointwise_ops"], report["graph_id"]


def test_gpt2_runs_every_pointwise_op_in_triton_standalone():
    entry, model, inputs = _model_and_inputs("gpt2_tiny")
    compiled = retrograd.compile(model)
    training_step(entry, compiled, model, inputs)

    assert set(compiled.reports) == {"forward", "backward"}
    for report in compiled.reports.values():
        _assert_pointwise_ops_all_in_triton(report)


def test_gpt2_runs_every_pointwise_op_in_triton_under_torch_compile(tmp_path):
    """The torch.compile face has no ``.reports``: its report.json files are read."""
    entry, model, inputs = _model_and_inputs("gpt2_tiny")
    compiled = torch.compile(model, backend="retrograd", options={"dump_dir": str(tmp_path)})
    training_step(entry, compiled, model, inputs)

    reports = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("*/report.json"))]
    assert {report["graph"] for report in reports} == {"forward", "backward"}
    for report in reports:
        _assert_pointwise_ops_all_in_triton(report)


@pytest.mark.parametrize("face", ["standalone", "torch.compile"])
def test_batchnorm_running_statistics_follow_eager(face):
    """Two training steps update running_mean/var and the batch count as eager does;
    in eval mode both then normalize with those statistics."""
    entry, model, _ = _model_and_inputs("cnn")
    reference = copy.deepcopy(model)
    compiled = FACES[face](model)
    for _ in range(2):
        inputs = entry.inputs()
        assert_parity(training_step(entry, compiled, model, inputs),
                      training_step(entry, reference, reference, inputs))

    buffers, expected = dict(model.named_buffers()), dict(reference.named_buffers())
    assert buffers.keys() == expected.keys() and len(buffers) == 6
    for name, value in expected.items():
        if name.endswith("num_batches_tracked"):
            assert buffers[name].item() == value.item() == 2
        else:
            assert not torch.equal(value, torch.zeros_like(value) if "mean" in name
                                   else torch.ones_like(value)), f"{name} never moved"
            assert_parity({name: buffers[name]}, {name: value})

    compiled.eval()
    reference.eval()
    images = entry.inputs()[0].detach()
    with torch.no_grad():
        assert_parity({"eval output": compiled(images)}, {"eval output": reference(images)})


@pytest.mark.gpu
@pytest.mark.parametrize("face", ["standalone", "torch.compile"])
@pytest.mark.parametrize("name", ZOO)
def test_loss_and_gradients_match_eager_on_cuda(name, face, caplog, monkeypatch):
    """The same parity with compiled Triton kernels on a GPU; convolutions in
    full fp32 on both sides (cuDNN's TF32 off)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    caplog.set_level(logging.INFO, logger="retrograd")
    entry, model, inputs = _model_and_inputs(name)
    model = model.cuda()
    inputs = tuple(value.detach().cuda().requires_grad_(value.requires_grad) for value in inputs)
    reference = copy.deepcopy(model)
    expected = training_step(entry, reference, reference, inputs)

    got = training_step(entry, FACES[face](model), model, inputs)

    assert_parity(got, expected, tolerance=1e-5)
    assert _compiled_halves(caplog.records) == {"forward", "backward"}
