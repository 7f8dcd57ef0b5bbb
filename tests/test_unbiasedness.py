"""The sum form is unbiased exactly where docs/pafm.md says: Monte Carlo, paired, per candidate source and likelihood.

The estimator is ``benchmarks/unbiasedness.py`` (its table reports the biased cases); here the unbiased cases must
lie within 3 standard errors of 0, in value and in the gradient's projections, and kNN's bias must be detected (so
that the test can fail).
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from unbiasedness import MEANFLOW_CASES, PAFM_CASES, UNBIASED, measure  # noqa: E402


@pytest.mark.parametrize("case", sorted(UNBIASED))
def test_unbiased_cases_are_unbiased_in_value_and_gradient(case):
    result = measure(case, reps=1500, seed=0)
    assert abs(result["value_bias"]) < 3 * result["value_se"], result
    assert result["grad_max_abs_z"] < 3, result


def test_knn_candidates_are_biased_and_the_test_sees_it():
    result = measure("knn, none", reps=1500, seed=0)
    assert result["value_bias"] < -3 * result["value_se"], result


def test_every_case_is_labelled():
    assert UNBIASED <= set(PAFM_CASES) | set(MEANFLOW_CASES)
