"""What do sparsity and DST cost in quality? Training curves, needle retrieval and the anchor/p
trade-off, on the same data and seeds (issue 11; docs/quality.md holds the tables it printed).

    python experiments/quality.py curves      # dense / MoBA k0 / MoBA sab+dst / MoBA at DST's mean
    python experiments/quality.py anchors     # anchors at p 0.1, p {0.1,0.2,0.3} at mean: quality + speed
    python experiments/quality.py timeline --nproc 4 --cost-model out/bench_balance/cost_model.json \\
        --measured out/bench_balance          # one step's microbatches per rank, none vs sab+dst
    python experiments/quality.py learn --nproc 0 --needle-docs 8  # needle accuracy by step, one run
    python experiments/quality.py induction --ckpt out/quality/learn-s1/ckpt.pt   # does it copy?
    python experiments/quality.py induction --steps 400 -- ngram_amp=none   # induction on a toy task
    python experiments/quality.py digits --ckpt out/quality/learn-s1/ckpt.pt   # which answer digit fails
    python experiments/quality.py curves --seeds 1 2 --out out/quality_needle    # ~16 CPU-min a run
    python experiments/quality.py curves --device cuda --nproc 8 --preset gpu --steps 4000 --seeds 1 2 \\
        --out out/quality_gpu -- --passkey-frac 0.5 --copy-frac 0.5 --induction-steps 500 \\
        --ngram-amp none                                                   # the GPU version (>= 2 GPUs)

Every run is `train.py` under torchrun (`--nproc` ranks, 2 by default: DST balances ranks, so it
needs at least two), the same preset, data and seed for every arm (the seed fixes the initial
weights and the samples of every step), `--correction off` (budgets independent of timings, so a
rerun gives the same numbers). Arms:
  dense     --topk max_seq_len/attn_block: every block
  k0        MoBA at the preset's fixed budget k0
  sabdst    MoBA, --balance sab+dst --anchor mean --p 0.1 (budgets per rank and layer at run time)
  dstmean   MoBA at a fixed budget = the sabdst run's mean used budget (same seed), rounded
After training, each checkpoint is asked `--needle-docs` passkey documents per cell of context
length (T/4, T/2, T) x budget (k0/2, k0, dense, and "dst": every layer at its own coverage floor
at p), needle depths spread over the context, answers generated greedily through the KV cache
(train.needle_eval); the same evaluation for every arm (default budget k0 of the preset).

Finished runs are cached in OUT/results.jsonl (and OUT/<run>/), so an interrupted command
continues where it stopped. Plots go to --img (matplotlib, imported only there; without it the
tables still print). Flags after `--` go to every train.py run.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import train  # noqa: E402
from balance import ANCHORS  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

ARMS = ("dense", "k0", "sabdst", "dstmean")
LABEL = {"dense": "dense", "k0": "MoBA k0", "sabdst": "MoBA sab+dst", "dstmean": "MoBA at DST's mean"}


# ------------------------------------------------------------------------------ running train.py
def base_args(a):
    """train.py's resolved flags for the preset plus the extra flags (what every arm shares)."""
    return train.get_args(["--preset", a.preset, *a.extra])


def train_cmd(a, run, seed, flags):
    """The torchrun command of one run (printed, so that every number has its command)."""
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}"] if a.nproc else []
    return [sys.executable, *launch, os.path.join(ROOT, "train.py"), "--preset", a.preset, "--seed", str(seed),
            "--out", os.path.join(a.out, run), "--steps", str(a.steps), "--ckpt-every", "0",
            "--correction", "off", "--needle-docs", "0", "--device", a.device,
            *(["--data", a.data] if a.data else []), *flags, *a.extra]


def read_metrics(out):
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    steps = {r["step"]: r for r in recs if "loss" in r}  # the last line of a step wins
    evals = {r["step"]: r for r in recs if "val_bpb" in r}
    return [steps[s] for s in sorted(steps)], [evals[s] for s in sorted(evals)]


