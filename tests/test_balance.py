"""balance.py: cost model, DST (tune_budgets) and the Balancer, against hand-computed or
brute-force references."""
import json
import random

import pytest
import torch

import balance
from balance import Balancer, CostModel, OnlineCorrection, tune_budgets, visited_blocks
from batching import check_plan, plan_batches


def test_visited_blocks_matches_brute_force():
    for n in range(1, 12):
        for k in range(1, 15):
            assert visited_blocks(n, k) == sum(min(k, i + 1) for i in range(n))
        assert visited_blocks(n, None) == n * (n + 1) // 2


def test_analytic_formula_and_monotonicity():
    cm = CostModel.analytic(block_size=64, n_embd=128, n_head=4, mlp_ratio=4,
                            attn_flops=1e9, linear_flops=2e9)
    L, k = 1000, 3  # 16 blocks, 1024 padded tokens
    n, hd = 16, 128
    expect = (12 * visited_blocks(n, k) * 64 * 64 * hd / 1e9 + n * (n + 1) * hd / 1e9
              + 6 * 1024 * (4 + 8) * 128 ** 2 / 2e9)
    assert cm.predict(L, k) == pytest.approx(expect)
    times = [cm.predict(L, k) for k in range(1, 20)]
    assert all(a < b for a, b in zip(times[:15], times[1:16]))  # grows until dense (k = 16)
    assert times[15] == times[18] == cm.predict(L, None)         # k >= blocks is dense
    with pytest.raises(ValueError):
        cm.predict(0, 2)


