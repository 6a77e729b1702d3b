"""SparseBalance's ablation, simulated: a DP x PP training step with a 1F1B pipeline, fed by the
cost model (balance.py), the batching policies (batching.py) and DST's two halves (balance.py's
targets, then each sample at max(target, its routing-coverage floor) as attention.py's layers do).

No model runs: step times are predicted latencies pushed through the 1F1B schedule, on synthetic
length mixes shaped like the paper's datasets (NOT the datasets) and on the default corpus's file
lengths. Every setting (anchor, p, k0, mixes, sizes, DP x PP, order) is a flag.

    python experiments/simulate.py                          # the three tables (~8 s)
    python experiments/simulate.py --anchor max --p 0.3     # another anchor and coverage drop
    python experiments/simulate.py --order 1f1b --dp 4 --pp 2
    python experiments/simulate.py --cost-model cost.json   # a table from balance.py --profile

API: simulate(latencies, pp, fwd_frac) -> SimResult; run_ablation(...) -> table rows.
"""
import argparse
import dataclasses
import math
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from attention import coverage_floor  # noqa: E402
from balance import ANCHORS, Balancer, CostModel, one_f_one_b, tune_budgets  # noqa: E402
from batching import SABState, imbalance, n_blocks, order_for_1f1b, padded, plan_batches  # noqa: E402
from data import stdlib_lengths  # noqa: E402


@dataclasses.dataclass
class SimResult:
    step_time: float        # seconds: the slowest data-parallel replica's pipeline
    rank_times: list        # pipeline time per data-parallel replica
    compute: list           # summed microbatch latency per data-parallel replica
    imbalance: float        # max/mean of `compute` (per-rank compute)
    micro_imbalance: float  # max/mean latency over the non-empty microbatches
    bubble: float           # idle share of all dp x pp devices over the step


def simulate(latencies, pp=1, fwd_frac=1 / 3):
    """Step time of DP x PP training with a 1F1B pipeline (the setting of SparseBalance's
    ablation). latencies[d][m]: seconds of microbatch m of data-parallel replica d through the
    whole model (all stages, forward+backward). Every replica needs the same number of
    microbatches. Ignores communication (gradient all-reduce, activations between stages)."""
    if not latencies or len({len(r) for r in latencies}) != 1 or pp < 1:
        raise ValueError("simulate needs latencies[dp][m] with the same m for every replica "
                         "and pp >= 1")
    rank_times = [one_f_one_b(list(r), pp, fwd_frac) for r in latencies]
    compute = [sum(r) for r in latencies]
    step = max(rank_times)
    mean = sum(compute) / len(compute)
    micro = [x for r in latencies for x in r if x > 0]
    return SimResult(
        step_time=step, rank_times=rank_times, compute=compute,
        imbalance=max(compute) / mean if mean > 0 else 1.0,
        micro_imbalance=max(micro) / (sum(micro) / len(micro)) if micro else 1.0,
        bubble=1.0 - sum(compute) / (step * len(latencies) * pp) if step > 0 else 0.0)


def synthetic_lengths(mix, n, rng):
    """Synthetic length mixes (NOT the real datasets): "bimodal" ~ ChatQA2-Long-SFT (55% short,
    log-normal around 1.5K, 128..4K; 45% long, log-normal around 24K, 16K..64K) and "longtail"
    ~ LongAlign-10k (Pareto tail from 8K, alpha 1.2, cut at 72K)."""
    out = []
    for _ in range(n):
        if mix == "bimodal":
            if rng.random() < 0.55:
                x = min(4096, max(128, rng.lognormvariate(math.log(1536), 0.6)))
            else:
                x = min(65536, max(16384, rng.lognormvariate(math.log(24576), 0.5)))
        else:
            x = min(73728, 8192 * rng.paretovariate(1.2))
        out.append(int(x))
    return out


