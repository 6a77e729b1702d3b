"""The N-gram Embedding paper's own experiment, small: from a base MoE, grow the total parameters
either with more experts (same top-k, so the activated parameters stay equal) or with N-gram
tables on the base MoE, at several total sizes and seeds, with a dense model of the same activated
size as reference; plus the ablations the paper reports (N and K at a fixed table budget,
amplification, table ratio on vs off an integer multiple of the vocabulary), measured in loss.

Every run is `python train.py` with the same data, tokens and data order for a given seed (the
seed fixes both the initial weights and the order of the samples), started as a subprocess; the
final validation bits per byte is read from its metrics.jsonl. Finished runs are cached in
OUT/results.jsonl, so an interrupted sweep resumes where it stopped.

    python experiments/ngram_sweep.py --parts sweep            # CPU: 16 runs, 2 at a time
    python experiments/ngram_sweep.py --parts ablations --steps 100 --warmup 10 \
        --out out/ngram_ablations                              # 9 shorter runs
    python experiments/ngram_sweep.py --parts sweep --report-only   # tables + plot from the cache

On 2 free cores a run takes about 1-1.5 min (the sweep's last two, side by side: 75 s), so the
sweep needs about 15 minutes and the shorter ablations about 5; other jobs on the cores stretch
that several times (docs/ngram.md ran it at load 5-14).
    python experiments/ngram_sweep.py --device cuda --n-layer 8 --n-embd 384 --n-head 6 \\
        --expert-hidden 512 --max-seq-len 1024 --topk 8 --batch-size 32 --steps 3000 \\
        --warmup 200 --lr 1e-3 --eval-samples 256 --seeds 1 2 3 --jobs 1 --out out/ngram_sweep_gpu
"""
import argparse
import concurrent.futures as cf
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tqdm import tqdm  # noqa: E402

from model import GPT, GPTConfig  # noqa: E402


# ------------------------------------------------------------------------------ the arms
def shape(args):
    """GPTConfig fields every run shares (the model's width, depth and attention)."""
    return dict(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
                max_seq_len=args.max_seq_len, attn_block=args.attn_block, topk=args.topk)


def moe(args, experts):
    return dict(shape(args), ngram_n=0, n_experts=experts, expert_topk=args.expert_topk,
                ffn_hidden=args.expert_hidden)


def dense(args):
    """A dense SwiGLU FFN of expert_topk x expert_hidden: what a token's top-k experts cost."""
    return dict(shape(args), ngram_n=0, n_experts=0, ffn_hidden=args.expert_topk * args.expert_hidden)


def counts(kw):
    """(total, activated, share of the total in n-gram tables) of a GPTConfig's fields."""
    model = GPT(GPTConfig(**kw))
    tables = model.embed.tables.weight.numel() if model.config.n_tables else 0
    total = model.num_params()
    return total, model.num_params(active=True), tables / total


def off_integer(ratio, margin=0.1, step=0.37):
    """Table sizes near an integer multiple of the vocabulary collide badly (the paper; `python
    experiments/ngram_report.py --collisions`): move a ratio that lands within `margin` of an integer by `step`."""
    return round(ratio + step, 2) if abs(ratio - round(ratio)) < margin else round(ratio, 2)


def ngram_for_total(args, total, n=None, k=None):
    """The base MoE plus N-gram tables whose ratio makes the total parameters equal `total`
    (total is linear in the ratio up to the integer row counts: solved from two probes)."""
    kw = dict(moe(args, args.base_experts), ngram_n=n or args.ngram_n, ngram_k=k or args.ngram_k)
    t1, t2 = (counts(dict(kw, ngram_ratio=r))[0] for r in (1.0, 2.0))
    ratio = 1.0 + (total - t1) / (t2 - t1)
    if ratio * GPTConfig.vocab_size < 1:
        raise ValueError(f"a total of {total:,} leaves too few parameters for n-gram tables on the "
                         f"base MoE of {args.base_experts} experts: grow --sizes")
    return dict(kw, ngram_ratio=off_integer(ratio))