def random_table(rng, block=64):
    lengths, budgets = [256, 1024, 4096], [1, 2, 8, 32]
    attention = []
    for x in lengths:  # as profile() writes it: budgets >= the blocks repeat the dense time
        row = [rng.uniform(1, 2) * x * k * 1e-7 for k in budgets]
        d = next((j for j, k in enumerate(budgets) if k >= x // block), len(budgets) - 1)
        attention.append(row[:d + 1] + [row[d]] * (len(budgets) - d - 1))
    return CostModel("table", block, lengths=lengths, budgets=budgets,
                     linear=[rng.uniform(1, 2) * x * 1e-6 for x in lengths], attention=attention)


def test_table_exact_at_grid_points_and_json_round_trip(tmp_path):
    cm = random_table(random.Random(0))
    for i, L in enumerate(cm.lengths):
        for j, k in enumerate(cm.budgets):
            assert cm.predict(L, k) == pytest.approx(cm.linear[i] + cm.attention[i][j], rel=1e-12)
    for L in (256, 700, 3000, 9000):  # dense is dense however it is asked for
        n = -(-L // 64)
        assert cm.predict(L, None) == cm.predict(L, n) == cm.predict(L, 10 * n)
    with pytest.raises(ValueError, match="multiples of block_size"):
        CostModel("table", 64, lengths=[100], budgets=[1], linear=[1.0], attention=[[1.0]])
    path = tmp_path / "cost.json"
    cm.call_overhead = 0.5 * min(min(cm.attention))    # a profiled table carries one
    cm = CostModel.load(cm.save(path) or path)
    assert cm.call_overhead > 0
    cm.save(path)
    again = CostModel.load(path)
    for L in (100, 256, 700, 5000, 9000):
        for k in (1, 3, 8, 40, None):
            assert again.predict(L, k) == cm.predict(L, k)
    with pytest.raises(FileNotFoundError, match="--profile"):
        CostModel.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({"kind": "table"}))
    with pytest.raises(ValueError, match="format"):
        CostModel.load(tmp_path / "bad.json")


def test_table_interpolation_reproduces_constant_rates():
    # linear seconds/token = 2e-6 and attention seconds/visited block = 3e-5 everywhere: then the
    # interpolated prediction must equal rate x work at any length and budget, on or off grid
    lengths, budgets, b = [128, 512, 2048], [1, 4, 16], 64
    cm = CostModel("table", b, lengths=lengths, budgets=budgets,
                   linear=[2e-6 * x for x in lengths],
                   attention=[[3e-5 * visited_blocks(x // b, k) for k in budgets] for x in lengths])
    for L in (100, 300, 1000, 3000):
        n = -(-L // b)
        for k in (1, 2, 5, 16, 50):
            assert cm.predict(L, k) == pytest.approx(2e-6 * n * b + 3e-5 * visited_blocks(n, k))


def test_profile_builds_a_table_with_a_stand_in_attention(one_thread):  # tests/conftest.py
    calls = []

    def fake_attention(q, k, v, topk, cu_seqlens=None, block_size=64, impl="auto"):
        calls.append((q.shape[2], topk, block_size))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    cm = CostModel.profile(lengths=(100, 256), budgets=(1, 2, 8), n_embd=16, n_head=2,
                           block_size=64, repeats=1, attn_fn=fake_attention, progress=False)
    assert cm.lengths == [128, 256] and cm.budgets == [1, 2, 8]
    assert all(t > 0 for t in cm.linear) and all(t > 0 for row in cm.attention for t in row)
    # 128 tokens = 2 blocks: budgets 2 and 8 are both dense, measured once and reused
    assert cm.attention[0][1] == cm.attention[0][2]
    assert {c[0] for c in calls} == {64, 128, 256} and {c[2] for c in calls} == {64}
    assert cm.call_overhead > 0                  # one block at budget 1: the per-call overhead
    assert cm.predict(256, 2) == pytest.approx(cm.linear[1] + cm.attention[1][1], rel=1e-12)
    rows = balance.check_cost_model(cm, attn_fn=fake_attention, repeats=1, progress=False)
    assert [(L, k) for L, k, _, _ in rows] == [(181, 1), (181, 4)]  # geometric midpoints
    assert all(meas > 0 and pred == cm.predict(L, k) for L, k, meas, pred in rows)


def test_table_is_monotone_in_the_budget_everywhere_even_with_flat_rows():
    """A GPU-like table whose attention time hardly moves with the budget: interpolating the rate
    per visited block made the prediction bulge between grid budgets; it must never fall."""
    lengths, budgets, b = [1024, 4096, 16384], [1, 2, 4, 8, 16, 32], 64
    flat = [[1e-3 * x / 1024] * len(budgets) for x in lengths]          # the same time at every k
    for attention in (flat, random_table(random.Random(1)).attention):
        grid = lengths if attention is flat else [256, 1024, 4096]
        cm = CostModel("table", b, lengths=grid, budgets=budgets if attention is flat else [1, 2, 8, 32],
                       linear=[1e-6 * x for x in grid], attention=attention)
        for L in (700, 1024, 2000, 4096, 9000, 16384, 30000):
            n = -(-L // b)
            times = [cm.predict(L, k) for k in range(1, n + 2)]
            assert all(x <= y * (1 + 1e-12) for x, y in zip(times, times[1:])), L


def test_packed_microbatch_pays_fixed_costs_once():
    """A microbatch runs as one packed row: eight 2K documents cost no more than one dense 16K
    document (8 x less attention work), although eight separate calls would cost more."""
    b, lengths, budgets = 64, [2048, 4096, 8192, 16384], [1, 4, 16, 64, 256]
    over, fixed = 5e-3, 1e-3                                            # per call, per row
    cm = CostModel("table", b, lengths=lengths, budgets=budgets,
                   linear=[fixed + 1e-7 * x for x in lengths],
                   attention=[[over + 1e-6 * visited_blocks(x // b, k) for k in budgets]
                              for x in lengths], call_overhead=over)
    assert cm.fixed == pytest.approx(over + fixed)
    packed = cm.predict_microbatch([2048] * 8, [None] * 8)
    assert packed <= cm.predict(16384, None)
    assert 8 * cm.predict(2048, None) > cm.predict(16384, None) > packed - 1e-12
    assert packed == pytest.approx(cm.fixed + 8 * (cm.predict(2048, None) - cm.fixed))
    assert cm.predict_microbatch([], []) == 0.0
    with pytest.raises(ValueError, match="one budget per length"):
        cm.predict_microbatch([100, 200], [1])


def dst_case(seed, world=4, m=2, n=24, block=64):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(100, 1000), rng.randint(2000, 8000)]) for _ in range(n)]
    cm = CostModel.analytic(block_size=block, n_embd=64, n_head=2)
    plan = plan_batches(lengths, world, m, "naive", block_size=block)
    return lengths, cm, plan


def unit_loads(budgets, plan, lengths, cm, unit):
    out = []
    for rank in plan:
        groups = [[m for m in rank if m]] if unit == "rank" else [[m] for m in rank if m]
        out += [sum(cm.predict_microbatch([lengths[i] for i in m], [budgets[i] for i in m])
                    for m in g) for g in groups if g]
    return out


@pytest.mark.parametrize("unit", ["rank", "microbatch"])
@pytest.mark.parametrize("seed", range(4))
def test_dst_targets_meet_the_anchor_and_never_lengthen_the_step(unit, seed):
    lengths, cm, plan = dst_case(seed)
    k0 = 16
    res = tune_budgets(plan, lengths, cm, "mean", k0, unit=unit)
    blocks = [-(-x // 64) for x in lengths]
    assert all(1 <= b <= n for b, n in zip(res.budgets, blocks))
    loads = unit_loads(res.budgets, plan, lengths, cm, unit)
    assert loads == pytest.approx(res.loads, rel=1e-9)
    assert res.anchor == pytest.approx(sum(res.loads_k0) / len(res.loads_k0))
    short = {u for u, _ in res.shortfalls}
    for u, before, after in zip(res.units, res.loads_k0, res.loads):
        if u not in short:
            assert after <= res.anchor * (1 + 1e-9)                      # meets the anchor
        if before > res.anchor:
            assert after <= before                                       # stragglers only shrink
    rank_at = lambda budgets: [sum(cm.predict_microbatch([lengths[i] for i in m], [budgets[i] for i in m])  # noqa: E731
                                   for m in rank) for rank in plan]
    at_k0 = rank_at([min(k0, n) for n in blocks])
    assert max(rank_at(res.budgets)) <= max(at_k0) * (1 + 1e-9)         # the step got no longer
    assert max(res.loads) < max(res.loads_k0)
    assert res == tune_budgets(plan, lengths, cm, "mean", k0, unit=unit)  # deterministic


@pytest.mark.parametrize("lengths", [[8000, 3000, 6000, 1500, 7000, 2500],
                                     [8000, 8000, 8000, 8000, 2000, 300],
                                     [16000, 15000, 900, 16000, 400, 15500, 700, 16000]])
def test_dst_levels_are_maximal(lengths):
    """The documented level rule, rebuilt here: at level t a rank's n samples, shortest first,
    get t // n + 1 blocks for the first t % n and t // n for the rest. Stragglers take the
    largest level at or below k0's that meets the step time (the slowest rank after the cut);
    the others the largest level that keeps them within it: one more step would overshoot."""
    cm = CostModel.analytic(block_size=64, n_embd=64, n_head=2)
    plan = plan_batches(lengths, 3, 2, "naive")
    k0 = 8
    res = tune_budgets(plan, lengths, cm, "mean", k0, unit="rank")
    blocks = [-(-x // 64) for x in lengths]

    def at(r, t):
        order = sorted((i for m in plan[r] for i in m), key=lambda i: (lengths[i], i))
        ks = {i: min(blocks[i], t // len(order) + (p < t % len(order))) for p, i in enumerate(order)}
        return ks, sum(cm.predict_microbatch([lengths[i] for i in m], [ks[i] for i in m]) for m in plan[r])
    final = [sum(cm.predict_microbatch([lengths[i] for i in m], [res.budgets[i] for i in m])
                     for m in plan[r]) for r in range(3)]
    step = max(final)
    grew = 0
    for r in range(3):
        n = sum(len(m) for m in plan[r])
        t = max(t for t in range(n, n * max(blocks) + 1)   # the last level giving these budgets
                if all(at(r, t)[0][i] == res.budgets[i] for m in plan[r] for i in m))
        top = n * max(blocks[i] for m in plan[r] for i in m)
        assert at(r, t)[1] <= step * (1 + 1e-9)
        if t < top and not (res.loads_k0[r] > res.anchor and t == n * k0):
            assert at(r, t + 1)[1] > step * (1 - 1e-9)                  # one more step overshoots
        grew += t > n * k0
    assert max(res.loads_k0) >= step                                    # the step got no longer
    assert grew >= (1 if lengths[-1] == 300 else 0)  # an idle rank takes free accuracy


def test_dst_anchors_and_rank_scale():
    lengths, cm, plan = dst_case(7)
    k0 = 16
    blocks = [-(-x // 64) for x in lengths]
    mean = tune_budgets(plan, lengths, cm, "mean", k0)
    hi = tune_budgets(plan, lengths, cm, "max", k0)
    assert all(b >= min(n, k0) for b, n in zip(hi.budgets, blocks))  # MAX: nobody shrinks
    lo = tune_budgets(plan, lengths, cm, "min", k0)
    assert all(b <= min(n, k0) for b, n in zip(lo.budgets, blocks))  # MIN: nobody grows above k0
    # a rank measured 3x slower than predicted becomes a straggler and gets smaller budgets
    slow = tune_budgets(plan, lengths, cm, "mean", k0, rank_scale=[3.0, 1.0, 1.0, 1.0])
    r0 = [i for micro in plan[0] for i in micro]
    assert sum(slow.budgets[i] for i in r0) < sum(mean.budgets[i] for i in r0)


def test_dst_bad_inputs():
    lengths, cm, plan = dst_case(0)
    for kw, msg in ((dict(anchor="average"), "anchor"), (dict(k0=0), "k0"), (dict(k0=2.5), "k0"),
                    (dict(block_size=128), "block_size"), (dict(unit="node"), "unit"),
                    (dict(rank_scale=[1.0, float("nan"), 1.0, 1.0]), "rank_scale"),
                    (dict(rank_scale=[1.0]), "rank_scale")):
        with pytest.raises(ValueError, match=msg):
            tune_budgets(plan, lengths, cm, **{"k0": 16, **kw})
    with pytest.raises(ValueError, match="exactly once"):
        tune_budgets([[[0, 1]], [[1]]], [100, 100], cm, k0=4)
    with pytest.raises(ValueError, match="lengths"):
        tune_budgets([[[0]]], [0], cm, k0=4)


def test_online_correction_learns_scale_and_relative_speed():
    corr = OnlineCorrection(2, decay=0.5)
    corr.update([2.0, 1.0], [0.01, 0.01])        # absolute seconds 150x off: the scale takes it
    assert corr.scale == pytest.approx(150.0) and corr.factors == pytest.approx([4 / 3, 2 / 3])
    assert corr.corrected([0.01, 0.01]) == pytest.approx([2.0, 1.0])
    corr.update([3.0, 3.0], [0.01, 0.01])
    assert corr.scale == pytest.approx(0.5 * 150 + 0.5 * 300)
    assert corr.factors == pytest.approx([0.5 * 4 / 3 + 0.5, 0.5 * 2 / 3 + 0.5])
    corr.update([0.0, 0.0], [0.0, 0.0])          # nothing ran: nothing learnt
    assert corr.steps == 2
    for bad in (([float("nan"), 1.0], [1.0, 1.0]), ([1.0, 1.0], [-1.0, 1.0]), ([1.0], [1.0])):
        with pytest.raises(ValueError):
            corr.update(*bad)
    with pytest.raises(ValueError):
        OnlineCorrection(0)


def test_balancer_plan_is_pure_and_observe_moves_the_estimates():
    rng = random.Random(3)
    cm = CostModel.analytic(block_size=64, n_embd=64, n_head=2)
    make = lambda: Balancer(cm, 4, "sab+dst", k0=8, p=0.1, n_layer=2, capacity=16384)  # noqa: E731
    a, b = make(), make()
    for _ in range(3):  # two "ranks": same inputs, same plans, every sample once
        lengths = [rng.choice([rng.randint(100, 2000), rng.randint(12000, 16000)]) for _ in range(16)]
        pa, pb = a.plan(lengths), b.plan(lengths)
        assert (pa.plan, pa.targets, pa.predicted) == (pb.plan, pb.targets, pb.predicted)
        check_plan(pa.plan, 16)
        used = [[t + 2 * (i % 3 == 0) for i, t in enumerate(pa.targets)], list(pa.targets)]
        times = [1.0, 2.0, 1.5, 1.2]
        la, lb = a.observe(pa, used, times), b.observe(pb, used, times)
        assert la == lb
        assert la["floor_above_target"] == sum(i % 3 == 0 for i in range(16))   # counted
        assert la["mean_budget_layer"] == pytest.approx([sum(used[0]) / 16, sum(used[1]) / 16])
    assert a.corr.steps == 2                     # the first observed step is a warm-up
    assert a.sab.ema and a.state_dict() == b.state_dict()
    with pytest.raises(ValueError, match="n_layer"):
        a.observe(pa, used[:1], times)
    with pytest.raises(ValueError, match="balance"):
        Balancer(cm, 4, "sab+magic")
    none = Balancer(cm, 4, "none", k0=8)
    step = none.plan([100, 5000, 20000])
    assert step.targets == [2, 8, 8] and none.layer_args() == {}


@pytest.mark.parametrize("kw", [dict(n_embd=float("nan")), dict(attn_flops=-1.0), dict(n_head=0),
                                dict(block_size=0), dict(linear_flops=float("inf"))])
def test_analytic_cost_model_refuses_bad_numbers(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        CostModel.analytic(**kw)


def test_dst_tolerance_leaves_balanced_ranks_uncut_and_grows_the_cheap_blocks():
    """After SAB the ranks sit within a percent of each other: cutting a whole block of a long
    document there buys a fraction of a percent of step time. With the tolerance no target falls
    below k0, the step time stays, and the short documents take the room that is left."""
    cm = CostModel.analytic(block_size=64, n_embd=64, n_head=2)
    lengths = [16384, 16384, 700, 16384, 16000, 1200, 16384, 16200, 900, 500]
    plan = [[[0, 2], [1]], [[3, 5], [4]], [[6, 8], [7, 9]]]
    k0 = 8
    blocks = [-(-x // 64) for x in lengths]
    loads = lambda ks: [sum(cm.predict_microbatch([lengths[i] for i in m], [ks[i] for i in m])  # noqa: E731
                            for m in rank) for rank in plan]
    at_k0 = loads([min(k0, n) for n in blocks])
    assert max(at_k0) / min(at_k0) < 1.02                              # balanced, not equal
    strict = tune_budgets(plan, lengths, cm, "mean", k0, tolerance=0.0)
    loose = tune_budgets(plan, lengths, cm, "mean", k0, tolerance=0.02)
    assert any(b < min(k0, n) for b, n in zip(strict.budgets, blocks))  # whole blocks cut
    assert all(b >= min(k0, n) for b, n in zip(loose.budgets, blocks))
    assert max(loads(loose.budgets)) <= max(at_k0) * (1 + 1e-9)
    assert sum(loose.budgets) > sum(min(k0, n) for n in blocks)         # free accuracy
    with pytest.raises(ValueError, match="tolerance"):
        tune_budgets(plan, lengths, cm, "mean", k0, tolerance=-0.1)


def test_correction_off_keeps_targets_independent_of_timings_but_still_reports():
    cm = CostModel.analytic(block_size=64, n_embd=64, n_head=2)
    lengths = [16000, 900, 15000, 700, 14000, 16384, 300, 12000]
    fast, slow = (Balancer(cm, 2, "sab+dst", k0=8, n_layer=1, correction=False) for _ in range(2))
    for _ in range(3):
        a, b = fast.plan(lengths), slow.plan(lengths)
        assert a.targets == b.targets and a.plan == b.plan
        fast.observe(a, [a.targets], [1.0, 1.0])
        logs = slow.observe(b, [b.targets], [1.0, 5.0])             # rank 1 five times slower
    assert slow.corr.scale > 1e3                   # the analytic seconds are far off: learnt anyway
    assert logs["pred_err"] < 0.5                  # so the logged prediction error means something
    on = Balancer(cm, 2, "sab+dst", k0=8, n_layer=1)
    for _ in range(3):
        st = on.plan(lengths)
        on.observe(st, [st.targets], [1.0, 5.0])
    assert on.plan(lengths).targets != fast.plan(lengths).targets   # with it on, DST reacts
