"""Token-level MoBA attention: the gate, routing coverage and the budget floor, a naive twin, a
torch path and Triton kernels (forward + backward), and sparse decoding.

The gate (MoBA, "Mixture of Block Attention"; SparseBalance sec. 2, the sparse attention it
trains). A document is cut into blocks of `block_size` tokens. Every query token t, in block i,
scores each earlier block j of its own document by
    score_j = q_t . mean(K of block j)                       (per head)
and attends to its own block i (always, causally) plus the `budget - 1` best earlier blocks (ties
to the lower j). Every block j < i ends before t, so nothing at t depends on a later position: the
model is causal by construction. `budget >= i + 1` is plain causal attention.

The layout is data you can print: per token, the ascending list of the blocks it attends to
(padded with -1) and a count. Two documents of 48 and 32 tokens in one row, block 16, budget 2
(the token's own block plus its best earlier one):
    >>> torch.manual_seed(0); q, k = torch.randn(2, 1, 1, 80, 16)
    >>> sel = select_blocks(q, k, 2, torch.tensor([0, 48, 80]), block_size=16)
    >>> [(t, sel.block_idx[0, 0, t].tolist()) for t in (0, 20, 32, 33, 48, 79)]
    [(0, [0, -1]), (20, [0, 1]), (32, [1, 2]), (33, [0, 2]), (48, [3, -1]), (79, [3, 4])]
Tokens 32 and 33 share block 2 but route on their own (block 1 vs block 0); token 48 starts the
second document and sees only its own block. The own block is always the last entry.

Coverage and the floor (SparseBalance, DST's quality floor). For each token, the softmax of its
earlier blocks' scores (scale 1/sqrt(D)) gives each block a share of routing mass; C(k) is the
mass of its best k - 1 blocks (its own block is always attended and stays out of the curve; 1 once
every earlier block is in). Averaged over heads and tokens, one curve per sequence. With `p`, a
sequence's budget is raised to its floor, the smallest k with C(k) >= (1 - p) C(k0). This comes
from the scores the gate computes anyway, so every layer gets its own floor at no extra pass. The
floor is one integer per sequence and layer computed from the whole sequence (as in the paper), so
with `p` set the budget, never the selection rule, carries information from later tokens; with
fixed budgets the model is exactly causal.

Kernels: key-block-major ("pair tiles"; tests/fixtures/README.md describes the reference it is
checked against). The selected (token,
block j) pairs are grouped by key block; the tokens that chose block j are gathered into dense
tiles of TILE query rows; each tile attends to its one key block and writes a partial output with
its log-sum-exp; the partials of a token are then merged (o = sum_p exp(lse_p - lse) o_p). Work is
proportional to the selected pairs. The other design, one program per query block looping over the
union of its tokens' blocks with a per-token mask, is simpler, but at random init the 64 tokens of
a block choose nearly every earlier block, so its work is close to dense: `python attention.py
--bench` prints both designs' key-block visits for the same layouts (column "union/pairs").
The backward has no atomics: one program per key block loops over its tiles (dK, dV owned by that
program) and writes each pair's dQ to its own row; the pairs of a token are then summed in index
order, so gradients are bitwise reproducible.

    forward, per tile (queries that chose key block j):       backward, per key block j:
        s = q k_j^T * scale * log2(e)                              for each tile of j:
        s = -inf where key > query (own block only)                   p = exp2(s - lse_token)
        m = rowmax(s); p = exp2(s - m); l = rowsum(p)                 dv += p^T do
        o_pair = p v_j / l;  lse_pair = m + log2(l)                   ds = p * (do v_j^T - delta)
                                                                       dk += ds^T q; dq_pair = ds k_j

On CPU, `attention_torch` runs the same key-block-major pairs without tiles: one `torch.mm` per key
block and product, a softmax over each token's own block and pairs together (see "torch path"
below). `moba_naive` is the obviously correct twin of gate + attention (a loop over documents, a
dense masked softmax in fp32), checked against MoBA's own reference; `attention_reference`
(impl="reference") is a dense mask built from a layout.

    python attention.py --bench        # speed table (CPU: torch path; CUDA: Triton, FlexAttention)
    python attention.py --check        # CUDA: Triton against the twin in bf16/fp16, reruns bitwise
"""
import argparse
import math
import os
import sys
import time
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

IMPLS = ("auto", "triton", "torch", "reference")
LOG2E = 1.4426950408889634                  # exp(x) = exp2(x * log2(e))
TILE = 64                                   # query rows per pair tile, Triton (16 interpreted)
CPU_CHUNK = 512                             # pairs per elementwise step of the torch path


# ------------------------------------------------------------------------------ input checks
def _is_pow2(n):
    return n >= 16 and (n & (n - 1)) == 0


def _check_qkv(q, k, v=None, block_size=64):
    """Validate the public inputs once, at the boundary, with messages that say what to change."""
    if not _is_pow2(block_size):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    for name, x in (("k", k), ("v", v)):
        if x is not None and (x.shape != q.shape or x.dtype != q.dtype or x.device != q.device):
            raise ValueError(f"q and {name} must share shape [B, H, T, D], dtype and device; got "
                             f"{tuple(q.shape)} {q.dtype} vs {tuple(x.shape)} {x.dtype}")
    if q.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, T, D], got shape {tuple(q.shape)}")
    B, H, T, D = q.shape
    if B == 0 or H == 0:
        raise ValueError(f"q, k, v must hold at least one row and head, got shape {tuple(q.shape)}")
    if not _is_pow2(D):
        raise ValueError(f"head dim must be a power of two >= 16, got {D}")
    if T == 0 or T % block_size:
        raise ValueError(f"T={T} must be a positive multiple of block_size={block_size}: pad the "
                         "sequence (the batcher pads each document to a block multiple)")
    return B, H, T, D


def _documents(cu_seqlens, B, T, block_size, device):
    """Per block of each row: its sequence id and the row-local first block of its document.

    Returns seq [B, NQ] long, first [B, NQ] long, and S (the number of sequences)."""
    NQ = T // block_size
    if cu_seqlens is None:
        seq = torch.arange(B, device=device)[:, None].expand(B, NQ)
        return seq, torch.zeros(B, NQ, dtype=torch.long, device=device), B
    cu = torch.as_tensor(cu_seqlens).flatten().tolist()
    bad = None
    if len(cu) < 2 or cu[0] != 0 or cu[-1] != B * T:
        bad = f"must start at 0 and end at B*T={B * T}"
    elif any(b <= a for a, b in zip(cu, cu[1:])):
        bad = "must be strictly increasing"
    elif any(c % block_size for c in cu):
        bad = f"entries must be multiples of block_size={block_size} (pad each document)"
    elif any(r * T not in set(cu) for r in range(B)):
        bad = f"must contain every row boundary (multiples of T={T}): no sequence may cross a row"
    if bad:
        raise ValueError(f"cu_seqlens {bad}; got {cu[:8]}{'...' if len(cu) > 8 else ''}")
    starts = torch.tensor(cu, device=device) // block_size                 # in global blocks
    g = torch.arange(B, device=device)[:, None] * NQ + torch.arange(NQ, device=device)
    seq = torch.searchsorted(starts[1:], g, right=True)                     # [B, NQ]
    first = starts[seq] - torch.arange(B, device=device)[:, None] * NQ      # row-local
    return seq, first, len(cu) - 1


