"""Who trains on what: split a global batch across data-parallel ranks and microbatches.

SparseBalance, "SAB: sparsity-aware batching" (coarse-grained balancing, on the CPU, before the
step). Pure Python: no torch, no torch.distributed, no model tensors. Every rank calls the same
function on the same inputs and gets the same plan, so no communication is needed.

Public API (stable):

    plan = plan_batches(lengths, world_size, num_microbatches, policy, cost=None, capacity=None,
                        block_size=64, pipeline_stages=1)
        -> list[list[list[int]]]: plan[rank][micro] = sample indices (into `lengths`)
    check_plan(plan, num_samples)              -> None, ValueError when an invariant is broken
    imbalance(plan, costs)                     -> {"rank": max/mean, "microbatch": max/mean}
    imbalance_report(before, after, costs)     -> one printable line
    lbb_cost(length)                           -> length ** 2 (the LBB / WLB-LLM cost)
    state = SABState(k0, block_size, decay=0.9)
        state.update(lengths, budgets)         # after DST: fold the budgets into the EMA
        state.budget(length) -> int            # estimated budget (blocks) for a length
        state.cost_fn(cost_model) -> callable  # length -> cost_model.predict(length, budget)
        state.state_dict() / SABState.from_state_dict(d)

Policies:
    "naive"  data order, round-robin: sample i goes to slot i mod (world_size * M), slot s being
             rank s mod world_size, microbatch s // world_size (next slot with room if full).
    "lbb"    length-based batching, cost = length^2 (the attention term; WLB-LLM's baseline).
    "sab"    cost = the predicted latency from the cost model at the sequence's *estimated*
             budget (SABState: an EMA of recent DST budgets per length bucket).

"lbb" and "sab" pack in two levels, both with LPT (longest processing time first): (1) across
ranks, minimising the largest per-rank sum (a DP rank runs its microbatches one after another;
with pipeline_stages > 1 "sab" minimises the predicted 1F1B time instead, see plan_batches),
(2) within each rank into `num_microbatches` microbatches, minimising the largest microbatch (a
pipeline's bubbles grow with its slowest microbatch). Why LPT rather than Karmarkar-Karp: it is
ten lines, deterministic, takes a per-bin constraint (token capacity) naturally by skipping full
bins, and carries known bounds: max load <= mean load + largest item (list scheduling), and
<= (4/3 - 1/(3m)) x optimum (Graham 1969). Karmarkar-Karp's differencing is often a little
tighter on many small items, but its multi-way form is harder to read and to combine with a
capacity limit.

Conventions:
- Every sample appears exactly once; every rank gets exactly `num_microbatches` microbatches.
  A microbatch may be EMPTY (fewer samples than slots, or short documents packed together).
  With DDP's gradient hooks every rank must run the same number of backward passes, so run an
  all-padding, zero-loss step for it; a loop that all-reduces gradients once after all its
  microbatches (as train.py does) may simply skip it.
- `capacity` (tokens) limits one microbatch: its documents, each padded up to a multiple of
  `block_size`, must sum to at most `capacity` (train.py packs them into one row). None means
  no limit. A document longer than `capacity` is an error (crop documents first).
- Ties break by index, so the plan is a deterministic function of the inputs.
"""
import heapq
import math
import numbers

POLICIES = ("naive", "lbb", "sab")


def lbb_cost(length):
    """LBB cost of one sequence: its squared length, the attention term of WLB-LLM's model."""
    return float(length) * float(length)