def synthetic_coverage(n_blocks, alpha):
    """A routing-coverage curve for a document of n_blocks blocks when the gate's mass over the
    blocks a query block can see falls as rank^-alpha (larger alpha = more concentrated = less
    sensitive to sparsity). C[j-1] = mean over query blocks i of P(min(j, i+1)) / P(i+1),
    P(m) = sum_{r<=m} r^-alpha, which is (j + P(j) * sum_{m>j} 1/P(m)) / n: O(n) per curve."""
    P = [0.0]
    for r in range(1, n_blocks + 1):
        P.append(P[-1] + r ** -alpha)
    tail = [0.0] * (n_blocks + 2)  # tail[j] = sum_{m=j..n} 1/P(m)
    for m in range(n_blocks, 0, -1):
        tail[m] = tail[m + 1] + 1.0 / P[m]
    return [min(1.0, (j + P[j] * tail[j + 1]) / n_blocks) for j in range(1, n_blocks + 1)]


def _floors(curves, k0, p):
    """Coverage floors of synthetic curves (ragged lists) with the model's own rule."""
    width = max(len(c) for c in curves)
    return coverage_floor(torch.tensor([c + [1.0] * (width - len(c)) for c in curves]),
                          k0, p).tolist()


ABLATION = [("baseline", "naive", False), ("+ DST", "naive", True), ("+ SAB", "sab", False),
            ("+ SAB + DST", "sab", True), ("+ LBB", "lbb", False), ("+ LBB + DST", "lbb", True)]


def run_ablation(draw_lengths, rng, steps, cm, dp, pp, global_batch, k0, p, n_layer, capacity,
                 unit="microbatch", anchor="mean", configs=ABLATION, order=None, tolerance=0.02):
    """Mean step time etc. over `steps` global batches for the configurations of the paper's
    ablation. draw_lengths(n, rng) -> n sequence lengths. DST runs in its two halves: targets
    before the step (tune_budgets), then each sample at max(target, its coverage floor) as the
    layers would (synthetic curves). Step times come from simulate() on cost-model latencies of
    packed microbatches, not measured. order="1f1b": each replica's microbatches reordered, small
    ones at both ends (batching.order_for_1f1b)."""
    b = cm.block_size
    M = global_batch // dp
    states = {name: SABState(k0, b) for name, _, _ in configs}
    acc = {name: dict(step=0.0, imb=0.0, mimb=0.0, bubble=0.0, kb=[], cov=[], ratio=[], short=0)
           for name, _, _ in configs}
    for _ in range(steps):
        lengths = draw_lengths(global_batch, rng)
        blocks = [n_blocks(x, b) for x in lengths]
        curves = [synthetic_coverage(n, rng.uniform(0.6, 1.4)) for n in blocks]
        floors = _floors(curves, k0, p)
        for name, policy, dst in configs:
            state, a = states[name], acc[name]
            plan = plan_batches(lengths, dp, M, policy, cost=state.cost_fn(cm), capacity=capacity,
                                block_size=b, pipeline_stages=pp)
            if dst:
                res = tune_budgets(plan, lengths, cm, anchor, k0, unit=unit, pipeline_stages=pp,
                                   tolerance=tolerance)
                budgets = [min(n, max(t, f)) for n, t, f in zip(blocks, res.budgets, floors)]
                a["short"] += sum(f > t for t, f in zip(res.budgets, floors))
            else:
                budgets = [min(n, k0) for n in blocks]
            state.update(lengths, budgets)
            lat = [[n_layer * x for x in rank] for rank in cm.predict_plan(plan, lengths, budgets)]
            if order == "1f1b":
                lat = [order_for_1f1b(r) for r in lat]
            sim = simulate(lat, pp)
            a["step"] += sim.step_time / steps
            a["imb"] += sim.imbalance / steps
            a["mimb"] += sim.micro_imbalance / steps
            a["bubble"] += sim.bubble / steps
            for n, k, c in zip(blocks, budgets, curves):
                if n > k0:  # only sparse-eligible sequences: dense ones sit at 1.0
                    a["kb"].append(k)
                    a["cov"].append(c[k - 1])
                    a["ratio"].append(c[k - 1] / c[k0 - 1])
    base = acc[configs[0][0]]["step"]
    mean = lambda v: sum(v) / len(v) if v else float("nan")  # noqa: E731
    rows = []
    for name, _, _ in configs:
        a = acc[name]
        rows.append((name, a["imb"], a["mimb"], a["step"] * 1e3, base / a["step"], mean(a["kb"]),
                     mean(a["cov"]), min(a["ratio"], default=float("nan")), a["bubble"],
                     a["short"]))
    return rows


