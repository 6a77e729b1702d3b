"""Train a GPT with SparseBalance: block-sparse attention whose per-sequence budget is tuned at run
time so that data-parallel ranks finish their step together (DST), fed by sparsity-aware batching
(SAB). One script for a single process, torchrun on CPUs (gloo, fp32) and torchrun on GPUs (NCCL,
bf16 autocast, Triton kernels).

    python train.py                                    # CPU: --preset cpu-quick; GPU: --preset gpu
    python train.py --preset cpu-quick --steps 50      # any flag overrides the preset
    torchrun --standalone --nproc_per_node=2 train.py --preset balance-demo --balance sab+dst
    python train.py --preset needle                    # learns needle retrieval: ~16 CPU-minutes
    torchrun --nnodes=2 --node-rank=0 --nproc-per-node=8 --rdzv-backend=c10d \\
             --rdzv-endpoint=HOST:29500 train.py --preset gpu       # multi-node (same on node 1)
    torchrun --standalone --nproc_per_node=2 --max-restarts=3 train.py --resume   # survives a kill

Data: by default the Python standard library's own sources (one file = one document, bytes plus an
end-of-document id 256); `--data` takes a directory of text files, one text file, or a uint16
token file (*.bin). A step draws `--batch-size` samples (documents cut to `max_seq_len`), plans
them across ranks and `--micro` microbatches and gives each sample a latency-target budget
(balance.Balancer: SAB, then DST's pre-step half), and runs the rank's microbatches; inside every
layer a sample's budget is raised to that layer's routing-coverage floor (DST's second half, in
attention.py). Gradients are summed by one explicit all-reduce after the last microbatch (see
`step`), so a rank with nothing to do still takes part and the compute time of every rank can be
measured without the wait for the slowest one; one gather then brings the compute times and the
budgets every layer used back to the Balancer (SAB's estimates, the cost model's correction).

Outputs in --out: metrics.jsonl (one JSON line per step and per evaluation), config.json, and
ckpt.pt (written atomically; `--resume` continues it exactly, and starts fresh when it is absent,
which is what `torchrun --max-restarts` needs). A `lock` file keeps a second run off the same --out.
A diverged run (non-finite weights, --max-skips skipped steps in a row) stops with an error and
never overwrites the last good checkpoint; a stalled rank ends the job after --pg-timeout seconds.
"""
import dataclasses
import datetime
import json
import math
import os
import sys
import time
import zlib
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from attention import reuse_cpu_memory
from balance import Balancer, CostModel
from batching import n_blocks, padded
from checkpoint import (TrainingError, check_resume, lock_out, read_checkpoint, rng_state,
                        save_checkpoint, set_rng_state)
from config import build_config, parse_args
from data import chunk, copy_sample, draw_mix, load_documents, passkey_sample
from infer import needle_budgets, needle_eval
from model import GPT

