"""Checks of exercise 5: LPT packing (batching._lpt, through batching.plan_batches).

References are independent of the code under test: hand-traced packings, LPT's two known bounds
(list scheduling; Graham 1969) against a brute-force optimum, and the plan invariants."""
import itertools
import random

import batching
from batching import check_plan, imbalance, plan_batches


def lpt(costs, n_bins, **kw):
    """_lpt on samples 0..n-1 with one token each (no capacity unless given)."""
    return batching._lpt(range(len(costs)), costs, kw.pop("tokens", [1] * len(costs)), n_bins,
                         kw.pop("capacity", None), **kw)


def loads(bins, costs):
    return [sum(costs[i] for i in b) for b in bins]


def test_hand_traced_example():
    """Costs 7 6 5 4 3 2 into two bins: {7, 4, 3} and {6, 5, 2}, as traced by hand in the README"""
    bins = lpt([7, 6, 5, 4, 3, 2], 2)
    assert [sorted(b) for b in bins] == [[0, 3, 4], [1, 2, 5]], (
        f"got bins {bins} (sample indices; costs 7 6 5 4 3 2): expected [[0, 3, 4], [1, 2, 5]]. "
        "Take the items heaviest first and put each into the bin with the smallest load so far; "
        "on equal loads, the lower bin")


def test_ties_break_by_index_and_bin():
    """Equal costs: items in index order, into the lower of two equally loaded bins"""
    bins = lpt([1, 1, 1, 1], 2)
    assert [list(b) for b in bins] == [[0, 2], [1, 3]], (
        f"four equal costs into two bins gave {bins}, expected [[0, 2], [1, 3]]: sort by "
        "(-cost, index), and break equal loads by the lower bin number (a heap of (load, bin) does)")


def test_every_sample_once_and_equal_microbatch_counts():
    """plan_batches with lbb and sab: every sample exactly once, every rank the same number of microbatches"""
    rng = random.Random(0)
    for _ in range(100):
        lengths = [rng.choice([rng.randint(50, 2000), rng.randint(8000, 16000)])
                   for _ in range(rng.randint(1, 24))]
        world, m = rng.randint(1, 5), rng.randint(1, 4)
        for policy in ("lbb", "sab"):
            plan = plan_batches(lengths, world, m, policy, cost=lambda x: x ** 1.5)
            try:
                check_plan(plan, len(lengths))
            except ValueError as e:
                raise AssertionError(f"{policy}, {len(lengths)} samples on {world} ranks x {m} "
                                     f"microbatches: {e}") from None
            assert len(plan) == world and all(len(r) == m for r in plan), (
                f"{policy}: expected {world} ranks of {m} microbatches, got "
                f"{[len(r) for r in plan]}: return exactly n_bins bins, empty ones included")


def test_list_scheduling_bound():
    """LPT's guarantee: the heaviest bin carries at most the mean load plus the largest item"""
    rng = random.Random(1)
    for _ in range(300):
        costs = [rng.expovariate(1.0) ** 2 for _ in range(rng.randint(1, 30))]
        n = rng.randint(1, 6)
        got = loads(lpt(costs, n), costs)
        bound = sum(costs) / n + max(costs)
        assert max(got) <= bound + 1e-9, (
            f"{len(costs)} items into {n} bins: heaviest bin {max(got):.3f} > mean + largest item "
            f"{bound:.3f}: is each item going to the currently lightest bin?")


def test_within_four_thirds_of_the_optimum():
    """Graham's bound: at most (4/3 - 1/(3m)) x the best split, checked against brute force"""
    rng = random.Random(2)
    for _ in range(40):
        costs = [rng.randint(1, 20) for _ in range(8)]
        m = 3
        best = min(max(loads([[i for i in range(8) if a[i] == b] for b in range(m)], costs))
                   for a in itertools.product(range(m), repeat=8))
        got = max(loads(lpt(costs, m), costs))
        assert got <= (4 / 3 - 1 / (3 * m)) * best + 1e-9, (
            f"costs {costs} on 3 bins: heaviest bin {got}, best possible {best}: LPT is never "
            "worse than 4/3 of it. Are the items sorted heaviest first?")


