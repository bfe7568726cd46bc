"""Resumable data orders."""

from __future__ import annotations

from palate.training import grouped_order


def test_grouped_order_keeps_each_key_together_and_is_seeded() -> None:
    keys = ["a", "b", "a", "c", "b", "a", "c"]
    order = grouped_order(keys, seed=3, epoch=0)
    assert sorted(order) == list(range(7))
    runs = [keys[i] for i in order]
    # each key's items are consecutive: the key changes exactly twice
    assert sum(x != y for x, y in zip(runs[:-1], runs[1:], strict=True)) == 2
    assert grouped_order(keys, seed=3, epoch=0) == order
    assert {tuple(grouped_order(keys, seed=3, epoch=e)) for e in range(6)} != {tuple(order)}