def sweep_runs(args):
    """Part 1: (name, arm, size label, GPTConfig fields) for dense, the base MoE, and per size
    the experts arm and the N-gram arm of the same total."""
    runs = [("dense", "dense", 0, dense(args)), (f"moe{args.base_experts}", "base MoE", 0,
                                                    moe(args, args.base_experts))]
    for e in args.sizes:
        kw = moe(args, e)
        runs.append((f"moe{e}", "experts", e, kw))
        runs.append((f"ne_as_moe{e}", "N-gram", e, ngram_for_total(args, counts(kw)[0])))
    return runs


def ablation_ratio(args):
    """The table ratio of the ablations: --abl-ratio, else the N-gram arm's at the middle size."""
    if args.abl_ratio:
        return args.abl_ratio
    e = sorted(args.sizes)[len(args.sizes) // 2]
    return ngram_for_total(args, counts(moe(args, e))[0])["ngram_ratio"]


def ablation_runs(args):
    """Part 2: (name, group, setting, GPTConfig fields) on the base MoE with a fixed table budget."""
    r = ablation_ratio(args)
    base = dict(moe(args, args.base_experts), ngram_ratio=r)
    runs = []
    if args.abl_grid:
        pairs = [(n, k) for n in args.abl_n for k in args.abl_k]
    else:  # a cross through the N-gram arm's (N, K): each N at its K, each K at its N
        pairs = [(n, args.ngram_k) for n in args.abl_n]
        pairs += [(args.ngram_n, k) for k in args.abl_k if (args.ngram_n, k) not in pairs]
    for n, k in pairs:
        runs.append((f"abl_n{n}_k{k}_r{r}", "N, K", f"N={n} K={k}", dict(base, ngram_n=n, ngram_k=k)))
    for amp in ("none", "sqrt_d", "layernorm"):
        runs.append((f"abl_n{args.ngram_n}_k{args.ngram_k}_r{r}" + ("" if amp == "sqrt_d" else f"_{amp}"),
                     "amplification", amp, dict(base, ngram_n=args.ngram_n, ngram_k=args.ngram_k,
                                                **({} if amp == GPTConfig.ngram_amp else dict(ngram_amp=amp)))))
    whole = float(math.floor(r))
    for ratio, label in ((whole, f"{whole:g} (integer)"), (whole + 0.37, f"{whole + 0.37:g} (off)")):
        ratio = round(ratio, 2)
        runs.append((f"abl_n{args.ngram_n}_k{args.ratio_k}_r{ratio}", "ratio", label,
                     dict(base, ngram_n=args.ngram_n, ngram_k=args.ratio_k, ngram_ratio=ratio)))
    return runs


# ------------------------------------------------------------------------------ running
def run_key(cmd):
    """What makes two runs the same: their flags, in any order, but the output folder (so an
    ablation that equals a sweep run is trained once). cmd: [python, train.py, --flag, value, ...]."""
    return settings_key(cmd[2:])


def settings_key(words):
    pairs = sorted(zip(words[::2], words[1::2]))
    return " ".join(f"{k} {v}" for k, v in pairs if k != "--out")


def train_cmd(args, kw, seed, out):
    """The train.py command of one run: the shared training flags, then every GPTConfig field."""
    cmd = [args.python, os.path.join(ROOT, "train.py"), "--preset", "cpu-quick", "--out", out,
           "--device", args.device, "--seed", str(seed), "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--warmup", str(args.warmup),
           "--eval-every", str(args.steps), "--eval-samples", str(args.eval_samples),
           "--ckpt-every", "0", "--threads", str(args.threads)]
    if args.data:
        cmd += ["--data", args.data]
    for key, value in kw.items():
        cmd += ["--" + key.replace("_", "-"), str(value)]
    return cmd


def finished(out, cmd, steps):
    """The final val bits per byte of a run in `out` that train.py completed with exactly the
    flags of `cmd` (its config.json), else None."""
    try:
        train = json.load(open(os.path.join(out, "config.json")))["train"]
        evals = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if "val_bpb" in line]
    except (OSError, ValueError, KeyError):
        return None
    flags = dict(zip(cmd[2::2], cmd[3::2]))
    same = all(str(train.get(k.lstrip("-").replace("-", "_"))) == v for k, v in flags.items()
               if k not in ("--out", "--preset"))
    return evals[-1]["val_bpb"] if same and evals and evals[-1]["step"] == steps else None


