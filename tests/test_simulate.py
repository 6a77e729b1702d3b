"""experiments/simulate.py: the DP x PP 1F1B simulator against hand-computed schedules and the
classic formula, the synthetic coverage curves and their floors, and the ablation's command line."""
import os
import random
import sys

import pytest

from balance import CostModel, tune_budgets
from batching import plan_batches

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import simulate as sim  # noqa: E402


def test_synthetic_curves_and_their_floors():
    rng = random.Random(0)
    curves = [sim.synthetic_coverage(rng.randint(1, 40), rng.uniform(0.3, 2.0)) for _ in range(50)]
    for c in curves:
        assert all(a <= b + 1e-12 for a, b in zip(c, c[1:])) and c[-1] == pytest.approx(1)
    k0, p = 6, 0.2
    for c, f in zip(curves, sim._floors(curves, k0, p)):
        want = next(k for k in range(1, len(c) + 1) if c[k - 1] >= (1 - p) * c[min(k0, len(c)) - 1] - 1e-6)
        assert f == want


@pytest.mark.parametrize("anchor", ["max", "mean"])
def test_dst_growth_never_lengthens_the_pipeline(anchor):
    """On the same plan, DST's targets never make the 1F1B step (DP 2 x PP 4) slower than k0:
    with the MAX anchor nobody shrinks, and growth stops at the slowest pipeline's time."""
    cm = CostModel.analytic(block_size=256, n_embd=2048, n_head=16, mlp_ratio=8)
    rng = random.Random(0)
    for _ in range(20):
        lengths = sim.synthetic_lengths("bimodal", 16, rng)
        plan = plan_batches(lengths, 2, 8, "sab", cost=lambda x: cm.predict(x, 32), capacity=65536,
                            block_size=256, pipeline_stages=4)
        step = lambda ks: sim.simulate([[cm.predict_microbatch([lengths[i] for i in m], [ks[i] for i in m])  # noqa: E731
                                     for m in rank] for rank in plan], pp=4).step_time
        res = tune_budgets(plan, lengths, cm, anchor, 32, unit="microbatch", pipeline_stages=4)
        assert step(res.budgets) <= step([32] * 16) * (1 + 1e-9)


def test_simulate_hand_computed_1f1b():
    # pp = 2, fwd 1/3: mb0 f .5 b 1, mb1 f 1 b 2. Stage 0: F0 F1 B0 B1, stage 1: F0 B0 F1 B1.
    # S0F0 0-.5, S1F0 .5-1, S0F1 .5-1.5, S1B0 1-2, S0B0 2-3, S1F1 2-3, S1B1 3-5, S0B1 5-7.
    res = sim.simulate([[3.0, 6.0], [1.0, 1.0]], pp=2)
    assert res.rank_times[0] == pytest.approx(7.0)
    assert res.step_time == pytest.approx(7.0)
    assert res.imbalance == pytest.approx(9.0 / 5.5)
    assert res.micro_imbalance == pytest.approx(6.0 / 2.75)
    assert res.bubble == pytest.approx(1 - 11.0 / (7.0 * 2 * 2))


@pytest.mark.parametrize("pp,m", [(1, 3), (2, 5), (4, 8), (4, 2)])
def test_simulate_uniform_matches_formula(pp, m):
    # uniform microbatches: (M + P - 1) stage slots of (f + b) = lat / P, the classic 1F1B time
    res = sim.simulate([[1.2] * m], pp=pp)
    assert res.step_time == pytest.approx((m + pp - 1) * 1.2 / pp)
    assert res.bubble == pytest.approx((pp - 1) / (m + pp - 1))


def test_simulate_dp_only_is_sum_and_empty_microbatches_are_free():
    res = sim.simulate([[1.0, 2.0, 0.0], [0.5, 0.0, 0.0]], pp=1)
    assert res.rank_times == [3.0, 0.5] and res.step_time == 3.0
    with pytest.raises(ValueError):
        sim.simulate([[1.0], [1.0, 2.0]])


@pytest.mark.parametrize("extra", [[], ["--order", "1f1b", "--anchor", "max"]])
def test_simulate_cli_prints_tables(capsys, extra):
    sim.main(["--steps", "2", "--bench-repeats", "2", *extra])
    out = capsys.readouterr().out
    assert out.count("| + SAB + DST |") == 3 and "SIMULATED" in out and "SYNTHETIC" in out
    assert "1024 sequences on 64 ranks" in out and "same objective" in out
    assert ("order 1f1b" in out) == bool(extra)
