import itertools

import numpy as np
import pytest

from megablocks_ablate.data.partition import (
    is_heldout,
    order_value,
    partition_key,
    safe_name,
    split_units,
)


def test_partition_key_rules():
    assert partition_key({"fos": ["Biology", "Physics"]}, ["fos"]) == "Biology"
    assert partition_key({"fos": None}, ["fos"]) == "NA"
    assert partition_key({}, ["fos", "year"]) == "NA+NA"
    assert partition_key({"fos": "Art", "year": 1999}, ["fos", "year"]) == "Art+1999"
    assert partition_key({"x": 1}, []) == "all"
    assert safe_name("Computer Science/AI") == "Computer_Science_AI"


def test_order_value_sorts_numbers_then_strings_then_missing():
    recs = [{"y": "b"}, {"y": 3}, {}, {"y": "2001"}, {"y": "a"}, {"y": 1.5}]
    keys = sorted(range(len(recs)), key=lambda i: order_value(recs[i], "y"))
    assert keys == [5, 1, 3, 4, 0, 2]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_split_units_equal_within_one_document(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 300, size=2000)
    target = 5000
    ranges, left_docs, left_tokens = split_units(lengths, target)
    assert ranges[0][0] == 0
    for (_, b), (c, _) in itertools.pairwise(ranges):
        assert b == c  # contiguous
    for a, b in ranges:
        total = int(lengths[a:b].sum())
        assert target <= total < target + lengths[b - 1]  # closed at the first doc reaching it
        assert int(lengths[a : b - 1].sum()) < target
    assert left_docs == len(lengths) - ranges[-1][1]
    assert left_tokens == int(lengths[ranges[-1][1] :].sum()) < target
    kept, ld, lt = split_units(lengths, target, keep_remainder=True)
    if left_docs:
        assert kept[:-1] == ranges and kept[-1] == (ranges[-1][1], len(lengths))
    else:
        assert kept == ranges
    assert ld == lt == 0


def test_split_units_whole_partition_and_empty():
    assert split_units(np.array([3, 4]), None) == ([(0, 2)], 0, 0)
    assert split_units(np.array([], dtype=np.int64), 10) == ([], 0, 0)
    assert split_units(np.array([3, 4]), 100) == ([], 2, 7)


def test_heldout_is_deterministic_and_near_fraction():
    texts = [f"document number {i}" for i in range(20000)]
    picks = [is_heldout(t, 0.1, salt=7) for t in texts]
    assert picks == [is_heldout(t, 0.1, salt=7) for t in texts]
    assert 0.09 < sum(picks) / len(texts) < 0.11
    assert picks != [is_heldout(t, 0.1, salt=8) for t in texts]
    assert not any(is_heldout(t, 0.0) for t in texts[:100])