def run_one(args, name, kw, seed):
    """Train one configuration (or read it from the cache): a dict with val_bpb and timings."""
    out = os.path.join(args.out, "runs", f"{name}_s{seed}")
    cmd = train_cmd(args, kw, seed, out)
    key = run_key(cmd)
    t0 = time.time()
    old = finished(out, cmd, args.steps)
    if old is not None:  # finished by an earlier sweep that stopped before caching the result
        return dict(key=key, name=name, seed=seed, val_bpb=old, seconds=0.0)
    for stale in ("ckpt.pt", "metrics.jsonl", "lock"):  # an unfinished run: train it again
        if os.path.exists(os.path.join(out, stale)):
            os.remove(os.path.join(out, stale))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"run {name} seed {seed} failed:\n{' '.join(cmd)}\n{proc.stderr[-2000:]}")
    bpb = [json.loads(line)["val_bpb"] for line in open(os.path.join(out, "metrics.jsonl"))
           if "val_bpb" in line]
    os.remove(os.path.join(out, "ckpt.pt"))  # only the numbers are needed; checkpoints are MBs each
    return dict(key=key, name=name, seed=seed, val_bpb=bpb[-1], seconds=time.time() - t0)


def run_all(args, jobs):
    """Run every (name, kw, seed) whose settings are not yet in OUT/results.jsonl, `--jobs` at a
    time; -> {(name, seed): result}."""
    path = os.path.join(args.out, "results.jsonl")
    done = {}
    if os.path.exists(path):
        for line in open(path):
            r = json.loads(line)
            done[settings_key(r["key"].split(" "))] = r
    key_of = {(name, seed): run_key(train_cmd(args, kw, seed, os.path.join(args.out, "runs", f"{name}_s{seed}")))
              for name, kw, seed in jobs}
    os.makedirs(args.out, exist_ok=True)
    with open(path, "a") as log:  # runs an earlier, interrupted sweep finished but did not cache
        for name, kw, seed in jobs:
            key = key_of[(name, seed)]
            out = os.path.join(args.out, "runs", f"{name}_s{seed}")
            bpb = None if key in done else finished(out, train_cmd(args, kw, seed, out), args.steps)
            if bpb is not None:
                done[key] = dict(key=key, name=name, seed=seed, val_bpb=bpb, seconds=0.0)
                log.write(json.dumps(done[key]) + "\n")
    todo, seen = [], set()
    for name, kw, seed in jobs:
        key = key_of[(name, seed)]
        if key not in done and key not in seen and not args.report_only:
            seen.add(key)
            todo.append((name, kw, seed))
    os.makedirs(args.out, exist_ok=True)
    with cf.ThreadPoolExecutor(args.jobs) as pool, open(path, "a") as log:
        futures = [pool.submit(run_one, args, name, kw, seed) for name, kw, seed in todo]
        for fut in tqdm(cf.as_completed(futures), total=len(futures), desc="training runs"):
            r = fut.result()
            done[r["key"]] = r
            log.write(json.dumps(r) + "\n")
            log.flush()
            tqdm.write(f"  {r['name']} seed {r['seed']}: {r['val_bpb']:.4f} bits per byte, {r['seconds']:.0f} s")
    # runs with the same settings (an ablation equal to a sweep run) share one result
    return {job: done[key] for job, key in key_of.items() if key in done}


def stats(values):
    mean = sum(values) / len(values)
    return mean, (max(values) - min(values)) / 2  # spread: half the range over the seeds