def print_table(title, rows):
    print(f"\n{title}")
    print("| config      | imbalance rank | imbalance mb | step (ms) | speedup | mean budget "
          "| mean coverage | min cov/cov(k0) | bubble | floor > target |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]:<11} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.0f} | {r[4]:.2f}x | {r[5]:.1f} "
              f"| {r[6]:.3f} | {r[7]:.3f} | {r[8]:.2f} | {r[9]} |")


def benchmark(cm, k0, n=1024, world=64, M=4, repeats=20, seed=0):
    """Wall and CPU time of Balancer.plan (SAB + DST's pre-step half) for one global batch of n
    sequences, a fresh batch each repeat (the cost model's per-length cache persists, as in
    training)."""
    rng = random.Random(seed)
    bal = Balancer(cm, world, "sab+dst", k0=k0, num_microbatches=M)
    wall, cpu = [], []
    for _ in range(repeats):
        lengths = synthetic_lengths("bimodal", n, rng)
        t, c = time.perf_counter(), time.process_time()
        step = bal.plan(lengths)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        bal.sab.update(lengths, step.targets)
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return med(wall), med(cpu), imbalance(step.plan, [cm.predict(x, k0) for x in lengths])


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="The paper's ablation (baseline, +DST, +SAB, +SAB+DST, +LBB, +LBB+DST) on two "
                    "SYNTHETIC length mixes and on the default corpus's lengths. Step times are "
                    "SIMULATED from a cost model through a 1F1B schedule, not measured.")
    ap.add_argument("--cost-model", default="analytic",
                    help="'analytic' (a 3B-like layer) or a JSON file from balance.py --profile")
    ap.add_argument("--steps", type=int, default=100, help="global batches per mix")
    ap.add_argument("--bench-repeats", type=int, default=20,
                    help="timed planning+tuning repeats (the median is printed)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic mixes")
    ap.add_argument("--p", type=float, default=0.1, help="allowed coverage drop of DST")
    ap.add_argument("--k0", type=int, default=32, help="default budget in blocks")
    ap.add_argument("--anchor", default="mean", choices=ANCHORS, help="DST anchor")
    ap.add_argument("--tolerance", type=float, default=0.02,
                    help="DST leaves units within this share of the anchor uncut (as the Balancer "
                         "does in training; 0 = the paper's rule)")
    ap.add_argument("--order", default="none", choices=("none", "1f1b"),
                    help="1f1b = each replica's microbatches reordered, small ones at both ends "
                         "(as verl orders them)")
    ap.add_argument("--block-size", type=int, default=256, help="attention block size (tokens)")
    ap.add_argument("--dp", type=int, default=2, help="data-parallel replicas")
    ap.add_argument("--pp", type=int, default=4, help="pipeline stages (1F1B)")
    ap.add_argument("--global-batch", type=int, default=16, help="sequences per step")
    ap.add_argument("--n-layer", type=int, default=36, help="layers of the model")
    ap.add_argument("--mixes", nargs="+", default=["bimodal", "longtail", "corpus"],
                    choices=["bimodal", "longtail", "corpus"], help="length mixes, one table each")
    print_simulation(ap.parse_args(argv))


