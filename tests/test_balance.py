"""balance.py: cost model, DST (tune_budgets) and the 1F1B simulator, against hand-computed or
brute-force references."""
import json
import random

import pytest
import torch

import balance
from balance import (CostModel, OnlineCorrection, coverage_floor, simulate, synthetic_coverage,
                     tune_budgets, visited_blocks)
from batching import plan_batches


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
    assert {c[0] for c in calls} == {128, 256} and {c[2] for c in calls} == {64}
    assert cm.predict(256, 2) == pytest.approx(cm.linear[1] + cm.attention[1][1], rel=1e-12)
    rows = balance.check_cost_model(cm, attn_fn=fake_attention, repeats=1, progress=False)
    assert [(L, k) for L, k, _, _ in rows] == [(181, 1), (181, 4)]  # geometric midpoints
    assert all(meas > 0 and pred == cm.predict(L, k) for L, k, meas, pred in rows)


def test_coverage_floor_brute_force():
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(1, 40)
        curve = synthetic_coverage(n, rng.uniform(0.3, 2.0))
        assert all(a <= b + 1e-12 for a, b in zip(curve, curve[1:]))
        assert curve[-1] == pytest.approx(1)
        k0, p = rng.randint(1, 48), rng.choice([0.0, 0.1, 0.3])
        c0 = curve[k0 - 1] if k0 <= n else 1.0
        cov = lambda k: curve[k - 1] if k <= n else 1.0  # noqa: E731
        want = next(k for k in range(1, 100) if cov(k) >= (1 - p) * c0 - 1e-12)
        assert coverage_floor(curve, k0, p) == want


