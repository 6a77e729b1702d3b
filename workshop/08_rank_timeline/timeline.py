"""Exercise 8's rank timeline (workshop/08_rank_timeline/README.md), as text: the 16 documents of
step 1 of preset balance-demo on 4 ranks (docs/quality.md, "The rank timeline of one step"),
planned by balance.Balancer under each --balance policy, each microbatch's seconds predicted by
the analytic cost model of the preset's layer (all layers, at DST's targets). One bar per rank,
one segment per microbatch (# and = in turn), dots for the time a rank waits for the slowest.
The analytic model counts FLOPs at an assumed throughput: only ratios matter.

    python workshop/08_rank_timeline/timeline.py                 # none, dst, lbb, sab, sab+dst
    python workshop/08_rank_timeline/timeline.py none sab+dst    # some of them
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from balance import Balancer, CostModel  # noqa: E402

# tokens of the 16 documents, in the order train.py drew them (seed 1337, bimodal mix)
LENGTHS = [16384, 2029, 16384, 1037, 1037, 451, 16384, 1105, 472, 1023, 16384, 16384, 1291, 13113,
           16384, 13686]
RANKS, K0, N_LAYER, BLOCK, CAPACITY = 4, 8, 2, 64, 16384     # preset balance-demo (train.py)
POLICIES = ("none", "dst", "lbb", "sab", "sab+dst")


def timeline(policy):
    """One policy's step: (plan[rank][micro] sample indices, targets per sample, predicted
    seconds[rank][micro] of all layers), as the Balancer plans a first step (no correction yet)."""
    cm = CostModel.analytic(block_size=BLOCK, n_embd=64, n_head=2)
    bal = Balancer(cm, RANKS, policy, k0=K0, p=0.1, anchor="mean", n_layer=N_LAYER,
                   capacity=CAPACITY, correction=False)
    step = bal.plan(LENGTHS)
    seconds = [[N_LAYER * s for s in rank] for rank in cm.predict_plan(step.plan, LENGTHS, step.targets)]
    return step.plan, step.targets, seconds


def summary(seconds):
    """Per-rank totals, the step (the slowest rank), imbalance (max / mean) and the idle share of
    all rank-time (sum over ranks of step - total, over ranks x step)."""
    totals = [sum(rank) for rank in seconds]
    step = max(totals)
    return dict(totals=totals, step=step, imbalance=step * len(totals) / sum(totals),
                idle=sum(step - t for t in totals) / (len(totals) * step))


def draw(policy, scale, width=64):
    plan, targets, seconds = timeline(policy)
    s = summary(seconds)
    print(f"--balance {policy}: step {1e3 * s['step']:.3f} ms, imbalance {s['imbalance']:.2f}, "
          f"idle {100 * s['idle']:.0f}% of rank time")
    for r, (micros, secs) in enumerate(zip(plan, seconds)):
        bar = "".join("#="[j % 2] * round(width * x / scale) for j, x in enumerate(secs))
        bar += "." * max(0, round(width * s["step"] / scale) - len(bar))
        docs = "  ".join(" ".join(f"{LENGTHS[i]}@{targets[i]}" for i in m) for m in micros if m)
        print(f"  rank {r} |{bar:<{width}}| {1e3 * s['totals'][r]:.3f} ms  {docs}")
    print()


if __name__ == "__main__":
    chosen = sys.argv[1:] or POLICIES
    scale = max(summary(timeline(p)[2])["step"] for p in chosen)
    print(f"{len(LENGTHS)} documents (tokens@budget) on {RANKS} ranks, k0 {K0}, anchor mean, p 0.1; "
          "predicted by the analytic cost model\n")
    for p in chosen:
        draw(p, scale)