# ------------------------------------------------------------------------------ tables and plots
def report_sweep(args, runs, results):
    print(f"\nNE vs experts at equal totals: {args.n_layer} layers, width {args.n_embd}, base MoE "
          f"{args.base_experts} experts of hidden {args.expert_hidden}, top-{args.expert_topk}; "
          f"N-gram arm N={args.ngram_n} K={args.ngram_k}; {args.steps} steps of {args.batch_size} "
          f"samples; seeds {' '.join(map(str, args.seeds))}; mean +- half the range over seeds")
    print("| arm | model | total | activated | NE share | val bits per byte | per seed |")
    print("|---|---|---:|---:|---:|---:|---|")
    rows = []
    for name, arm, size, kw in runs:
        total, active, share = counts(kw)
        vals = [results[(name, s)]["val_bpb"] for s in args.seeds if (name, s) in results]
        if not vals:  # --report-only before the run finished
            print(f"| {arm} | {name} | {total:,} | {active:,} | {share:.1%} | not run | |")
            continue
        mean, spread = stats(vals)
        label = name if arm != "N-gram" else f"moe{args.base_experts} + NE (ratio {kw['ngram_ratio']})"
        rows.append(dict(name=name, arm=arm, size=size, total=total, active=active, share=share,
                         mean=mean, spread=spread))
        print(f"| {arm} | {label} | {total:,} | {active:,} | {share:.1%} | {mean:.4f} +- {spread:.4f} "
              f"| {' '.join(f'{v:.4f}' for v in vals)} |")
    return rows


def report_ablations(args, runs, results):
    print(f"\nAblations on the base MoE ({args.base_experts} experts) at table ratio "
          f"{ablation_ratio(args)} (about ratio x vocab x width table parameters whatever N and K); "
          f"seeds {' '.join(map(str, args.abl_seeds))}")
    print("| ablation | setting | total | NE share | val bits per byte | per seed |")
    print("|---|---|---:|---:|---:|---|")
    rows = []
    for name, group, setting, kw in runs:
        total, _, share = counts(kw)
        vals = [results[(name, s)]["val_bpb"] for s in args.abl_seeds if (name, s) in results]
        if not vals:
            print(f"| {group} | {setting} | {total:,} | {share:.1%} | not run | |")
            continue
        mean, spread = stats(vals)
        rows.append(dict(group=group, setting=setting, mean=mean, spread=spread))
        print(f"| {group} | {setting} | {total:,} | {share:.1%} | {mean:.4f} +- {spread:.4f} | "
              f"{' '.join(f'{v:.4f}' for v in vals)} |")
    return rows


