"""train.py's command line: every flag (documented by `python train.py --help`), the checks that
refuse a bad value before anything is read or written, and the GPTConfig a run builds from its
preset and flags (including the ngram-vs-moe comparison's three models at equal parameters).
The presets themselves are train.py's.
"""
import argparse
import dataclasses
import math
import os

import numpy as np
import torch

from balance import ANCHORS, BALANCE
from data import passkey_sample
from model import GPT, GPTConfig

MAX_BATCH = 1 << 16  # samples per step; more is a typo (every rank plans the whole global batch)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # a bad flag is one line and exit status 1, like every other bad input
        raise ValueError(message)


def to_bool(s):
    if s.lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise argparse.ArgumentTypeError(f"{s!r} is not a boolean: use true or false")
    return s.lower() in ("1", "true", "yes")


def parse_args(argv, presets, description=None):
    """The training flags -> args, with the preset (of `presets`) filling in what the command
    line left out."""
    p = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--preset", default=None, help=f"one of {', '.join(presets)} (default: cpu-quick, or gpu on CUDA)")
    a("--data", default=None, help="directory of text files, a text file, or a uint16 token file "
      "(*.bin); default: this Python's standard library sources")
    a("--out", default=None, help="output directory (default: out/<preset>)")
    a("--resume", action="store_true", help="continue OUT/ckpt.pt if it exists, else start fresh")
    a("--allow-changes", action="store_true", help="with --resume: continue a checkpoint written with "
      "other training flags (lr, schedule, steps, data, ...); the model's fields must still match")
    a("--steps", type=int, help="optimizer steps (also the length of the cosine schedule)")
    a("--batch-size", type=int, help="samples (document chunks) per step, all ranks together")
    a("--micro", type=int, help="microbatches per rank per step (gradient accumulation); each packs "
      "documents into one row of at most max_seq_len tokens; 0 = as many as the batch needs")
    a("--lr", type=float, help="peak learning rate")
    a("--min-lr-frac", type=float, default=None, help="final lr as a fraction of --lr (default 0.1; "
      "1 = constant after the warmup)")
    a("--warmup", type=int, help="linear warmup steps")
    a("--weight-decay", type=float, default=0.1, help="AdamW decay on matrices (never on tables)")
    a("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0 = off)")
    a("--balance", default="none", help=f"{' | '.join(BALANCE)}: batching policy and DST")
    a("--anchor", default="mean", help=f"DST anchor: {' | '.join(ANCHORS)} (paper: mean)")
    a("--p", type=float, default=0.1, help="DST threshold: in every layer a sample's budget is raised "
      "to its floor, the smallest budget keeping (1 - p) x the routing coverage it has at k0 (from "
      "the gate scores the layer computes anyway; 0 = never below k0's coverage)")
    a("--cost-model", default="analytic", help="analytic (FLOPs) | profile (measure this device once, "
      "saved to OUT/cost_model.json) | path to a CostModel JSON (python balance.py --profile PATH)")
    a("--correction", default="on", help="on | off: scale DST's per-rank predictions by an EMA of "
      "measured/predicted time (adapts to the machine, but makes budgets depend on timings)")
    a("--length-bias", type=float, default=0.0, help="0 = draw samples uniformly; 1 = in proportion to "
      "length (more long documents, the long-context fine-tuning regime)")
    a("--mix", default=None, help="none | bimodal: half of each step's samples of at most 2K tokens, "
      "half of at least 12K (like the paper's ChatQA2 mix; needs --max-seq-len >= 12288)")
    a("--eval-every", type=int, help="evaluate every N steps (and at the end)")
    a("--eval-samples", type=int, help="validation samples per evaluation")
    a("--passkey-frac", type=float, default=None, help="share of training samples replaced by "
      "synthetic passkey documents (default 0, preset needle 0.5); > 0 also turns on needle evaluation")
    a("--copy-frac", type=float, default=None, help="share of training samples replaced by a random "
      "string repeated to the sample's length (default 0, preset needle 0.5): copying is what forms the "
      "induction heads needle retrieval needs; passkey + copy shares must sum to at most 1")
    a("--induction-steps", type=int, default=None, help="a warm-up stage: the first N steps train on "
      "copy strings only, attending densely (default 0, preset needle 500); sparse routing at random "
      "init and the other data both slow the induction heads that retrieval needs (docs/quality.md)")
    a("--needle-docs", type=int, default=8, help="needle evaluation: passkey documents per (context "
      "length, budget) cell, generated free running and scored teacher forced (0 = skip it)")
    a("--ckpt-every", type=int, help="checkpoint every N steps (0 = only at the end)")
    a("--val-frac", type=float, default=0.1, help="share of documents held out, chosen by path hash")
    a("--seed", type=int, default=1337)
    a("--device", default="auto", help="auto | cpu | cuda")
    a("--threads", type=int, default=1, help="CPU threads per rank (more only help on an idle machine "
      "with wide models: with busy cores, spinning threads slow a step down several times)")
    a("--variant", default=None, help="dense | moe | ngram: the ngram-vs-moe comparison's three models")
    a("--max-skips", type=int, default=3, help="stop with an error after this many steps in a row "
      "skipped for a non-finite loss or gradient norm (a diverged run)")
    a("--pg-timeout", type=float, default=300.0, help="seconds a rank waits in a collective before "
      "the job stops with an error naming the step (a stalled rank); longer than any step")
    a("--crash-at-step", type=int, default=0, help="fault injection: the last rank exits at this "
      "step once (a marker file in --out stops it repeating after a restart)")
    a("--stall-at-step", type=int, default=0, help="fault injection: the last rank hangs at this step "
      "(alive but silent), until --pg-timeout ends the job")
    g = p.add_argument_group("model (GPTConfig fields; default from the preset, else GPTConfig)")
    for f in dataclasses.fields(GPTConfig):
        kind = type(f.default) if f.default is not dataclasses.MISSING else str
        conv = to_bool if kind is bool else kind
        g.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=conv, default=None)
    args = p.parse_args(argv)
    args.preset = args.preset or ("gpu" if torch.cuda.is_available() and args.device != "cpu" else "cpu-quick")
    if args.preset not in presets:
        raise ValueError(f"unknown preset {args.preset!r}; choose one of {', '.join(presets)}")
    for k, v in presets[args.preset].items():  # the preset fills in what the command line left out
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    for k, default in (("passkey_frac", 0.0), ("copy_frac", 0.0), ("min_lr_frac", 0.1), ("induction_steps", 0)):
        if getattr(args, k) is None:  # flags a preset may set: their default comes after the preset
            setattr(args, k, default)
    args.out = args.out or os.path.join("out", args.preset)
    return args