def test_capacity_skips_full_bins():
    """A bin without token room is skipped; no bin with room at all raises _NoFit"""
    # costs 5 4 3, tokens 6 6 6, capacity 10: bin 0 takes 5; 4 goes to bin 1; 3 would go to
    # bin 1 (load 4 < 5) but neither has room left for 6 tokens
    try:
        lpt([5, 4, 3], 2, tokens=[6, 6, 6], capacity=10)
    except batching._NoFit:
        pass
    else:
        raise AssertionError("costs 5 4 3, 6 tokens each, two bins of 10 tokens: the third item "
                             "fits in no bin, so _lpt must raise _NoFit (plan_batches then tries "
                             "more microbatches)")
    bins = lpt([5, 4, 1], 2, tokens=[6, 2, 5], capacity=8)
    # 5 -> bin 0 (6 tokens); 4 -> bin 1 (2 tokens); 1 would prefer bin 1 (load 4) and fits there
    assert [sorted(b) for b in bins] == [[0], [1, 2]], f"got {bins}, expected [[0], [1, 2]]"
    bins = lpt([5, 4, 1], 2, tokens=[2, 6, 5], capacity=8)
    # 1 prefers bin 1 (load 4) but 6 + 5 tokens > 8: it goes to bin 0 (2 + 5 <= 8)
    assert [sorted(b) for b in bins] == [[0, 2], [1]], (
        f"got {bins}, expected [[0, 2], [1]]: when the lightest bin has no token room, take the "
        "next lightest, and keep the skipped bin for later items")
    lengths = [900, 800, 700, 600]       # 960, 832, 704, 640 tokens padded to blocks of 64
    plan = plan_batches(lengths, 1, None, "lbb", capacity=1024, block_size=64)
    used = [sum(batching.padded(lengths[i], 64) for i in mb) for mb in plan[0]]
    assert max(used) <= 1024, f"microbatches of {used} tokens, capacity 1024: {plan}"


def test_pipeline_key():
    """With stages > 1 the lightest bin is the one with the smallest load + (stages - 1) x its first item"""
    got = [sorted(b) for b in lpt([10, 6, 5, 5], 2, stages=4)]
    assert got == [[0], [1, 2, 3]], (
        f"costs 10 6 5 5, two bins, 4 stages: got {got}, expected [[0], [1, 2, 3]] (bin 0's key "
        "is 10 + 3 x 10 = 40, bin 1's stays below it). With stages = 1 the same costs give "
        "[[0, 3], [1, 2]]")
    assert [sorted(b) for b in lpt([10, 6, 5, 5], 2)] == [[0, 3], [1, 2]]


def test_balanced_beats_round_robin():
    """Observe: imbalance (max / mean) of round-robin against LBB and SAB on a bimodal batch"""
    def cost(length):   # seconds: a fixed cost per sample, linear work and attention
        return 0.05 + length * 1e-4 + (length / 1000) ** 2 * 1e-2

    rng = random.Random(3)
    rows = []
    for _ in range(20):
        lengths = [rng.randint(100, 2000) if rng.random() < 0.5 else rng.randint(12000, 16384)
                   for _ in range(16)]
        costs = [cost(x) for x in lengths]
        rows.append({p: imbalance(plan_batches(lengths, 4, 4, p, cost=cost), costs)["rank"]
                     for p in ("naive", "lbb", "sab")})
    mean = {p: sum(r[p] for r in rows) / len(rows) for p in rows[0]}
    print("\n        rank imbalance over 20 bimodal batches (16 samples, 4 ranks x 4 microbatches): "
          + ", ".join(f"{p} {v:.3f}" for p, v in mean.items()))
    assert mean["sab"] < mean["naive"] and mean["lbb"] < mean["naive"], (
        f"mean rank imbalance {mean}: packing by cost should beat round-robin")
    assert mean["sab"] <= mean["lbb"] + 0.01, (
        f"mean rank imbalance {mean}: SAB packs by the true cost, LBB by a proxy (length^2), so "
        "SAB should not lose on average")