def plot_sweep(rows, path):
    """Bits per byte against total parameters for the two arms (the paper's Pareto picture)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    base = [r for r in rows if r["arm"] == "base MoE"]
    for arm, style in (("experts", "o-"), ("N-gram", "s-")):
        pts = sorted(base + [r for r in rows if r["arm"] == arm], key=lambda r: r["total"])
        ax.errorbar([r["total"] / 1e6 for r in pts], [r["mean"] for r in pts],
                    yerr=[r["spread"] for r in pts], fmt=style, capsize=3,
                    label="more experts" if arm == "experts" else "N-gram tables on the base MoE")
    for r in rows:
        if r["arm"] == "dense":
            ax.errorbar([r["total"] / 1e6], [r["mean"]], yerr=[r["spread"]], fmt="k^", capsize=3,
                        label="dense (same activated)")
    ax.set_xlabel("total parameters (millions)")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("N-gram tables vs more experts (equal activated parameters)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"plot: {path}")


# ------------------------------------------------------------------------------ command line
def get_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--parts", nargs="+", default=["sweep", "ablations"], choices=["sweep", "ablations"],
      help="sweep: NE vs experts at equal totals; ablations: N/K, amplification, ratio")
    g = ap.add_argument_group("model shape (shared by every run)")
    g.add_argument("--n-layer", type=int, default=2)
    g.add_argument("--n-embd", type=int, default=96, help="width; divisible by every (N-1)K tried "
                   "(96 serves N in 2..4 and K in 1, 2, 4)")
    g.add_argument("--n-head", type=int, default=3, help="heads (head dim n_embd/n_head: a power of two >= 16)")
    g.add_argument("--max-seq-len", type=int, default=256)
    g.add_argument("--attn-block", type=int, default=64)
    g.add_argument("--topk", type=int, default=4, help="attention budget in blocks")
    g = ap.add_argument_group("the arms")
    g.add_argument("--base-experts", type=int, default=8, help="experts of the base MoE")
    g.add_argument("--expert-topk", type=int, default=2, help="experts per token (every MoE)")
    g.add_argument("--expert-hidden", type=int, default=128, help="hidden width of each expert; the "
                   "dense reference has expert-topk x this")
    g.add_argument("--sizes", type=int, nargs="+", default=[10, 12, 16], help="expert counts of the "
                   "experts arm; the N-gram arm matches each one's total (NE share 17-45%% by default)")
    g.add_argument("--ngram-n", type=int, default=3, help="N of the N-gram arm")
    g.add_argument("--ngram-k", type=int, default=2, help="K of the N-gram arm")
    g = ap.add_argument_group("ablations (on the base MoE, one fixed table budget)")
    g.add_argument("--abl-ratio", type=float, default=0.0, help="table ratio (0 = the N-gram arm's "
                   "at the middle size)")
    g.add_argument("--abl-n", type=int, nargs="+", default=[2, 3, 4])
    g.add_argument("--abl-k", type=int, nargs="+", default=[1, 2, 4])
    g.add_argument("--abl-grid", action="store_true", help="every (N, K) pair of --abl-n x --abl-k "
                   "(default: a cross through --ngram-n/--ngram-k, 5 runs instead of 9)")
    g.add_argument("--ratio-k", type=int, default=1, help="K for the integer vs off-integer ratio "
                   "pair (1: with K >= 2 the second table hides most collisions of the first)")
    g.add_argument("--abl-seeds", type=int, nargs="+", default=[1])
    g = ap.add_argument_group("training (train.py flags)")
    g.add_argument("--steps", type=int, default=250)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--warmup", type=int, default=25)
    g.add_argument("--eval-samples", type=int, default=64)
    g.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="seeds of the sweep (each "
                   "fixes the initial weights and the data order, the same for every arm)")
    g.add_argument("--data", default=None, help="train.py --data (default: the stdlib sources)")
    g.add_argument("--device", default="cpu", help="cpu | cuda (train.py --device)")
    g.add_argument("--threads", type=int, default=1, help="torch threads per run")
    g.add_argument("--jobs", type=int, default=2, help="runs trained at the same time")
    g.add_argument("--python", default=sys.executable, help="interpreter that runs train.py")
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "ngram_sweep"),
                    help="results.jsonl (the cache of finished runs) and the runs' folders")
    ap.add_argument("--plot-dir", default=None, help="where the PNG plots go (default: --out)")
    ap.add_argument("--report-only", action="store_true", help="train nothing: the tables and plots "
                    "of the results cached so far ('not run' for the others)")
    args = ap.parse_args(argv)
    for k in ("steps", "batch_size", "eval_samples", "jobs", "threads", "n_layer", "base_experts", "expert_topk"):
        if getattr(args, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be at least 1")
    if min(args.sizes) <= args.base_experts:
        ap.error("--sizes: every expert count must exceed --base-experts (the arms grow the base MoE)")
    args.plot_dir = args.plot_dir or args.out
    return args


def main(argv=None):
    args = get_args(argv)
    t0 = time.time()
    sweep = sweep_runs(args) if "sweep" in args.parts else []
    abl = ablation_runs(args) if "ablations" in args.parts else []
    jobs = [(name, kw, s) for name, _, _, kw in sweep for s in args.seeds]
    jobs += [(name, kw, s) for name, _, _, kw in abl for s in args.abl_seeds]
    results = run_all(args, jobs)
    os.makedirs(args.plot_dir, exist_ok=True)
    out = {}
    if sweep:
        out["sweep"] = report_sweep(args, sweep, results)
        plot_sweep(out["sweep"], os.path.join(args.plot_dir, "ngram_sweep.png"))
    if abl:
        out["ablations"] = report_ablations(args, abl, results)
    print(f"\n({sum((n, s) in results for n, _, s in jobs)} of {len(jobs)} runs done, {time.time() - t0:.0f} s wall; run seconds "
          f"summed: {sum(r['seconds'] for r in results.values()):.0f})")
    return out


if __name__ == "__main__":
    main()
