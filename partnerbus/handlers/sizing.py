"""Batches sized by time: a transaction of the intake, or a window of the relay, takes about
`budget_s`, however fast the host.

An urgent signal waits, at worst, for the routine batch or window under way: a fixed count
(128 signals, 256 rows) takes 0.1 s on a fast host and over a second on a slow or busy
one. `Sizer` keeps the count that fills the budget instead, from what the last ones took.
With a batch costing a fixed `F` plus `r` per item, the count settles at `(budget − F) / r`,
so each batch still spreads its fixed cost (the commit, the confirms' round trip) over as
many items as the budget allows. A full batch done within the budget lets the count grow
back towards `largest`; a batch that was small because little was waiting says nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Sizer:
    largest: int
    budget_s: float
    """0: no budget, every batch may take `largest`."""
    smallest: int = 8
    _size: float = field(init=False)

    def __post_init__(self) -> None:
        self.smallest = max(1, min(self.smallest, self.largest))
        self._size = float(self.largest)

    @property
    def size(self) -> int:
        """How many items the next batch may take."""
        return round(self._size)

    def observe(self, items: int, elapsed_s: float) -> None:
        """A batch of `items` took `elapsed_s`: move halfway to the count that fills the
        budget at that pace. A batch within the budget that was not full (little was
        waiting) says nothing against the size: its fixed cost, spread over few items,
        would make the pace look slower than it is."""
        if self.budget_s <= 0 or items <= 0 or elapsed_s <= 0:
            return
        if elapsed_s <= self.budget_s and items < self.size:
            return
        fits = self.budget_s * items / elapsed_s
        target = min(float(self.largest), max(float(self.smallest), fits))
        self._size = (self._size + target) / 2