def budget_per_sequence(topk, S, device, name="topk"):
    """The budget of every sequence as a LongTensor [S]; raises on budgets < 1 or a wrong length."""
    if isinstance(topk, torch.Tensor):
        if topk.dtype.is_floating_point or topk.dtype == torch.bool or topk.numel() != S:
            raise ValueError(f"{name} must be an int or an integer tensor with one budget per "
                             f"sequence ({S}); got {topk.dtype} with {topk.numel()} entries")
        budget = topk.reshape(S).to(device=device, dtype=torch.long)
    elif isinstance(topk, int) and not isinstance(topk, bool):
        budget = torch.full((S,), topk, dtype=torch.long, device=device)
    else:
        raise ValueError(f"{name} must be an int or a LongTensor [S], got {type(topk).__name__}")
    if S and int(budget.min()) < 1:
        raise ValueError(f"every budget must be >= 1 (it counts the token's own block), "
                         f"got {name}={int(budget.min())}")
    return budget


# ------------------------------------------------------------------------------ naive twin
def moba_naive(q, k, v, topk, cu_seqlens=None, block_size=64):
    """The obviously correct twin of gate + attention, one document at a time, in fp32 (fp64 if
    given): score every earlier block by q_t . mean(K_j), keep the best budget - 1 (a stable sort:
    ties to the lower block) and the token's own block, then a dense masked softmax. Slow; every
    other implementation is tested against it, and it against MoBA's own reference."""
    B, H, T, D = q.shape
    f = torch.promote_types(q.dtype, torch.float32)
    cu = [r * T for r in range(B + 1)] if cu_seqlens is None else torch.as_tensor(cu_seqlens).tolist()
    budgets = budget_per_sequence(topk, len(cu) - 1, "cpu").tolist()
    out = torch.zeros(B, H, T, D, dtype=f, device=q.device)
    for (a, e), budget in zip(zip(cu, cu[1:]), budgets):
        b, a, e = a // T, a % T, (e - 1) % T + 1                           # row, row-local span
        qd, kd, vd = (x[b, :, a:e].to(f) for x in (q, k, v))              # [H, n, D]
        n = e - a
        blk = torch.arange(n, device=q.device) // block_size              # block of each token
        j = torch.arange(n // block_size, device=q.device)                # block of each key block
        means = kd.unflatten(1, (n // block_size, block_size)).mean(2)    # [H, nb, D]
        score = (qd @ means.transpose(-1, -2)).masked_fill(j >= blk[:, None], float("-inf"))
        best = score.sort(dim=-1, descending=True, stable=True).indices[..., :budget - 1]
        keep = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, best, True)
        keep &= score > float("-inf")                                     # only earlier blocks
        keep |= j == blk[:, None]                                         # and its own block
        mask = keep.repeat_interleave(block_size, -1) & torch.ones(n, n, dtype=torch.bool,
                                                                   device=q.device).tril()
        s = (qd @ kd.transpose(-1, -2) / math.sqrt(D)).masked_fill(~mask, float("-inf"))
        out[b, :, a:e] = torch.softmax(s, -1) @ vd
    return out.to(q.dtype)


def attention_reference(q, k, v, block_idx, block_cnt, block_size):
    """The layout as a dense token mask (causal in each token's own block), softmax in fp32 (fp64
    if given): `impl="reference"`, the plain-torch twin of the kernels for a given layout."""
    B, H, T, D = q.shape
    KMAX = block_idx.shape[-1]
    mask = torch.zeros(B, H, T, T // block_size + 1, dtype=torch.bool, device=q.device)
    keep = torch.arange(KMAX, device=q.device) < block_cnt[..., None]      # [B, H, T, KMAX]
    blocks = torch.where(keep, block_idx.long(), T // block_size)         # padding -> spare column
    mask.scatter_(-1, blocks, True)
    mask = mask[..., :-1].repeat_interleave(block_size, -1)               # [B, H, T, T] keys
    mask &= torch.ones(T, T, dtype=torch.bool, device=q.device).tril()    # causal in own block
    f = torch.promote_types(q.dtype, torch.float32)
    s = (q.to(f) @ k.to(f).transpose(-1, -2)) / math.sqrt(D)
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    return (p @ v.to(f)).to(q.dtype)


# ------------------------------------------------------------------------------ the gate
class Selection(NamedTuple):
    block_idx: torch.Tensor   # int32 [B, H, T, KMAX]: blocks each token attends to, ascending, -1 pad
    block_cnt: torch.Tensor   # int32 [B, H, T]: how many (own block included)
    budget: torch.Tensor      # long [S]: the budget each sequence used (requested, or its floor)
    coverage: torch.Tensor    # float [S, NQ]: C(k) at index k - 1 (None unless asked or p is set)
    floor: torch.Tensor       # long [S]: smallest k with C(k) >= (1 - p) C(k0) (None without p)


def _past_scores(q, kmean, blk, first):
    """Gate scores of query tokens against block means, -inf outside each token's earlier blocks
    of its document. q [..., n, D], kmean [..., NQ, D], blk [n] / first [..., n] -> [..., n, NQ]."""
    j = torch.arange(kmean.shape[-2], device=q.device)
    past = (j < blk[:, None]) & (j >= first[..., None])
    return (q.float() @ kmean.transpose(-1, -2)).masked_fill_(~past, float("-inf"))


def select_blocks(q, k, topk, cu_seqlens=None, block_size=64, k0=None, p=None, coverage=False,
                  coverage_stride=1, chunk_elems=1 << 24):
    """The MoBA gate, per query token and head (module docstring), plus DST's per-layer floor.

    q, k [B, H, T, D]; topk: int or LongTensor [S] (one budget per sequence, own block included);
    cu_seqlens: packed documents (int32 offsets into B*T, multiples of block_size). With `p` (and
    `k0`, the budget the floor is measured at) each budget becomes max(requested, floor).
    `coverage=True` returns the full curves (else they run up to max(budget, k0), when p is set).
    coverage_stride: average C(k) over every n-th query token only (the floor is a per-sequence
    mean: 8 keeps it within a percent or two of the exact one at an eighth of the cost).
    Scores are computed without gradient, `chunk_elems` at a time. Returns a `Selection`."""
    B, H, T, D = _check_qkv(q, k, None, block_size)
    NQ = T // block_size
    seq, first, S = _documents(cu_seqlens, B, T, block_size, q.device)
    budget = budget_per_sequence(topk, S, q.device)
    if p is not None:
        if not (isinstance(p, (int, float)) and 0 <= p < 1):
            raise ValueError(f"p must be a number in [0, 1) (the coverage DST may give up), got {p!r}")
        if not (isinstance(k0, int) and not isinstance(k0, bool) and k0 >= 1):
            raise ValueError(f"with p, k0 must be an int >= 1 (the budget coverage is measured "
                             f"at), got {k0!r}")
    st = coverage_stride
    if not (isinstance(st, int) and 1 <= st <= block_size and st & (st - 1) == 0):
        raise ValueError(f"coverage_stride must be a power of two in [1, block_size={block_size}], "
                         f"got {st!r}")
    want_cov = coverage or p is not None
    width = min(max(int(budget.max()), k0 or 1, NQ if coverage else 1), NQ)   # C(1..width)
    r = min(width, NQ - 1) if NQ > 1 else 0        # earlier blocks ranked per token (+1: ties)
    blk = torch.arange(T, device=q.device) // block_size           # [T] block of each token
    first_t = first[:, blk][:, None]                               # [B, 1, T] doc's first block
    n_past = blk - first[:, blk]                                   # [B, T] earlier blocks in doc
    tok_seq = seq[:, blk]                                          # [B, T]
    kmean = k.detach().float().unflatten(2, (NQ, block_size)).mean(3)    # [B, H, NQ, D]
    top = torch.empty(B, H, T, r, dtype=torch.long, device=q.device)
    val = torch.empty(B, H, T, r, device=q.device)
    cov = torch.zeros(S, width, device=q.device)
    # chunks of query tokens, each scored against the blocks before its last token only (an
    # eighth of T at a time: half the scores of the whole square); chunks start on a stride
    step = min(chunk_elems // (B * H * NQ), max(block_size, T // 8 // block_size * block_size))
    step = max(st, step // st * st)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        ncol = max(1, int(blk[t1 - 1]))                                   # blocks j < last block
        s = _past_scores(q[:, :, t0:t1].detach(), kmean[:, :, :ncol], blk[t0:t1], first_t[..., t0:t1])
        rc = min(r, ncol)
        val[:, :, t0:t1, :rc], top[:, :, t0:t1, :rc] = s.topk(rc, dim=-1)  # [B, H, c, r] descending
        val[:, :, t0:t1, rc:], top[:, :, t0:t1, rc:] = float("-inf"), 0
        if want_cov:   # C(k): softmax mass (scale 1/sqrt(D)) of the best k - 1 earlier blocks
            rows = slice(t0 + st - 1, t1, st)                             # every st-th token
            lse = torch.logsumexp(s[:, :, st - 1::st] / math.sqrt(D), -1, keepdim=True)
            mass = torch.exp(val[:, :, rows, :width - 1] / math.sqrt(D) - lse).cumsum(-1)
            curve = F.pad(mass, (1, 0)).nan_to_num(0.0).clamp(max=1.0)   # [B, H, c, width]
            kk = torch.arange(width, device=q.device)                     # k - 1
            curve = torch.where(kk >= n_past[:, None, rows, None], 1.0, curve)  # all earlier in
            cov.index_add_(0, tok_seq[:, rows].flatten(), curve.mean(1).flatten(0, 1))
    floor = None
    if want_cov:
        counts = torch.bincount(tok_seq[:, st - 1::st].flatten(), minlength=S)
        cov /= counts.clamp(min=1)[:, None].float()
    if p is not None:   # DST, in this layer: raise each budget to its coverage floor
        blocks = torch.bincount(seq.flatten(), minlength=S)             # each sequence's blocks
        floor = torch.minimum(coverage_floor(cov, k0, p), blocks)
        budget = torch.maximum(budget, floor)
    cnt = torch.minimum(budget[tok_seq] - 1, n_past)[:, None].expand(B, H, T)   # earlier blocks
    # torch.topk does not say which of two equal scores it keeps: where a tie straddles a token's
    # cut, rank that token again with a stable sort, so ties always go to the lower block.
    if r:
        c = cnt.clamp(max=r - 1)
        tie = (cnt >= 1) & (cnt < r) & (val.gather(-1, (c - 1).clamp(min=0)[..., None])
                                        == val.gather(-1, c[..., None]))[..., 0]
        if tie.any():
            b, h, t = tie.nonzero(as_tuple=True)
            s = _past_scores(q[b, h, t].detach()[:, None], kmean[b, h], blk[t, None], first_t[b, 0, t, None])
            top[b, h, t] = s[:, 0].sort(dim=-1, descending=True, stable=True).indices[:, :r]
    kmax = min(int(cnt.max()) + 1, NQ)
    slot = torch.arange(kmax - 1, device=q.device)
    chosen = torch.where(slot < cnt[..., None], top[..., :kmax - 1], NQ)
    own = blk.expand(B, H, T)[..., None]
    idx = torch.cat([chosen, own], -1).sort(dim=-1).values                # padding (NQ) last
    idx = idx.masked_fill(idx == NQ, -1)
    return Selection(idx.to(torch.int32).contiguous(), (cnt + 1).to(torch.int32).contiguous(),
                     budget, cov if want_cov else None, floor)


def coverage_floor(cov, k0, p):
    """DST's quality floor (SparseBalance): per curve, the smallest k with C(k) >= (1 - p) C(k0).
    cov [S, K] non-decreasing curves, C(k) at index k - 1 (k0 past the end: the last entry)."""
    target = (1 - p) * cov[:, min(k0, cov.shape[1]) - 1, None]           # [S, 1]
    return (cov < target - 1e-6).sum(1) + 1


def visited_blocks(n_blocks, topk):
    """(query token's block, key block) pairs of a causal document of n_blocks blocks at budget
    topk, counted per query block: block i sees i + 1 blocks and visits min(topk, i + 1). The sum
    is k(k+1)/2 + (n-k)k for k < n, n(n+1)/2 (dense causal) for k >= n or None. The work of
    every kernel here, and so of the cost model (balance.py), is proportional to it."""
    k = n_blocks if topk is None else min(int(topk), n_blocks)
    return k * (k + 1) // 2 + (n_blocks - k) * k


def routing_coverage(q, k, cu_seqlens=None, block_size=64):
    """Routing coverage curves [S, NQ] (C(k) at index k - 1), from the same scores as the gate."""
    return select_blocks(q, k, 1, cu_seqlens, block_size, coverage=True).coverage


# ------------------------------------------------------------------------------ pair tiles
class _Tiles(NamedTuple):
    rows: torch.Tensor     # long [NT * tile]: flat token row (z*T + t) of each tile row, -1 pad
    tkey: torch.Tensor     # long [NT]: the key block of each tile, flat (z*NQ + j)
    tstart: torch.Tensor   # long [Z*NQ + 1]: tiles of key block g are tstart[g]:tstart[g+1]


def _pair_tiles(block_idx, block_cnt, NQ, tile, own_block):
    """The layout, key-block-major: the (token, block) pairs sorted by key block (then token), and
    the tokens of each key block cut into tiles of `tile` rows. own_block=False leaves every
    token's own block out (the torch path attends to it without a gather)."""
    Z, T, KMAX = block_idx.shape
    used = block_cnt.long() - (0 if own_block else 1)                       # [Z, T]
    z, t, s = (torch.arange(KMAX, device=used.device) < used[..., None]).nonzero(as_tuple=True)
    key = z * NQ + block_idx[z, t, s].long()
    order = torch.argsort(key, stable=True)                                 # token order kept
    key = key[order]
    counts = torch.bincount(key, minlength=Z * NQ)
    tiles_per = (counts + tile - 1) // tile
    tstart = F.pad(tiles_per.cumsum(0), (1, 0))
    first = F.pad(counts.cumsum(0), (1, 0))
    prow = tstart[key] * tile + torch.arange(len(key), device=key.device) - first[key]
    rows = torch.full((int(tstart[-1]) * tile,), -1, dtype=torch.long, device=key.device)
    rows[prow] = (z * T + t)[order]
    tkey = torch.repeat_interleave(torch.arange(Z * NQ, device=key.device), tiles_per)
    return _Tiles(rows, tkey, tstart)


def _merge(o_pairs, lse_pairs, rows, n_tok, o_own=None, lse_own=None):
    """Per token: lse = log sum_p exp(lse_p), o = sum_p exp(lse_p - lse) o_p over its pairs (rows:
    the token of each pair, -1 = none), and its own block's (o_own, lse_own) where given.
    The sums run in index order (`_sum_rows`), so the merge is reproducible."""
    m = torch.full((n_tok,), float("-inf"), device=o_pairs.device) if lse_own is None else lse_own
    m = m.scatter_reduce(0, rows.clamp(min=0), torch.where(rows >= 0, lse_pairs, float("-inf")),
                         "amax")                                           # stabiliser, [n_tok]
    w = torch.exp(lse_pairs - m[rows.clamp(min=0)]).masked_fill(rows < 0, 0.0)[:, None]
    l = _sum_rows(w, rows, n_tok)[:, 0]
    o = _sum_rows(w * o_pairs, rows, n_tok)
    if o_own is not None:
        w_own = torch.exp(lse_own - m)[:, None]
        l, o = l + w_own[:, 0], o + w_own * o_own
    return o / l[:, None], m + torch.log(l)


def _sum_rows(parts, index, n):
    """out[i] = sum of parts[r] over the rows r with index[r] == i (index -1: dropped), added in
    index order, so reproducibly: on CPU index_add_ adds the rows one after another; on CUDA it
    would use atomics, and F.embedding's backward (a sort, then sums per index) is used instead."""
    index = torch.where(index < 0, n, index)
    if parts.is_cuda:
        return torch.ops.aten.embedding_dense_backward(parts, index, n + 1, -1, False)[:n]
    return parts.new_zeros(n + 1, parts.shape[1]).index_add_(0, index, parts)[:n]


# ------------------------------------------------------------------------------ torch path
# The CPU path keeps the pairs key-block-major *without* tile padding: the pairs of key block g
# are one contiguous slice of rows, so each of the six products of a forward + backward is one
# `torch.mm` per key block ([pairs of g, D] x [D, block]): no gathered copies of K or V, no padded
# rows. The softmax runs over each token's own block and all its pairs at once, stabilised by the
# token's max; 1 / sum multiplies the merged output (and, in the backward, dO), so there is no
# per-pair log-sum-exp and no merge weight. The work walks the pairs in chunks of >= CPU_CHUNK
# rows: a chunk's queries are gathered into a small scratch buffer and its elementwise steps run
# while it is in cache. At T = 8192, budget 9, one thread, forward + backward took 336 CPU ms,
# against 466 for the previous path (PyTorch's CPU flash kernel on gathered 128-row tiles).
class _PairRows(NamedTuple):
    rows: torch.Tensor     # long [P]: token row (z*T + t) of each pair, key-block-major
    segs: list             # (g, a, b): the pairs of key block g (flat z*NQ + j) are rows a:b
    tok: torch.Tensor      # sparse CSR [Z*T, P] of ones: (tok @ x)[n] = sum of x over n's pairs


def _pair_rows(block_idx, block_cnt, NQ, dtype):
    """The torch path's layout: every (token, earlier block) pair, sorted by key block, then token.
    Own blocks are left out (they are attended block by block, in place)."""
    Z, T, KMAX = block_idx.shape
    used = block_cnt.long() - 1                                           # earlier blocks [Z, T]
    z, t, s = (torch.arange(KMAX, device=used.device) < used[..., None]).nonzero(as_tuple=True)
    key = z * NQ + block_idx[z, t, s].long()                              # token-major pairs
    order = torch.argsort(key, stable=True)
    bounds = F.pad(torch.bincount(key, minlength=Z * NQ).cumsum(0), (1, 0)).tolist()
    segs = [(g, a, b) for g, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])) if b > a]
    col = torch.empty_like(order)
    col[order] = torch.arange(len(order), device=order.device)            # pair -> its row
    crow = F.pad(used.flatten().cumsum(0), (1, 0)).int()                  # int32: what MKL takes
    with warnings.catch_warnings():                                       # "CSR is in beta"
        warnings.simplefilter("ignore", UserWarning)
        tok = torch.sparse_csr_tensor(crow, col.int(), torch.ones(len(col), dtype=dtype),
                                      (Z * T, len(col)), check_invariants=False)
    return _PairRows((z * T + t)[order], segs, tok)


def _chunks(segs, rows=CPU_CHUNK):
    """Consecutive key blocks' pair slices grouped into chunks of at least `rows` pairs, as
    (a, b, [(g, a_g, b_g), ...]): elementwise work runs a chunk at a time (while it is in cache,
    and few calls when blocks hold few pairs), the products a key block at a time."""
    out, cur = [], []
    for seg in segs:
        cur.append(seg)
        if seg[2] - cur[0][1] >= rows:
            out.append((cur[0][1], seg[2], cur))
            cur = []
    return out + ([(cur[0][1], cur[-1][2], cur)] if cur else [])


class _TorchPairs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_idx, block_cnt, block_size):
        B, H, T, D = q.shape
        Z, NQ, bs, N = B * H, T // block_size, block_size, B * H * T
        ctx.dtype = q.dtype
        work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        q, k, v = (x.to(work) for x in (q, k, v))
        qs = (q * D ** -0.5).reshape(N, D)                                  # softmax scale on q
        qb, kb, vb = qs.view(Z * NQ, bs, D), k.reshape(Z * NQ, bs, D), v.reshape(Z * NQ, bs, D)
        kbT = kb.transpose(1, 2).contiguous()
        lay = _pair_rows(block_idx.reshape(Z, T, -1), block_cnt.reshape(Z, T), NQ, work)
        rows, chunks, P = lay.rows, _chunks(lay.segs), len(lay.rows)
        s, s_max = qs.new_empty(P, bs), qs.new_empty(P)                     # scores, row max
        n = max((b - a for a, b, _ in chunks), default=0)                   # scratch rows
        q_c = qs.new_empty(n, D)
        for a, b, segs in chunks:
            torch.index_select(qs, 0, rows[a:b], out=q_c[:b - a])           # the pairs' queries
            for g, a_g, b_g in segs:
                torch.mm(q_c[a_g - a:b_g - a], kbT[g], out=s[a_g:b_g])
            torch.amax(s[a:b], -1, out=s_max[a:b])
        s_own = torch.bmm(qb, kbT).masked_fill_(
            torch.ones(bs, bs, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        # softmax over the token's own block and all its pairs, stabilised by the token's max
        m = s_own.amax(-1).view(N).scatter_reduce(0, rows, s_max, "amax")
        p_own = s_own.sub_(m.view(Z * NQ, bs, 1)).exp_()
        m_r, l_r, o_r = m[rows, None], qs.new_empty(P, 1), qs.new_empty(P, D)
        for a, b, segs in chunks:                    # p = exp(s - m), unnormalised; p v
            torch.sum(s[a:b].sub_(m_r[a:b]).exp_(), -1, keepdim=True, out=l_r[a:b])
            for g, a_g, b_g in segs:
                torch.mm(s[a_g:b_g], vb[g], out=o_r[a_g:b_g])
        p = s
        inv = 1 / torch.addmm(p_own.sum(-1).view(N, 1), lay.tok, l_r)[:, 0]
        o = torch.addmm(torch.bmm(p_own, vb).view(N, D), lay.tok, o_r).mul_(inv[:, None])
        ctx.save_for_backward(qs, kb, vb, p_own, p, inv, o, rows, lay.tok)
        ctx.chunks, ctx.scratch, ctx.shape = chunks, n, (B, H, T, D)
        return o.view(B, H, T, D).to(ctx.dtype)

    @staticmethod
    def backward(ctx, do):
        qs, kb, vb, p_own, p, inv, o, rows, tok = ctx.saved_tensors
        n_blk, bs, D = kb.shape
        N, P = n_blk * bs, len(rows)
        qb = qs.view(n_blk, bs, D)
        do = do.reshape(N, D).to(o.dtype)
        delta = (do * o).sum(-1) * inv            # rowsum(dO * O), over the token's sum
        do = do * inv[:, None]                    # p = p_unnormalised / sum: 1 / sum rides on dO
        dob = do.view(n_blk, bs, D)
        vbT = vb.transpose(1, 2).contiguous()
        ds_own = torch.bmm(dob, vbT).sub_(delta.view(n_blk, bs, 1)).mul_(p_own)   # own blocks
        dv = torch.bmm(p_own.transpose(1, 2), dob)
        dk = torch.bmm(ds_own.transpose(1, 2), qb)
        delta_r = delta[rows, None]
        dq_r, n = p.new_empty(P, D), ctx.scratch
        q_c, do_c, ds_c = p.new_empty(n, D), p.new_empty(n, D), p.new_empty(n, bs)   # scratch
        for a, b, segs in ctx.chunks:
            torch.index_select(qs, 0, rows[a:b], out=q_c[:b - a])
            torch.index_select(do, 0, rows[a:b], out=do_c[:b - a])
            for g, a_g, b_g in segs:
                i, j = a_g - a, b_g - a
                dv[g].addmm_(p[a_g:b_g].T, do_c[i:j])
                torch.mm(do_c[i:j], vbT[g], out=ds_c[i:j])
            ds_c[:b - a].sub_(delta_r[a:b]).mul_(p[a:b])                    # dS = P (dP - delta)
            for g, a_g, b_g in segs:
                i, j = a_g - a, b_g - a
                dk[g].addmm_(ds_c[i:j].T, q_c[i:j])
                torch.mm(ds_c[i:j], kb[g], out=dq_r[a_g:b_g])
        dq = torch.addmm(torch.bmm(ds_own, kb).view(N, D), tok, dq_r).mul_(D ** -0.5)
        return (*(x.view(ctx.shape).to(ctx.dtype) for x in (dq, dk, dv)), None, None, None)


def attention_torch(q, k, v, block_idx, block_cnt, block_size):
    """Token-level MoBA in plain torch (the CPU training path): own blocks in one batched product
    per step, the pairs with one `torch.mm` per key block, a softmax over each token's own block
    and pairs together. Time and memory follow the selected pairs: the backward keeps each pair's
    probabilities ([pairs, block_size]: (budget - 1) copies of q when block_size = head dim).
    fp16/bf16 inputs are computed in fp32. Differentiable in q, k, v; every sum runs in a fixed
    order, so reruns are bitwise equal."""
    return _TorchPairs.apply(q.contiguous(), k.contiguous(), v.contiguous(), block_idx,
                             block_cnt, block_size).view(q.shape)


# ------------------------------------------------------------------------------ Triton kernels
# Triton is imported here, on first use, so the rest of the project runs where it is not installed.
# q, k, v, do are contiguous [Z*T, D] (Z = batch*heads): token row r at r*D. A key block g = z*NQ+j
# is rows g*BLOCK .. g*BLOCK + BLOCK-1. lse (log2 units) and delta are fp32 [Z*T].
# UPCAST (CPU interpreter): compute in fp32 right after each load, as bf16 math is wrong there.
_KERNELS = None


def _triton_kernels():
    global _KERNELS
    if _KERNELS is not None:
        return _KERNELS
    try:
        import triton
        import triton.language as tl
    except ImportError:
        raise ValueError("impl='triton' needs the triton package (Linux: pip install "
                         "triton==3.7.1); without it use impl='torch' or 'auto'") from None

    @triton.jit
    def pair_fwd(Q, K, V, O, LSE, ROWS, TKEY, qk_scale, T, NQ, UPCAST: tl.constexpr,
                 TILE_M: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
        """One tile: TILE_M tokens that chose key block g -> partial o and lse per token."""
        tile = tl.program_id(0)
        g = tl.load(TKEY + tile)                                   # key block z*NQ + j
        offs_m = tl.arange(0, TILE_M)
        offs_n = tl.arange(0, BLOCK)
        offs_d = tl.arange(0, HEAD_DIM)
        rows = tl.load(ROWS + tile * TILE_M + offs_m)              # [TILE_M] token rows, -1 pad
        valid = rows >= 0
        qpos = tl.where(valid, rows % T, T)                        # pad rows: nothing masked
        q = tl.load(Q + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=valid[:, None], other=0.)
        keys = g.to(tl.int64) * BLOCK + offs_n                     # [BLOCK] key rows
        kT = tl.load(K + keys[None, :] * HEAD_DIM + offs_d[:, None])   # [HEAD_DIM, BLOCK]
        v = tl.load(V + keys[:, None] * HEAD_DIM + offs_d[None, :])    # [BLOCK, HEAD_DIM]
        if UPCAST:
            q, kT, v = q.to(tl.float32), kT.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, kT) * qk_scale                               # [TILE_M, BLOCK], log2 units
        kpos = (g % NQ) * BLOCK + offs_n
        s = tl.where(kpos[None, :] <= qpos[:, None], s, float("-inf"))   # bites on own block only
        m = tl.max(s, 1)
        p = tl.exp2(s - m[:, None])
        l = tl.sum(p, 1)
        o = tl.dot(p.to(v.dtype), v) / l[:, None]                  # [TILE_M, HEAD_DIM]
        out = tile * TILE_M + offs_m
        tl.store(O + out[:, None] * HEAD_DIM + offs_d[None, :], o)
        tl.store(LSE + out, m + tl.log2(l))

    @triton.jit
    def pair_bwd(Q, K, V, DO, DK, DV, DQP, LSE, DELTA, ROWS, TSTART, sm_scale, qk_scale, T, NQ,
                 UPCAST: tl.constexpr, TILE_M: tl.constexpr, BLOCK: tl.constexpr,
                 HEAD_DIM: tl.constexpr):
        """One key block g: dK, dV summed over its tiles (owned here: no atomics); each pair's
        dQ to its own row of DQP (summed per token afterwards)."""
        g = tl.program_id(0)
        offs_m = tl.arange(0, TILE_M)
        offs_n = tl.arange(0, BLOCK)
        offs_d = tl.arange(0, HEAD_DIM)
        keys = g.to(tl.int64) * BLOCK + offs_n
        k = tl.load(K + keys[:, None] * HEAD_DIM + offs_d[None, :])    # [BLOCK, HEAD_DIM]
        v = tl.load(V + keys[:, None] * HEAD_DIM + offs_d[None, :])
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        kpos = (g % NQ) * BLOCK + offs_n
        dk = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
        for tile in range(tl.load(TSTART + g), tl.load(TSTART + g + 1)):
            rows = tl.load(ROWS + tile * TILE_M + offs_m)
            valid = rows >= 0
            qpos = tl.where(valid, rows % T, T)
            tok = rows[:, None] * HEAD_DIM + offs_d[None, :]
            q = tl.load(Q + tok, mask=valid[:, None], other=0.)           # [TILE_M, HEAD_DIM]
            do = tl.load(DO + tok, mask=valid[:, None], other=0.)         # pad rows: do = 0
            if UPCAST:
                q, do = q.to(tl.float32), do.to(tl.float32)
            lse = tl.load(LSE + rows, mask=valid, other=0.)
            delta = tl.load(DELTA + rows, mask=valid, other=0.)
            p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])  # [TILE_M, BLOCK]
            p = tl.where(kpos[None, :] <= qpos[:, None], p, 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)                     # [BLOCK, HEAD_DIM]
            ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])            # [TILE_M, BLOCK]
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
            dq = tl.dot(ds.to(k.dtype), k) * sm_scale                      # [TILE_M, HEAD_DIM]
            out = tile * TILE_M + offs_m
            tl.store(DQP + out[:, None] * HEAD_DIM + offs_d[None, :], dq)
        tl.store(DK + keys[:, None] * HEAD_DIM + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty))
        tl.store(DV + keys[:, None] * HEAD_DIM + offs_d[None, :], dv.to(DV.dtype.element_ty))

    _KERNELS = (pair_fwd, pair_bwd)
    return _KERNELS