# ------------------------------------------------------------------------------------------------
# Presets: values for the flags (config.py, `--help`) and for GPTConfig's fields; explicit flags win.
PRESETS = {
    # A tiny model for a CPU: about 3 minutes of one core's time.
    "cpu-quick": dict(n_layer=4, n_head=4, n_embd=128, max_seq_len=512, attn_block=64, topk=4,
                      batch_size=8, micro=0, steps=120, lr=3e-3, warmup=12, eval_every=40,
                      eval_samples=64, ckpt_every=40),
    # A larger default for one GPU.
    "gpu": dict(n_layer=8, n_head=8, n_embd=512, max_seq_len=4096, attn_block=64, topk=16,
                batch_size=32, micro=0, steps=5000, lr=1e-3, warmup=200, eval_every=500,
                eval_samples=256, ckpt_every=500),
    # Long sequences and a narrow model: attention dominates, so budgets move step time. The
    # bimodal mix (half <= 2K, half >= 12K tokens, like the paper's ChatQA2) leaves real imbalance
    # to round-robin; 16 samples a step for 4 CPU ranks (bench_balance.sh).
    "balance-demo": dict(n_layer=2, n_head=2, n_embd=64, max_seq_len=16384, attn_block=64, topk=8,
                         batch_size=16, micro=0, steps=12, lr=2e-3, warmup=3, eval_every=12,
                         eval_samples=4, ckpt_every=0, balance="sab+dst", mix="bimodal"),
    # Dense vs MoE (same active parameters) vs N-gram embedding (same total parameters as the MoE).
    "ngram-vs-moe": dict(n_layer=4, n_head=4, n_embd=128, max_seq_len=512, attn_block=64, topk=4,
                         batch_size=16, micro=0, steps=300, lr=3e-3, warmup=30, eval_every=100,
                         eval_samples=64, ckpt_every=100, variant="dense"),
    # Needle retrieval learnt on a CPU (docs/quality.md). Half the samples are passkey documents
    # (data.passkey_sample, 82-256 tokens: k0 = 4 blocks of 16 cover 64 of them, so the gate must
    # pick the needle's block), half random strings repeated (data.copy_sample), after a warm-up
    # stage of copy strings alone at the dense budget: retrieval is copying what followed the
    # earlier "The passkey is ", and these heads do not form from passkey documents alone. The
    # embedding is not amplified (ngram_amp none): on the induction toy that took the repeats from
    # 2.720 to 1.553 nats at step 400. The lr stays constant after the warmup, as retrieval comes late.
    "needle": dict(n_layer=2, n_head=4, n_embd=128, max_seq_len=256, attn_block=16, topk=4, ngram_amp="none",
                   batch_size=16, micro=0, steps=4000, lr=3e-3, warmup=50, min_lr_frac=1.0, eval_every=250,
                   eval_samples=32, ckpt_every=250, passkey_frac=0.5, copy_frac=0.5, induction_steps=500),
    # The small plain-embedding draft model infer.py uses for speculative decoding.
    "draft": dict(n_layer=2, n_head=2, n_embd=64, max_seq_len=512, attn_block=64, topk=8,
                  batch_size=16, micro=0, steps=300, lr=3e-3, warmup=30, eval_every=100,
                  eval_samples=64, ckpt_every=100, variant="dense"),
}
# Train settings that change the numbers a run produces: a resume must use the same ones to continue
# exactly (or say --allow-changes). The model's fields must always match (they shape the weights).
MUST_MATCH = ("data", "seed", "batch_size", "micro", "val_frac", "passkey_frac", "copy_frac", "induction_steps",
              "variant", "lr", "min_lr_frac", "warmup", "steps", "weight_decay", "grad_clip", "balance",
              "anchor", "p", "correction", "length_bias", "mix")


def get_args(argv=None):
    return parse_args(argv, PRESETS, __doc__)


# ------------------------------------------------------------------------------------------------
# Data: samples (data.chunk) -> microbatches (rows packed with documents)

def make_microbatch(samples, block, device):
    """Pack samples into one row [1, T]: each sample padded to a multiple of `block` (padding masked
    out of the loss), offsets in cu_seqlens. An empty list gives one masked dummy block."""
    if not samples:
        z = torch.zeros(1, block, dtype=torch.long, device=device)
        return z, z, torch.zeros(1, block, device=device), torch.tensor([0, block], dtype=torch.int32, device=device)
    xs, ys, ms, cu = [], [], [], [0]
    for s in samples:
        n = len(s) - 1
        pad = -n % block
        xs += [s[:-1], np.zeros(pad, np.uint16)]
        ys += [s[1:], np.zeros(pad, np.uint16)]
        ms += [np.ones(n, np.float32), np.zeros(pad, np.float32)]
        cu.append(cu[-1] + n + pad)
    t = lambda parts, dt: torch.from_numpy(np.concatenate(parts).astype(dt))[None].to(device)
    return t(xs, np.int64), t(ys, np.int64), t(ms, np.float32), torch.tensor(cu, dtype=torch.int32, device=device)


# ------------------------------------------------------------------------------------------------
# Distributed helpers (checkpoints, the --out lock and RNG state: checkpoint.py)

