"""Inference cost, the N-gram paper's other half: decoding speed of dense, MoE and N-gram Embedding
models of (nearly) equal total parameters at several batch sizes.

The paper's point: at batch 1 an MoE reads only its top-k experts per layer, but with a batch the
tokens route to more and more distinct experts, so a decoding step reads more weights; the N-gram
tables cost a fixed (N-1)K row lookups per token whatever the batch. Besides tokens/s this prints
what a step reads: distinct experts per layer (measured) and the weight bytes touched (counted).

Models are randomly initialised (a step's cost does not depend on the weights' values; a trained
router may spread tokens less evenly than a random one, which the measured expert count shows).
Each step is timed in wall time and in this process's CPU time; on a shared machine compare the
CPU columns, and only ratios taken in one run.

    python experiments/ngram_infer_cost.py                              # CPU, 1 thread, ~2 min
    python experiments/ngram_infer_cost.py --batches 1 8 32 128 --device cuda --n-embd 1024 \\
        --n-layer 8 --n-head 8 --expert-hidden 1408 --steps 64
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from model import GPT, GPTConfig, MoE  # noqa: E402


def configs(args):
    """name -> GPTConfig fields: the MoE of `experts` experts, the base MoE plus N-gram tables of
    the same total, a dense model of the same total (a wide FFN), and a dense model of the same
    activated size (the reference every sparse model should beat at batch 1)."""
    shape = dict(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, max_seq_len=args.max_len,
                 attn_block=args.attn_block, topk=args.topk)
    moe = dict(shape, ngram_n=0, n_experts=args.experts, expert_topk=args.expert_topk,
               ffn_hidden=args.expert_hidden)
    total = GPT(GPTConfig(**moe)).num_params()
    base = dict(shape, ngram_n=0, n_experts=args.base_experts, expert_topk=args.expert_topk,
                ffn_hidden=args.expert_hidden)
    kw = dict(base, ngram_n=args.ngram_n, ngram_k=args.ngram_k)
    t1, t2 = (GPT(GPTConfig(**dict(kw, ngram_ratio=r))).num_params() for r in (1.0, 2.0))
    ratio = round(1.0 + (total - t1) / (t2 - t1), 2)
    ratio = ratio + 0.37 if abs(ratio - round(ratio)) < 0.1 else ratio   # off integer multiples
    ne = dict(kw, ngram_ratio=ratio)
    # dense of equal total: solve the SwiGLU hidden width (parameters linear in it), a multiple of 64
    d1, d2 = (GPT(GPTConfig(**dict(shape, ngram_n=0, ffn_hidden=h))).num_params() for h in (64, 128))
    wide = 64 * max(1, round((64 + (total - d1) * 64 / (d2 - d1)) / 64))
    return {
        "dense (same activated)": dict(shape, ngram_n=0, ffn_hidden=args.expert_topk * args.expert_hidden),
        "dense (same total)": dict(shape, ngram_n=0, ffn_hidden=wide),
        f"MoE {args.experts} experts": moe,
        f"MoE {args.base_experts} + N-gram": ne,
    }


def weight_bytes(model, experts_per_layer, batch):
    """Bytes of weights one decoding step reads: everything but the embedding tables and the
    experts, plus the experts it routes to, plus one row of E0 and of each sub-table per token."""
    cfg, size = model.config, model.lm_head.weight.element_size()
    n = sum(p.numel() for p in model.parameters())
    n -= model.embed.wte.weight.numel() - batch * cfg.n_embd
    if cfg.n_tables:
        n -= model.embed.tables.weight.numel() - batch * cfg.n_embd   # T rows of width D/T each
    if cfg.n_experts:
        per = sum(p.numel() for p in model.blocks[0].ffn.experts[0].parameters())
        n -= cfg.n_layer * (cfg.n_experts - experts_per_layer) * per
    return n * size


@torch.inference_mode()
def decode_cost(model, batch, prompt_len, steps, device, reps):
    """Best-of-reps (wall s, CPU s) of `steps` single-token decoding steps after a prefill, and the
    mean number of distinct experts a step reads per layer."""
    g = torch.Generator().manual_seed(batch)
    idx = torch.randint(0, 256, (batch, prompt_len + steps), generator=g).to(device)
    moes = [b.ffn for b in model.blocks if isinstance(b.ffn, MoE)]
    best_w = best_c = float("inf")
    used = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(reps):
        cache = model.new_cache(batch, max_len=prompt_len + steps, device=device)
        model(idx[:, :prompt_len], cache=cache)
        used = []
        sync()
        w0, c0 = time.perf_counter(), time.process_time()
        for t in range(prompt_len, prompt_len + steps):
            model(idx[:, t:t + 1], cache=cache)   # teacher-forced tokens: the same work as sampling
            used.append(sum(m.experts_used for m in moes) / max(len(moes), 1))
        sync()
        best_w = min(best_w, time.perf_counter() - w0)
        best_c = min(best_c, time.process_time() - c0)
    return best_w, best_c, sum(used) / len(used)


def plot(rows, batches, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in dict.fromkeys(r["name"] for r in rows):
        pts = [r for r in rows if r["name"] == name]
        axes[0].plot(batches, [r["cpu_tps"] for r in pts], "o-", label=name)
        axes[1].plot(batches, [r["mb"] for r in pts], "o-", label=name)
    axes[0].set_ylabel("decoded tokens/s (CPU time)")
    axes[1].set_ylabel("weights read per step (MB)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Decoding cost at equal total parameters")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"plot: {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--batches", type=int, nargs="+", default=[1, 8, 32], help="decoding batch sizes")
    a("--n-layer", type=int, default=4)
    a("--n-embd", type=int, default=256)
    a("--n-head", type=int, default=4)
    a("--attn-block", type=int, default=64)
    a("--topk", type=int, default=4, help="attention budget in blocks")
    a("--experts", type=int, default=16, help="experts of the MoE arm")
    a("--base-experts", type=int, default=8, help="experts of the MoE under the N-gram tables")
    a("--expert-topk", type=int, default=2)
    a("--expert-hidden", type=int, default=352, help="hidden width of each expert (SwiGLU)")
    a("--ngram-n", type=int, default=3)
    a("--ngram-k", type=int, default=2)
    a("--prompt-len", type=int, default=128, help="tokens prefilled before the timed steps")
    a("--steps", type=int, default=32, help="timed decoding steps")
    a("--reps", type=int, default=2, help="best of this many repeats")
    a("--device", default="cpu")
    a("--threads", type=int, default=1, help="torch CPU threads")
    a("--plot", default=os.path.join(ROOT, "out", "ngram_infer_cost.png"), help="PNG path ('' = none)")
    args = ap.parse_args(argv)
    for k in ("steps", "reps", "threads", "prompt_len"):
        if getattr(args, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be at least 1")
    if min(args.batches) < 1:
        ap.error("--batches must be >= 1")
    args.max_len = args.attn_block * -(-(args.prompt_len + args.steps) // args.attn_block)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    models = {}
    for name, kw in configs(args).items():
        torch.manual_seed(0)
        models[name] = GPT(GPTConfig(**kw)).to(device).eval()
    work = [(name, b) for b in args.batches for name in models]
    for name, b in tqdm(work, desc="decode timings"):
        m = models[name]
        wall, cpu, used = decode_cost(m, b, args.prompt_len, args.steps, device, args.reps)
        rows.append(dict(name=name, batch=b, tps=b * args.steps / wall, cpu_tps=b * args.steps / cpu,
                         used=used, mb=weight_bytes(m, used, b) / 1e6,
                         total=m.num_params(), active=m.num_params(active=True)))
    print(f"\n{args.n_layer} layers, width {args.n_embd}; prompt {args.prompt_len} tokens, "
          f"{args.steps} decoding steps timed, best of {args.reps}; {args.threads} thread(s), {args.device}")
    print("| model | total | activated | batch | tokens/s (wall) | tokens/s (CPU) | vs dense same "
          "activated (CPU) | experts read per layer | weights read per step (MB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ref = next(x for x in rows if x["batch"] == r["batch"] and x["name"].startswith("dense (same activated"))
        used = f"{r['used']:.1f}" if "MoE" in r["name"] else "-"
        print(f"| {r['name']} | {r['total']:,} | {r['active']:,} | {r['batch']} | {r['tps']:.0f} | "
              f"{r['cpu_tps']:.0f} | {r['cpu_tps'] / ref['cpu_tps']:.2f}x | {used} | {r['mb']:.1f} |")
    if args.plot:
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        plot(rows, args.batches, args.plot)
    return rows


if __name__ == "__main__":
    main()