def n_blocks(length, block_size):
    """Attention blocks a document of `length` tokens occupies (rounded up: documents start on
    block boundaries, so the last block may be partly padding)."""
    return -(-int(length) // block_size)


def padded(length, block_size):
    """Tokens a document occupies in a packed row: rounded up to a multiple of block_size."""
    return n_blocks(length, block_size) * block_size


class _NoFit(Exception):
    """Internal: the packing needs more microbatches (or a larger capacity)."""


def _lpt(items, costs, tokens, n_bins, capacity, stages=1):
    """LPT: heaviest item first, into the currently lightest bin that still has token room.

    items: sample indices; returns bins: a list of lists of indices.
    A heap keyed by (load, bin) gives the lightest bin in O(log n_bins); bins skipped for lack
    of room are pushed back afterwards. Raises _NoFit when no bin can take an item.
    stages > 1 (pipelines): "lightest" means the smallest predicted 1F1B time
    (sum + (stages - 1) * largest item) / stages (the last item of the slowest microbatch drains
    through every stage). Items come heaviest first, so a bin's largest item never changes
    after its first and the heap key load + (stages - 1) * first item stays exact.
    """
    order = sorted(items, key=lambda i: (-costs[i], i))
    bins = [[] for _ in range(n_bins)]
    loads = [0.0] * n_bins
    used = [0] * n_bins
    first = [0.0] * n_bins
    heap = [(0.0, b) for b in range(n_bins)]
    for i in order:
        skipped = []
        while heap:
            load, b = heapq.heappop(heap)
            if capacity is None or used[b] + tokens[i] <= capacity:
                break
            skipped.append((load, b))
        else:
            raise _NoFit
        if not bins[b]:
            first[b] = costs[i]
        bins[b].append(i)
        loads[b] += costs[i]
        used[b] += tokens[i]
        heapq.heappush(heap, (loads[b] + (stages - 1) * first[b], b))
        for entry in skipped:
            heapq.heappush(heap, entry)
    return bins


def _ffd(items, tokens, n_bins, capacity):
    """First-fit decreasing by tokens: the fallback when LPT-by-cost cannot satisfy capacity."""
    bins = [[] for _ in range(n_bins)]
    used = [0] * n_bins
    for i in sorted(items, key=lambda i: (-tokens[i], i)):
        for b in range(n_bins):
            if used[b] + tokens[i] <= capacity:
                bins[b].append(i)
                used[b] += tokens[i]
                break
        else:
            raise _NoFit
    return bins


def _plan_naive(n, world_size, m, tokens, capacity):
    slots = world_size * m
    plan = [[[] for _ in range(m)] for _ in range(world_size)]
    used = [0] * slots
    for i in range(n):
        for step in range(slots):  # next slot in round-robin order that has room
            s = (i + step) % slots
            if capacity is None or used[s] + tokens[i] <= capacity:
                break
        else:
            raise _NoFit
        used[s] += tokens[i]
        plan[s % world_size][s // world_size].append(i)
    return plan


def _plan_two_level(n, world_size, m, costs, tokens, capacity, stages):
    # Level 1: across ranks. A rank can hold at most m * capacity tokens (necessary, not
    # sufficient: level 2 may still fail, and then falls back to first-fit decreasing).
    rank_cap = None if capacity is None else m * capacity
    ranks = _lpt(range(n), costs, tokens, world_size, rank_cap, stages)
    plan = []
    for items in ranks:
        # Level 2: within the rank, into m microbatches.
        try:
            micro = _lpt(items, costs, tokens, m, capacity)
        except _NoFit:
            micro = _ffd(items, tokens, m, capacity)
        plan.append(micro)
    return plan


def plan_batches(lengths, world_size, num_microbatches, policy, cost=None, capacity=None,
                 block_size=64, pipeline_stages=1):
    """Split one global batch into plan[rank][micro] = list of sample indices (SparseBalance, SAB).

    lengths: tokens per sample. policy: "naive" | "lbb" | "sab" (see the module docstring).
    cost: for "sab" (required), a callable length -> predicted seconds, normally
    `SABState.cost_fn(cost_model)` (the cost model at each sequence's estimated budget). Ignored by
    "naive" and "lbb" (whose cost is fixed by definition). capacity: max padded tokens per
    microbatch, or None. num_microbatches: microbatches per rank, or None for the smallest
    number that fits `capacity` (1 without a capacity). pipeline_stages: > 1 makes level 1 of
    "lbb" and "sab" alike balance the predicted 1F1B time of each data-parallel pipeline instead
    of its sum of latencies (an addition to the paper; the same objective for both, so that
    they are compared fairly: only their costs differ).
    """
    lengths = list(lengths)
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if num_microbatches is not None and (not isinstance(num_microbatches, int)
                                         or num_microbatches < 1):
        raise ValueError("num_microbatches must be a positive int or None, "
                         f"got {num_microbatches!r}")
    if block_size < 1 or pipeline_stages < 1:
        raise ValueError(f"block_size and pipeline_stages must be positive, got {block_size}, "
                         f"{pipeline_stages}")
    if policy == "sab" and cost is not None and not callable(cost):
        raise ValueError(f"cost must be a callable length -> seconds, got {type(cost).__name__}")
    for i, length in enumerate(lengths):
        if not isinstance(length, numbers.Integral) or isinstance(length, bool) or length < 1:
            raise ValueError(f"lengths[{i}] = {length!r}: every length must be a positive int "
                             "(drop empty documents before batching)")
    lengths = [int(length) for length in lengths]  # numpy/torch integers -> plain ints
    tokens = [padded(length, block_size) for length in lengths]
    if capacity is not None:
        if capacity < block_size:
            raise ValueError(f"capacity {capacity} is below block_size {block_size}")
        too_long = [i for i, t in enumerate(tokens) if t > capacity]
        if too_long:
            i = too_long[0]
            raise ValueError(
                f"document {i} has {lengths[i]} tokens ({tokens[i]} padded to block_size "
                f"{block_size}) > capacity {capacity}: raise capacity or crop documents to at "
                f"most {capacity // block_size * block_size} tokens before batching")

    if policy == "naive":
        costs = None
    elif policy == "lbb":
        costs = [lbb_cost(length) for length in lengths]
    else:
        if cost is None:  # the cost model lives in balance.py, which builds on this module
            raise ValueError("policy 'sab' needs cost, a callable length -> predicted seconds: "
                             "SABState(k0, block_size).cost_fn(balance.CostModel.analytic(...)) "
                             "or a profiled table (balance.Balancer does this)")
        memo = {}
        costs = []
        for length in lengths:
            if length not in memo:
                memo[length] = float(cost(length))
                if not (math.isfinite(memo[length]) and memo[length] >= 0):
                    raise ValueError(f"cost({length}) = {memo[length]}: costs must be finite "
                                     "and >= 0 (check the cost model)")
            costs.append(memo[length])

    def build(m):
        if policy == "naive":
            return _plan_naive(len(lengths), world_size, m, tokens, capacity)
        return _plan_two_level(len(lengths), world_size, m, costs, tokens, capacity,
                               pipeline_stages)

    if num_microbatches is not None:
        try:
            return build(num_microbatches)
        except _NoFit:
            raise ValueError(
                f"{len(lengths)} documents ({sum(tokens)} padded tokens) do not fit in "
                f"{world_size} ranks x {num_microbatches} microbatches of capacity {capacity}: "
                "raise num_microbatches or capacity, or pass num_microbatches=None to choose "
                "the smallest number that fits") from None
    if capacity is None:
        return build(1)
    m = max(1, math.ceil(sum(tokens) / (world_size * capacity)))
    while True:  # terminates: with m >= len(lengths) every document gets its own microbatch
        try:
            return build(m)
        except _NoFit:
            m += 1


def check_plan(plan, num_samples):
    """Raise ValueError unless every sample 0..num_samples-1 appears exactly once and every rank
    has the same number of microbatches (the invariants DDP and the loss scaling rely on)."""
    if not plan:
        raise ValueError("plan has no ranks")
    m = len(plan[0])
    seen = [0] * num_samples
    for r, rank in enumerate(plan):
        if len(rank) != m:
            raise ValueError(f"rank {r} has {len(rank)} microbatches, rank 0 has {m}")
        for micro in rank:
            for i in micro:
                if not 0 <= i < num_samples:
                    raise ValueError(f"sample index {i} out of range [0, {num_samples})")
                seen[i] += 1
    bad = [i for i, c in enumerate(seen) if c != 1]
    if bad:
        raise ValueError(f"sample {bad[0]} appears {seen[bad[0]]} times (must be exactly once)")


def _max_over_mean(values):
    mean = sum(values) / len(values) if values else 0.0
    return max(values) / mean if mean > 0 else 1.0


def imbalance(plan, costs):
    """Max/mean load of a plan (SparseBalance's imbalance metric) at two levels.

    costs: per-sample cost (a list indexed like `lengths`). "rank": max/mean of the per-rank sums
    over all ranks (an empty rank idles the whole step, so it counts). "microbatch": max/mean
    over the non-empty microbatches (an empty one has no work to wait for).
    """
    rank_loads = [sum(costs[i] for micro in rank for i in micro) for rank in plan]
    micro_loads = [sum(costs[i] for i in micro) for rank in plan for micro in rank if micro]
    return {"rank": _max_over_mean(rank_loads), "microbatch": _max_over_mean(micro_loads)}


def imbalance_report(before, after, costs):
    """One line comparing two plans' imbalance, e.g. for logging naive vs SAB."""
    b, a = imbalance(before, costs), imbalance(after, costs)
    return (f"imbalance max/mean: rank {b['rank']:.3f} -> {a['rank']:.3f}, "
            f"microbatch {b['microbatch']:.3f} -> {a['microbatch']:.3f}")


def order_for_1f1b(micro_costs):
    """A rank's microbatch costs reordered for a 1F1B pipeline: the smallest at both ends, the
    largest in the middle, so the warm-up and the drain, which the other
    stages wait through, run the cheap ones. Returns the reordered list."""
    ranked = sorted(micro_costs)
    front, back = ranked[0::2], ranked[1::2]
    return front + back[::-1]


class SABState:
    """SAB's budget estimate: an EMA of recently used budgets per length bucket (SparseBalance,
    SAB).

    Buckets are powers of two of the length in blocks (1, 2, 3-4, 5-8, ... blocks), so a
    sequence is predicted from the budgets sequences of similar length recently ran at. A
    bucket never seen yet answers k0 (the default budget). The EMA decays once per step (the
    step's budgets in a bucket are averaged first), so a step with many samples of one length
    does not wipe out the memory of earlier steps. The Balancer calls `update` after each step
    and `cost_fn(cost_model)` before planning the next global batch.
    """

    def __init__(self, k0, block_size, decay=0.9):
        for name, v in (("k0", k0), ("block_size", block_size)):
            if not (isinstance(v, numbers.Integral) and v >= 1):
                raise ValueError(f"SABState: {name} must be an int >= 1, got {v!r}")
        if not (isinstance(decay, (int, float)) and 0.0 <= decay < 1.0):
            raise ValueError(f"SABState: decay must be in [0, 1), got {decay!r}")
        self.k0, self.block_size, self.decay = int(k0), int(block_size), float(decay)
        self.ema = {}  # bucket -> EMA of budgets (blocks)

    def bucket(self, length):
        blocks = n_blocks(length, self.block_size)
        return max(0, (blocks - 1).bit_length())  # ceil(log2(blocks))

    def update(self, lengths, budgets):
        """Fold one step's budgets (one per sample) into the EMA: one decay per bucket and step."""
        lengths, budgets = list(lengths), [float(k) for k in budgets]
        if len(budgets) != len(lengths):
            raise ValueError(f"{len(lengths)} lengths but {len(budgets)} budgets")
        if not all(math.isfinite(k) and k >= 1 for k in budgets):
            raise ValueError(f"budgets must be finite and >= 1, got {budgets}")
        step = {}
        for length, k in zip(lengths, budgets):
            step.setdefault(self.bucket(length), []).append(k)
        for b, ks in step.items():
            k, old = sum(ks) / len(ks), self.ema.get(b)
            self.ema[b] = k if old is None else self.decay * old + (1 - self.decay) * k

    def budget(self, length):
        """Estimated budget (blocks, >= 1) for a sequence of this length."""
        return max(1, round(self.ema.get(self.bucket(length), self.k0)))

    def cost_fn(self, cost_model):
        """The SAB cost callable for plan_batches: length -> predicted seconds at the estimated
        budget (any object with predict(seq_len, topk) works)."""
        return lambda length: cost_model.predict(length, self.budget(length))

    def state_dict(self):
        return {"k0": self.k0, "block_size": self.block_size, "decay": self.decay,
                "ema": {str(b): v for b, v in self.ema.items()}}

    @classmethod
    def from_state_dict(cls, d):
        state = cls(d["k0"], d["block_size"], d["decay"])
        state.ema = {int(b): float(v) for b, v in d["ema"].items()}
        return state