def check_args(args):
    """Every flag checked before anything is read or written. Non-finite numbers are refused
    everywhere: one NaN learning rate or weight decay silently turns every weight into NaN."""
    for k, v in vars(args).items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"--{k.replace('_', '-')} {v}: must be a finite number")
    rules = [  # (flag, ok, what it must be)
        ("balance", args.balance in BALANCE, f"choose one of {', '.join(BALANCE)}"),
        ("anchor", args.anchor in ANCHORS, f"choose one of {', '.join(ANCHORS)}"),
        ("correction", args.correction in ("on", "off"), "choose on or off"),
        ("device", args.device in ("auto", "cpu", "cuda"), "choose auto, cpu or cuda"),
        ("variant", args.variant in (None, "dense", "moe", "ngram"), "choose dense, moe or ngram"),
        ("mix", args.mix in (None, "none", "bimodal"), "choose none or bimodal"),
        ("lr", args.lr > 0, "must be > 0"),
        ("min_lr_frac", 0 <= args.min_lr_frac <= 1, "must be in [0, 1]"),
        ("weight_decay", args.weight_decay >= 0, "must be >= 0"),
        ("grad_clip", args.grad_clip >= 0, "must be >= 0 (0 = no clipping)"),
        ("p", 0 <= args.p < 1, "must be in [0, 1)"),
        ("passkey_frac", 0 <= args.passkey_frac <= 1, "must be in [0, 1]"),
        ("copy_frac", 0 <= args.copy_frac <= 1 - args.passkey_frac,
         f"must be in [0, 1 - --passkey-frac] = [0, {1 - args.passkey_frac:g}]"),
        ("val_frac", 0 < args.val_frac < 1, "must be in (0, 1)"),
        ("batch_size", 1 <= args.batch_size <= MAX_BATCH, f"must be in [1, {MAX_BATCH}]"),
        ("length_bias", args.length_bias >= 0, "must be >= 0 (0 = uniform, 1 = in proportion to length)"),
        ("rope_base", args.rope_base is None or args.rope_base > 0, "must be > 0"),
        ("pg_timeout", args.pg_timeout > 0, "must be > 0 seconds"),
    ]
    rules += [(k, getattr(args, k) >= 1, "must be at least 1")
              for k in ("steps", "eval_every", "eval_samples", "threads", "max_skips")]
    rules += [(k, getattr(args, k) >= 0, "must be at least 0")
              for k in ("micro", "warmup", "ckpt_every", "crash_at_step", "stall_at_step", "needle_docs",
                        "induction_steps")]
    for k, ok, what in rules:
        if not ok:
            raise ValueError(f"--{k.replace('_', '-')} {getattr(args, k)!r}: {what}")


