"""check_finite_state: the first tensor holding NaN/inf is named, with its count."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from megablocks_ablate.checkpoint import check_finite_state
from megablocks_ablate.checkpoint.finite import first_non_finite, tensor_is_finite
from megablocks_ablate.errors import DataFormatError, NonFiniteError

INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_each_float_dtype(dtype):
    t = torch.ones(5, 7, dtype=dtype)
    assert tensor_is_finite(t)
    t[2, 3] = INF
    assert not tensor_is_finite(t)
    t[2, 3] = NAN
    assert not tensor_is_finite(t)
    t[2, 3] = -INF
    assert not tensor_is_finite(t)


def test_large_finite_values_do_not_overflow_the_check():
    # the fp64 sum of fp32 maxima stays finite: only a real NaN/inf fails
    assert tensor_is_finite(torch.full((1000,), torch.finfo(torch.float32).max))
    assert tensor_is_finite(torch.full((1000,), torch.finfo(torch.float16).max, dtype=torch.half))
    big = torch.full((4,), torch.finfo(torch.float64).max, dtype=torch.float64)
    assert tensor_is_finite(big)  # its sum overflows fp64; the values do not


def test_integer_bool_and_empty_tensors_are_finite():
    assert tensor_is_finite(torch.arange(5))
    assert tensor_is_finite(torch.ones(3, dtype=torch.bool))
    assert tensor_is_finite(torch.empty(0))


def test_first_in_order_is_named_with_its_count():
    state = {
        "a": torch.ones(3),
        "b": torch.tensor([1.0, NAN, INF, 2.0]),
        "c": torch.tensor([NAN]),
    }
    assert first_non_finite(state.items()) == ("b", 2)
    with pytest.raises(NonFiniteError) as e:
        check_finite_state(state, "ckpt/model.safetensors", "refusing it")
    assert str(e.value) == (
        "ckpt/model.safetensors: tensor 'b' has 2 non-finite values (NaN/inf); refusing it"
    )
    check_finite_state({"a": torch.ones(3), "i": torch.arange(3)}, "fine")


def test_a_file_is_checked_tensor_by_tensor(tmp_path):
    path = str(tmp_path / "model.safetensors")
    good = {"x": torch.ones(4, 4), "y": torch.zeros(3, dtype=torch.bfloat16)}
    save_file(good, path)
    check_finite_state(path)
    bad = dict(good, z=torch.tensor([1.0, INF, NAN], dtype=torch.float16))
    save_file(bad, path)
    with pytest.raises(NonFiniteError) as e:
        check_finite_state(path, consequence="not loaded")
    assert str(e.value) == f"{path}: tensor 'z' has 2 non-finite values (NaN/inf); not loaded"
    with pytest.raises(NonFiniteError, match=r"^weights of x: tensor 'z'"):
        check_finite_state(path, "weights of x")
    # a truncated file is a format error naming it, not a crash
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 4)
    with pytest.raises(DataFormatError, match=path):
        check_finite_state(path)