def _launch_cfg(block, head_dim, elem_bytes):
    """num_warps / num_stages that fit H100/H200 shared memory for a [64 x block] tile."""
    return dict(num_warps=4 if block * head_dim <= 64 * 128 else 8,
                num_stages=2 if elem_bytes * block * head_dim <= 2 * 128 * 128 else 1)


class _TritonPairs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_idx, block_cnt, block_size):
        pair_fwd, _ = _triton_kernels()
        B, H, T, D = q.shape
        Z, NQ, KMAX = B * H, T // block_size, block_idx.shape[-1]
        tile = TILE if q.is_cuda else 16
        q, k, v = (x.contiguous() for x in (q, k, v))
        tl_ = _pair_tiles(block_idx.reshape(Z, T, KMAX), block_cnt.reshape(Z, T), NQ, tile, True)
        n_t = len(tl_.tkey)
        o_p = torch.empty(n_t * tile, D, device=q.device, dtype=torch.float32)
        lse_p = torch.empty(n_t * tile, device=q.device, dtype=torch.float32)
        pair_fwd[(n_t,)](q, k, v, o_p, lse_p, tl_.rows, tl_.tkey, D ** -0.5 * LOG2E, T, NQ,
                         UPCAST=not q.is_cuda, TILE_M=tile, BLOCK=block_size, HEAD_DIM=D,
                         **_launch_cfg(block_size, D, q.element_size()))
        o, lse = _merge(o_p, lse_p / LOG2E, tl_.rows, Z * T)
        o = o.to(q.dtype)
        ctx.save_for_backward(q, k, v, o, lse, tl_.rows, tl_.tstart)
        ctx.shape = (B, H, T, D, block_size, tile)
        return o.view(B, H, T, D)

    @staticmethod
    def backward(ctx, do):
        _, pair_bwd = _triton_kernels()
        q, k, v, o, lse, rows, tstart = ctx.saved_tensors
        B, H, T, D, block_size, tile = ctx.shape
        do = do.contiguous()
        delta = (o.float() * do.float().reshape(-1, D)).sum(-1)               # rowsum(o * dO)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        dq_p = torch.empty(len(rows), D, device=q.device, dtype=torch.float32)
        pair_bwd[(B * H * (T // block_size),)](
            q, k, v, do, dk, dv, dq_p, lse * LOG2E, delta, rows, tstart, D ** -0.5,
            D ** -0.5 * LOG2E, T, T // block_size, UPCAST=not q.is_cuda, TILE_M=tile,
            BLOCK=block_size, HEAD_DIM=D, **_launch_cfg(block_size, D, q.element_size()))
        dq = _sum_rows(dq_p, rows, B * H * T).to(q.dtype).view_as(q)
        return dq, dk, dv, None, None, None


# ------------------------------------------------------------------------------ dispatch
def check_layout(block_idx, block_cnt, B, H, T, block_size):
    """Raise ValueError unless (block_idx, block_cnt) is a layout `select_blocks` could return:
    shapes [B, H, T, KMAX] / [B, H, T], integer, 1 <= count <= KMAX, the counted entries strictly
    ascending (no duplicates), >= 0, ending with the token's own block (nothing in the future)."""
    NQ = T // block_size
    if (block_idx.dim() != 4 or tuple(block_idx.shape[:3]) != (B, H, T)
            or tuple(block_cnt.shape) != (B, H, T)):
        raise ValueError(f"block_idx must be [B, H, T, KMAX] and block_cnt [B, H, T] for q of "
                         f"shape [{B}, {H}, {T}, D]; got {tuple(block_idx.shape)} and "
                         f"{tuple(block_cnt.shape)} (use select_blocks with the same inputs)")
    if block_idx.dtype.is_floating_point or block_cnt.dtype.is_floating_point:
        raise ValueError("block_idx and block_cnt must be integer tensors (as from select_blocks)")
    KMAX = block_idx.shape[-1]
    cnt = block_cnt.long()
    if KMAX == 0 or int(cnt.min()) < 1 or int(cnt.max()) > KMAX:
        raise ValueError(f"every block_cnt must be in [1, KMAX={KMAX}] (the own block counts); "
                         f"got {int(cnt.min())}..{int(cnt.max())}")
    idx = block_idx.long()
    on = torch.arange(KMAX, device=idx.device) < cnt[..., None]
    own = torch.arange(T, device=idx.device) // block_size
    last = idx.gather(-1, cnt[..., None] - 1)[..., 0]
    ascending = ((idx[..., 1:] > idx[..., :-1]) | ~on[..., 1:]).all()
    if not (ascending and (~on | (idx >= 0)).all() and (last == own).all()):
        raise ValueError(f"each token's counted block_idx entries must be distinct block indices "
                         f"in [0, {NQ}), ascending, the last one its own block t // block_size "
                         "(no later block): build layouts with select_blocks")


def block_sparse_attention(q, k, v, block_idx, block_cnt, block_size, impl="auto", validate=True):
    """Attention of every token to the key blocks its layout lists (causal inside its own block).

    q, k, v [B, H, T, D]; block_idx int [B, H, T, KMAX], block_cnt int [B, H, T], as returned by
    `select_blocks`. Softmax scale 1/sqrt(D). `impl`: "triton" (CUDA, or CPU under
    TRITON_INTERPRET=1), "torch" (CPU), "reference" (the naive twin), or "auto" (triton on CUDA,
    else torch). `validate=False` skips the layout check (the model passes the gate's own layout).
    Returns o with the shape and dtype of q; differentiable in every impl."""
    B, H, T, D = _check_qkv(q, k, v, block_size)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if validate:
        check_layout(block_idx, block_cnt, B, H, T, block_size)
    if impl == "auto":
        impl = "triton" if q.is_cuda else "torch"
    if impl == "reference":
        return attention_reference(q, k, v, block_idx, block_cnt, block_size)
    if impl == "torch":
        if q.is_cuda:
            raise ValueError("impl='torch' is the CPU path (a loop of small products per key "
                             "block); on CUDA use impl='triton' or 'auto'")
        return attention_torch(q, k, v, block_idx, block_cnt, block_size)
    if q.is_cuda and q.element_size() * block_size * D > 4 * 64 * 128:
        raise ValueError("fp32 Triton on CUDA fits shared memory only for block_size * head_dim "
                         "<= 8192: use bf16/fp16 (autocast) or a smaller block")
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("impl='triton' needs a CUDA tensor, or TRITON_INTERPRET=1 set before "
                         "triton is imported; on CPU use impl='torch'")
    return _TritonPairs.apply(q, k, v, block_idx, block_cnt, block_size)


def sparse_attention(q, k, v, topk, cu_seqlens=None, block_size=64, impl="auto", k0=None, p=None):
    """Select with the MoBA gate, then attend: `select_blocks` + `block_sparse_attention`."""
    _check_qkv(q, k, v, block_size)
    sel = select_blocks(q, k, topk, cu_seqlens, block_size, k0=k0, p=p)
    return block_sparse_attention(q, k, v, sel.block_idx, sel.block_cnt, block_size, impl,
                                  validate=False)


# ------------------------------------------------------------------------------ decoding
def decode_attention(q, k, v, k_means, pos, topk, block_size):
    """Sparse decoding with the same gate: queries at absolute positions pos .. pos+n-1 of one
    sequence per row attend, through a KV cache, to what a full forward would let them see.

    q [B, H, n, D]; k, v [B, H, L, D] the cache, written up to pos + n; k_means [B, H, NB, D] the
    mean key of every complete block (the cache keeps them). Token a, in block i = a // block_size,
    scores the complete blocks j < i, keeps the `topk - 1` best (ties to the lower j) and its own,
    partial block up to a. topk: int or LongTensor [B]. Cost follows the budget, not the length:
    the chosen blocks are copied as whole [block_size, D] tiles (an element-wise gather cost 3-4x
    more on a CPU and made a 5-token verification forward twice a 1-token step), and the own
    blocks of all n tokens lie in one span of at most block_size + n - 1 keys."""
    B, H, n, D = q.shape
    bs = block_size
    a = pos + torch.arange(n, device=q.device)                             # [n] positions
    i = a // bs
    budget = budget_per_sequence(topk, B, q.device)
    qf = q.float()
    s0 = (pos // bs) * bs                                                  # first token's block
    span = torch.arange(s0, pos + n, device=q.device)                      # [S] keys of own blocks
    own = (span >= i[:, None] * bs) & (span <= a[:, None])                 # [n, S]
    K_own, V_own = k[:, :, s0:pos + n].float(), v[:, :, s0:pos + n].float()   # [B, H, S, D]
    s_own = (qf @ K_own.transpose(-1, -2)).masked_fill(~own, float("-inf"))   # [B, H, n, S]
    nb = int(i[-1])                                                        # blocks j < i needed
    keep = max(0, min(int(budget.max()) - 1, nb))
    if not keep:
        return (torch.softmax(s_own / math.sqrt(D), dim=-1) @ V_own).to(q.dtype)
    s = _past_scores(q, k_means[:, :, :nb].float(), i, torch.zeros_like(i))    # [B, H, n, nb]
    top = s.sort(dim=-1, descending=True, stable=True).indices[..., :keep]    # [B, H, n, keep]
    cnt = torch.minimum(budget[:, None] - 1, i[None])[:, None, :, None]    # [B, 1, n, 1]
    valid = torch.arange(keep, device=q.device) < cnt                      # [B, 1, n, keep]
    bi = torch.arange(B, device=q.device)[:, None, None, None]
    hi = torch.arange(H, device=q.device)[None, :, None, None]
    tiles = lambda x: x[:, :, :nb * bs].unflatten(2, (nb, bs))[bi, hi, top].float()  # noqa: E731
    K_sel, V_sel = tiles(k).flatten(3, 4), tiles(v).flatten(3, 4)         # [B, H, n, keep*bs, D]
    s_sel = (K_sel @ qf[..., None]).view(B, H, n, keep, bs)                # [B, H, n, keep, bs]
    s_sel = s_sel.masked_fill(~valid[..., None], float("-inf")).flatten(3)
    w = torch.softmax(torch.cat([s_sel, s_own], -1) / math.sqrt(D), dim=-1)
    y = (w[..., None, :keep * bs] @ V_sel)[..., 0, :] + w[..., keep * bs:] @ V_own
    return y.to(q.dtype)                                                   # [B, H, n, D]


# ------------------------------------------------------------------------------ benchmark, check
def reuse_cpu_memory():
    """Keep freed memory inside this process (glibc malloc on Linux) instead of handing every block
    above 32 MB back to the OS. The CPU path allocates tensors of tens of MB per call (the pairs'
    scores, their outputs, gradients); returned to the OS, each is page-faulted back in on the
    next call: 0.65x instead of 0.51x of dense time at T = 8192 (docs/attention.md). This is what
    a caching allocator does on GPUs; train.py and the benchmark call it on CPUs. Process-wide;
    a no-op (False) where glibc is absent."""
    if sys.platform != "linux":
        return False
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, most = -1, -3, 2**31 - 1   # mallopt takes a C int
    return bool(libc.mallopt(M_MMAP_THRESHOLD, most)) and bool(libc.mallopt(M_TRIM_THRESHOLD, most))


def budget_for_density(nq, density):
    """Smallest budget whose visited blocks reach `density` of dense causal's."""
    want = density * visited_blocks(nq, nq)
    return next(kb for kb in range(1, nq + 1) if visited_blocks(nq, kb) >= want)


def timed(fns, reps, cuda=False, warmup=None, desc=None):
    """The project's timing harness: best-of-`reps` (wall ms, CPU ms) of each function after
    `warmup` untimed calls each (default: 1 on CUDA, which also compiles the kernels, 0 on CPU).
    The functions are called in turn, so a change of load on a shared machine hits them alike.
    CPU ms is this process's CPU time (all its threads): unlike wall time on a shared machine it
    does not grow when other jobs take the cores. On CUDA: event timing, and CPU ms is None.
    desc: a tqdm bar over the repeats."""
    warmup = int(cuda) if warmup is None else warmup
    times = [[] for _ in fns]
    rounds = range(warmup + reps)
    if desc:
        from tqdm import tqdm
        rounds = tqdm(rounds, desc=desc)
    for rep in rounds:
        for fn, t in zip(fns, times):
            if cuda:
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                t.append((start.elapsed_time(end), None))
            else:
                w0, c0 = time.perf_counter(), time.process_time()
                fn()
                t.append((1e3 * (time.perf_counter() - w0), 1e3 * (time.process_time() - c0)))
    return [(min(w for w, _ in t[warmup:]), None if cuda else min(c for _, c in t[warmup:]))
            for t in times]


def _fwd_bwd(attend, q, k, v, g):
    def run():
        for x in (q, k, v):
            x.grad = None
        attend(q, k, v).backward(g)
    return run


def _union_over_pairs(sel, block_size):
    """Work of a query-block-major design (each query block visits the union of its tokens'
    choices) over the work of the pair tiles, both in (query row x key block) units."""
    idx, cnt = sel.block_idx.cpu(), sel.block_cnt.cpu()
    B, H, T, KMAX = idx.shape
    NQ = T // block_size
    on = torch.arange(KMAX) < cnt[..., None].long()
    hit = torch.zeros(B, H, NQ, NQ + 1, dtype=torch.bool)
    qblk = (torch.arange(T) // block_size)[None, None, :, None].expand_as(idx)
    flat = torch.where(on, idx.long(), NQ) + qblk * (NQ + 1)
    hit.view(B, H, -1).scatter_(-1, flat.flatten(2), True)
    union = int(hit[..., :NQ].sum())
    tiles = len(_pair_tiles(idx.reshape(B * H, T, KMAX), cnt.reshape(B * H, T), NQ, TILE,
                            True).tkey)
    return union * block_size / (tiles * TILE)


def bench(lengths, heads, dim, block, reps, densities=(1, 1 / 2, 1 / 4, 1 / 8, 1 / 16),
          keep_memory=True):
    """Print gate ms, forward ms, forward+backward ms of token-level MoBA at several densities
    next to dense causal SDPA (flash backend on CUDA), timed in turn with each row; on CUDA also
    FlexAttention with the same mask, checked equal before it is timed, and peak memory."""
    cuda = torch.cuda.is_available()
    dev, dtype, impl = ("cuda", torch.bfloat16, "triton") if cuda else ("cpu", torch.float32,
                                                                         "torch")
    kept = not cuda and keep_memory and reuse_cpu_memory()
    print(f"device={dev} impl={impl} dtype={str(dtype)[6:]} B=1 H={heads} D={dim} block={block} "
          f"threads={torch.get_num_threads()}" + ("" if cuda else f" reuse_cpu_memory={kept}"))
    print("density: share of dense causal's (token, block) pairs; times: best of reps, gate "
          "included in fwd and fwd+bwd; speedup = SDPA / sparse" + ("" if cuda else
          " by wall time (cpu: by process CPU time)"))
    head = (f"{'T':>6} {'density':>7} {'budget':>6} {'gate ms':>8} {'fwd ms':>8} "
            f"{'fwd+bwd ms':>10} {'SDPA f+b':>9} {'speedup':>7} {'union/pairs':>11}")
    print(head + (f" {'flex f+b':>8} {'vs flex':>7} {'peak GB':>7} {'SDPA GB':>7}" if cuda
                  else f" {'cpu speedup':>11}"))

    def sdpa(a, b, c):
        if not cuda:
            return F.scaled_dot_product_attention(a, b, c, is_causal=True)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(a, b, c, is_causal=True)

    def peak(fn):
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**30

    for T in lengths:
        nq = T // block
        q, k, v, g = (torch.randn(1, heads, T, dim, device=dev, dtype=dtype) for _ in range(4))
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        for density in densities:
            try:                                             # one failure must not end the table
                kb = budget_for_density(nq, density)
                sel = select_blocks(q, k, kb, None, block)

                def attend(a, b, c):
                    # the gate runs inside every timed call: its cost is part of the speedup
                    s = select_blocks(a, b, kb, None, block)
                    return block_sparse_attention(a, b, c, s.block_idx, s.block_cnt, block, impl,
                                                  validate=False)
                with torch.no_grad():
                    (gate, _), (fwd, _) = timed([lambda: select_blocks(q, k, kb, None, block),
                                                 lambda: attend(q, k, v)], reps, cuda)
                (fb, fb_cpu), (dense, dense_cpu) = timed(
                    [_fwd_bwd(attend, q, k, v, g), _fwd_bwd(sdpa, q, k, v, g)], reps, cuda)
                pairs = int(sel.block_cnt.sum()) / (heads * T)               # blocks per token
                line = (f"{T:>6} {pairs / ((nq + 1) / 2):>7.3f} {kb:>6} {gate:>8.2f} {fwd:>8.2f} "
                        f"{fb:>10.2f} {dense:>9.2f} {dense / fb:>6.2f}x "
                        f"{_union_over_pairs(sel, block):>11.2f}")
                if cuda:
                    flex = _flex(sel, block)
                    want = attend(q, k, v)
                    err = float((flex(q, k, v).float() - want.float()).abs().max())
                    if err > 2e-2:
                        raise RuntimeError(f"FlexAttention disagrees with the kernel: {err:.2e}")
                    (ffb, _), = timed([_fwd_bwd(flex, q, k, v, g)], reps, cuda)
                    line += (f" {ffb:>8.2f} {ffb / fb:>6.2f}x {peak(_fwd_bwd(attend, q, k, v, g)):>7.2f}"
                             f" {peak(_fwd_bwd(sdpa, q, k, v, g)):>7.2f}")
                else:
                    line += f" {dense_cpu / fb_cpu:>10.2f}x"
                print(line, flush=True)
            except Exception as e:
                print(f"{T:>6} density {density:.3f} failed: {type(e).__name__}: {str(e)[:200]}",
                      flush=True)


def _flex(sel, block):
    """FlexAttention with the same token-level mask: a mask_mod reading the selection (a dense
    [T, NQ] bool per head) and a BlockMask of the union, compiled: the peer a user would pick."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    B, H, T, KMAX = sel.block_idx.shape
    NQ = T // block
    chosen = torch.zeros(B, H, T, NQ + 1, dtype=torch.bool, device=sel.block_idx.device)
    on = torch.arange(KMAX, device=chosen.device) < sel.block_cnt[..., None]
    chosen.scatter_(-1, torch.where(on, sel.block_idx.long(), NQ), True)

    def mask_mod(b, h, qi, ki):
        return chosen[b, h, qi, ki // block] & (ki <= qi)
    bm = create_block_mask(mask_mod, B, H, T, T, device=chosen.device, BLOCK_SIZE=block)
    compiled = torch.compile(flex_attention)
    return lambda a, b, c: compiled(a, b, c, block_mask=bm)


def _grads(impl, x, sel, bs, dtype):
    """Output and dq, dk, dv of one impl, inputs cast to dtype; x = [q, k, v, do]."""
    q, k, v = (t.detach().to(dtype).clone().requires_grad_() for t in x[:3])
    o = block_sparse_attention(q, k, v, sel.block_idx, sel.block_cnt, bs, impl)
    o.backward(x[3].to(dtype))
    return [o.detach(), q.grad, k.grad, v.grad]


CHECK_CASES = [  # B, H, T, D, block, cu_seqlens, topk
    (2, 2, 512, 64, 64, [0, 64, 256, 512, 640, 1024], 3),
    (1, 4, 1024, 128, 64, None, 5),
    (1, 2, 1024, 128, 128, [0, 128, 512, 1024], torch.tensor([1, 2, 3])),
    (2, 2, 256, 32, 32, [0, 32, 256, 288, 512], 100),
]


def check(cases=CHECK_CASES, device="cuda"):
    """The Triton kernels against the naive twin (fp32) in bf16 and fp16: outputs and grads,
    errors relative to the twin's max / mean magnitude, and bitwise-equal reruns."""
    tols = {torch.bfloat16: (3e-2, 1e-2), torch.float16: (5e-3, 2e-3)}   # relative max, mean
    failures = 0
    for dtype, (tol_max, tol_mean) in tols.items():
        for B, H, T, D, bs, cu, topk in cases:
            docs = B if cu is None else len(cu) - 1
            name = f"{str(dtype)[6:]:>8} B{B} H{H} T{T} D{D} block{bs} docs={docs}"
            try:
                x = [torch.randn(B, H, T, D, device=device).to(dtype) for _ in range(4)]
                cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=device)
                sel = select_blocks(x[0], x[1], topk, cu_t, bs)
                got = _grads("triton", x, sel, bs, dtype)
                want = _grads("reference", x, sel, bs, torch.float32)
                rerun = _grads("triton", x, sel, bs, dtype)
                same = all(torch.equal(a, b) for a, b in zip(got, rerun))
                ok, errs = same, []
                for n, a, b in zip(("o", "dq", "dk", "dv"), got, want):
                    d = (a.float() - b).abs()
                    mx, mn = float(d.max() / b.abs().max()), float(d.mean() / b.abs().mean())
                    ok &= mx <= tol_max and mn <= tol_mean
                    errs.append(f"{n} {mx:.1e}/{mn:.1e}")
                print(f"{'ok  ' if ok else 'FAIL'} {name}  rel err max/mean: {', '.join(errs)}  "
                      f"rerun bitwise equal: {same}", flush=True)
            except Exception as e:
                ok = False
                print(f"FAIL {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            failures += not ok
    return failures


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Token-level MoBA attention: speed table (--bench, "
                                 "the default) and, on CUDA, Triton correctness in bf16/fp16 "
                                 "(--check).")
    ap.add_argument("--bench", action="store_true", help="print the speed table (default action)")
    ap.add_argument("--check", action="store_true",
                    help="CUDA only: kernels vs the naive twin in bf16/fp16; exit 1 on failure")
    ap.add_argument("--lengths", type=int, nargs="+",
                    help="sequence lengths (default: CPU 4096 8192, CUDA 4096 8192 16384 32768)")
    ap.add_argument("--heads", type=int, help="heads (default: CPU 4, CUDA 16)")
    ap.add_argument("--dim", type=int, help="head dim (default: CPU 64, CUDA 128)")
    ap.add_argument("--block", type=int, default=64, help="block size (default 64)")
    ap.add_argument("--densities", type=float, nargs="+", default=[1, 1 / 2, 1 / 4, 1 / 8, 1 / 16],
                    help="shares of dense causal's (token, block) pairs (default 1 1/2 1/4 1/8 1/16)")
    ap.add_argument("--no-reuse-memory", action="store_true",
                    help="CPU: leave glibc's malloc as it is (see reuse_cpu_memory) to measure its cost")
    ap.add_argument("--reps", type=int,
                    help="timed repetitions per number, best reported (default: CPU 2, CUDA 10)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if args.check:
        if not cuda:
            sys.exit("--check needs a CUDA GPU; on CPU run: python -m pytest -q "
                     "tests/test_attention.py")
        n_fail = check()
        print(f"check: {n_fail} failure(s)")
        if n_fail:
            sys.exit(1)
    if args.bench or not args.check:
        bench(args.lengths or ([4096, 8192, 16384, 32768] if cuda else [4096, 8192]),
              args.heads or (16 if cuda else 4), args.dim or (128 if cuda else 64), args.block,
              args.reps or (10 if cuda else 2), args.densities, not args.no_reuse_memory)