def dst_case(seed, world=4, m=2, n=24, block=64):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(100, 1000), rng.randint(2000, 8000)]) for _ in range(n)]
    curves = [synthetic_coverage(-(-x // block), rng.uniform(0.5, 1.5)) for x in lengths]
    cm = CostModel.analytic(block_size=block, n_embd=64, n_head=2)
    plan = plan_batches(lengths, world, m, "naive", block_size=block)
    return lengths, curves, cm, plan


def unit_loads(res, plan, lengths, cm, unit):
    out = []
    for r, rank in enumerate(plan):
        groups = [[i for micro in rank for i in micro]] if unit == "rank" else rank
        out += [sum(cm.predict(lengths[i], res.budgets[i]) for i in g) for g in groups if g]
    return out


@pytest.mark.parametrize("unit", ["rank", "microbatch"])
@pytest.mark.parametrize("seed", range(4))
def test_dst_floor_anchor_growth_determinism(unit, seed):
    lengths, curves, cm, plan = dst_case(seed)
    k0, p = 16, 0.1
    res = tune_budgets(plan, lengths, cm, "mean", p, k0, coverage=curves, unit=unit)
    blocks = [-(-x // 64) for x in lengths]
    for i, (b, f) in enumerate(zip(res.budgets, res.floors)):
        assert f == min(blocks[i], coverage_floor(curves[i], k0, p))
        assert min(blocks[i], f) <= b <= blocks[i]                       # never below the floor
        assert curves[i][b - 1] >= (1 - p) * curves[i][min(k0, blocks[i]) - 1] - 1e-12
    loads = unit_loads(res, plan, lengths, cm, unit)
    assert loads == pytest.approx(res.loads, rel=1e-9)
    assert res.anchor == pytest.approx(sum(res.loads_k0) / len(res.loads_k0))
    short = {u for u, _, _ in res.shortfalls}
    for u, before, after in zip(res.units, res.loads_k0, res.loads):
        if u not in short:
            assert after <= res.anchor * (1 + 1e-9)                      # meets the anchor
        if before > res.anchor:
            assert after <= before                                       # stragglers only shrink
    assert max(res.loads) < max(res.loads_k0)
    assert res == tune_budgets(plan, lengths, cm, "mean", p, k0, coverage=curves, unit=unit)


def test_dst_single_sample_units_are_maximal_and_grow():
    # one sample per microbatch: the chosen budget is the largest one meeting the anchor
    lengths = [8000, 3000, 6000, 1500, 7000, 2500]
    cm = CostModel.analytic(block_size=64, n_embd=64, n_head=2)
    plan = plan_batches(lengths, 3, 2, "naive")
    k0 = 8
    res = tune_budgets(plan, lengths, cm, "mean", 0.5, k0, unit="microbatch", default_floor=0.25)
    grew = 0
    for i, L in enumerate(lengths):
        n, b = -(-L // 64), res.budgets[i]
        if b < n:  # one more block would overshoot the anchor
            assert cm.predict(L, b + 1) > res.anchor
        grew += b > k0
        if cm.predict(L, k0) <= res.anchor:
            assert b >= min(n, k0)
        else:
            assert b <= k0
    assert grew >= 1  # under-loaded microbatches took free accuracy
    assert res.feasible


def test_dst_fallback_keeps_floors_and_reports():
    # coverage that is flat below k0 and p = 0: the floor is k0 itself, nobody can shrink
    lengths = [20_000, 1_000, 1_000, 1_000]
    cm = CostModel.analytic(block_size=64, n_embd=64, n_head=2)
    plan = [[[0]], [[1]], [[2]], [[3]]]
    k0 = 8
    curves = [[0.0] * (k0 - 1) + [1.0] * (-(-x // 64) - k0 + 1) for x in lengths]
    res = tune_budgets(plan, lengths, cm, "mean", 0.0, k0, coverage=curves, unit="rank")
    assert res.budgets[0] == res.floors[0] == k0
    assert not res.feasible and [u for u, _, _ in res.shortfalls] == [(0,)]
    assert res.shortfalls[0][2] == pytest.approx(cm.predict(20_000, k0) - res.anchor)
    assert "1 unit(s) above the anchor" in res.summary()


def test_dst_anchors_per_layer_rank_scale_and_tensor_input():
    lengths, curves, cm, plan = dst_case(7)
    k0 = 16
    width = max(len(c) for c in curves)
    padded = torch.tensor([c + [1.0] * (width - len(c)) for c in curves])  # [S, KMAX] like
    res_t = tune_budgets(plan, lengths, cm, "mean", 0.1, k0, coverage=padded)
    res_l = tune_budgets(plan, lengths, cm, "mean", 0.1, k0, coverage=curves)
    assert res_t.budgets == res_l.budgets
    hi = tune_budgets(plan, lengths, cm, "max", 0.1, k0, coverage=curves)
    blocks = [-(-x // 64) for x in lengths]
    assert all(b >= min(n, k0) for b, n in zip(hi.budgets, blocks))  # MAX: nobody shrinks
    lo = tune_budgets(plan, lengths, cm, "min", 0.1, k0, coverage=curves)
    assert all(b <= min(n, k0) for b, n in zip(lo.budgets, blocks))  # MIN: nobody grows above k0
    # per-layer curves: [n_layer, S, KMAX] -> budgets [n_layer][S], each layer above its floors
    layered = torch.stack([padded, padded.pow(2)])
    res = tune_budgets(plan, lengths, cm, "mean", 0.1, k0, coverage=layered)
    assert len(res.budgets) == 2 and res.budgets[0] == res_t.budgets
    assert all(b >= f for lb, lf in zip(res.budgets, res.floors) for b, f in zip(lb, lf))
    # a rank measured 3x slower than predicted becomes a straggler and gets smaller budgets
    slow = tune_budgets(plan, lengths, cm, "mean", 0.1, k0, coverage=curves,
                        rank_scale=[3.0, 1.0, 1.0, 1.0])
    r0 = [i for micro in plan[0] for i in micro]
    assert sum(slow.budgets[i] for i in r0) < sum(res_l.budgets[i] for i in r0)


def test_dst_bad_inputs():
    lengths, curves, cm, plan = dst_case(0)
    with pytest.raises(ValueError, match="anchor"):
        tune_budgets(plan, lengths, cm, "median")
    with pytest.raises(ValueError, match="one curve per sample"):
        tune_budgets(plan, lengths, cm, coverage=curves[:-1], k0=16)
    with pytest.raises(ValueError, match="block_size"):
        tune_budgets(plan, lengths, cm, k0=16, block_size=128)
    with pytest.raises(ValueError, match="exactly once"):
        tune_budgets([[[0, 1]], [[1]]], [100, 100], cm, k0=4)


def test_online_correction():
    corr = OnlineCorrection(2, decay=0.5)
    corr.update([2.0, 1.0], [1.0, 1.0])
    assert corr.factors == [2.0, 1.0]  # first step: the ratio itself
    corr.update([1.0, 100.0], [1.0, 1.0])
    assert corr.factors == pytest.approx([1.5, 0.5 * 1.0 + 0.5 * 10.0])  # ratio clipped at 10


def test_simulate_hand_computed_1f1b():
    # pp = 2, fwd 1/3: mb0 f .5 b 1, mb1 f 1 b 2. Stage 0: F0 F1 B0 B1, stage 1: F0 B0 F1 B1.
    # S0F0 0-.5, S1F0 .5-1, S0F1 .5-1.5, S1B0 1-2, S0B0 2-3, S1F1 2-3, S1B1 3-5, S0B1 5-7.
    sim = simulate([[3.0, 6.0], [1.0, 1.0]], pp=2)
    assert sim.rank_times[0] == pytest.approx(7.0)
    assert sim.step_time == pytest.approx(7.0)
    assert sim.imbalance == pytest.approx(9.0 / 5.5)
    assert sim.micro_imbalance == pytest.approx(6.0 / 2.75)
    assert sim.bubble == pytest.approx(1 - 11.0 / (7.0 * 2 * 2))


@pytest.mark.parametrize("pp,m", [(1, 3), (2, 5), (4, 8), (4, 2)])
def test_simulate_uniform_matches_formula(pp, m):
    # uniform microbatches: (M + P - 1) stage slots of (f + b) = lat / P, the classic 1F1B time
    sim = simulate([[1.2] * m], pp=pp)
    assert sim.step_time == pytest.approx((m + pp - 1) * 1.2 / pp)
    assert sim.bubble == pytest.approx((pp - 1) / (m + pp - 1))


def test_simulate_dp_only_is_sum_and_empty_microbatches_are_free():
    sim = simulate([[1.0, 2.0, 0.0], [0.5, 0.0, 0.0]], pp=1)
    assert sim.rank_times == [3.0, 0.5] and sim.step_time == 3.0
    with pytest.raises(ValueError):
        simulate([[1.0], [1.0, 2.0]])


def test_simulate_cli_prints_tables(capsys):
    balance.main(["--simulate", "--steps", "2", "--bench-repeats", "2"])
    out = capsys.readouterr().out
    assert out.count("| + SAB + DST |") == 3 and "SIMULATED" in out and "SYNTHETIC" in out
    assert "1024 sequences on 64 ranks" in out
