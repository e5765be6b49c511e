"""Input checks on tensors: the one-pass range check agrees with the exact one."""

from __future__ import annotations

import numpy as np
import pytest

from vaeserve.errors import TensorError
from vaeserve.rows import check_finite


@pytest.mark.parametrize("value", [0.0, -0.0, 1.0, 0.5, 1e-45])
def test_values_in_the_unit_interval_pass(value: float) -> None:
    rows = np.zeros((3, 4), np.float32)
    rows[2, 1] = value
    check_finite(rows, "inputs", 0.0, 1.0)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.nan, "NaN or infinity at row 2, column 1"),
        (np.inf, "NaN or infinity at row 2, column 1"),
        (-np.inf, "NaN or infinity at row 2, column 1"),
        (1.0000001, r"values span \[0, 1.00000012\]; expected \[0, 1\]"),
        (-1e-30, r"values span \[-1e-30, 0\]; expected \[0, 1\]"),
    ],
)
def test_values_outside_it_are_named(value: float, message: str) -> None:
    rows = np.zeros((3, 4), np.float32)
    rows[2, 1] = value
    with pytest.raises(TensorError, match=message):
        check_finite(rows, "inputs", 0.0, 1.0)


def test_latents_need_only_be_finite() -> None:
    check_finite(np.array([[-7.5, 1e30]], np.float32), "latents")
    with pytest.raises(TensorError, match="NaN or infinity at row 0, column 1"):
        check_finite(np.array([[-7.5, np.nan]], np.float32), "latents")
