"""When to merge parts: size-tiered compaction, as RocksDB's universal compaction and
Cassandra's size-tiered strategy do it.

A part's *tier* is ``floor(log_F(weight))`` (weight: the rows, failure records and
tombstones it still carries; F the fan-out). When F parts share a tier they are merged
into one, whose weight is at least F times theirs, so it lands at least one tier higher:
every row is rewritten at most ``log_F(N)`` times over the cache's life (3 times up to
32 M rows at F = 32), a nightly delta only ever merges with parts of its own size, and
at most F - 1 parts sit in each tier (O(log N) parts). A part with 10 % or more of its
rows deleted is rewritten alone (Lance's rule), and a part that carries nothing live is
dropped without a rewrite.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .manifest import PartInfo


@dataclass(frozen=True)
class CompactionPolicy:
    fanout: int = 32  # parts per tier before they merge
    rewrite_deleted_fraction: float = 0.10  # rewrite a part alone once this much of it is deleted
    memory_budget: int = 64 << 20  # bytes of rows a merge holds at once, whatever the cache size
    auto: bool = True  # merge after commits (a writer's compact() runs the same plan on demand)

    def __post_init__(self) -> None:
        if self.fanout < 2:
            raise ValueError(f"compaction fan-out must be at least 2 (got {self.fanout})")


def tier(weight: int, fanout: int) -> int:
    return 0 if weight < fanout else int(math.log(weight) / math.log(fanout) + 1e-9)


def is_dead(p: PartInfo) -> bool:
    """Nothing live left: no rows, no failure records, no tombstones to carry."""
    return p.live_rows == 0 and p.live_failures == 0 and p.tombstones == 0


def plan_merges(parts: list[PartInfo], policy: CompactionPolicy) -> list[list[str]]:
    """Groups of part names to merge now (one name: a rewrite or a drop); empty when nothing is due."""
    groups: list[list[str]] = []
    taken: set[str] = set()
    for p in parts:
        if is_dead(p) or (p.rows >= policy.fanout and p.deleted >= policy.rewrite_deleted_fraction * p.rows):
            groups.append([p.name])
            taken.add(p.name)
    by_tier: dict[int, list[str]] = {}
    for p in parts:
        if p.name not in taken:
            by_tier.setdefault(tier(p.weight, policy.fanout), []).append(p.name)
    for t in sorted(by_tier):
        if len(by_tier[t]) >= policy.fanout:
            groups.append(by_tier[t])
    return groups
