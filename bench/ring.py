"""Ring balance and remap fraction for the gateway's tenant ring (docs/design.md §10).

For N = 3..10 workers and 10,000 tenants it reports, as a markdown table:

* the fraction of tenants that move when a worker joins (N → N+1), against the ideal
  ``1/(N+1)`` (goal: within ±2 points), and whether every moved tenant went to the new
  worker (consistent hashing promises that);
* the busiest worker's load over the mean at N workers (goal: ≤ 1.15);
* the cost of one lookup (home node) and of one full failover order (``candidates``).

``TenantRing`` uses ``vnodes=320`` (ketama: 1,280 points per worker); the last table
shows why, against uhashring's default of 40.

Run: ``.venv/bin/python -m bench.ring [--tenants 10000]``.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from dataclasses import dataclass

from gateway.ring import DEFAULT_VNODES, TenantRing

BALANCE_GOAL = 1.15
REMAP_TOLERANCE = 0.02


def worker_urls(n: int) -> list[str]:
    return [f"http://10.0.0.{i + 1}:8081" for i in range(n)]


@dataclass(frozen=True)
class Row:
    n: int
    moved: float
    all_to_new: bool
    balance: float

    @property
    def ideal(self) -> float:
        return 1 / (self.n + 1)


def measure(n: int, tenants: list[str], vnodes: int) -> Row:
    ring = TenantRing(worker_urls(n), vnodes=vnodes)
    before = [ring.node_for(t) for t in tenants]
    new = f"http://10.0.1.{n + 1}:8081"
    ring.add(new)
    after = [ring.node_for(t) for t in tenants]
    moved = [a for b, a in zip(before, after, strict=True) if a != b]
    load = Counter(before)
    return Row(
        n=n,
        moved=len(moved) / len(tenants),
        all_to_new=all(a == new for a in moved),
        balance=max(load.values()) / (len(tenants) / n),
    )


def per_call_us(ring: TenantRing, tenants: list[str], candidates: bool) -> float:
    lookup = ring.candidates if candidates else ring.node_for
    started = time.perf_counter()
    for tenant in tenants:
        lookup(tenant)
    return (time.perf_counter() - started) / len(tenants) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.ring", description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=10_000)
    args = parser.parse_args(argv)
    tenants = [f"tenant-{i}" for i in range(args.tenants)]

    rows = [measure(n, tenants, DEFAULT_VNODES) for n in range(3, 11)]
    print(f"## Tenant ring (uhashring ketama, vnodes={DEFAULT_VNODES}, {len(tenants)} tenants)")
    print()
    print("| N → N+1 | moved | ideal 1/(N+1) | deviation | all to new node "
          "| max/mean load at N |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        dev = r.moved - r.ideal
        print(f"| {r.n} → {r.n + 1} | {r.moved:.2%} | {r.ideal:.2%} | {dev:+.2%}"
              f"{'' if abs(dev) <= REMAP_TOLERANCE else ' ✗'} | {'yes' if r.all_to_new else 'NO'}"
              f" | {r.balance:.3f}{'' if r.balance <= BALANCE_GOAL else ' ✗'} |")
    worst_dev = max(abs(r.moved - r.ideal) for r in rows)
    worst_bal = max(r.balance for r in rows)
    ok = worst_dev <= REMAP_TOLERANCE and worst_bal <= BALANCE_GOAL and all(
        r.all_to_new for r in rows)
    print()
    print(f"Worst remap deviation {worst_dev:.2%} (goal ±{REMAP_TOLERANCE:.0%}); worst "
          f"max/mean {worst_bal:.3f} (goal ≤ {BALANCE_GOAL}): {'PASS' if ok else 'FAIL'}.")

    ring = TenantRing(worker_urls(5))
    per_call_us(ring, tenants[:1000], candidates=False)  # warm up
    home_us = per_call_us(ring, tenants, candidates=False)
    order_us = per_call_us(ring, tenants, candidates=True)
    print()
    print("| lookup (5 workers) | µs per call |")
    print("|---|---|")
    print(f"| home node (`node_for`) | {home_us:.2f} |")
    print(f"| failover order (`candidates`) | {order_us:.2f} |")

    print()
    print("| vnodes | worst max/mean, N = 3..10 | worst remap deviation |")
    print("|---|---|---|")
    for vnodes in (40, 160, DEFAULT_VNODES):
        vrows = rows if vnodes == DEFAULT_VNODES else [
            measure(n, tenants, vnodes) for n in range(3, 11)]
        print(f"| {vnodes}{' (chosen)' if vnodes == DEFAULT_VNODES else ''} "
              f"| {max(r.balance for r in vrows):.3f} "
              f"| {max(abs(r.moved - r.ideal) for r in vrows):.2%} |")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