def setup_distributed(device_arg, timeout_s=300.0):
    """torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; without them this is a single process. A collective
    that waits longer than timeout_s raises (gloo) or aborts (NCCL) instead of hanging for the
    default 30 minutes: a stalled rank is otherwise silent."""
    use_cuda = torch.cuda.is_available() and device_arg != "cpu"
    if device_arg == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible; use --device cpu")
    rank, local, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if "RANK" in os.environ and not dist.is_initialized():
        # After `torchrun --max-restarts` restarts the workers, the rendezvous store can still hold
        # the dead workers' addresses; a per-attempt key prefix keeps the new group from reading them.
        store, _, _ = next(dist.rendezvous("env://"))
        store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}", store)
        dist.init_process_group("nccl" if use_cuda else "gloo", store=store, rank=rank, world_size=world,
                                device_id=device if use_cuda else None,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return rank, local, world, device


def all_gather_row(values, world, device):
    """Every rank's list of floats -> tensor [world, len(values)] (float64, on the CPU)."""
    x = torch.tensor(values, dtype=torch.float64, device=device)
    if world == 1:
        return x[None].cpu()
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x)
    return torch.stack(out).cpu()


# ------------------------------------------------------------------------------------------------
# Evaluation: validation bits per byte, passkey retrieval by context length and budget

def pack_rows(samples, capacity, block):
    """Greedy, in order: samples -> rows whose padded lengths sum to at most `capacity`."""
    rows, cur, used = [], [], 0
    for s in samples:
        n = padded(len(s) - 1, block)
        if cur and used + n > capacity:
            rows, cur, used = rows + [cur], [], 0
        cur, used = cur + [s], used + n
    return rows + [cur] if cur else rows


