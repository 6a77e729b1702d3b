"""Checks of exercise 8: your reading of the rank timeline (answers.py), against the numbers the
timeline is drawn from (timeline.py: balance.Balancer's plans and targets, the cost model's
predicted seconds). The choices are checked against the same numbers."""
import os

import pytest

from workshop import load

HERE = os.path.dirname(os.path.abspath(__file__))
tl = load(os.path.join(HERE, "timeline.py"))
answers = load(os.path.join(HERE, "answers.py"))
steps = {p: tl.timeline(p) for p in tl.POLICIES}                 # plan, targets, seconds
stats = {p: tl.summary(s[2]) for p, s in steps.items()}
STRAGGLER = max(range(tl.RANKS), key=lambda r: stats["none"]["totals"][r])


def answer(name):
    if answers is None:
        pytest.fail("there is no workshop/08_rank_timeline/answers.py yet: run python -m workshop start 8")
    value = getattr(answers, name)
    if value is None:
        pytest.fail(f"no answer yet: fill in {name} in workshop/08_rank_timeline/answers.py")
    return value


def test_straggler():
    """Under none: which rank the others wait for"""
    got = answer("STRAGGLER_NONE")
    assert got == STRAGGLER, (
        f"rank {got} is not the one the step waits for: find the longest bar under --balance none "
        "(ranks count from 0)")


@pytest.mark.parametrize("name,policy", [("IDLE_PERCENT_NONE", "none"), ("IDLE_PERCENT_SAB", "sab")])
def test_idle_share(name, policy):
    """Idle share of all rank-time under {policy}"""
    got, want = answer(name), 100 * stats[policy]["idle"]
    assert abs(got - want) <= 2, (
        f"{got}% is off: the header line of --balance {policy} gives it; it is the sum over ranks "
        "of (step - the rank's time), over ranks x step")


def test_dst_alone_cuts_the_straggler():
    """Under dst: the smallest budget DST gave the straggler's documents"""
    plan, targets, _ = steps["dst"]
    want = min(targets[i] for m in plan[STRAGGLER] for i in m)
    got = answer("SMALLEST_BUDGET_DST")
    assert got == want, (
        f"{got} is not it: under --balance dst, read the budgets (tokens@budget) of rank "
        f"{STRAGGLER}'s documents. How far below k0 = {tl.K0} did DST have to cut them?")


def test_lbb_slowest_rank():
    """Under lbb: how many documents the slowest rank holds"""
    plan, _, _ = steps["lbb"]
    slow = max(range(tl.RANKS), key=lambda r: stats["lbb"]["totals"][r])
    want = sum(len(m) for m in plan[slow])
    got = answer("DOCS_ON_SLOWEST_RANK_LBB")
    assert got == want, (
        f"{got} is not it: count the tokens@budget entries of the longest bar under --balance lbb")


def test_where_the_idle_time_went():
    """Where none's idle time went under sab+dst"""
    _, targets, _ = steps["sab+dst"]
    moved = sum(t != min(tl.K0, -(-x // tl.BLOCK)) for t, x in zip(targets, tl.LENGTHS))
    sab_did_it = stats["sab"]["idle"] <= 0.1 * stats["none"]["idle"] and moved <= len(targets) // 4
    assert sab_did_it, "the timeline no longer supports the choices in answers.py: update the exercise"
    got = answer("WHERE_IDLE_WENT")
    assert got == "b", (
        f"not {got!r}: compare --balance sab (no DST at all) with sab+dst. How much idle time is "
        f"left under sab alone, and how many of sab+dst's budgets differ from k0 = {tl.K0}?")


def test_why_lbb_lags():
    """Why lbb leaves more idle time than sab"""
    assert stats["lbb"]["idle"] > stats["sab"]["idle"], "the timeline no longer shows lbb behind sab"
    got = answer("WHY_LBB_LAGS")
    assert got == "a", (
        f"not {got!r}: look at lbb's slowest rank. Which documents does it hold besides its long "
        "ones, and what would length^2 say they cost next to a 16K-token document?")
