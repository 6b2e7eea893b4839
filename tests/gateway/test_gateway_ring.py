"""The tenant ring: determinism, failover order, remapping on membership change, balance."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from gateway.ring import TenantRing

TENANTS = [f"tenant-{i}" for i in range(10_000)]


def nodes(n: int) -> list[str]:
    return [f"http://10.0.0.{i + 1}:8081" for i in range(n)]


def owners(ring: TenantRing) -> list[str | None]:
    return [ring.node_for(t) for t in TENANTS]


def test_empty_ring_has_no_candidates() -> None:
    ring = TenantRing()
    assert ring.candidates("acme") == [] and ring.node_for("acme") is None


def test_deterministic_whatever_the_order_members_were_learnt_in() -> None:
    members = nodes(5)
    shuffled = members[:]
    random.Random(7).shuffle(shuffled)
    a, b = TenantRing(members), TenantRing(shuffled)
    built = TenantRing()
    for node in reversed(members):
        built.add(node)
    sample = TENANTS[:500]
    assert [a.candidates(t) for t in sample] == [b.candidates(t) for t in sample]
    assert [a.candidates(t) for t in sample] == [built.candidates(t) for t in sample]


def test_candidates_are_every_node_once_home_first() -> None:
    ring = TenantRing(nodes(6))
    seconds: Counter[str] = Counter()
    for tenant in TENANTS[:2000]:
        cands = ring.candidates(tenant)
        assert sorted(cands) == sorted(ring.nodes)
        assert cands[0] == ring.node_for(tenant)
        seconds[cands[1]] += 1
    # A dead node's tenants spread over the survivors, not onto one neighbour.
    assert len(seconds) == 6


def test_membership_changes() -> None:
    ring = TenantRing(nodes(3))
    assert not ring.set_nodes(reversed(nodes(3)))  # same members: no change
    assert ring.add("http://10.0.0.9:8081") and len(ring) == 4
    assert not ring.add("http://10.0.0.9:8081")
    assert ring.remove("http://10.0.0.9:8081") and "http://10.0.0.9:8081" not in ring
    assert ring.nodes == tuple(sorted(nodes(3)))


@pytest.mark.parametrize("n", [3, 5, 8])
def test_adding_a_node_moves_about_one_share_all_to_the_new_node(n: int) -> None:
    ring = TenantRing(nodes(n))
    before = owners(ring)
    new = f"http://10.0.1.{n}:8081"
    ring.add(new)
    after = owners(ring)
    moved = [(b, a) for b, a in zip(before, after, strict=True) if a != b]
    assert all(a == new for _, a in moved)
    fraction = len(moved) / len(TENANTS)
    assert abs(fraction - 1 / (n + 1)) <= 0.02, fraction


def test_removing_a_node_moves_only_its_tenants() -> None:
    members = nodes(5)
    ring = TenantRing(members)
    before = owners(ring)
    ring.remove(members[2])
    after = owners(ring)
    for b, a in zip(before, after, strict=True):
        assert (a == b) == (b != members[2])


@pytest.mark.parametrize("n", range(3, 11))
def test_balance_over_ten_thousand_tenants(n: int) -> None:
    load = Counter(owners(TenantRing(nodes(n))))
    mean = len(TENANTS) / n
    assert len(load) == n
    assert max(load.values()) / mean <= 1.15