@torch.no_grad()
def evaluate(model, val, filler, cfg, args, rank, world, device, ctx):
    """Validation loss in bits per byte (EOS counted as a byte) at the default budget, and, with
    --passkey-frac > 0, needle retrieval on --needle-docs fixed documents per cell (needle depths
    spread over the context) for contexts of T/4, T/2, T and the budgets of `needle_budgets`:
    `needle_T{L}_k{k}` free running (generated through the KV cache, exact match),
    `needle_tf_T{L}_k{k}` teacher forced, and `needle_dst_budget`, the mean budget the "dst"
    cells used. Work is split across ranks."""
    model.eval()
    sums = []
    for row in pack_rows(val, cfg.max_seq_len, cfg.attn_block)[rank::world]:
        x, y, m, cu = make_microbatch(row, cfg.attn_block, device)
        with ctx:
            logits, _ = model(x, cu_seqlens=cu)  # (1, T, V); no targets: the loss is summed here
        ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        sums.append(torch.stack([(ce * m.flatten()).sum(), m.sum()]).double())
    local = torch.stack(sums).sum(0).tolist() if sums else [0.0, 0.0]
    cells = []
    n = args.needle_docs
    if args.passkey_frac > 0 and n:
        T = cfg.max_seq_len
        cells = [(L, k) for L in (T // 4, T // 2, T) for k in needle_budgets(cfg)]
        for L, k in cells:
            free, forced, used = needle_eval(model, filler, L, k, n, args.seed, args.p, ctx,
                                             mine=range(rank, n, world))
            local += [sum(free), sum(forced), sum(used)]
    tot = all_gather_row(local, world, device).sum(0).tolist()
    model.train()
    out = {"val_bpb": tot[0] / max(tot[1], 1) / math.log(2)}
    for i, (L, k) in enumerate(cells):
        free, forced, used = tot[2 + 3 * i:5 + 3 * i]
        out.update({f"needle_T{L}_k{k}": free / n, f"needle_tf_T{L}_k{k}": forced / n})
        if k == "dst":
            out["needle_dst_budget"] = out.get("needle_dst_budget", 0) + used / n / 3
    return out


# ------------------------------------------------------------------------------------------------
# One training step

def step(model, params, samples, plan_r, targets, layer_args, n_global, world, device, ctx):
    """Run this rank's microbatches, then sum gradients over ranks. Each microbatch's mean loss is
    weighted by its share of the global token count, so the summed gradient is that of the mean
    loss over every token of the step whatever the split. We all-reduce once, by hand, rather than
    through DDP's hooks: a rank with an empty plan still joins the same single collective (no hang),
    and the clocks stop before it, so the compute times are this rank's own work without waiting
    for others (CPU time as well as wall time: on a shared machine the CPU time does not grow when
    other jobs take the cores). Each sample runs at its DST target, raised in every layer to that
    layer's coverage floor (`layer_args`: k0 and p); the budgets the layers used are read back.
    -> (sum of token losses, wall seconds, CPU seconds, used budgets [n_layer][S], 0 for samples
    of other ranks)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    used = np.zeros((model.config.n_layer, len(targets)))
    t0, c0 = time.perf_counter(), time.process_time()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    for micro in (mb for mb in plan_r if mb):  # empty microbatches have nothing to compute
        x, y, m, cu = make_microbatch([samples[i] for i in micro], model.config.attn_block, device)
        topk = torch.tensor([targets[i] for i in micro], dtype=torch.long, device=device)
        with ctx:
            _, loss = model(x, y, cu_seqlens=cu, topk=topk, loss_mask=m, **layer_args)
        used[:, micro] = model.used_budgets.cpu().numpy()
        n = m.sum()
        (loss * (n / n_global)).backward()
        loss_sum += model.last_losses["lm"].double() * n  # the LM part alone (no MoE/draft terms)
    sync()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if world > 1:  # one flat buffer: unused parameters (an idle rank, unrouted experts) send zeros
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        dist.all_reduce(flat)
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad = g.view_as(p)
    return loss_sum.item(), wall, cpu, used


def gather_step(s, plan, loss_sum, wall, cpu, used, n_global, world, device):
    """The one collective after the step: every rank's loss sum, compute times and the budgets its
    layers used, with a digest of the plan each rank computed on its own (they must all agree).
    -> (mean loss over the step's tokens, wall [world], cpu [world], used budgets [n_layer][S])."""
    digest = zlib.crc32(repr((plan.plan, plan.targets)).encode())
    gathered = all_gather_row([loss_sum, wall, cpu, digest] + used.flatten().tolist(), world, device)
    if (gathered[:, 3] != digest).any():
        raise TrainingError(f"step {s + 1}: the ranks planned different batches or budgets "
                            "(the plan must be a pure function of inputs every rank holds)")
    used = gathered[:, 4:].sum(0).view(len(used), -1).round().long().tolist()  # one rank each
    return gathered[:, 0].sum().item() / n_global, gathered[:, 1], gathered[:, 2], used


# ------------------------------------------------------------------------------------------------
# Setting a run up: data, cost model, resume

def load_data(args, cfg, note):
    """-> (training samples, the fixed validation samples, filler for needle documents)."""
    train_docs, val_docs = load_documents(args.data, args.val_frac, cfg.max_seq_len, note=note)
    top = max(int(d.max()) for d in train_docs + val_docs)
    if top >= cfg.vocab_size:
        raise ValueError(f"--vocab-size {cfg.vocab_size}: the data holds token ids up to {top}; "
                         f"use at least {top + 1}")
    train, val = chunk(train_docs, cfg.max_seq_len), chunk(val_docs, cfg.max_seq_len)
    val = [val[i] for i in np.linspace(0, len(val) - 1, min(args.eval_samples, len(val))).astype(int)]
    return train, val, val_docs[0]


def load_cost_model(args, cfg, master, world, device):
    """--cost-model: analytic (FLOPs), profile (measured once on rank 0 into OUT/cost_model.json and
    shared through the file system; a resumed run keeps the table it started with) or a file."""
    if args.cost_model == "analytic":
        cost = CostModel.analytic(block_size=cfg.attn_block, n_embd=cfg.n_embd, n_head=cfg.n_head)
    elif args.cost_model == "profile":
        cost_file = os.path.join(args.out, "cost_model.json")
        if master and not os.path.exists(cost_file):
            os.makedirs(args.out, exist_ok=True)
            # every length the run can see (powers of two from 2 blocks to max_seq_len) and the
            # budgets up to 4 x k0 (beyond, the cost per visited block is held constant)
            lens = sorted({max(2 * cfg.attn_block, cfg.max_seq_len >> i) for i in range(16)})
            ks = [2 ** i for i in range(12) if 2 ** i <= max(32, 4 * cfg.topk)]
            CostModel.profile(lengths=lens, budgets=ks, n_embd=cfg.n_embd, n_head=cfg.n_head,
                              block_size=cfg.attn_block, device=device).save(cost_file)
        if world > 1:
            dist.barrier()
        cost = CostModel.load(cost_file)
    elif os.path.isfile(args.cost_model):
        try:
            cost = CostModel.load(args.cost_model)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"--cost-model {args.cost_model}: not a cost table ({type(e).__name__}: {e}); "
                             "write one with python balance.py --profile PATH") from None
    else:
        raise FileNotFoundError(f"--cost-model {args.cost_model}: not analytic, profile or a JSON file")
    if cost.block_size != cfg.attn_block:
        raise ValueError(f"--cost-model {args.cost_model}: profiled for blocks of {cost.block_size}, the "
                         f"model uses {cfg.attn_block}: profile it again with --block-size {cfg.attn_block}")
    return cost


def claim_out(args, cfg, master):
    """Lock --out for this run (rank 0), clear a half-written checkpoint, and read the checkpoint to
    continue (--resume; its config must match) -> (lock path or None, checkpoint path, dict or None)."""
    lock = lock_out(args.out) if master else None
    path = os.path.join(args.out, "ckpt.pt")
    if master and os.path.exists(path + ".tmp"):
        os.remove(path + ".tmp")  # a crash mid-write left it; we hold the lock, nobody writes it
    if not os.path.exists(path):
        return lock, path, None
    if not args.resume:
        raise ValueError(f"{path} exists: pass --resume to continue it, or choose another --out")
    ckpt = read_checkpoint(path)
    check_resume(ckpt, path, cfg, args, MUST_MATCH, args.allow_changes)
    return lock, path, ckpt


def weights_ok(params):
    return bool(torch.isfinite(torch.nn.utils.get_total_norm([p.detach() for p in params])))


def restore(ckpt, path, model, opt, bal):
    """Load a checkpoint's state into the run -> the step it holds. Contents that do not fit, or
    non-finite weights, are an error naming the file (nothing is overwritten)."""
    try:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        bal.load_state_dict(dict(sab=ckpt["sab_state"], correction=ckpt["correction"]))
        set_rng_state(ckpt["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        raise ValueError(f"{path}: its contents do not fit this model and optimizer "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:240]}): move it away "
                         "to start fresh, or choose another --out") from None
    if not weights_ok(model.parameters()):
        raise ValueError(f"{path}: holds non-finite weights (written by a diverged run): "
                         "move it away to start fresh, or resume an earlier copy")
    return int(ckpt["step"])


def write_config(args, cfg, model, world, train, val, note):
    """OUT/config.json: every flag and model field as resolved, and the sizes, also printed."""
    resolved = {"train": vars(args), "model": dataclasses.asdict(cfg), "world_size": world,
                "params": model.num_params(), "active_params": model.num_params(active=True),
                "train_samples": len(train), "val_samples": len(val)}
    note(json.dumps(resolved, indent=1))
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(resolved, f, indent=1)


def lr_at(s, args):
    """Linear warmup, then cosine down to min_lr_frac x lr at the last step."""
    lr_min = args.lr * args.min_lr_frac
    if s < args.warmup:
        return args.lr * (s + 1) / args.warmup
    frac = (s - args.warmup) / max(1, args.steps - args.warmup)
    return lr_min + 0.5 * (args.lr - lr_min) * (1 + math.cos(math.pi * frac))


def draw_samples(s, args, cfg, train, lengths, draw):
    """Step s's samples: a function of (seed, step) alone, so a resumed run sees the same data.
    lengths: of the training samples; draw: their sampling probabilities (--length-bias); --mix
    shapes the lengths; --passkey-frac replaces samples with synthetic needle documents and
    --copy-frac with repeated random strings (data.copy_sample), each of a random length; in the
    first --induction-steps every sample is such a string."""
    rng = np.random.default_rng([args.seed, s])
    length = lambda: int(rng.integers(cfg.attn_block, cfg.max_seq_len + 1))  # noqa: E731  synthetic ones
    if s < args.induction_steps:  # the warm-up stage: copy strings only
        return [copy_sample(rng, length()) for _ in range(args.batch_size)]
    samples = [train[i] for i in draw_mix(rng, lengths, args.batch_size, args.mix, p=draw)]
    u = rng.random(args.batch_size)
    for j in np.flatnonzero(u < args.passkey_frac):
        L = length()
        samples[j] = passkey_sample(rng, train[int(rng.integers(len(train)))], L)[0]
    if args.copy_frac:  # drawn after the passkey documents, so adding it leaves those unchanged
        for j in np.flatnonzero((u >= args.passkey_frac) & (u < args.passkey_frac + args.copy_frac)):
            samples[j] = copy_sample(rng, length())
    return samples


def fault_injection(s, args, rank, world):
    """--crash-at-step / --stall-at-step: the last rank dies (SIGKILL, what a lost node looks like to
    torchrun; once, a marker file stops it repeating after a restart) or hangs alive but silent."""
    if s + 1 == args.crash_at_step and rank == world - 1:
        marker = os.path.join(args.out, f"crashed_at_{s + 1}")
        if not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), 9)
    if s + 1 == args.stall_at_step and rank == world - 1:
        time.sleep(10 ** 6)  # the other ranks wait in this step's first collective


# ------------------------------------------------------------------------------------------------

def main(argv=None):
    args = get_args(argv)
    cfg = build_config(args)
    rank, _, world, device = setup_distributed(args.device, args.pg_timeout)
    master = rank == 0
    print0 = (lambda *a: tqdm.write(" ".join(map(str, a)))) if master else (lambda *a: None)
    torch.set_num_threads(args.threads)
    if device.type == "cpu":
        reuse_cpu_memory()  # no page faults for the step's large tensors (attention.py)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    # Everything that can fail on bad input fails here, before a checkpoint is touched.
    train, val, filler = load_data(args, cfg, print0)
    lock, ckpt_path, ckpt = claim_out(args, cfg, master)

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = GPT(cfg).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(model.param_groups(args.weight_decay), lr=args.lr, betas=(0.9, 0.95),
                            fused=device.type == "cuda")
    bal = Balancer(load_cost_model(args, cfg, master, world, device), world, args.balance, k0=cfg.topk,
                   p=args.p, anchor=args.anchor, n_layer=cfg.n_layer, num_microbatches=args.micro or None,
                   capacity=cfg.max_seq_len, correction=args.correction == "on")
    start = saved = restore(ckpt, ckpt_path, model, opt, bal) if ckpt else 0  # saved: the step on disk
    if ckpt:
        print0(f"resumed {ckpt_path} at step {start}")
    if master:
        write_config(args, cfg, model, world, train, val, print0)
    log = open(os.path.join(args.out, "metrics.jsonl"), "a") if master else None

    def record(d):
        if master:
            log.write(json.dumps(d) + "\n")
            log.flush()

    def kept():  # what the error messages of a stopped run say about the checkpoint
        return f"{ckpt_path} " + (f"still holds step {saved}: --resume from there" if saved
                                  else "was never written")

    def checkpoint(s):
        nonlocal saved
        # Never replace a good checkpoint with a diverged model: the weights must give finite
        # logits on a validation sample (every rank checks, so all stop together).
        x, _, _, cu = make_microbatch(val[:1], cfg.attn_block, device)
        with torch.no_grad(), ctx:
            ok = all_gather_row([float(torch.isfinite(model(x, cu_seqlens=cu)[0]).all())], world, device)
        if not ok.all():
            raise TrainingError(f"step {s}: the weights give non-finite outputs (diverged; lower --lr?): "
                                f"no checkpoint written; {kept()}")
        if master:  # `step` is also the data position: step s's samples come from (seed, s)
            sab, corr = bal.state_dict().values()
            save_checkpoint(ckpt_path, dict(model=model.state_dict(), optimizer=opt.state_dict(), step=s,
                                            rng=rng_state(), sab_state=sab, correction=corr,
                                            config=dataclasses.asdict(cfg), train_config=vars(args)))
        if world > 1:
            dist.barrier()  # the checkpoint is complete before any rank moves on (or dies)
        saved = s

    lengths_all = np.array([len(x) - 1 for x in train])
    draw = (lengths_all / lengths_all.max()) ** args.length_bias  # no overflow at any bias
    draw /= draw.sum()
    skips = 0  # steps skipped in a row

    def train_step(s):
        nonlocal skips
        fault_injection(s, args, rank, world)
        t_step = time.perf_counter()
        lr = lr_at(s, args)
        for g in opt.param_groups:
            g["lr"] = lr
        samples = draw_samples(s, args, cfg, train, lengths_all, draw)
        lengths = [len(x) - 1 for x in samples]  # input tokens; batching pads them to blocks
        plan = bal.plan(lengths)  # SAB + DST's targets: the same on every rank, no communication
        warm = s < args.induction_steps  # the warm-up stage attends densely, without DST
        targets = [n_blocks(n, cfg.attn_block) for n in lengths] if warm else plan.targets
        n_global = float(sum(lengths))
        loss_sum, wall, cpu, used = step(model, params, samples, plan.plan[rank], targets,
                                         {} if warm else bal.layer_args(), n_global, world, device, ctx)
        loss, walls, cpus, used = gather_step(s, plan, loss_sum, wall, cpu, used, n_global, world, device)
        norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
        skipped = not (math.isfinite(loss) and torch.isfinite(norm))  # same on every rank: same grads
        skips = skips + 1 if skipped else 0
        if skipped:
            print0(f"step {s + 1}: non-finite loss {loss} or grad norm {norm.item()}; update skipped")
            if skips >= args.max_skips:  # not a transient NaN: the weights themselves are broken
                raise TrainingError(f"step {s + 1}: {skips} steps in a row had a non-finite loss or "
                                    f"gradient norm (diverged; lower --lr?); {kept()}")
        else:
            opt.step()
            if not weights_ok(params):  # a huge lr or weight decay: the weights overflow in one update
                raise TrainingError(f"step {s + 1}: the update left non-finite weights (diverged; "
                                    f"--lr {lr:g} too high?); {kept()}")
        opt.zero_grad(set_to_none=True)
        # Measured balance, fed back into SAB's budget estimates and the cost model's correction:
        # CPU time on CPUs (what the step would take on dedicated cores), wall time on GPUs.
        times = walls if device.type == "cuda" else cpus
        # (the warm-up stage's dense budgets are not the plan's: nothing to learn from them)
        obs = dict(mean_budget=float(np.mean(used))) if warm else bal.observe(plan, used, times.tolist())
        dt = time.perf_counter() - t_step
        return dict(step=s + 1, loss=loss, lr=lr, grad_norm=norm.item(), skipped=skipped, step_time=dt,
                    compute=walls.tolist(), compute_cpu=cpus.tolist(), critical_path=times.max().item(),
                    imbalance=(times.max() / times.mean().clamp_min(1e-9)).item(),
                    idle=(times.max() - times).mean().item(), tokens=n_global, tok_s=n_global / dt,
                    plan_ms=plan.report["plan_ms"], imbalance_k0=plan.report["imbalance_k0"], **obs)

    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=not master, dynamic_ncols=True)
    for s in bar:
        try:
            m = train_step(s)
            record(m)
            bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m['tok_s']:.0f}", imb=f"{m['imbalance']:.2f}")
            if (s + 1) % args.eval_every == 0 or s + 1 == args.steps:
                e = dict(step=s + 1, **evaluate(model, val, filler, cfg, args, rank, world, device, ctx))
                record(e)
                print0(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in e.items()))
            if (args.ckpt_every and (s + 1) % args.ckpt_every == 0) or s + 1 == args.steps:
                checkpoint(s + 1)
        except RuntimeError as e:  # gloo raises when a collective waits longer than --pg-timeout
            if world == 1 or "timed out" not in str(e).lower():
                raise
            raise TrainingError(f"step {s + 1}: rank {rank} waited more than --pg-timeout "
                                f"{args.pg_timeout:g} s for the other ranks (one stalled or died); "
                                f"{kept()}") from None

    # Replicas must agree bit for bit; a silent divergence is the nastiest data-parallel bug.
    sums = all_gather_row([sum(p.double().sum().item() for p in params)], world, device)[:, 0]
    record(dict(step=args.steps, replica_max_diff=(sums.max() - sums.min()).item()))
    bar.close()
    if log:
        log.close()
    if lock:
        os.remove(lock)
    if dist.is_initialized():
        dist.barrier()  # no rank tears down gloo while another is still in its last collective
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, TrainingError) as e:  # the message says what to change
        sys.exit(f"train.py: error: {e}")
