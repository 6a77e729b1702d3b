"""batching.py: plan invariants, capacity, LPT bounds, SAB state (pure Python, no model)."""
import random

import pytest

from balance import CostModel
from batching import (SABState, check_plan, imbalance, imbalance_report, lbb_cost, order_for_1f1b, padded,
                      plan_batches)


def long_tailed(rng, n):
    return [max(1, int(256 * rng.paretovariate(1.1))) for _ in range(n)]


def assert_invariants(plan, n, world, m, lengths=None, capacity=None, block=64):
    # independent re-check (not check_plan): exactly once, equal microbatch counts, capacity
    assert len(plan) == world and all(len(rank) == m for rank in plan)
    flat = sorted(i for rank in plan for micro in rank for i in micro)
    assert flat == list(range(n))
    if capacity is not None:
        for rank in plan:
            for micro in rank:
                assert sum(-(-lengths[i] // block) * block for i in micro) <= capacity


CASES = {
    "random": lambda rng: long_tailed(rng, 37),
    "all_equal": lambda rng: [1000] * 24,
    "one_giant": lambda rng: [100] * 15 + [50_000],
    "fewer_than_slots": lambda rng: [500, 70, 9000],
    "empty": lambda rng: [],
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("policy", ["naive", "lbb", "sab"])
def test_invariants(case, policy):
    rng = random.Random(1)
    lengths = CASES[case](rng)
    plan = plan_batches(lengths, 4, 3, policy, cost=lambda x: x ** 1.5)
    assert_invariants(plan, len(lengths), 4, 3)
    check_plan(plan, len(lengths))
    assert plan == plan_batches(lengths, 4, 3, policy, cost=lambda x: x ** 1.5)  # deterministic


@pytest.mark.parametrize("policy", ["naive", "lbb", "sab"])
def test_capacity_respected_and_auto_microbatches(policy):
    rng = random.Random(2)
    lengths = [rng.randint(1, 2000) for _ in range(60)]
    cost = lambda x: x ** 1.5  # noqa: E731  (ignored by naive and lbb)
    plan = plan_batches(lengths, 3, 8, policy, cost=cost, capacity=4096)
    assert_invariants(plan, 60, 3, 8, lengths, 4096)
    auto = plan_batches(lengths, 3, None, policy, cost=cost, capacity=4096)
    m = len(auto[0])
    assert_invariants(auto, 60, 3, m, lengths, 4096)
    lower = -(-sum(padded(x, 64) for x in lengths) // (3 * 4096))
    assert m >= lower
    if m > lower:  # the automatic choice is the smallest that fits
        with pytest.raises(ValueError, match="num_microbatches"):
            plan_batches(lengths, 3, m - 1, policy, cost=cost, capacity=4096)


def test_capacity_errors_name_the_fix():
    with pytest.raises(ValueError, match="crop documents"):
        plan_batches([100, 5000], 2, 2, "lbb", capacity=4096)
    with pytest.raises(ValueError, match="raise num_microbatches or capacity"):
        plan_batches([4000] * 10, 2, 2, "sab", cost=float, capacity=4096)
    with pytest.raises(ValueError, match="policy"):
        plan_batches([1, 2], 2, 2, "random")
    with pytest.raises(ValueError, match="positive int"):
        plan_batches([0, 2], 2, 2, "naive")
    with pytest.raises(ValueError, match="world_size"):
        plan_batches([1, 2], 0, 2, "naive")


def test_naive_is_round_robin_in_data_order():
    plan = plan_batches(list(range(1, 13)), 3, 4, "naive")
    for i in range(12):  # slot s = i: rank s % 3, microbatch s // 3
        assert plan[i % 3][i // 3] == [i]


@pytest.mark.parametrize("seed", range(5))
def test_lpt_within_list_scheduling_bound(seed):
    rng = random.Random(seed)
    lengths = long_tailed(rng, 50)
    world, m = 4, 3
    for policy, cost in [("lbb", lbb_cost), ("sab", lambda x: 3.0 * x + x * x / 500)]:
        plan = plan_batches(lengths, world, m, policy, cost=cost)
        c = [cost(x) for x in lengths]
        ranks = [sum(c[i] for micro in rank for i in micro) for rank in plan]
        assert max(ranks) <= sum(c) / world + max(c) + 1e-6
        for rank, total in zip(plan, ranks):  # level 2, inside each rank
            biggest = max((c[i] for micro in rank for i in micro), default=0.0)
            assert max(sum(c[i] for i in micro) for micro in rank) <= total / m + biggest + 1e-6


def test_balanced_policies_beat_naive_on_long_tails():
    wins, naive_sum, lbb_sum = 0, 0.0, 0.0
    for seed in range(20):
        rng = random.Random(seed)  # log-normal lengths: long-tailed, yet not one item > all
        lengths = [max(1, int(rng.lognormvariate(7.0, 0.8))) for _ in range(64)]
        c = [lbb_cost(x) for x in lengths]
        a = imbalance(plan_batches(lengths, 8, 2, "naive"), c)["rank"]
        b = imbalance(plan_batches(lengths, 8, 2, "lbb"), c)["rank"]
        wins += b <= a
        naive_sum, lbb_sum = naive_sum + a, lbb_sum + b
    assert wins == 20 and lbb_sum < 0.8 * naive_sum


def test_sab_needs_a_cost_and_follows_it():
    lengths = long_tailed(random.Random(3), 30)
    with pytest.raises(ValueError, match="needs cost"):
        plan_batches(lengths, 3, 2, "sab")
    cm = CostModel.analytic(block_size=64)
    by_model = plan_batches(lengths, 3, 2, "sab", cost=lambda x: cm.predict(x, None))
    assert plan_batches(lengths, 3, 2, "sab", cost=lambda x: 2.0 * cm.predict(x, None)) == by_model
    assert plan_batches(lengths, 3, 2, "sab", cost=lbb_cost) == plan_batches(lengths, 3, 2, "lbb")


def test_imbalance_hand_computed():
    plan = [[[0], [1]], [[2], []]]
    out = imbalance(plan, [1.0, 3.0, 2.0])
    assert out["rank"] == pytest.approx(4.0 / 3.0)       # ranks 4, 2
    assert out["microbatch"] == pytest.approx(3.0 / 2.0)  # non-empty 1, 3, 2
    assert "1.333 -> 1.333" in imbalance_report(plan, plan, [1.0, 3.0, 2.0])
    better = [[[0], [2]], [[1], []]]  # ranks 3, 3
    assert imbalance_report(plan, better, [1.0, 3.0, 2.0]) == (
        "imbalance max/mean: rank 1.333 -> 1.000, microbatch 1.500 -> 1.500")


def test_check_plan_rejects_broken_plans():
    with pytest.raises(ValueError, match="exactly once"):
        check_plan([[[0, 0]], [[1]]], 2)
    with pytest.raises(ValueError, match="microbatches"):
        check_plan([[[0], []], [[1]]], 2)


def test_sab_state_ema_decays_once_per_step_and_cost_fn():
    state = SABState(k0=32, block_size=256, decay=0.5)
    assert state.budget(100_000) == 32  # nothing seen yet: k0
    state.update([20_000, 30_000], [10, 30])  # 79 and 118 blocks: buckets 7 and 7
    assert state.bucket(20_000) == state.bucket(30_000) == 7
    assert state.ema[7] == pytest.approx(20.0)       # first step: the step's mean
    assert state.budget(25_000) == 20 and state.budget(1000) == 32
    # one decay per step, however many samples: 9 samples at 4 count as one step at 4
    state.update([20_000] * 9, [4] * 9)
    assert state.ema[7] == pytest.approx(0.5 * 20 + 0.5 * 4)

    class Spy:
        def predict(self, seq_len, topk):
            return seq_len * 1000 + topk
    assert state.cost_fn(Spy())(20_000) == 20_000 * 1000 + 12
    again = SABState.from_state_dict(state.state_dict())
    assert again.ema == state.ema and again.budget(20_000) == 12
    for bad in (dict(k0=0, block_size=64), dict(k0=4, block_size=64, decay=1.0),
                dict(k0=4, block_size=64, decay=float("nan")), dict(k0=2.5, block_size=64)):
        with pytest.raises(ValueError):
            SABState(**bad)
    with pytest.raises(ValueError, match="finite"):
        state.update([100], [float("nan")])


def test_order_for_1f1b_puts_small_microbatches_at_both_ends():
    assert order_for_1f1b([5, 1, 4, 2, 3]) == [1, 3, 5, 4, 2]
    assert order_for_1f1b([]) == [] and order_for_1f1b([7]) == [7]
    costs = [random.Random(1).random() for _ in range(9)]
    out = order_for_1f1b(costs)
    assert sorted(out) == sorted(costs) and max(out) == out[len(out) // 2]


def test_bad_costs_are_refused():
    with pytest.raises(ValueError, match="finite"):
        plan_batches([100, 200], 2, 1, "sab", cost=lambda x: float("nan"))
    with pytest.raises(ValueError, match="finite"):
        plan_batches([100, 200], 2, 1, "sab", cost=lambda x: -1.0)
    with pytest.raises(ValueError, match="positive int"):
        plan_batches([100, True], 2, 1, "lbb")


@pytest.mark.parametrize("policy", ["sab", "lbb"])
def test_pipeline_aware_level_one_matches_greedy_reference(policy):
    # with pipeline_stages = P, "sab" and "lbb" alike give each sample (heaviest first) to the rank
    # whose predicted 1F1B time (sum + (P - 1) * largest) / P grows least: a direct twin
    rng = random.Random(4)
    lengths = [rng.randint(1, 400) for _ in range(40)]
    cost = (lambda x: float(x * x % 997 + 1)) if policy == "sab" else (lambda x: float(x * x))  # noqa: E731
    P, world = 4, 3
    plan = plan_batches(lengths, world, 5, policy, cost=cost, pipeline_stages=P)
    total, top, want = [0.0] * world, [0.0] * world, [set() for _ in range(world)]
    for i in sorted(range(40), key=lambda i: (-cost(lengths[i]), i)):
        c = cost(lengths[i])
        r = min(range(world), key=lambda r: ((total[r] + c + (P - 1) * max(top[r], c)) / P, r))
        total[r], top[r] = total[r] + c, max(top[r], c)
        want[r].add(i)
    assert [{i for micro in rank for i in micro} for rank in plan] == want
