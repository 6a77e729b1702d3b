"""The latency cost model, dynamic sparsity tuning (DST) and the per-step Balancer.

SparseBalance ("Cost model", "DST", "SAB"): the attention budget k (key blocks per query block, the
diagonal block included) is a run-time knob for load balance. A cost model predicts each
sequence's latency; DST cuts the budget of stragglers down to an anchor latency (never below a
routing-coverage floor) and raises the budget of under-loaded units up to the anchor ("free
accuracy"). This file never runs the model: it only predicts and tunes. The paper's ablation,
simulated on a DP x PP 1F1B schedule, is experiments/simulate.py.

    python balance.py --profile cost.json   # measure a cost table on this device (tqdm bar)
    python balance.py --check cost.json     # its error at lengths/budgets it never measured

Public API (stable):

    cm = CostModel.analytic(block_size=64, n_embd=768, n_head=12, head_dim=None, mlp_ratio=4,
                            attn_flops=200e12, linear_flops=400e12)
    cm = CostModel.profile(lengths=(1024, 2048, 4096, 8192), budgets=(1, 2, 4, 8, 16, 32),
                           n_embd=256, n_head=4, block_size=64, mlp_ratio=4, device=None,
                           dtype=None, repeats=3, impl="auto", attn_fn=None, progress=True)
    cm = CostModel.load(path); cm.save(path)
    cm.predict(seq_len, topk) -> seconds (one layer, forward + backward; topk None = dense)
    cm.curve(seq_len) -> callable topk -> seconds (same numbers, faster in loops)
    corr = OnlineCorrection(world_size, decay=0.9)
        corr.update(measured, predicted)     # per-rank lists of seconds, after each step
        corr.factors -> list[float]          # pass as tune_budgets(..., rank_scale=corr.factors)
    res = tune_budgets(plan, lengths, cost_model, anchor="mean", k0=32, unit="rank", k_max=None,
                       rank_scale=None, block_size=None, pipeline_stages=1, tolerance=0.0)
        res.budgets   list[int], the latency target of every sample (indexed like `lengths`);
                      each layer raises it to its own coverage floor (attention.select_blocks)
        res.anchor, res.units, res.loads_k0, res.loads, res.shortfalls
    bal = Balancer(cm, world, "sab+dst", k0=32, p=0.1, anchor="mean", n_layer=...)
        step = bal.plan(lengths)             # identical on every rank, no communication
        model(..., topk=step.targets, **bal.layer_args())   # per-layer half: k0, p
        bal.observe(step, used_budgets, measured_seconds)
    check_cost_model(cm, points=None) -> [(length, budget, measured s, predicted s)]
    one_f_one_b(latencies, pp, fwd_frac) -> seconds of one 1F1B pipeline (DST's growth cap)

What "load" means (one layer's predicted seconds, summed over the unit's sequences):
- unit="microbatch": one microbatch's latency. This is the paper's DST, and the unit of a
  pipeline (1F1B), whose bubbles grow with its slowest microbatch: used by the simulator.
- unit="rank": the sum over a rank's microbatches. A data-parallel rank without pipelining runs
  its microbatches one after another and all ranks meet at the gradient all-reduce, so the
  per-rank sum is what makes a straggler: used by train.py.
"""
import argparse
import bisect
import dataclasses
import json
import math
import os
import sys
import time

from attention import reuse_cpu_memory, timed, visited_blocks
from batching import SABState, check_plan, n_blocks, padded, plan_batches

# DST's anchor A: the load every unit is tuned to, from the units' loads at k0 (paper: MEAN is the
# best trade-off; MIN over-compresses; MAX gives almost no speedup). A new anchor is one entry here.
ANCHORS = {"mean": lambda loads: sum(loads) / len(loads), "min": min, "max": max}
UNITS = ("rank", "microbatch")


# ----------------------------------------------------------------------------- cost model