def print_simulation(args):
    """--simulate: the ablation tables on three length mixes, then the planning benchmark."""
    if args.global_batch % args.dp:
        raise ValueError(f"--global-batch {args.global_batch} must be a multiple of --dp {args.dp}")
    k0, p = args.k0, args.p
    dp, pp, gb, n_layer = args.dp, args.pp, args.global_batch, args.n_layer
    unit = "microbatch" if pp > 1 else "rank"
    if args.cost_model == "analytic":
        # A Qwen2.5-3B-like layer: width 2048, 16 heads of 128, MLP ~ SwiGLU 11008 (ratio 8).
        cm = CostModel.analytic(block_size=args.block_size, n_embd=2048, n_head=16, mlp_ratio=8)
        source = "the analytic cost model of a 3B-like layer (width 2048, 16 heads of 128)"
    else:
        cm = CostModel.load(args.cost_model)
        source = (f"the cost table {args.cost_model} ({cm.kind}, measured on "
                  f"{cm.meta.get('device', '?')}, width {cm.meta.get('n_embd', '?')})")
    b = cm.block_size
    print(f"SparseBalance ablation, SIMULATED: step times come from {source} x {n_layer} layers "
          f"and a 1F1B simulator (no model runs); DP {dp} x PP {pp}, global batch {gb}, "
          f"{gb // dp} microbatches per replica, block {b}, k0 {k0}, anchor {args.anchor}, p {p}, "
          f"DST unit {unit}, tolerance {args.tolerance}, microbatch order {args.order}, "
          f"{args.steps} global batches per mix "
          f"(seed {args.seed}). Synthetic routing-coverage curves (gate mass ~ rank^-alpha, alpha ~ "
          "U(0.6, 1.4)). Short documents may share a microbatch up to the capacity (the longest "
          "document). SAB and LBB pack with the same objective (the predicted 1F1B time of each "
          "replica), so only their costs differ.")
    print("imbalance rank = max/mean summed compute of the DP replicas; imbalance mb = max/mean "
          "over non-empty microbatches; mean budget/coverage over sequences longer than k0 blocks; "
          "DST runs each sample at max(target, coverage floor), as the layers do; floor > target = "
          "samples whose floor was above their target (summed over steps).")
    corpus = stdlib_lengths(crop=65536) if "corpus" in args.mixes else []
    mixes = [("bimodal", "(a) bimodal, ChatQA2-Long-SFT-like (SYNTHETIC mix)",
              lambda n, rng: synthetic_lengths("bimodal", n, rng), 65536),
             ("longtail", "(b) long tail 8K-72K, LongAlign-10k-like (SYNTHETIC mix)",
              lambda n, rng: synthetic_lengths("longtail", n, rng), 73728),
             ("corpus", f"(c) default corpus: {len(corpus)} stdlib .py files of this interpreter, "
              "bytes = tokens, cropped at 64K",
              lambda n, rng: [rng.choice(corpus) for _ in range(n)], 65536)]
    for key, title, draw, cap in mixes:
        if key not in args.mixes:
            continue
        print_table(title, run_ablation(draw, random.Random(args.seed), args.steps, cm, dp, pp,
                                        gb, k0, p, n_layer, padded(cap, b), unit, args.anchor,
                                        order=args.order, tolerance=args.tolerance))
    wall, cpu, imb = benchmark(cm, k0, repeats=args.bench_repeats)
    print(f"\nplanning (sab) + tuning (DST's pre-step half, unit rank) of 1024 sequences on 64 "
          f"ranks x 4 microbatches: {wall * 1e3:.1f} ms wall, {cpu * 1e3:.1f} ms CPU (medians of "
          f"{args.bench_repeats} fresh batches, this machine); plan imbalance at k0: "
          f"rank {imb['rank']:.3f}, microbatch {imb['microbatch']:.3f}")

if __name__ == "__main__":
    main()