def needle_table(a, ckpt, base):
    """needle_eval of one checkpoint on the grid, at the preset's k0 whatever the arm trained at.
    -> {"T{L}_k{k}": [free hits, teacher-forced hits, mean budget used]}, and per depth."""
    torch.set_num_threads(1)
    dev = "cuda" if a.device != "cpu" and torch.cuda.is_available() else "cpu"
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if dev == "cuda" else nullcontext()
    model = GPT.from_checkpoint(ckpt, map_location=dev).eval()
    model.config.topk = base.topk  # k0 and the DST floors refer to the preset's k0
    _, val_docs = train.load_documents(a.data, base_args(a).val_frac, base.max_seq_len, note=lambda *_: None)
    T, out, depth = base.max_seq_len, {}, {}
    for L in (T // 4, T // 2, T):
        for k in train.needle_budgets(base):
            free, forced, used = train.needle_eval(model, val_docs[0], L, k, a.needle_docs, seed=10_000,
                                                   p=a.p, ctx=ctx)
            out[f"T{L}_k{k}"] = [sum(free) / len(free), sum(forced) / len(forced), float(np.mean(used))]
            depth[f"T{L}_k{k}"] = free
    return out, depth


def run_arm(a, arm, seed, flags, cache, run=None):
    """Train one arm (unless cached) and evaluate it. -> its result record."""
    run = run or f"{arm}-s{seed}"
    if run in cache:
        return cache[run]
    out = os.path.join(a.out, run)
    cmd = train_cmd(a, run, seed, flags)
    done = os.path.exists(os.path.join(out, "ckpt.pt"))
    print(("reusing " if done else "") + " ".join(cmd[1:]).replace(ROOT + "/", ""), flush=True)
    if not done:
        t0 = time.time()
        env = dict(os.environ, OMP_NUM_THREADS="1")
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        open(os.path.join(a.out, run + ".log"), "w").write(r.stdout + r.stderr)
        if r.returncode:
            sys.exit(f"quality.py: {run} failed (log: {a.out}/{run}.log):\n{(r.stdout + r.stderr)[-3000:]}")
        print(f"  {run}: {time.time() - t0:.0f} s wall", flush=True)
    steps, evals = read_metrics(out)
    warm = json.load(open(os.path.join(out, "config.json")))["train"].get("induction_steps", 0)
    base = train.build_config(base_args(a))
    needle, depth = needle_table(a, os.path.join(out, "ckpt.pt"), base)
    rec = dict(run=run, arm=arm, seed=seed, flags=flags, steps=len(steps),
               val_bpb=evals[-1]["val_bpb"], curve=[[e["step"], e["val_bpb"]] for e in evals],
               loss=[s["loss"] for s in steps],  # the mean budget after the dense warm-up stage
               mean_budget=float(np.mean([s["mean_budget"] for s in steps[warm:] or steps])),
               cpu_s=float(sum(sum(s["compute_cpu"]) for s in steps)),
               critical_s=float(np.median([s["critical_path"] for s in steps])),
               needle=needle, depth=depth)
    with open(os.path.join(a.out, "results.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")
    cache[run] = rec
    return rec


def load_cache(a):
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "results.jsonl")
    return {r["run"]: r for r in map(json.loads, open(path))} if os.path.exists(path) else {}


def arm_flags(a, arm, base, cache, seed):
    if arm == "dense":
        return ["--balance", "none", "--topk", str(base.max_seq_len // base.attn_block)]
    if arm == "k0":
        return ["--balance", "none"]
    if arm == "sabdst":
        return ["--balance", "sab+dst", "--anchor", "mean", "--p", str(a.p)]
    ref = run_arm(a, "sabdst", seed, arm_flags(a, "sabdst", base, cache, seed), cache)
    return ["--balance", "none", "--topk", str(max(1, round(ref["mean_budget"])))]


# ------------------------------------------------------------------------------ tables
def spread(xs):
    """'mean ± half range (n)': with two or three seeds the range says more than a std."""
    m = statistics.mean(xs)
    return f"{m:.3f} ± {(max(xs) - min(xs)) / 2:.3f}" if len(xs) > 1 else f"{m:.3f}"


def print_curves(a, recs, base):
    T, k0 = base.max_seq_len, base.topk
    print(f"\nFinal validation bits per byte and needle retrieval, preset {a.preset}, {a.steps} steps, "
          f"{a.nproc} ranks, seeds {' '.join(map(str, a.seeds))} (mean ± half the range over seeds). "
          f"Needle: free running (greedy through the KV cache, exact 5-digit match) at context T={T}, "
          f"budget k0={k0}, {a.needle_docs} documents per cell; teacher forced in brackets.")
    print("| arm | trained budget | val bpb | needle T/4 | needle T/2 | needle T | mean used budget | CPU s/run |")
    print("|---|---|---|---|---|---|---|---|")
    key = lambda L: f"T{L}_k{k0}"  # noqa: E731
    for arm in a.arms:
        rs = [r for r in recs if r["arm"] == arm]
        if not rs:
            continue
        cells = []
        for L in (T // 4, T // 2, T):
            cells.append(f"{statistics.mean(r['needle'][key(L)][0] for r in rs):.2f} "
                         f"({statistics.mean(r['needle'][key(L)][1] for r in rs):.2f})")
        f = rs[0]["flags"]
        trained = (f"fixed {f[f.index('--topk') + 1]}" if "--topk" in f else f"fixed {k0}" if "none" in f
                   else f"{f[1]}, {f[3]}, p {f[5]}")
        print(f"| {arm} | {trained} | {spread([r['val_bpb'] for r in rs])} | {' | '.join(cells)} | "
              f"{spread([r['mean_budget'] for r in rs])} | {statistics.mean(r['cpu_s'] for r in rs):.0f} |")
    # Same seed = same initial weights and samples: the paired difference per seed is the cleanest
    # comparison; the seed spread (largest range over seeds of either arm) is the noise it must beat.
    bpb = {(r["arm"], r["seed"]): r["val_bpb"] for r in recs}
    pairs = [(x, a.arms[0]) for x in a.arms[1:]] + [p for p in (("sabdst", "k0"), ("sabdst", "dstmean"))
                                                     if set(p) <= set(a.arms) and a.arms[0] not in p]
    for x, y in pairs:
        seeds = [s for s in a.seeds if (x, s) in bpb and (y, s) in bpb]
        if not seeds:
            continue
        d = [bpb[x, s] - bpb[y, s] for s in seeds]
        rng = max(max(bpb[z, s] for s in seeds) - min(bpb[z, s] for s in seeds) for z in (x, y))
        print(f"{x} - {y}: {statistics.mean(d):+.3f} bpb (per seed {', '.join(f'{v:+.3f}' for v in d)}); "
              f"seed spread {rng:.3f} -> {'LARGER than' if abs(statistics.mean(d)) > rng else 'within'} "
              "the seed spread")
    print(f"\nNeedle accuracy by context length and budget, free running (teacher forced), mean over "
          f"seeds; k=dst: every layer at its own coverage floor at p={a.p} (mean budget in brackets)")
    budgets = train.needle_budgets(base)
    print("| arm | T | " + " | ".join(f"k={k}" for k in budgets) + " |")
    print("|---|---|" + "---|" * len(budgets))
    for arm in a.arms:
        rs = [r for r in recs if r["arm"] == arm]
        for L in (T // 4, T // 2, T) if rs else ():
            cells = []
            for k in budgets:
                c = [r["needle"][f"T{L}_k{k}"] for r in rs]
                extra = f" [{statistics.mean(x[2] for x in c):.2f}]" if k == "dst" else ""
                cells.append(f"{statistics.mean(x[0] for x in c):.2f} ({statistics.mean(x[1] for x in c):.2f}){extra}")
            print(f"| {arm} | {L} | " + " | ".join(cells) + " |")


def plot_curves(a, recs, base, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = dict(zip(ARMS, ("black", "tab:blue", "tab:red", "tab:green")))
    for arm in a.arms:
        for i, r in enumerate(x for x in recs if x["arm"] == arm):
            s, v = zip(*r["curve"])
            lab = LABEL[arm] if not i else None
            ax1.plot(s, v, "-o", ms=3, color=colors[arm], alpha=0.8, label=lab)
            loss = np.convolve(r["loss"], np.ones(10) / 10, mode="valid")  # 10-step mean
            ax2.plot(np.arange(10, len(r["loss"]) + 1), loss, color=colors[arm], alpha=0.7, lw=1, label=lab)
    ax1.set(xlabel="step", ylabel="validation bits per byte", title="validation (each seed a line)")
    ax2.set(xlabel="step", ylabel="train loss (nats/token, 10-step mean)", title="training loss")
    # final bpb per arm, one line per seed: the seed spread next to the differences between arms
    arms = [arm for arm in a.arms if any(r["arm"] == arm for r in recs)]
    for seed in a.seeds:
        ys = [next((r["val_bpb"] for r in recs if r["arm"] == arm and r["seed"] == seed), np.nan) for arm in arms]
        ax3.plot(range(len(arms)), ys, "-o", color="grey", alpha=0.6, ms=3)
        ax3.annotate(f"seed {seed}", (len(arms) - 1, ys[-1]), xytext=(4, 0), textcoords="offset points", fontsize=7)
    for j, arm in enumerate(arms):
        ax3.plot(j, statistics.mean(r["val_bpb"] for r in recs if r["arm"] == arm), "_", color=colors[arm],
                 ms=30, mew=3)
    ax3.set_xticks(range(len(arms)), [LABEL[arm].replace("MoBA ", "MoBA\n") for arm in arms], fontsize=8)
    ax3.set(ylabel=f"final validation bits per byte (step {a.steps})",
            title="final bpb: each seed a line, mean a bar")
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    fig.suptitle(f"preset {a.preset}, {a.steps} steps, seeds {' '.join(map(str, a.seeds))}, {a.nproc} ranks")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")


def plot_needle(a, recs, base, path):
    """Free-running accuracy by context length x budget (one panel per arm) and by needle depth."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    T, budgets = base.max_seq_len, train.needle_budgets(base)
    arms = [arm for arm in a.arms if any(r["arm"] == arm for r in recs)]
    fig, axes = plt.subplots(1, len(arms) + 1, figsize=(3.3 * (len(arms) + 1), 3.4))
    lengths = (T // 4, T // 2, T)
    for ax, arm in zip(axes, arms):
        rs = [r for r in recs if r["arm"] == arm]
        m = np.array([[statistics.mean(r["needle"][f"T{L}_k{k}"][0] for r in rs) for k in budgets] for L in lengths])
        ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=8)
        ax.set_xticks(range(len(budgets)), [str(k) for k in budgets])
        ax.set_yticks(range(3), [str(L) for L in lengths])
        ax.set(xlabel="decoding budget (blocks)", ylabel="context (tokens)", title=LABEL[arm])
    ax = axes[-1]
    for arm in arms:
        hits = np.mean([r["depth"][f"T{T}_k{base.topk}"] for r in recs if r["arm"] == arm], axis=0)
        depth = (np.arange(len(hits)) + 0.5) / len(hits)
        ax.plot(depth, hits, "-o", ms=3, label=LABEL[arm])
    ax.set(xlabel="needle depth (fraction of the context)", ylabel="exact match", ylim=(-0.05, 1.05),
           title=f"by depth, T={T}, k={base.topk}")
    ax.legend(fontsize=7)
    fig.suptitle("needle retrieval, free running (greedy through the KV cache), mean over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")


# ------------------------------------------------------------------------------ commands
def cmd_curves(a):
    cache, base = load_cache(a), train.build_config(base_args(a))
    recs = []
    for seed in a.seeds:
        for arm in a.arms:
            flags = arm_flags(a, arm, base, cache, seed)
            if arm == "dstmean" and flags[-1] == str(base.topk) and "k0" in a.arms:
                # DST's mean used budget rounds to k0: this arm is the k0 run (same flags, same seed)
                rec = dict(run_arm(a, "k0", seed, arm_flags(a, "k0", base, cache, seed), cache),
                           arm="dstmean", flags=flags)
                print(f"  dstmean-s{seed}: DST's mean used budget rounds to k0 = {base.topk}: the k0 run")
            else:
                rec = run_arm(a, arm, seed, flags, cache)
            recs.append(rec)
    print_curves(a, recs, base)
    if not a.no_plots:
        try:
            plot_curves(a, recs, base, os.path.join(a.img, "quality_curves.png"))
            plot_needle(a, recs, base, os.path.join(a.img, "quality_needle.png"))
        except ImportError:
            print("matplotlib is not installed: tables only")


def cmd_learn(a):
    """One run of the preset with needle evaluation during training (train.py --needle-docs, every
    --eval-every steps): when does retrieval appear, and how far does it get? -> a table by step."""
    run, seed = a.run or f"learn-s{a.seeds[0]}", a.seeds[0]
    out = os.path.join(a.out, run)
    flags = ["--needle-docs", str(a.needle_docs), "--eval-every", str(a.eval_every)]
    if not os.path.exists(os.path.join(out, "ckpt.pt")):
        os.makedirs(a.out, exist_ok=True)
        cmd = train_cmd(a, run, seed, [])
        cmd = cmd[:cmd.index("--needle-docs")] + cmd[cmd.index("--needle-docs") + 2:] + flags
        print(" ".join(cmd[1:]).replace(ROOT + "/", ""), flush=True)
        r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
        open(os.path.join(a.out, run + ".log"), "w").write(r.stdout + r.stderr)
        if r.returncode:
            sys.exit(f"quality.py: {run} failed (log: {a.out}/{run}.log):\n{(r.stdout + r.stderr)[-3000:]}")
    steps, evals = read_metrics(out)
    cfg = json.load(open(os.path.join(out, "config.json")))["model"]
    T, k0 = cfg["max_seq_len"], cfg["topk"]
    cpu = np.cumsum([sum(s["compute_cpu"]) for s in steps])  # training compute, all ranks
    print(f"\nNeedle retrieval while training: {out} (T={T}, blocks of {cfg['attn_block']}, k0={k0}); free "
          "running exact match (teacher forced) at budget k0, documents per cell as run; CPU = the "
          "ranks' training compute up to that step (evaluation not counted)")
    print(f"| step | CPU min | val bpb | T/4={T // 4} | T/2={T // 2} | T={T} | T, dense | T, dst (budget) |")
    print("|---|---|---|---|---|---|---|---|")
    for e in evals:
        c = lambda L, k: f"{e[f'needle_T{L}_k{k}']:.2f} ({e[f'needle_tf_T{L}_k{k}']:.2f})"  # noqa: E731
        dense = T // cfg["attn_block"]
        print(f"| {e['step']} | {cpu[e['step'] - 1] / 60:.1f} | {e['val_bpb']:.3f} | {c(T // 4, k0)} | {c(T // 2, k0)} | "
              f"{c(T, k0)} | {c(T, dense)} | {c(T, 'dst')} ({e['needle_dst_budget']:.2f}) |")
    if not a.no_plots:
        try:
            plot_learn(evals, cpu, T, k0, T // cfg["attn_block"], os.path.join(a.img, "quality_learn.png"))
        except ImportError:
            print("(matplotlib is not installed: no plot)")


def plot_learn(evals, cpu, T, k0, dense, path):
    """Free-running exact match against training CPU minutes, one line per (context, budget)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    x = [cpu[e["step"] - 1] / 60 for e in evals]
    for L, k, style in ((T // 4, k0, "-o"), (T // 2, k0, "-s"), (T, k0, "-^"), (T, dense, "--^")):
        ax.plot(x, [e[f"needle_T{L}_k{k}"] for e in evals], style, ms=3,
                label=f"T={L}, budget {k}" + (" (dense)" if k == dense else " (k0)"))
    ax.set(xlabel="training CPU minutes (one thread)", ylabel="exact match, free running", ylim=(-0.05, 1.05),
           title=f"needle retrieval while training (steps {evals[0]['step']}-{evals[-1]['step']})")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")


# ------------------------------------------------------------------------------ induction
def induction_losses(model, n=8, period=40, passes=3, seed=0):
    """Mean next-token loss (nats) on each pass of n random 26-letter strings of `period` tokens,
    each repeated `passes` times, at the dense budget: a model with an induction head (copy what
    followed the earlier occurrence of the current context, what passkey retrieval needs) predicts
    the repeats, so passes 2.. fall far below pass 1; one without has the same loss on every pass."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(np.tile(rng.integers(97, 123, (n, period)), passes)).long()
    cfg = model.config
    ce = 0
    with torch.no_grad():
        for row in x:  # one string at a time
            logits, _ = model(row[None, :-1], topk=-(-cfg.max_seq_len // cfg.attn_block))
            ce = ce + F.cross_entropy(logits[0].float(), row[1:], reduction="none") / n
    return [ce[max(0, i * period - 1):(i + 1) * period - 1].mean().item() for i in range(passes)]


def cmd_induction(a):
    """With --ckpt: does a trained model copy (`induction_losses`)? Without: how many steps does
    the bare model (2 layers, width 128, 4 heads, rows of 128, blocks of 16, dense) need to form an
    induction head on the easiest data there is, rows that are random letter strings of 10-59
    tokens tiled (16 rows a step, every token counted, AdamW 3e-3, clipped at 1)? GPTConfig fields
    after `--` (e.g. -- ngram_amp=none n_head=2). Prints the loss on the first 9 and the last 60
    targets of the step's rows (the latter copyable) every 50 steps."""
    if a.ckpt:
        model = GPT.from_checkpoint(a.ckpt).eval()
        print(f"{a.ckpt}: loss per pass of a 40-letter string repeated 3 times (nats):",
              " ".join(f"{x:.3f}" for x in induction_losses(model)))
        return
    kw = dict(n_layer=2, n_head=4, n_embd=128, max_seq_len=128, attn_block=16, topk=8)
    for e in a.extra:
        k, v = e.split("=")
        kw[k] = type(getattr(GPTConfig, k))(v)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**kw))
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=3e-3, betas=(0.9, 0.95))
    rng, c0 = np.random.default_rng(0), time.process_time()
    for s in range(a.steps):
        x = np.stack([np.resize(rng.integers(97, 123, int(rng.integers(10, 60))), 128) for _ in range(16)])
        x = torch.from_numpy(x).long()
        logits, _ = model(x[:, :-1])
        ce = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
        ce.mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if (s + 1) % 50 == 0:
            print(f"step {s + 1}: first 9 {ce[:, :9].mean().item():.3f}, last 60 {ce[:, 67:].mean().item():.3f} "
                  f"nats ({time.process_time() - c0:.0f} CPU s)", flush=True)


def cmd_digits(a):
    """Which answer digit fails? Teacher-forced accuracy of each of the five digits separately (the
    model shown the earlier ones), for --needle-docs passkey documents per context length and
    budget (k0 and dense), fillers from the validation documents. Digits 2-5 only need the copy
    head (find the earlier digit, copy its successor); digit 1 needs "The passkey is " matched
    against the needle's, among the code's many spaces."""
    if not a.ckpt:
        sys.exit("quality.py digits: give the checkpoint to test with --ckpt PATH")
    model = GPT.from_checkpoint(a.ckpt).eval()
    cfg = model.config
    torch.set_num_threads(1)
    _, val = train.load_documents(a.data, base_args(a).val_frac, cfg.max_seq_len, note=lambda *_: None)
    T, n = cfg.max_seq_len, a.needle_docs
    print(f"{a.ckpt}: teacher-forced accuracy per answer digit, {n} documents a row")
    print("| context | budget | digit 1 | 2 | 3 | 4 | 5 | all five |")
    print("|---|---|---|---|---|---|---|---|")
    for L in (T // 4, T // 2, T):
        for k in (cfg.topk, T // cfg.attn_block):
            hits = []
            for i in range(n):
                toks, pos = train.passkey_sample(np.random.default_rng([7, L, i]), val[i % len(val)], L,
                                                 depth=(i + 0.5) / n)
                x = torch.from_numpy(toks.astype(np.int64))[None]
                with torch.no_grad():
                    logits, _ = model(x[:, :-1], topk=k)
                hits.append((logits[0, pos].argmax(-1) == x[0, pos + 1]).numpy())
            h = np.array(hits)
            print(f"| {len(toks) - 1} | {k} | " + " | ".join(f"{v:.2f}" for v in h.mean(0)) +
                  f" | {h.all(1).mean():.2f} |")


def simulate_row(anchor, p, steps):
    """experiments/simulate.py at (anchor, p): the '+ SAB + DST' row of mix (a) -> (speedup, mean
    budget, mean coverage). Simulated: analytic cost model of a 3B-like layer, no model runs."""
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "simulate.py"), "--anchor", anchor, "--p", str(p),
           "--steps", str(steps), "--bench-repeats", "1", "--mixes", "bimodal"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    table = r.stdout.split("(b) ")[0]
    row = next(line for line in table.splitlines() if line.startswith("| + SAB + DST"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    return float(cells[4].rstrip("x")), float(cells[5]), float(cells[6])


def anchor_grid(a):
    """The (anchor, p) cells: every pair with --full-grid, else the two sweeps through (mean, --p)."""
    if a.full_grid:
        return [(anchor, p) for anchor in a.anchors for p in a.ps]
    return [(anchor, a.p) for anchor in a.anchors] + [("mean", p) for p in a.ps if p != a.p]


def cmd_anchors(a):
    cache, base = load_cache(a), train.build_config(base_args(a))
    T, k0, seed = base.max_seq_len, base.topk, a.seeds[0]
    grid = anchor_grid(a)
    res = {}
    # (mean, p) is the curves' sabdst arm: last, so that a curves command running beside this one
    # has written it by then and it is reused, not trained twice
    for anchor, p in sorted(grid, key=lambda c: c == ("mean", a.p)):
        flags = ["--balance", "sab+dst", "--anchor", anchor, "--p", str(p)]
        run = f"sabdst-s{seed}" if (anchor, p) == ("mean", a.p) else f"sabdst-{anchor}-p{p}-s{seed}"
        res[anchor, p] = (run_arm(a, "sabdst", seed, flags, cache, run=run), simulate_row(anchor, p, a.sim_steps))
    rows = [(anchor, p, *res[anchor, p]) for anchor, p in grid]
    print(f"\nAnchor x p. MEASURED (train.py, preset {a.preset}, {a.steps} steps, {a.nproc} ranks, seed "
          f"{seed}): final val bpb, needle free running at T={T} and k={k0} (teacher forced), mean used "
          f"budget, median critical path (CPU s/step). SIMULATED (experiments/simulate.py --steps "
          f"{a.sim_steps}, mix (a), '+ SAB + DST' row: analytic 3B-like layer, 1F1B, no model runs): "
          "speedup over the baseline, mean budget (k0 32), mean coverage.")
    print("| anchor | p | measured: val bpb | needle T | mean budget | critical s | "
          "simulated: speedup | mean budget | mean coverage |")
    print("|---|---|---|---|---|---|---|---|---|")
    for anchor, p, r, (speed, sim_budget, cov) in rows:
        nd = r["needle"][f"T{T}_k{k0}"]
        print(f"| {anchor} | {p} | {r['val_bpb']:.3f} | {nd[0]:.2f} ({nd[1]:.2f}) | {r['mean_budget']:.2f} | "
              f"{r['critical_s']:.3f} | {speed:.2f}x | {sim_budget:.1f} | {cov:.3f} |")


def cmd_timeline(a):
    """One step's microbatches per rank under none and sab+dst, RECONSTRUCTED from the cost model:
    train.py's own draw of the step's samples, the Balancer's plan and DST targets (its first step:
    no online correction learnt yet), each microbatch's predicted seconds (all layers, at the
    targets; the layers' floors can only raise them). Not a measurement: train.py logs per-rank
    compute times, not per-microbatch ones."""
    from balance import Balancer, CostModel
    from data import draw_mix
    args = train.get_args(["--preset", "balance-demo", *a.extra])
    cfg = train.build_config(args)
    cost = (CostModel.load(a.cost_model) if a.cost_model != "analytic" else
            CostModel.analytic(block_size=cfg.attn_block, n_embd=cfg.n_embd, n_head=cfg.n_head))
    docs, _ = train.load_documents(args.data, args.val_frac, cfg.max_seq_len, note=lambda *_: None)
    samples = train.chunk(docs, cfg.max_seq_len)
    lens = np.array([len(x) - 1 for x in samples])
    rng = np.random.default_rng([args.seed, a.step])
    lengths = [int(lens[i]) for i in draw_mix(rng, lens, args.batch_size, args.mix)]
    timelines, measured = {}, {}
    a.nproc = max(1, a.nproc)
    print(f"\nStep {a.step + 1} of preset balance-demo on {a.nproc} ranks (seed {args.seed}), RECONSTRUCTED "
          f"from the cost model ({a.cost_model}): predicted seconds of each microbatch, all "
          f"{cfg.n_layer} layers, at DST's targets")
    print("| --balance | rank | microbatches: tokens @ mean budget -> predicted s | rank total s |")
    print("|---|---|---|---|")
    for policy in ("none", "sab+dst"):
        bal = Balancer(cost, a.nproc, policy, k0=cfg.topk, p=args.p, anchor=args.anchor, n_layer=cfg.n_layer,
                       num_microbatches=args.micro or None, capacity=cfg.max_seq_len, correction=False)
        step = bal.plan(lengths)
        ranks = []
        for r, micros in enumerate(step.plan):
            mbs = [(sum(lengths[i] for i in m), float(np.mean([step.targets[i] for i in m])),
                    cfg.n_layer * cost.predict_microbatch([lengths[i] for i in m], [step.targets[i] for i in m]))
                   for m in micros if m]
            ranks.append(mbs)
            print(f"| {policy} | {r} | " + ", ".join(f"{n} @ {k:.1f} -> {s:.3f}" for n, k, s in mbs)
                  + f" | {sum(s for *_, s in mbs):.3f} |")
        totals = [sum(s for *_, s in mbs) for mbs in ranks]
        print(f"| {policy} | step | critical path {max(totals):.3f} s, imbalance {max(totals) / np.mean(totals):.3f}, "
              f"idle {np.mean([max(totals) - t for t in totals]):.3f} s per rank | |")
        timelines[policy] = ranks
        log = os.path.join(a.measured or "", f"r{a.nproc}-{policy}", "metrics.jsonl")
        if a.measured and os.path.exists(log):  # the bench's run of the same step: rank totals only
            rec = next((r for r in map(json.loads, open(log)) if r.get("step") == a.step + 1 and "loss" in r), None)
            if rec:
                measured[policy] = rec["compute_cpu"]
                print(f"| {policy} | measured | {log}: step {a.step + 1}, compute CPU s per rank "
                      + ", ".join(f"{x:.3f}" for x in rec["compute_cpu"]) + " | |")
    if a.no_plots:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: table only")
        return
    end = max(sum(s for *_, s in mbs) for ranks in timelines.values() for mbs in ranks)
    fig, axes = plt.subplots(2, 1, figsize=(9, 1.1 + 0.55 * a.nproc * 2), sharex=True)
    for ax, (policy, ranks) in zip(axes, timelines.items()):
        for r, mbs in enumerate(ranks):
            t = 0.0
            for j, (n, k, s) in enumerate(mbs):
                ax.barh(r, s, left=t, color=("tab:blue", "tab:orange")[j % 2], edgecolor="black")
                if s > 0.06 * end:
                    ax.text(t + s / 2, r, f"{n // 1024}K@{k:.0f}" if n >= 1024 else f"{n}@{k:.0f}",
                            ha="center", va="center", fontsize=7)
                t += s
            ax.barh(r, end - t, left=t, color="lightgrey", hatch="//", edgecolor="grey")  # idle
        totals = [sum(s for *_, s in mbs) for mbs in ranks]
        if policy in measured:  # scaled to the predicted total: where the measured ranks end
            m = np.array(measured[policy]) * sum(totals) / sum(measured[policy])
            ax.plot(m, range(len(m)), "k|", ms=16, mew=2, label="measured end (scaled)")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in range(len(ranks))])
        ax.invert_yaxis()
        ax.set_title(f"--balance {policy}: step {max(totals):.2f} s, imbalance {max(totals) / np.mean(totals):.2f} "
                     "(grey = idle until the slowest rank)", fontsize=9)
    axes[-1].set_xlabel("seconds (predicted by the cost model, all layers; labels: tokens@budget)")
    fig.tight_layout()
    path = os.path.join(a.img, "quality_timeline.png")
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("curves", "anchors", "timeline", "learn", "induction", "digits"))
    ap.add_argument("--preset", default="needle", help="train.py preset of every run")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps of every run (default: the "
                    "preset's; induction: 400 toy steps)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="seeds (anchors: the first)")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--nproc", type=int, default=2, help="ranks per run under torchrun (0 = one plain "
                    "process, no torchrun); timeline: ranks of the plot")
    ap.add_argument("--p", type=float, default=0.1, help="DST threshold of the sabdst arm and of k=dst")
    ap.add_argument("--anchors", nargs="+", default=list(ANCHORS), choices=list(ANCHORS),
                    help="anchors: DST anchors to run (balance.ANCHORS)")
    ap.add_argument("--ps", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--full-grid", action="store_true", help="anchors: every anchor x every p (default: "
                    "the two sweeps through (mean, --p), which is 5 runs instead of 9)")
    ap.add_argument("--sim-steps", type=int, default=100, help="anchors: experiments/simulate.py --steps")
    ap.add_argument("--needle-docs", type=int, default=16, help="documents per needle cell")
    ap.add_argument("--data", default=None, help="train.py --data (default: the stdlib corpus)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto (train.py --device)")
    ap.add_argument("--out", default="out/quality", help="runs and results.jsonl")
    ap.add_argument("--img", default=os.path.join(ROOT, "docs", "img"), help="where the PNGs go")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--step", type=int, default=0, help="timeline: which step's samples (0 = first)")
    ap.add_argument("--run", default=None, help="learn: the run's folder name in --out (default learn-s<seed>)")
    ap.add_argument("--ckpt", default=None, help="induction: a checkpoint to test (else train the toy); "
                    "digits: the checkpoint (required)")
    ap.add_argument("--eval-every", type=int, default=250, help="learn: needle evaluation every N steps")
    ap.add_argument("--cost-model", default="analytic", help="timeline: analytic or a balance.py JSON")
    ap.add_argument("--measured", default=None, help="timeline: a bench_balance.sh OUT folder; its "
                    "r<nproc>-<policy>/metrics.jsonl give the measured compute of the same step per rank")
    a = ap.parse_args(argv)
    a.extra = extra
    if a.steps is None:  # the preset's steps (printed in every table), or the toy's
        a.steps = 400 if a.command == "induction" else train.get_args(["--preset", a.preset, *extra]).steps
    {"curves": cmd_curves, "anchors": cmd_anchors, "timeline": cmd_timeline, "learn": cmd_learn,
     "induction": cmd_induction, "digits": cmd_digits}[a.command](a)


if __name__ == "__main__":
    main()