def build_config(args):
    """GPTConfig from preset + flags (+ the ngram-vs-moe variant), validated with clear errors."""
    check_args(args)
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(GPTConfig) if getattr(args, f.name) is not None}
    if kw.get("max_seq_len", 1) % kw.get("attn_block", 1):
        raise ValueError(f"max_seq_len={kw['max_seq_len']} must be a multiple of attn_block="
                         f"{kw['attn_block']}: change --max-seq-len or --attn-block")
    shortest = len(passkey_sample(np.random.default_rng(0), [], 0)[0]) - 1  # needle + question + key
    if args.passkey_frac > 0 and kw.get("max_seq_len", GPTConfig.max_seq_len) < shortest:
        raise ValueError(f"--passkey-frac needs max_seq_len >= {shortest} (a passkey document's "
                         "shortest length): raise --max-seq-len or pass --passkey-frac 0")
    if args.variant:
        # The COMPARE of experiments/ngram_report.py at any width: a dense SwiGLU FFN of hidden h;
        # 4 experts of hidden h/2 routed top-2 = the same active parameters; N-gram tables holding
        # the MoE's extra parameters = the same total. Total parameters are linear in the table
        # ratio: solve for it.
        h = GPTConfig(**dict(kw, ffn_hidden=0)).hidden
        moe = dict(ngram_n=0, n_experts=4, expert_topk=2, ffn_hidden=h // 2)
        arms = dict(dense=dict(ngram_n=0, n_experts=0), moe=moe, ngram=dict(n_experts=0, ngram_n=3, ngram_k=2))
        kw.update(arms[args.variant])
        if args.variant == "ngram":
            target = GPT(GPTConfig(**dict(kw, **moe))).num_params()
            n1, n2 = (GPT(GPTConfig(**dict(kw, ngram_ratio=r))).num_params() for r in (1.0, 2.0))
            ratio = round(1.0 + (target - n1) / (n2 - n1), 2)
            # Table sizes near an integer multiple of the vocabulary collide badly (the paper; see
            # `python experiments/ngram_report.py --collisions`): step off by a few percent of V rows if it lands there.
            kw["ngram_ratio"] = round(ratio + 0.17, 2) if abs(ratio - round(ratio)) < 0.1 else ratio
            if kw["ngram_ratio"] <= 1:
                raise ValueError("--variant ngram: the MoE adds too few parameters for n-gram tables")
    return GPTConfig(**kw)