class CostModel:
    """One transformer layer's forward+backward seconds for a sequence of length L at budget k.

    SparseBalance's cost model is an offline-profiled lookup table, because FLOPs do not track
    real sparse-kernel time. Two sources here:
    - "table" (profile/load): measured seconds on a grid of lengths x budgets. predict() splits
      them into a linear part, interpolated as seconds per token in log-length, and an attention
      part, interpolated as seconds per visited block in (log-length, log-budget) and multiplied
      by visited_blocks(L, k). A budget >= the blocks of L is dense, whatever its value, and
      uses the dense rate (measured at the first grid budget >= the blocks; cells beyond it
      must hold the same dense time, as profile() writes them). Exact at grid points; outside
      the grid the rates are held constant, so the prediction still scales with the work.
    - "analytic": FLOPs over an assumed throughput (see analytic()).
    Documents are padded to a multiple of block_size, so L counts as ceil(L / b) * b tokens.
    """

    def __init__(self, kind, block_size, params=None, lengths=None, budgets=None, linear=None,
                 attention=None, meta=None, call_overhead=0.0):
        if kind not in ("analytic", "table"):
            raise ValueError(f"kind must be 'analytic' or 'table', got {kind!r}")
        self.kind, self.block_size = kind, int(block_size)
        self.params, self.meta = dict(params or {}), dict(meta or {})
        self._curves = {}  # blocks -> curve(), see curve()
        self.call_overhead = float(call_overhead)  # seconds of one attention call on one block
        self.fixed = 0.0  # seconds a microbatch (one packed row) pays once, whatever it holds
        if kind == "table":
            self.lengths, self.budgets = [int(x) for x in lengths], [int(x) for x in budgets]
            self.linear = [float(x) for x in linear]  # [len(lengths)] seconds
            self.attention = [[float(x) for x in row] for row in attention]  # [lengths][budgets]
            nl, nk = len(self.lengths), len(self.budgets)
            increasing = lambda xs: sorted(set(xs)) == xs  # noqa: E731
            if (not increasing(self.lengths) or not increasing(self.budgets)
                    or len(self.linear) != nl or len(self.attention) != nl
                    or any(len(row) != nk for row in self.attention)):
                raise ValueError("cost table needs strictly increasing lengths and budgets, "
                                 "linear[len(lengths)] and attention[len(lengths)][len(budgets)]")
            b = self.block_size
            if any(x % b for x in self.lengths):
                raise ValueError(f"cost table lengths must be multiples of block_size {b} "
                                 "(documents are padded to whole blocks)")
            self._logl = [math.log(x) for x in self.lengths]
            # A row's fixed cost, paid once however many documents it packs: the intercept of a
            # line through the linear times (least squares) plus one attention call's overhead,
            # each clipped to the smallest time measured, so every document's share stays >= 0.
            xs, ts = self.lengths, self.linear
            mx, mt = sum(xs) / nl, sum(ts) / nl
            var = sum((x - mx) ** 2 for x in xs)
            slope = sum((x - mx) * (t - mt) for x, t in zip(xs, ts)) / var if var else 0.0
            self._lin_fixed = min(max(0.0, mt - slope * mx), min(ts))
            self.call_overhead = min(max(0.0, self.call_overhead), min(min(self.attention)))
            self.fixed = self._lin_fixed + self.call_overhead
            self._lin_rate = [t / padded(x, b) for x, t in zip(self.lengths, self.linear)]
            self._att_rate = [[t / visited_blocks(x // b, k) for k, t in zip(self.budgets, row)]
                              for x, row in zip(self.lengths, self.attention)]
            # dense rate per length: at the first budget >= its blocks (the last one if none)
            self._dense_rate = [rates[min(bisect.bisect_left(self.budgets, x // b),
                                          len(rates) - 1)]
                                for x, rates in zip(self.lengths, self._att_rate)]

    # -- constructors
    @classmethod
    def analytic(cls, block_size=64, n_embd=768, n_head=12, head_dim=None, mlp_ratio=4,
                 attn_flops=200e12, linear_flops=400e12):
        """FLOP-count cost model (no measurement). Per layer, forward + backward (x3 of forward):
        attention 3 * 4 * visited_blocks * b^2 * head_dim * n_head (QK^T and PV per visited
        block pair), the gate 2 * n(n+1)/2 * head_dim * n_head (forward only: scoring every past
        block by its mean-pooled key; not differentiated), and the linear work
        3 * 2 * tokens * (4 + 2 * mlp_ratio) * n_embd^2 (QKV + output projections, MLP).
        attn_flops/linear_flops: assumed sustained FLOP/s (sparse attention kernels reach a
        lower share of peak than GEMMs); only their ratio matters for balancing."""
        for name, v in (("block_size", block_size), ("n_embd", n_embd), ("n_head", n_head),
                        ("mlp_ratio", mlp_ratio), ("attn_flops", attn_flops),
                        ("linear_flops", linear_flops), ("head_dim", head_dim or 1)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"CostModel.analytic: {name} must be a finite number > 0, got {v!r}")
        head_dim = n_embd // n_head if head_dim is None else head_dim
        params = dict(n_embd=n_embd, n_head=n_head, head_dim=head_dim, mlp_ratio=mlp_ratio,
                      attn_flops=float(attn_flops), linear_flops=float(linear_flops))
        return cls("analytic", block_size, params=params)

    @classmethod
    def profile(cls, lengths=(1024, 2048, 4096, 8192), budgets=(1, 2, 4, 8, 16, 32), n_embd=256,
                n_head=4, block_size=64, mlp_ratio=4, device=None, dtype=None, repeats=3,
                impl="auto", attn_fn=None, progress=True):
        """Measure the table on this device (SparseBalance: offline-profiled cost model).

        For each length: a layer's linear work (QKV, output projection, MLP; forward+backward
        on [1, L, n_embd]) and, for each budget, attention.sparse_attention forward+backward on
        [1, n_head, L, head_dim]. Budgets at or above the number of blocks are dense, so they are
        measured once and reused. Seconds are the minimum over `repeats` after one warm-up,
        made non-decreasing in the budget (running maximum) to remove timing noise.
        attn_fn: replaces attention.sparse_attention (same signature), e.g. in tests.
        """
        import torch
        from tqdm import tqdm
        if attn_fn is None:
            from attention import sparse_attention as attn_fn
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        lengths = sorted({padded(int(x), block_size) for x in lengths})
        budgets = sorted({int(k) for k in budgets})
        if not lengths or not budgets or budgets[0] < 1:
            raise ValueError("profile needs at least one length and budgets >= 1")
        head_dim = n_embd // n_head
        gen = torch.Generator(device="cpu").manual_seed(0)

        def timeit(fn):  # seconds: best of `repeats` after one warm-up (allocation, compilation)
            return timed([fn], repeats, device.type == "cuda", warmup=1)[0][0] / 1e3

        lin = torch.nn.Sequential()  # a stand-in for the layer's matmuls, not a model
        lin.qkv = torch.nn.Linear(n_embd, 3 * n_embd)
        lin.proj = torch.nn.Linear(n_embd, n_embd)
        lin.up = torch.nn.Linear(n_embd, mlp_ratio * n_embd)
        lin.down = torch.nn.Linear(mlp_ratio * n_embd, n_embd)
        lin = lin.to(device=device, dtype=dtype)

        def linear_step(x):
            h = lin.proj(lin.qkv(x)[..., :n_embd]) + x
            (lin.down(torch.nn.functional.gelu(lin.up(h))) + h).float().sum().backward()

        linear, attention = [], []
        bar = tqdm(total=len(lengths) * (1 + len(budgets)) + 1, desc="profiling cost model",
                   disable=not progress)
        # one block at budget 1: what any attention call costs besides its work (a packed row
        # of many documents pays it once)
        q1, k1, v1 = (torch.randn(1, n_head, block_size, head_dim, generator=gen)
                      .to(device, dtype).requires_grad_() for _ in range(3))
        overhead = timeit(lambda: attn_fn(q1, k1, v1, 1, block_size=block_size, impl=impl)
                          .float().sum().backward())
        bar.update(1)
        for length in lengths:
            x = torch.randn(1, length, n_embd, generator=gen).to(device, dtype).requires_grad_()
            linear.append(timeit(lambda: linear_step(x)))
            bar.update(1)
            q, k, v = (torch.randn(1, n_head, length, head_dim, generator=gen)
                       .to(device, dtype).requires_grad_() for _ in range(3))
            nb, row, dense = length // block_size, [], None
            for budget in budgets:
                if budget >= nb and dense is not None:
                    row.append(dense)
                else:
                    t = timeit(lambda: attn_fn(q, k, v, budget, block_size=block_size, impl=impl)
                               .float().sum().backward())
                    row.append(t)
                    if budget >= nb:
                        dense = t
                bar.update(1)
            # More blocks never cost less: a running maximum over budgets removes timing noise
            # that would make a straggler's budget search see a non-monotone curve.
            attention.append([max(row[:j + 1]) for j in range(len(row))])
        bar.close()
        meta = dict(device=str(torch.cuda.get_device_name(device) if device.type == "cuda"
                               else "cpu"), dtype=str(dtype), n_embd=n_embd, n_head=n_head,
                    mlp_ratio=mlp_ratio, impl=impl, repeats=repeats)
        return cls("table", block_size, lengths=lengths, budgets=budgets, linear=linear,
                   attention=attention, meta=meta, call_overhead=overhead)

    @classmethod
    def load(cls, path):
        """Read a cost model written by save() (or `python balance.py --profile PATH`)."""
        if not os.path.exists(path):
            raise FileNotFoundError(f"no cost model at {path}: create one with "
                                    f"`python balance.py --profile {path}` or use the analytic one")
        with open(path) as f:
            d = json.load(f)
        if d.get("format") != "sparsebalance-costmodel-v1":
            raise ValueError(f"{path} is not a cost model file (format field missing or unknown)")
        return cls(d["kind"], d["block_size"], params=d.get("params"), lengths=d.get("lengths"),
                   budgets=d.get("budgets"), linear=d.get("linear"),
                   attention=d.get("attention"), meta=d.get("meta"),
                   call_overhead=d.get("call_overhead", 0.0))

    def save(self, path):
        d = {"format": "sparsebalance-costmodel-v1", "kind": self.kind,
             "block_size": self.block_size, "params": self.params, "meta": self.meta,
             "call_overhead": self.call_overhead}
        if self.kind == "table":
            d.update(lengths=self.lengths, budgets=self.budgets, linear=self.linear,
                     attention=self.attention)
        with open(path, "w") as f:
            json.dump(d, f, indent=1)

    # -- prediction
    def curve(self, seq_len):
        """Return f(topk) -> seconds of one document of seq_len tokens inside a packed row
        (topk None = dense), without the row's fixed cost. The length-dependent part is computed
        once and cached (SAB and DST ask for the same lengths each step)."""
        b = self.block_size
        n = n_blocks(seq_len, b)
        f = self._curves.get(n)
        if f is None:
            if len(self._curves) > 100_000:  # a bound on memory for endless streams of lengths
                self._curves.clear()
            f = self._curves[n] = self._make_curve(n)
        return f

    def _make_curve(self, n):
        b = self.block_size
        tokens = n * b
        if self.kind == "analytic":
            q = self.params
            hd_h = q["head_dim"] * q["n_head"]
            per_block = 12.0 * b * b * hd_h / q["attn_flops"]
            linear = 6.0 * tokens * (4 + 2 * q["mlp_ratio"]) * q["n_embd"] ** 2
            fixed = n * (n + 1) * hd_h / q["attn_flops"] + linear / q["linear_flops"]

            def f(topk):
                return fixed + per_block * visited_blocks(n, topk)
            return f
        # Attention seconds at the grid budgets below n (rate per visited block, interpolated in
        # log-length, times the visited blocks), then dense at k = n. A running maximum makes them
        # non-decreasing, and between grid budgets the time is linear in the visited blocks: so
        # the prediction is monotone in the budget everywhere, not only at the grid points, and
        # exact wherever the rate is constant.
        i, w = _bracket(self._logl, math.log(tokens))
        at = lambda xs: (1 - w) * xs[i] + w * xs[i + 1] if w else xs[i]  # noqa: E731
        vs, ts = [], []
        for j, k in enumerate(self.budgets):
            if k >= n:
                break
            vs.append(visited_blocks(n, k))
            ts.append(at([row[j] for row in self._att_rate]) * vs[-1])
        vs.append(visited_blocks(n, n))
        ts.append(at(self._dense_rate) * vs[-1])
        ts = [max(0.0, max(ts[:j + 1]) - self.call_overhead) for j in range(len(ts))]
        lin = tokens * at(self._lin_rate) - self._lin_fixed

        def f(topk):
            if topk is None or topk >= n:  # dense causal, however it is asked for
                return lin + ts[-1]
            v = visited_blocks(n, topk)
            if v <= vs[0]:  # below the grid: the first grid time scaled by the work
                return lin + ts[0] * v / vs[0]
            j = bisect.bisect_left(vs, v) - 1                            # vs[j] < v <= vs[j + 1]
            return lin + ts[j] + (v - vs[j]) / (vs[j + 1] - vs[j]) * (ts[j + 1] - ts[j])
        return f

    def predict(self, seq_len, topk=None):
        """Predicted seconds of one layer, forward + backward, for one sequence of seq_len
        tokens alone in a row, at budget topk (blocks incl. its own; None or >= blocks = dense)."""
        return self.predict_microbatch([seq_len], [topk])

    def predict_plan(self, plan, lengths, budgets):
        """predict_microbatch of every microbatch of a plan: [rank][micro] seconds (one layer)."""
        return [[self.predict_microbatch([lengths[i] for i in m], [budgets[i] for i in m])
                 for m in rank] for rank in plan]

    def predict_microbatch(self, lengths, budgets):
        """One layer's forward + backward seconds for a microbatch as it runs: one packed row,
        so the fixed per-call cost is paid once, attention per document at its budget, linear
        work per token. An empty microbatch costs nothing (it is skipped)."""
        if len(lengths) != len(budgets):
            raise ValueError(f"predict_microbatch needs one budget per length, got "
                             f"{len(lengths)} lengths and {len(budgets)} budgets")
        for x, k in zip(lengths, budgets):
            if not (x >= 1 and (k is None or k >= 1)):
                raise ValueError(f"seq_len must be >= 1 and topk >= 1 (or None), got {x}, {k}")
        if not lengths:
            return 0.0
        return self.fixed + sum(self.curve(x)(k) for x, k in zip(lengths, budgets))


def check_cost_model(cm, points=None, attn_fn=None, repeats=3, progress=True):
    """How well does a profiled table predict lengths and budgets it never measured? Measures
    (length, budget) points exactly as profile() does (same layer shape, from cm.meta) and
    returns rows (length, budget, measured s, predicted s). Default points: the geometric
    midpoints between neighbouring grid lengths, each at the midpoints of three budget pairs."""
    from tqdm import tqdm
    if cm.kind != "table":
        raise ValueError("check_cost_model needs a profiled table (CostModel.profile / load)")
    if points is None:
        ks = cm.budgets
        pairs = sorted({j for j in (0, len(ks) // 2 - 1, len(ks) - 2) if 0 <= j < len(ks) - 1})
        points = [(round(math.sqrt(a * c)), round(math.sqrt(ks[j] * ks[j + 1])))
                  for a, c in zip(cm.lengths, cm.lengths[1:]) for j in pairs]
    m = cm.meta
    rows = []
    for length, k in tqdm(points, desc="checking cost model", disable=not progress):
        t = CostModel.profile(lengths=(length,), budgets=(k,), n_embd=m["n_embd"],
                              n_head=m["n_head"], block_size=cm.block_size,
                              mlp_ratio=m["mlp_ratio"], repeats=repeats,
                              impl=m.get("impl", "auto"), attn_fn=attn_fn, progress=False)
        rows.append((length, k, t.linear[0] + t.attention[0][0], cm.predict(length, k)))
    return rows


def _bracket(xs, x):
    """(i, w) with x ~ (1-w) xs[i] + w xs[i+1], clamped to the ends (w = 0 there)."""
    if x <= xs[0] or len(xs) == 1:
        return 0, 0.0
    if x >= xs[-1]:
        return len(xs) - 1, 0.0
    i = bisect.bisect_right(xs, x) - 1
    w = (x - xs[i]) / (xs[i + 1] - xs[i])
    return i, w


class OnlineCorrection:
    """Measured against predicted compute, per rank (an addition: the paper has none).

    A table profiled once drifts from reality (other kernels, a slower node, thermal limits), and
    an analytic model's absolute seconds can be off by orders of magnitude. After each step the
    Balancer passes every rank's measured compute seconds and what the cost model predicted for
    the budgets that ran; `scale` becomes an EMA of total measured / total predicted, and
    `factors` an EMA of each rank's ratio relative to that (clipped to [0.1, 10], so one odd step
    cannot throw it far off). DST scales each rank's load by its factor; `corrected(predicted)`
    is the prediction in measured seconds. Identical inputs on every rank give identical state.
    """

    def __init__(self, world_size, decay=0.9):
        if not (isinstance(world_size, int) and world_size >= 1) or not 0.0 <= decay < 1.0:
            raise ValueError(f"OnlineCorrection needs world_size >= 1 and 0 <= decay < 1, got "
                             f"{world_size!r}, {decay!r}")
        self.decay, self.factors, self.scale, self.steps = float(decay), [1.0] * world_size, 1.0, 0

    def corrected(self, predicted):
        return [self.scale * f * x for f, x in zip(self.factors, predicted)]

    def update(self, measured, predicted):
        n = len(self.factors)
        if len(measured) != n or len(predicted) != n:
            raise ValueError(f"update needs one measured and one predicted time per rank ({n})")
        if not all(math.isfinite(x) and x >= 0 for x in list(measured) + list(predicted)):
            raise ValueError(f"measured and predicted times must be finite and >= 0, got "
                             f"{list(measured)}, {list(predicted)}")
        if sum(predicted) <= 0 or sum(measured) <= 0:
            return  # nothing ran: nothing learnt
        ema = lambda old, new: new if self.steps == 0 else self.decay * old + (1 - self.decay) * new  # noqa: E731
        total = sum(measured) / sum(predicted)
        for r, (m, p) in enumerate(zip(measured, predicted)):
            if p > 0:  # an empty rank tells nothing about its speed
                self.factors[r] = ema(self.factors[r], min(10.0, max(0.1, m / p / total)))
        self.scale = ema(self.scale, total)
        self.steps += 1

    def state_dict(self):
        return dict(factors=list(self.factors), scale=self.scale, steps=self.steps)

    def load_state_dict(self, d):
        if len(d["factors"]) == len(self.factors):  # a new world size starts afresh
            self.factors, self.scale, self.steps = list(d["factors"]), d.get("scale", 1.0), d["steps"]


# ----------------------------------------------------------------------------- DST

@dataclasses.dataclass
class DSTResult:
    """Output of tune_budgets. Loads are predicted seconds of one layer (times rank_scale)."""
    budgets: list      # the latency-target budget of every sample, clipped to its blocks
    anchor: float      # the anchor load A
    units: list        # (rank,) or (rank, micro) per non-empty unit
    loads_k0: list     # per unit, at the default budget k0
    loads: list        # per unit, at the targets
    shortfalls: list   # units still above the anchor at budget 1: (unit, seconds above)


def _check_dst_inputs(plan, lengths, b, anchor, unit, k0, tolerance, k_max, block_size, rank_scale):
    """tune_budgets' inputs, checked at the boundary with errors that say what to change."""
    if anchor not in ANCHORS:
        raise ValueError(f"anchor must be one of {', '.join(ANCHORS)}, got {anchor!r}")
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    if not (isinstance(k0, int) and not isinstance(k0, bool) and k0 >= 1):
        raise ValueError(f"k0 must be a positive int (blocks), got {k0!r}")
    if not (isinstance(tolerance, (int, float)) and 0 <= tolerance < 1):
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance!r}")
    if k_max is not None and k_max < k0:
        raise ValueError(f"k_max ({k_max}) must be >= k0 ({k0}) or None")
    if any(not (isinstance(x, int) and x >= 1) for x in lengths):
        raise ValueError("lengths must be positive ints (tokens per sample)")
    if block_size is not None and block_size != b:
        raise ValueError(f"block_size {block_size} differs from the cost model's {b}: "
                         "profile the cost model at the block size you train with")
    if rank_scale is not None and (len(rank_scale) != len(plan) or not all(
            math.isfinite(x) and x > 0 for x in rank_scale)):
        raise ValueError(f"rank_scale needs one finite factor > 0 per rank ({len(plan)})")


def tune_budgets(plan, lengths, cost_model, anchor="mean", k0=32, unit="rank", k_max=None,
                 rank_scale=None, block_size=None, pipeline_stages=1, tolerance=0.0):
    """DST's pre-step half: a latency-target budget per sample, so every unit meets the anchor.

    SparseBalance, "workload-aware dynamic sparsity tuning". Pure and deterministic: every rank
    computes the same targets from the same inputs, without communication. The second half runs
    inside every layer: budget = max(target, that layer's coverage floor) (attention.py).
    unit: "rank" (per-rank sum, data-parallel training) or "microbatch" (the paper's unit, for
    pipelines). A unit's load is what runs: each microbatch one packed row
    (CostModel.predict_microbatch). Within a unit one level is searched (bisection; loads grow
    with it), one block of one sample per step (see `budgets_at`). rank_scale: per-rank
    factors (OnlineCorrection).
    """
    lengths = list(lengths)
    S = len(lengths)
    b = cost_model.block_size
    _check_dst_inputs(plan, lengths, b, anchor, unit, k0, tolerance, k_max, block_size, rank_scale)
    check_plan(plan, S)
    blocks = [n_blocks(x, b) for x in lengths]
    doc = {x: cost_model.curve(x) for x in set(lengths)}

    if unit == "rank":
        units = [((r,), [m for m in rank if m], r) for r, rank in enumerate(plan)]
    else:
        units = [((r, j), [m], r) for r, rank in enumerate(plan) for j, m in enumerate(rank) if m]
    units = [u for u in units if u[1]]
    scale = [1.0 if rank_scale is None else float(rank_scale[r]) for _, _, r in units]

    # A unit's level t counts (sample, block) steps: with n samples, the shortest t % n samples
    # run at t // n + 1 blocks and the rest at t // n (each clipped to its blocks). One block for
    # one sample at a time, so DST can meet its target closely instead of moving every sample of
    # the unit by a whole block; below k0 the longest (whose blocks cost most) give first, above
    # it the shortest (whose blocks cost least) take first.
    order = [sorted((i for m in micros for i in m), key=lambda i: (lengths[i], i))
             for _, micros, _ in units]

    def budgets_at(j, t):
        n = len(order[j])
        return {i: min(blocks[i], t // n + (p < t % n)) for p, i in enumerate(order[j])}

    def load(j, t):  # unit j's seconds at level t
        ks = budgets_at(j, t)
        return scale[j] * sum(cost_model.fixed + sum(doc[lengths[i]](ks[i]) for i in m)
                              for m in units[j][1])

    base = [k0 * len(o) for o in order]                      # level t of "every sample at k0"
    # (1) predict every unit's load at the default budget k0
    loads_k0 = [load(j, base[j]) for j in range(len(units))]
    # (2) the anchor: mean | min | max of those loads (ANCHORS)
    A = ANCHORS[anchor](loads_k0) if units else 0.0
    limit = A * (1 + 1e-12)  # the anchor unit itself must count as "at the anchor" despite rounding
    level, shortfalls = list(base), []
    # (3) stragglers shrink: the largest level below k0's whose load meets the anchor (quality is
    #     kept by each layer's coverage floor at run time, which may raise a budget back: counted)
    late = [j for j in range(len(units)) if loads_k0[j] > limit * (1 + tolerance)]
    for j in late:
        lo = len(order[j])                                    # every sample at one block
        if load(j, lo) > limit:
            level[j] = lo
            shortfalls.append((units[j][0], load(j, lo) - limit))
        else:
            level[j] = _largest_within(lambda t: load(j, t), limit, lo, base[j])
    #     ... but no further than the step needs: budgets move in whole blocks, so the slowest
    #     unit after the cut (not the anchor itself) sets the step; a straggler that overshot
    #     below it takes back what still fits under it.
    step = max(load(j, level[j]) for j in range(len(units))) * (1 + 1e-12) if units else 0.0
    for j in late:
        level[j] = base[j] if load(j, base[j]) <= step else _largest_within(
            lambda t: load(j, t), step, level[j], base[j])
    # (4) the other units grow ("free accuracy": they would idle anyway) up to that step time, and
    #     never past the slowest rank's time (its sum, or its 1F1B time in a pipeline): growth
    #     cannot lengthen the step. (The paper grows up to the anchor; with whole blocks the step
    #     ends above it, and the room in between is free too.)
    def rank_time(r):
        lat = []
        for j, (_, micros, rr) in enumerate(units):
            if rr == r:
                ks = budgets_at(j, level[j])
                lat += [scale[j] * (cost_model.fixed + sum(doc[lengths[i]](ks[i]) for i in m))
                        for m in micros]
        return sum(lat) if pipeline_stages == 1 else one_f_one_b(lat, pipeline_stages, 1 / 3)
    cap = max(rank_time(r) for r in range(len(plan))) * (1 + 1e-12)

    def fits(j, r, t):
        level[j] = t
        return load(j, t) <= step and rank_time(r) <= cap
    for j, (o, (_, _, r)) in enumerate(zip(order, units)):
        hi = max(blocks[i] for i in o)
        hi = len(o) * (hi if k_max is None else min(hi, k_max))
        if j in late or hi <= base[j]:
            continue
        t = hi if fits(j, r, hi) else _largest_within(lambda t: 0.0 if fits(j, r, t) else 1.0,
                                                      0.5, base[j], hi)
        level[j] = t
    budgets = [0] * S
    for j in range(len(units)):
        for i, k in budgets_at(j, level[j]).items():
            budgets[i] = k
    return DSTResult(budgets=budgets, anchor=A, units=[u for u, _, _ in units], loads_k0=loads_k0,
                     loads=[load(j, level[j]) for j in range(len(units))], shortfalls=shortfalls)


def one_f_one_b(lat, pp, fwd_frac):
    """Finish time of one pipeline running microbatch latencies `lat` with 1F1B.

    Stage s holds 1/pp of the layers: forward lat*fwd_frac/pp, backward lat*(1-fwd_frac)/pp.
    Stage s runs min(pp-1-s, M) warm-up forwards, then alternates one forward and one
    backward, then drains the remaining backwards. F(s, i) waits for F(s-1, i); B(s, i) waits
    for B(s+1, i) (the last stage: for its own F(s, i), earlier in its order).
    """
    M = len(lat)
    f = [x * fwd_frac / pp for x in lat]
    bw = [x * (1 - fwd_frac) / pp for x in lat]
    orders = []
    for s in range(pp):
        w = min(pp - 1 - s, M)
        order = [("F", i) for i in range(w)]
        for i in range(M - w):
            order += [("F", w + i), ("B", i)]
        orders.append(order + [("B", i) for i in range(M - w, M)])
    end = {}
    free, pos = [0.0] * pp, [0] * pp
    remaining = 2 * M * pp
    while remaining:
        progressed = False
        for s in range(pp):
            while pos[s] < len(orders[s]):
                kind, i = orders[s][pos[s]]
                if kind == "F":
                    dep = 0.0 if s == 0 else end.get(("F", s - 1, i))
                else:
                    dep = end.get(("F", s, i)) if s == pp - 1 else end.get(("B", s + 1, i))
                if dep is None:
                    break
                free[s] = max(free[s], dep) + (f[i] if kind == "F" else bw[i])
                end[(kind, s, i)] = free[s]
                pos[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise RuntimeError("1F1B schedule deadlocked (a bug in the schedule order)")
    return max(free)


def _largest_within(cost, limit, lo, hi):
    """Bisection: cost(lo) <= limit < cost(hi) -> the largest k in [lo, hi) with cost(k) <= limit
    (exact when cost is non-decreasing; always a k with cost(k) <= limit)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cost(mid) <= limit:
            lo = mid
        else:
            hi = mid
    return lo


# ----------------------------------------------------------------------------- the per-step loop
# --balance: (policy for batching.plan_batches, tune budgets with DST?)
BALANCE = {"none": ("naive", False), "dst": ("naive", True), "lbb": ("lbb", False),
           "lbb+dst": ("lbb", True), "sab": ("sab", False), "sab+dst": ("sab", True)}


@dataclasses.dataclass
class StepPlan:
    lengths: list      # tokens per sample
    plan: list         # plan[rank][micro] = sample indices (batching.plan_batches)
    targets: list      # DST's latency-target budget per sample (k0, clipped, without DST)
    predicted: list    # per rank: predicted seconds of the whole model at the targets, corrected
    report: dict       # anchor, imbalance at k0 and at the targets, planning time


class Balancer:
    """SparseBalance's per-step loop in one place. Before the step, `plan(lengths)`: SAB packs the
    global batch across ranks and microbatches using each length's expected budget (an EMA of
    the budgets recently used), then DST's first half gives every sample a latency target (see
    `tune_budgets`). Pure: every rank computes the same plan without communication. The model
    then runs each sample at max(target, each layer's coverage floor at `p`) (DST's second
    half, inside the layers). After the step, `observe(step, used, measured)` takes the budgets
    every layer used and the ranks' measured compute seconds (gathered by train.py's one
    existing collective): they update SAB's EMA and the online correction, and come back as logs.
    """

    def __init__(self, cost_model, world_size, balance="sab+dst", k0=8, p=0.1, anchor="mean",
                 n_layer=1, num_microbatches=None, capacity=None, correction=True, decay=0.9,
                 tolerance=0.02):
        if balance not in BALANCE:
            raise ValueError(f"balance must be one of {', '.join(BALANCE)}, got {balance!r}")
        self.cost, self.world, self.balance = cost_model, world_size, balance
        self.policy, self.dst = BALANCE[balance]
        self.k0, self.p, self.anchor, self.n_layer = k0, p, anchor, n_layer
        self.micro, self.capacity, self.correction = num_microbatches, capacity, correction
        self.tolerance = tolerance
        self.sab = SABState(k0, cost_model.block_size, decay)
        self.corr = OnlineCorrection(world_size, decay)
        self.seen = 0  # steps observed by this process

    def layer_args(self):
        """What the model's layers need for DST's second half: dict(k0=, p=) or {}."""
        return dict(k0=self.k0, p=self.p) if self.dst else {}

    def _rank_seconds(self, plan, lengths, budgets_per_layer):
        """Predicted seconds per rank: every layer's packed microbatches at its budgets."""
        per_layer = [self.cost.predict_plan(plan, lengths, ks) for ks in budgets_per_layer]
        return [sum(sum(layer[r]) for layer in per_layer) for r in range(len(plan))]

    def plan(self, lengths):
        t0 = time.process_time()
        lengths = [int(x) for x in lengths]
        b = self.cost.block_size
        plan = plan_batches(lengths, self.world, self.micro, self.policy,
                            cost=self.sab.cost_fn(self.cost), capacity=self.capacity, block_size=b)
        at_k0 = [min(self.k0, n_blocks(x, b)) for x in lengths]
        scale = self.corr.factors if self.correction else None
        res = tune_budgets(plan, lengths, self.cost, self.anchor, self.k0, "rank",
                           rank_scale=scale, tolerance=self.tolerance) if self.dst else None
        targets = res.budgets if res else at_k0
        pred = self.corr.corrected([self.n_layer * x for x in
                                    self._rank_seconds(plan, lengths, [targets])])
        k0_loads = self._rank_seconds(plan, lengths, [at_k0])
        report = dict(plan_ms=1e3 * (time.process_time() - t0),
                      imbalance_k0=max(k0_loads) / max(1e-30, sum(k0_loads) / len(k0_loads)),
                      anchor=res.anchor if res else None,
                      shortfalls=len(res.shortfalls) if res else 0)
        return StepPlan(lengths, plan, [int(k) for k in targets], pred, report)

    def observe(self, step, used, measured):
        """step: this step's StepPlan; used: [n_layer][S] budgets each layer ran each sample at;
        measured: compute seconds per rank. -> dict of logs (predicted vs measured, budgets)."""
        used = [[int(k) for k in row] for row in used]
        if len(used) != self.n_layer or any(len(row) != len(step.lengths) for row in used):
            raise ValueError(f"used budgets must be [n_layer={self.n_layer}][S={len(step.lengths)}]")
        predicted = self._rank_seconds(step.plan, step.lengths, used)   # what really ran
        before = self.corr.corrected(predicted)                           # before this step's update
        err = sorted(abs(p - m) / m for p, m in zip(before, measured) if m > 0)
        mean_used = [sum(col) / len(col) for col in zip(*used)]          # per sample, over layers
        self.sab.update(step.lengths, mean_used)
        # The correction always learns (its scale makes `pred_err` meaningful); DST reads its
        # factors only with correction on, so "off" keeps the budgets independent of timings.
        if self.seen:  # the first step of a process is a warm-up (allocator, first touch of
            self.corr.update(list(measured), predicted)   # every page): not learnt
        self.seen += 1
        return dict(mean_budget=sum(mean_used) / max(1, len(mean_used)),
                    mean_budget_layer=[sum(row) / max(1, len(row)) for row in used],
                    mean_target=sum(step.targets) / max(1, len(step.targets)),
                    floor_above_target=sum(any(row[i] > t for row in used)
                                           for i, t in enumerate(step.targets)),
                    predicted=before, pred_err=err[len(err) // 2] if err else None)

    def state_dict(self):
        return dict(sab=self.sab.state_dict(), correction=self.corr.state_dict())

    def load_state_dict(self, d):
        self.sab = SABState.from_state_dict(d["sab"])
        self.corr.load_state_dict(d["correction"])


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="SparseBalance's latency cost model: --profile measures a cost table on this "
                    "device (tqdm bar), --check measures it at points it never saw. The paper's "
                    "ablation (a DP x PP simulator) is experiments/simulate.py.")
    ap.add_argument("--profile", metavar="PATH", help="profile a cost table here, save as JSON")
    ap.add_argument("--check", metavar="PATH",
                    help="measure off-grid points of the cost table PATH on this device and "
                         "print measured vs predicted")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192],
                    help="--profile grid: sequence lengths (tokens)")
    ap.add_argument("--budgets", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32],
                    help="--profile grid: budgets (blocks)")
    ap.add_argument("--block-size", type=int, default=256, help="--profile: attention block size")
    ap.add_argument("--n-embd", type=int, default=256, help="--profile: layer width")
    ap.add_argument("--n-head", type=int, default=4, help="--profile: attention heads")
    ap.add_argument("--mlp-ratio", type=int, default=4, help="--profile: MLP width / n_embd")
    ap.add_argument("--impl", default="auto", help="--profile: attention implementation")
    ap.add_argument("--threads", type=int, default=0,
                    help="--profile: torch threads (0 = torch's default; train.py uses 1 per rank)")
    args = ap.parse_args(argv)
    if not (args.profile or args.check):
        ap.print_help()
        return
    if args.profile:
        import torch
        if args.threads:
            torch.set_num_threads(args.threads)
        if not torch.cuda.is_available():
            reuse_cpu_memory()  # as train.py runs: the table must measure what training pays
        cm = CostModel.profile(args.lengths, args.budgets, n_embd=args.n_embd, n_head=args.n_head,
                               block_size=args.block_size, mlp_ratio=args.mlp_ratio, impl=args.impl)
        cm.save(args.profile)
        print(f"saved cost table ({len(cm.lengths)} lengths x {len(cm.budgets)} budgets, "
              f"{cm.meta['device']}) to {args.profile}")
    if args.check:
        print_check(args.check)


def print_check(path):
    """--check: measured vs predicted at the off-grid points of check_cost_model."""
    cm = CostModel.load(path)
    rows = check_cost_model(cm)
    print(f"| length | budget | measured (ms) | predicted (ms) | error |  "
          f"({path}, {cm.meta.get('device', '?')})")
    print("|---|---|---|---|---|")
    for length, k, meas, pred in rows:
        print(f"| {length} | {k} | {meas * 1e3:.2f} | {pred * 1e3:.2f} | "
              f"{100 * (pred - meas) / meas:+.1f}% |")
    errors = sorted(abs(pred - meas) / meas for _, _, meas, pred in rows)
    print(f"off-grid |error|: median {100 * errors[len(errors) // 2]:.1f}%, "
          f"max {100 * errors[-1]:.1f}% over {len(errors)} points")


if __name__ == "__main__":
    sys.exit(main())
