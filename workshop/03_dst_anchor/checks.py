"""Checks of exercise 3: a DST anchor "median" (balance.ANCHORS), used by tune_budgets, accepted by
train.py and experiments/simulate.py, and seen in the simulated ablation. References: the median
computed here by sorting, and DST's own guarantees (no unit above the anchor unless already at
budget 1; the step never lengthens)."""
import os
import random
import sys

import pytest

import balance
from balance import ANCHORS, CostModel, tune_budgets
from batching import padded, plan_batches

sys.path.insert(0, os.path.join(balance.__file__.rsplit(os.sep, 1)[0], "experiments"))
import simulate  # noqa: E402


def median(xs):
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def anchor():
    if "median" not in ANCHORS:
        pytest.fail('balance.ANCHORS has no "median" entry yet: add one (a function of the list of '
                    "loads that returns the anchor load)")
    return ANCHORS["median"]


def test_median_of_the_loads():
    """ANCHORS["median"] gives the middle load (the mean of the two middle ones for an even count)"""
    f = anchor()
    for loads in ([3.0, 1.0, 2.0], [4.0, 1.0, 3.0, 2.0], [5.0], [2.0, 2.0, 9.0, 1.0, 7.0]):
        before = list(loads)
        got = f(loads)
        assert loads == before, (
            f"the anchor function reordered the list it was given ({before} -> {loads}): "
            "tune_budgets reads the loads by unit afterwards; sort a copy (sorted(loads))")
        assert got == pytest.approx(median(loads)), f"median of {loads}: got {got}, expected {median(loads)}"


def batch(seed, n=16):
    rng = random.Random(seed)
    return [rng.randint(256, 4096) if rng.random() < 0.6 else rng.randint(16384, 65536) for _ in range(n)]


def test_dst_meets_the_median_anchor():
    """tune_budgets(anchor="median"): the anchor is the median load at k0; no unit ends above it
    (or above a straggler stuck at budget 1)"""
    anchor()
    cm = CostModel.analytic(block_size=256, n_embd=2048, n_head=16, mlp_ratio=8)
    for seed in range(10):
        lengths = batch(seed)
        plan = plan_batches(lengths, 4, 2, "naive")
        res = tune_budgets(plan, lengths, cm, "median", k0=32)
        assert res.anchor == pytest.approx(median(res.loads_k0)), (
            f"batch {seed}: tune_budgets used the anchor {res.anchor:.4g}, the median of the loads "
            f"at k0 is {median(res.loads_k0):.4g}")
        # the step: the anchor, unless a straggler cannot reach it even with every budget at 1
        stuck = [load for u, load in zip(res.units, res.loads) if u in {v for v, _ in res.shortfalls}]
        step = max([res.anchor] + stuck)
        assert max(res.loads) <= step * (1 + 1e-9), (
            f"batch {seed}: a unit ends at {max(res.loads):.4g} s, above the step {step:.4g} s")
        assert max(res.loads) <= max(res.loads_k0) * (1 + 1e-9), f"batch {seed}: DST lengthened the step"


def test_command_lines_accept_median(capsys):
    """train.py --anchor median and experiments/simulate.py --anchor median are accepted (their
    choices come from ANCHORS)"""
    anchor()
    import config
    import train
    config.check_args(train.get_args(["--anchor", "median"]))
    simulate.main(["--anchor", "median", "--steps", "2", "--mixes", "bimodal", "--bench-repeats", "1"])
    out = capsys.readouterr().out
    assert "anchor median" in out and "| + SAB + DST |" in out, "experiments/simulate.py printed no table"


def test_the_simulated_ablation_by_anchor():
    """Observe: simulated '+ SAB + DST' by anchor (speedup, mean budget, coverage); the median
    lies between min and max"""
    anchor()
    cm = CostModel.analytic(block_size=256, n_embd=2048, n_head=16, mlp_ratio=8)
    configs = [c for c in simulate.ABLATION if c[0] in ("baseline", "+ SAB + DST")]
    print("\n        mix       anchor   speedup  mean budget  mean coverage   "
          "(+ SAB + DST, k0 32, p 0.1, DP 2 x PP 4)")
    for mix in ("bimodal", "longtail"):
        budget = {}
        for a in ("min", "median", "mean", "max"):
            rows = simulate.run_ablation(lambda n, rng: simulate.synthetic_lengths(mix, n, rng),
                                         random.Random(0), 20, cm, 2, 4, 16, 32, 0.1, 36,
                                         padded(73728, 256), "microbatch", a, configs=configs)
            _, _, _, _, speedup, kb, cov, *_ = rows[1]
            budget[a] = kb
            print(f"        {mix:9} {a:7} {speedup:7.2f}x {kb:11.1f} {cov:14.3f}")
        assert budget["min"] - 0.5 <= budget["median"] <= budget["max"] + 0.5, (
            f"{mix}: mean budget with the median anchor {budget['median']:.1f} is not between "
            f"min's {budget['min']:.1f} and max's {budget['max']:.1f}")
