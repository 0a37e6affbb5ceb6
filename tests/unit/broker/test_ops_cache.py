"""The ops monitor's shared snapshot: one taker at a time, reused until it is old."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from partnerbus.ops.monitor import LedgerFigures, Snapshot, SnapshotCache


def test_concurrent_viewers_share_one_snapshot_until_it_is_old() -> None:
    now = [0.0]
    taken = 0

    async def take() -> Snapshot:
        nonlocal taken
        taken += 1
        await asyncio.sleep(0)  # let the other viewers queue up behind the lock
        return Snapshot(datetime.now(UTC), [], LedgerFigures({}, [], 0, 0))

    async def main() -> None:
        cache = SnapshotCache(take, 5.0, monotonic=lambda: now[0])
        first = await asyncio.gather(*(cache.get() for _ in range(25)))
        assert taken == 1 and len({id(s) for s in first}) == 1
        now[0] = 4.9
        assert await cache.get() is first[0]
        now[0] = 5.0
        assert await cache.get() is not first[0]
        assert taken == 2 == cache.taken

    asyncio.run(main())
