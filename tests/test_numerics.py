"""The one relative error and tolerance table (compiler/numerics.py) that
verify, tests/checks.py and the benchmarks share: the formula on values
worked by hand, the floor, and the cases that must read as failures."""

from __future__ import annotations

import math

import torch

import retrograd.numerics as numerics
import retrograd.verify as verify
import checks


def test_one_definition_everywhere():
    assert checks.relative_error is numerics.relative_error
    assert checks.TOLERANCE is numerics.TOLERANCE is verify.TOLERANCE


def test_relative_error_by_hand():
    """Values chosen so each error is exact: ||(3, 4)|| = 5."""
    ref = torch.tensor([3.0, 4.0])
    assert numerics.relative_error(torch.tensor([3.0, 4.0]), ref) == 0.0
    assert numerics.relative_error(torch.tensor([0.0, 4.0]), ref) == 3 / 5
    assert numerics.relative_error(ref, torch.zeros(2)) == 5.0      # absolute at scale 0
    # the floor: noise around zero judged against the scale of the rest
    assert numerics.relative_error(torch.tensor([0.5]), torch.zeros(1), floor=2.0) == 0.25
    assert numerics.relative_error(0.5, 0.25) == 1.0                 # numbers too


def test_relative_error_leaves_out_the_references_non_finite_entries():
    ref = torch.tensor([3.0, float("inf"), 4.0, float("nan")])
    got = torch.tensor([3.0, float("inf"), 4.0, float("nan")])
    assert numerics.relative_error(got, ref) == 0.0


def test_relative_error_reads_nan_and_shape_changes_as_failures():
    """inf, not NaN: ``error > limit`` (verify) must fail as ``error < limit`` (tests) does."""
    ref = torch.tensor([1.0, float("nan"), 3.0])
    assert numerics.relative_error(torch.tensor([float("nan")] * 3), ref) == math.inf
    assert numerics.relative_error(torch.ones(3), torch.ones(1, 3)) == math.inf


def test_relative_error_is_complex_aware():
    """A complex difference in the imaginary part counts (float64 would drop it)."""
    ref = torch.tensor([1 + 0j, 2 + 0j])
    assert numerics.relative_error(torch.tensor([1 + 1j, 2 + 0j]), ref) > 0.4


def test_tolerance_falls_back_to_float32s():
    assert numerics.tolerance(torch.bfloat16) == 1e-2
    assert numerics.tolerance(torch.complex64) == numerics.TOLERANCE[torch.float32]


def test_zoo_parity_counts_a_nan_or_inf_on_one_side_only():
    """The zoo's parity harness measures the finite rest with relative_error,
    and its non-finite entries by position: there they must agree."""
    from zoo import errors
    nan, inf = float("nan"), float("inf")
    ref = {"g": torch.tensor([nan, 2.0, inf])}
    assert errors({"g": torch.tensor([nan, 2.0, inf])}, ref) == {"g": 0.0}
    assert errors({"g": torch.tensor([1.0, 2.0, inf])}, ref) == {"g": math.inf}
    assert errors({"g": torch.tensor([nan, 2.0, -inf])}, ref) == {"g": math.inf}
    assert errors({"g": torch.tensor([nan, nan, inf])}, ref) == {"g": math.inf}
