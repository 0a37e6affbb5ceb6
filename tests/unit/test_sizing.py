"""Batches sized by time (`partnerbus.handlers.sizing.Sizer`)."""

from __future__ import annotations

import pytest

from partnerbus.handlers.sizing import Sizer


def settle(sizer: Sizer, fixed_s: float, per_item_s: float, rounds: int = 40) -> int:
    """Feed the sizer batches that cost `fixed_s + per_item_s * n`, n being its own size."""
    for _ in range(rounds):
        n = sizer.size
        sizer.observe(n, fixed_s + per_item_s * n)
    return sizer.size


def test_a_slow_host_gets_batches_that_fill_the_budget() -> None:
    # 3 ms an item, 5 ms fixed: 128 would take 389 ms; the budget of 100 ms fits 31
    sizer = Sizer(largest=128, budget_s=0.1)
    assert settle(sizer, 0.005, 0.003) in range(30, 33)


def test_a_fast_host_keeps_the_largest_batches() -> None:
    sizer = Sizer(largest=128, budget_s=0.1)
    assert settle(sizer, 0.002, 0.0005) == 128


def test_the_size_grows_back_when_the_host_gets_faster() -> None:
    sizer = Sizer(largest=256, budget_s=0.1)
    assert settle(sizer, 0.005, 0.004) < 30
    assert settle(sizer, 0.005, 0.0002) == 256


def test_never_below_the_smallest_even_when_one_item_overruns_the_budget() -> None:
    sizer = Sizer(largest=256, budget_s=0.1, smallest=8)
    assert settle(sizer, 0.5, 0.05) == 8


def test_a_small_batch_because_little_was_waiting_does_not_shrink_the_next() -> None:
    sizer = Sizer(largest=128, budget_s=0.1)
    for _ in range(20):
        sizer.observe(1, 0.004)  # one signal at a time, at low load
    assert sizer.size == 128


@pytest.mark.parametrize(("items", "elapsed"), [(0, 0.1), (5, 0.0)])
def test_nothing_to_learn_from_an_empty_or_instant_batch(items: int, elapsed: float) -> None:
    sizer = Sizer(largest=64, budget_s=0.1)
    sizer.observe(items, elapsed)
    assert sizer.size == 64


def test_no_budget_means_the_fixed_size() -> None:
    sizer = Sizer(largest=128, budget_s=0.0)
    assert settle(sizer, 0.5, 0.05) == 128
