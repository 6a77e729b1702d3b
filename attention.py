"""Dynamic block-sparse attention: a MoBA-style gate, Triton kernels (fwd + bwd) and a torch path.

The gate (SparseBalance sec. "sparse attention used", after MoBA). The sequence is cut into blocks
of `block_size` tokens. Query block i scores every earlier key block j of its own document by
    score(i, j) = mean(q of block i) . mean(k of block j)
keeps the top `topk - 1` of them plus its own (diagonal) block, and attends only to those, with the
causal mask applied inside the diagonal block. `topk` is the per-sequence budget that the balancer
(DST) turns up and down at run time; a budget >= the blocks available is plain causal attention.

The layout is data you can print: per query block, the ascending list of selected key blocks and a
count. Two documents of 3 and 2 blocks in one row (cu_seqlens = [0, 192, 320], block 64), topk=2:
    block_idx[b, h] = [[0, -1],      block_cnt[b, h] = [1, 2, 2, 1, 2]
                       [0,  1],
                       [0,  2],      <- block 2 kept the better of {0, 1}, and itself
                       [3, -1],      <- a new document: block 3 sees only itself
                       [3,  4]]
Padding is -1; the diagonal block is always present and, being the largest entry, always last.

The kernel loop (one program per query block and batch-head, FlashAttention-2 style):
    for each selected key block j (the last one, the diagonal, with the causal mask):
        s = q k_j^T * scale * log2(e)         # exp2 is the fast hardware exponential
        m_new = max(m, rowmax(s)); p = exp2(s - m_new)
        acc = acc * exp2(m - m_new) + p v_j;  l = l * exp2(m - m_new) + rowsum(p)
    o = acc / l;  lse = m + log2(l)            # lse is all the backward needs to rebuild p
The backward runs two kernels without atomics, so gradients are bitwise reproducible: dK/dV with
one program per key block, looping over the query blocks that selected it (a transposed index
built in torch), and dQ with one program per query block, looping over its key blocks.

On CPU, `attention_torch` groups the query blocks by how many key blocks they attend to, gathers
those blocks and runs PyTorch's fused CPU flash-attention kernels on them, forward and backward,
summing dK/dV in index order (reproducible as well). `attention_reference` expands the layout to
a dense mask; `routing_coverage` is the per-sequence curve the balancer uses as its quality floor.

Run `python attention.py --bench` for the speed table, `python attention.py --check` (CUDA) for
correctness of the Triton kernels against the reference in bf16 and fp16.
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from einops import rearrange

IMPLS = ("auto", "triton", "torch", "reference")
LOG2E = 1.4426950408889634                  # exp(x) = exp2(x * log2(e))


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
    row_block = torch.arange(NQ, device=device)
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
    g = torch.arange(B, device=device)[:, None] * NQ + row_block            # [B, NQ] global block
    seq = torch.searchsorted(starts[1:], g, right=True)                     # [B, NQ]
    first = starts[seq] - torch.arange(B, device=device)[:, None] * NQ      # row-local
    return seq, first, len(cu) - 1


def _budgets(topk, S, device):
    """The budget of every sequence as a LongTensor [S]; raises on budgets < 1 or a wrong length."""
    if isinstance(topk, torch.Tensor):
        if topk.dtype.is_floating_point or topk.dtype == torch.bool or topk.numel() != S:
            raise ValueError(f"topk must be an int or an integer tensor with one budget per "
                             f"sequence ({S}); got {topk.dtype} with {topk.numel()} entries")
        budget = topk.reshape(S).to(device=device, dtype=torch.long)
    elif isinstance(topk, int) and not isinstance(topk, bool):
        budget = torch.full((S,), topk, dtype=torch.long, device=device)
    else:
        raise ValueError(f"topk must be an int or a LongTensor [S], got {type(topk).__name__}")
    if S and int(budget.min()) < 1:
        raise ValueError(f"every budget must be >= 1 (it counts the diagonal block), "
                         f"got {int(budget.min())}")
    return budget


# ------------------------------------------------------------------------------ reference
def _selected(block_idx, block_cnt):
    """The layout as a dense block mask: sel[..., i, j] is True where query block i attends to key
    block j. block_idx [..., NQ, KMAX], block_cnt [..., NQ] -> bool [..., NQ, NQ]."""
    NQ, KMAX = block_idx.shape[-2:]
    slot = torch.arange(KMAX, device=block_idx.device)
    keep = (slot < block_cnt[..., None]) & (block_idx >= 0)                 # [..., NQ, KMAX]
    sel = torch.zeros(*block_idx.shape[:-1], NQ + 1, dtype=torch.bool, device=block_idx.device)
    sel.scatter_(-1, torch.where(keep, block_idx.long(), NQ), True)         # column NQ = padding
    return sel[..., :NQ]


def attention_reference(q, k, v, block_idx, block_cnt, block_size):
    """Obviously correct twin: expand the block layout to a dense token mask, softmax in fp32."""
    B, H, T, D = q.shape
    blocks = _selected(block_idx, block_cnt)                                # [B, H, NQ, NQ]
    mask = blocks.repeat_interleave(block_size, 2).repeat_interleave(block_size, 3)
    mask &= torch.ones(T, T, dtype=torch.bool, device=q.device).tril()      # causal, [B, H, T, T]
    f = torch.promote_types(q.dtype, torch.float32)                         # fp32, or fp64 if given
    s = (q.to(f) @ k.to(f).transpose(-1, -2)) / math.sqrt(D)
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    return (p @ v.to(f)).to(q.dtype)


# ------------------------------------------------------------------------------ selection
def _gate_scores(q, k, cu_seqlens, block_size):
    """Mean-pooled gate scores [B, H, NQ, NQ] (fp32), the allowed mask [B, 1, NQ, NQ] (earlier
    blocks of the same document, diagonal excluded) and the document layout."""
    B, H, T, D = q.shape
    NQ = T // block_size
    seq, first, S = _documents(cu_seqlens, B, T, block_size, q.device)
    qm = rearrange(q.detach().float(), "b h (n s) d -> b h n s d", s=block_size).mean(3)
    km = rearrange(k.detach().float(), "b h (n s) d -> b h n s d", s=block_size).mean(3)
    scores = qm @ km.transpose(-1, -2)                                      # [B, H, NQ, NQ]
    i = torch.arange(NQ, device=q.device)
    allowed = (i[None, :] < i[:, None]) & (i[None, None, :] >= first[:, :, None])
    return scores, allowed[:, None], seq, first, S


def select_blocks(q, k, topk, cu_seqlens=None, block_size=64):
    """MoBA gate at query-block granularity (SparseBalance sec. "sparse attention used").

    Query block i keeps its diagonal block plus the `topk - 1` earlier key blocks of its document
    with the highest score mean(q_i) . mean(k_j). Ties go to the earlier block (stable sort), so the
    layout is deterministic. `topk`: int or LongTensor [S] (one budget per sequence, diagonal
    included). Returns block_idx int32 [B, H, NQ, KMAX] (ascending, padded with -1; KMAX =
    min(max budget, NQ)) and block_cnt int32 [B, H, NQ] = min(budget, blocks available)."""
    B, H, T, D = _check_qkv(q, k, None, block_size)
    NQ = T // block_size
    scores, allowed, seq, first, S = _gate_scores(q, k, cu_seqlens, block_size)
    budget = _budgets(topk, S, q.device)
    kmax = min(int(budget.max()), NQ)
    i = torch.arange(NQ, device=q.device)
    scores = scores.masked_fill(~allowed, float("-inf"))
    scores[..., i, i] = float("inf")                                        # diagonal always first
    order = scores.sort(dim=-1, descending=True, stable=True).indices[..., :kmax]
    cnt = torch.minimum(budget[seq], i - first + 1)[:, None].expand(B, H, NQ)   # [B, H, NQ]
    slot = torch.arange(kmax, device=q.device)
    idx = torch.where(slot < cnt[..., None], order, NQ).sort(dim=-1).values   # padding sorts last
    idx = idx.masked_fill(idx == NQ, -1)
    return idx.to(torch.int32).contiguous(), cnt.to(torch.int32).contiguous()


# ------------------------------------------------------------------------------ coverage
def routing_coverage(q, k, cu_seqlens=None, block_size=64):
    """Routing-score coverage C(k) (SparseBalance sec. "sparse attention used", quality proxy).

    Softmax of the gate scores / sqrt(D) over the blocks a query block may see; C[s, j] = mass of
    the diagonal block plus the best j other blocks, averaged over heads and the query blocks of
    sequence s (1 where fewer than j+1 blocks exist). Float [S, KMAX_all], non-decreasing, ending
    at 1. DST uses it as the quality floor when it cuts a budget."""
    B, H, T, D = _check_qkv(q, k, None, block_size)
    NQ = T // block_size
    scores, allowed, seq, first, S = _gate_scores(q, k, cu_seqlens, block_size)
    i = torch.arange(NQ, device=q.device)
    allowed = allowed.clone()
    allowed[..., i, i] = True
    p = torch.softmax((scores / math.sqrt(D)).masked_fill(~allowed, float("-inf")), dim=-1)
    rank = p.masked_fill(~allowed, -1.0)
    rank[..., i, i] = 2.0                                                   # diagonal counted first
    order = rank.sort(dim=-1, descending=True, stable=True).indices
    cov = p.gather(-1, order).cumsum(-1).clamp(max=1.0)                     # [B, H, NQ, NQ]
    avail = (i - first + 1)[:, None, :, None]                                # [B, 1, NQ, 1]
    cov = torch.where(i >= avail - 1, 1.0, cov)                             # exact 1 once all seen
    kall = int((i - first + 1).max())
    per_block = cov[..., :kall].mean(1).reshape(B * NQ, kall)               # mean over heads
    seq = seq.reshape(-1)
    total = torch.zeros(S, kall, device=q.device).index_add_(0, seq, per_block)
    return total / torch.bincount(seq, minlength=S).clamp(min=1)[:, None].float()


# ------------------------------------------------------------------------------ Triton kernels
# q, k, v, o, do, dq, dk, dv are contiguous [B*H, T, D]: row z starts at z*stride_z, token t at
# t*stride_t. lse and delta are fp32 [B*H, T]. idx/cnt: the layout, [B*H, NQ, KMAX] and [B*H, NQ].
# UPCAST (CPU interpreter): compute in fp32 right after each load, as bf16 math is wrong there.

@triton.jit
def _fwd_step(acc, l_i, m_i, q, K, V, j, offs_m, offs_n, offs_d, stride_t, qk_scale,
              UPCAST: tl.constexpr, BLOCK: tl.constexpr, CAUSAL: tl.constexpr):
    """One key block of the online softmax (FlashAttention-2, Alg. 1) in the log2 domain."""
    offs_k = j * BLOCK + offs_n
    kT = tl.load(K + offs_k[None, :] * stride_t + offs_d[:, None])       # [HEAD_DIM, BLOCK]
    v = tl.load(V + offs_k[:, None] * stride_t + offs_d[None, :])        # [BLOCK, HEAD_DIM]
    if UPCAST:
        kT, v = kT.to(tl.float32), v.to(tl.float32)
    s = tl.dot(q, kT) * qk_scale                                          # [BLOCK, BLOCK]
    if CAUSAL:
        s = tl.where(offs_m[:, None] >= offs_k[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))                                 # [BLOCK]
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])                                       # [BLOCK, BLOCK]
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)                 # [BLOCK, HEAD_DIM]
    return acc, l_i * alpha + tl.sum(p, 1), m_new


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, IDX, CNT, qk_scale, stride_z, stride_t, T, NQ, KMAX,
                UPCAST: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    i, z = tl.program_id(0), tl.program_id(1)                 # query block, batch*head
    zo = z.to(tl.int64) * stride_z                          # 64-bit: B*H*T*D may pass 2^31
    offs_m = i * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    Q, K, V, O = Q + zo, K + zo, V + zo, O + zo
    IDX = IDX + (z * NQ + i) * KMAX
    q = tl.load(Q + offs_m[:, None] * stride_t + offs_d[None, :])         # [BLOCK, HEAD_DIM]
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
    n = tl.load(CNT + z * NQ + i)
    for s in range(0, n - 1):                                 # earlier blocks: no mask needed
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K, V, tl.load(IDX + s), offs_m, offs_n,
                                  offs_d, stride_t, qk_scale, UPCAST, BLOCK, False)
    acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K, V, tl.load(IDX + n - 1), offs_m, offs_n,
                              offs_d, stride_t, qk_scale, UPCAST, BLOCK, True)   # the diagonal
    o = acc / l_i[:, None]
    tl.store(O + offs_m[:, None] * stride_t + offs_d[None, :], o.to(O.dtype.element_ty))
    tl.store(LSE + z * T + offs_m, m_i + tl.log2(l_i))                   # log2 domain


@triton.jit
def _dkdv_step(dk, dv, k, v, Q, DO, LSE, DELTA, i, offs_n, offs_r, offs_d, stride_t, qk_scale,
               UPCAST: tl.constexpr, BLOCK: tl.constexpr, CAUSAL: tl.constexpr):
    """Add the contribution of query block i to dK, dV of this key block (transposed math)."""
    offs_m = i * BLOCK + offs_r
    qT = tl.load(Q + offs_m[None, :] * stride_t + offs_d[:, None])       # [HEAD_DIM, BLOCK]
    do = tl.load(DO + offs_m[:, None] * stride_t + offs_d[None, :])      # [BLOCK, HEAD_DIM]
    if UPCAST:
        qT, do = qT.to(tl.float32), do.to(tl.float32)
    pT = tl.exp2(tl.dot(k, qT) * qk_scale - tl.load(LSE + offs_m)[None, :])   # [BLOCK_N, BLOCK_M]
    if CAUSAL:
        pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
    dv += tl.dot(pT.to(do.dtype), do)                                     # [BLOCK, HEAD_DIM]
    dpT = tl.dot(v, tl.trans(do))                                         # [BLOCK_N, BLOCK_M]
    dsT = pT * (dpT - tl.load(DELTA + offs_m)[None, :])
    dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT))                          # [BLOCK, HEAD_DIM]
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, QIDX, QCNT, sm_scale, qk_scale, stride_z,
                 stride_t, T, NQ, UPCAST: tl.constexpr, BLOCK: tl.constexpr,
                 HEAD_DIM: tl.constexpr):
    j, z = tl.program_id(0), tl.program_id(1)                 # key block, batch*head
    zo = z.to(tl.int64) * stride_z                          # 64-bit: B*H*T*D may pass 2^31
    offs_n = j * BLOCK + tl.arange(0, BLOCK)
    offs_r = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    Q, DO, LSE, DELTA = Q + zo, DO + zo, LSE + z * T, DELTA + z * T
    QIDX = QIDX + (z * NQ + j) * NQ
    k = tl.load(K + zo + offs_n[:, None] * stride_t + offs_d[None, :])   # [BLOCK, HEAD_DIM]
    v = tl.load(V + zo + offs_n[:, None] * stride_t + offs_d[None, :])
    if UPCAST:
        k, v = k.to(tl.float32), v.to(tl.float32)
    dk = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
    n = tl.load(QCNT + z * NQ + j)
    if n > 0:                                # the first (smallest) query block is the diagonal
        dk, dv = _dkdv_step(dk, dv, k, v, Q, DO, LSE, DELTA, tl.load(QIDX), offs_n, offs_r,
                            offs_d, stride_t, qk_scale, UPCAST, BLOCK, True)
    for s in range(1, n):
        dk, dv = _dkdv_step(dk, dv, k, v, Q, DO, LSE, DELTA, tl.load(QIDX + s), offs_n, offs_r,
                            offs_d, stride_t, qk_scale, UPCAST, BLOCK, False)
    out = zo + offs_n[:, None] * stride_t + offs_d[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty))
    tl.store(DV + out, dv.to(DV.dtype.element_ty))


@triton.jit
def _dq_step(dq, q, do, lse, delta, K, V, j, offs_m, offs_n, offs_d, stride_t, qk_scale,
             UPCAST: tl.constexpr, BLOCK: tl.constexpr, CAUSAL: tl.constexpr):
    """Add the contribution of key block j to dQ of this query block."""
    offs_k = j * BLOCK + offs_n
    kT = tl.load(K + offs_k[None, :] * stride_t + offs_d[:, None])       # [HEAD_DIM, BLOCK]
    vT = tl.load(V + offs_k[None, :] * stride_t + offs_d[:, None])       # [HEAD_DIM, BLOCK]
    if UPCAST:
        kT, vT = kT.to(tl.float32), vT.to(tl.float32)
    p = tl.exp2(tl.dot(q, kT) * qk_scale - lse[:, None])                  # [BLOCK, BLOCK]
    if CAUSAL:
        p = tl.where(offs_m[:, None] >= offs_k[None, :], p, 0.0)
    ds = p * (tl.dot(do, vT) - delta[:, None])                            # [BLOCK, BLOCK]
    return dq + tl.dot(ds.to(kT.dtype), tl.trans(kT))                     # [BLOCK, HEAD_DIM]


@triton.jit
def _dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, IDX, CNT, sm_scale, qk_scale, stride_z, stride_t,
               T, NQ, KMAX, UPCAST: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    i, z = tl.program_id(0), tl.program_id(1)                 # query block, batch*head
    zo = z.to(tl.int64) * stride_z                          # 64-bit: B*H*T*D may pass 2^31
    offs_m = i * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    K, V, IDX = K + zo, V + zo, IDX + (z * NQ + i) * KMAX
    tok = zo + offs_m[:, None] * stride_t + offs_d[None, :]
    q, do = tl.load(Q + tok), tl.load(DO + tok)                           # [BLOCK, HEAD_DIM]
    if UPCAST:
        q, do = q.to(tl.float32), do.to(tl.float32)
    lse, delta = tl.load(LSE + z * T + offs_m), tl.load(DELTA + z * T + offs_m)   # [BLOCK]
    dq = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
    n = tl.load(CNT + z * NQ + i)
    for s in range(0, n - 1):
        dq = _dq_step(dq, q, do, lse, delta, K, V, tl.load(IDX + s), offs_m, offs_n, offs_d,
                      stride_t, qk_scale, UPCAST, BLOCK, False)
    dq = _dq_step(dq, q, do, lse, delta, K, V, tl.load(IDX + n - 1), offs_m, offs_n, offs_d,
                  stride_t, qk_scale, UPCAST, BLOCK, True)
    tl.store(DQ + tok, (dq * sm_scale).to(DQ.dtype.element_ty))


def _transpose_layout(block_idx, block_cnt):
    """For each key block, the ascending list of query blocks that selected it, and their count:
    qidx int32 [B*H, NQ, NQ] (padded with 0), qcnt int32 [B*H, NQ]. Built once per backward."""
    NQ = block_idx.shape[1]
    selT = _selected(block_idx, block_cnt).transpose(1, 2)               # [BH, key j, query i]
    qi = torch.arange(NQ, device=block_idx.device)
    qidx = torch.where(selT, qi, NQ).sort(dim=-1).values                 # selecting blocks first
    qcnt = selT.sum(-1, dtype=torch.int32)
    return qidx.masked_fill(qidx == NQ, 0).to(torch.int32).contiguous(), qcnt


def _launch_cfg(block, head_dim, elem_bytes):
    """num_warps / num_stages that fit H100 shared memory (checked by compiling for sm_90: bf16
    at block 128 x D 128 needs 132 KB of the 227 KB; fp32 above 64 x 128 does not fit)."""
    return dict(num_warps=4 if block * head_dim <= 64 * 128 else 8,
                num_stages=2 if elem_bytes * block * head_dim <= 2 * 128 * 128 else 1)


class _TritonBlockSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_idx, block_cnt, block_size):
        B, H, T, D = q.shape
        NQ = T // block_size
        q, k, v = (x.contiguous() for x in (q, k, v))
        idx = block_idx.reshape(B * H, NQ, -1).to(torch.int32).contiguous()
        cnt = block_cnt.reshape(B * H, NQ).to(torch.int32).contiguous()
        o = torch.empty_like(q)
        lse = torch.empty(B * H, T, device=q.device, dtype=torch.float32)
        sm_scale = D ** -0.5
        _fwd_kernel[(NQ, B * H)](q, k, v, o, lse, idx, cnt, sm_scale * LOG2E,
                                 T * D, D, T, NQ, idx.shape[-1], UPCAST=not q.is_cuda,
                                 BLOCK=block_size, HEAD_DIM=D,
                                 **_launch_cfg(block_size, D, q.element_size()))
        ctx.save_for_backward(q, k, v, o, lse, idx, cnt)
        ctx.block_size = block_size
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, idx, cnt = ctx.saved_tensors
        B, H, T, D = q.shape
        BS, NQ = ctx.block_size, T // ctx.block_size
        do = do.contiguous()
        delta = (o.float() * do.float()).sum(-1).reshape(B * H, T)         # rowsum(o * dO)
        qidx, qcnt = _transpose_layout(idx, cnt)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        sm_scale = D ** -0.5
        common = dict(UPCAST=not q.is_cuda, BLOCK=BS, HEAD_DIM=D,
                      **_launch_cfg(BS, D, q.element_size()))
        _dkdv_kernel[(NQ, B * H)](q, k, v, do, dk, dv, lse, delta, qidx, qcnt, sm_scale,
                                  sm_scale * LOG2E, T * D, D, T, NQ, **common)
        _dq_kernel[(NQ, B * H)](q, k, v, do, dq, lse, delta, idx, cnt, sm_scale,
                                sm_scale * LOG2E, T * D, D, T, NQ, idx.shape[-1],
                                **common)
        return dq, dk, dv, None, None, None


# ------------------------------------------------------------------------------ torch path
def _row_groups(block_idx, block_cnt):
    """Query blocks grouped by the shape of their attention, so that no group needs padding.

    Rows are query blocks flattened over (batch, head, block): r = (b*H + h)*NQ + i. A group holds
    the rows with the same number of off-diagonal blocks n and the same has-diagonal flag d, and
    their key blocks as rows of K viewed as [B*H*NQ, block*D]: `keys` [G, n + d], the diagonal
    (row r itself) last. Returns a list of (rows [G], keys [G, n + d], has_diag)."""
    B, H, NQ, KMAX = block_idx.shape
    idx = block_idx.reshape(-1, KMAX).long()                                # [R, KMAX]
    r = torch.arange(idx.shape[0], device=idx.device)
    slot = torch.arange(KMAX, device=idx.device)
    valid = (slot < block_cnt.reshape(-1, 1).long()) & (idx >= 0)
    has_diag = (valid & (idx == (r % NQ)[:, None])).any(-1)
    n_off = valid.sum(-1) - has_diag.long()     # ascending + causal: off-diagonal blocks first
    kind = n_off * 2 + has_diag.long()
    order = torch.argsort(kind, descending=True, stable=True)
    kinds, sizes = torch.unique_consecutive(kind[order], return_counts=True)
    groups = []
    for rows, kd in zip(order.split(sizes.tolist()), kinds.tolist()):
        n, d = kd // 2, bool(kd % 2)
        keys = idx[rows, :n] + (rows // NQ * NQ)[:, None]                   # same (b, h) only
        keys = torch.cat([keys, rows[:, None]], 1) if d else keys
        if keys.shape[1]:                     # a row with nothing to attend to keeps o = 0
            groups.append((rows, keys, d))
    return groups


def _chunks(groups, block_size, head_dim, chunk_elems, dtype):
    """Split each group into chunks of rows whose gathered keys hold <= chunk_elems elements, each
    with the additive mask it needs: none, or causal inside its last (diagonal) key block."""
    widest = max((keys.shape[1] for _, keys, _ in groups), default=1) * block_size
    device = groups[0][0].device if groups else None
    # query t of a block sees every off-diagonal key and the diagonal keys <= t. Built once for
    # the widest group; a narrower group uses its last columns (tiny ops are slow under load).
    keep = torch.ones(block_size, widest, dtype=torch.bool, device=device).tril(widest - block_size)
    causal = torch.zeros(block_size, widest, dtype=dtype, device=device).masked_fill_(
        ~keep, float("-inf"))
    for rows, keys, diag in groups:
        width = keys.shape[1] * block_size                                  # keys per query row
        step = max(1, chunk_elems // (width * head_dim))
        mask = causal[:, widest - width:] if diag else None
        for c0 in range(0, rows.shape[0], step):
            yield rows[c0:c0 + step], keys[c0:c0 + step], mask


# The fused CPU flash-attention kernels behind F.scaled_dot_product_attention. Called directly
# because the forward returns the log-sum-exp the backward needs, and the backward returns dK/dV
# per gathered key, which we add straight into dK/dV (autograd through the gathers would fill a
# zero K-sized gradient per gather and then sum them).
_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class _TorchBlockSparse(torch.autograd.Function):
    """Each chunk of query blocks gathers its key/value blocks and runs the fused attention kernel
    on them as a batch of small dense problems, [G, 1, block, D] queries against [G, 1, width, D]
    keys: no score tensor in memory, no padding (rows are grouped by width), and one small mask
    [block, width], shared by the batch, for the diagonal block. The gathered K/V are kept for the
    backward (gathering is memory-bound, so doing it twice costs more than the flops); the backward
    rebuilds p from the saved log-sum-exp (FlashAttention-2) and sums dK/dV back into the key
    blocks in index order, so gradients are reproducible."""

    @staticmethod
    def forward(ctx, q, k, v, block_idx, block_cnt, block_size, chunk_elems):
        B, H, T, D = q.shape
        rows_of = lambda x: x.reshape(-1, block_size * D)   # noqa: E731  [B*H*NQ, block*D]
        qf, kf, vf = rows_of(q), rows_of(k), rows_of(v)
        o = torch.zeros_like(qf)
        lse = torch.zeros(qf.shape[0], block_size, device=q.device,   # fp32, or fp64 if given
                          dtype=torch.promote_types(q.dtype, torch.float32))
        ctx.chunks = []
        for rows, keys, mask in _chunks(_row_groups(block_idx, block_cnt), block_size, D,
                                        chunk_elems, q.dtype):
            G, W = keys.shape
            flat = keys.reshape(-1)
            ks, vs = (x.index_select(0, flat).view(G, 1, W * block_size, D) for x in (kf, vf))
            out, lse_c = _flash_fwd(qf.index_select(0, rows).view(G, 1, block_size, D), ks, vs,
                                    is_causal=False, attn_mask=mask)
            o.index_copy_(0, rows, out.reshape(G, -1))
            lse.index_copy_(0, rows, lse_c.reshape(G, -1))
            ctx.chunks.append((rows, flat, ks, vs, mask))
        ctx.save_for_backward(q, o, lse)
        return o.view(B, H, T, D)

    @staticmethod
    def backward(ctx, do):
        q, o, lse = ctx.saved_tensors
        E = o.shape[1]                                                      # block * D
        qf, dof = q.reshape(-1, E), do.contiguous().reshape(-1, E)
        dq, dk, dv = torch.zeros_like(qf), torch.zeros_like(qf), torch.zeros_like(qf)
        for rows, flat, ks, vs, mask in ctx.chunks:
            shape = (rows.shape[0], 1, lse.shape[1], q.shape[-1])          # [G, 1, block, D]
            q_c, do_c, o_c = (x.index_select(0, rows).view(shape) for x in (qf, dof, o))
            dq_c, dk_c, dv_c = _flash_bwd(do_c, q_c, ks, vs, o_c,
                                          lse.index_select(0, rows).view(shape[:3]), 0.0, False,
                                          attn_mask=mask)
            dq.index_copy_(0, rows, dq_c.reshape(-1, E))
            # A key block chosen by several query blocks sums their gradients. F.embedding's
            # backward (the gradient of a row gather) does it in index order, so reproducibly,
            # and on CPU faster than index_add_, which expands the index to every element.
            for grad, part in ((dk, dk_c), (dv, dv_c)):
                grad += torch.ops.aten.embedding_dense_backward(part.reshape(-1, E), flat,
                                                                 qf.shape[0], -1, False)
        return dq.view_as(q), dk.view_as(q), dv.view_as(q), None, None, None, None


def attention_torch(q, k, v, block_idx, block_cnt, block_size, chunk_elems=1 << 25):
    """Block-sparse attention in plain torch: time and memory scale with the budget, not with T^2.

    Query blocks attending to the same number of blocks are batched together; each gathers only
    its selected key/value blocks and runs the fused CPU attention kernel on them (see
    _TorchBlockSparse). Each call of the kernel gets a chunk of <= `chunk_elems` gathered key
    elements; the gathered K/V themselves, 2 * B*H*T*budget*D elements, are kept for the backward,
    as autograd would keep them. This is the CPU training path; differentiable in q, k, v."""
    return _TorchBlockSparse.apply(q.contiguous(), k.contiguous(), v.contiguous(), block_idx,
                                   block_cnt, block_size, chunk_elems)


# ------------------------------------------------------------------------------ dispatch
def block_sparse_attention(q, k, v, block_idx, block_cnt, block_size, impl="auto"):
    """Attention of every query block to its selected key blocks (causal inside the diagonal one).

    q, k, v [B, H, T, D]; block_idx int [B, H, NQ, KMAX] ascending, -1 padded, block_cnt int
    [B, H, NQ], as returned by `select_blocks`. Softmax scale 1/sqrt(D). `impl`: "triton" (CUDA, or
    CPU under TRITON_INTERPRET=1), "torch", "reference", or "auto" (triton on CUDA, else torch).
    Returns o with the shape and dtype of q; differentiable in every impl."""
    B, H, T, D = _check_qkv(q, k, v, block_size)
    NQ = T // block_size
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if (block_idx.dim() != 4 or tuple(block_idx.shape[:3]) != (B, H, NQ)
            or tuple(block_cnt.shape) != (B, H, NQ)):
        raise ValueError(f"block_idx must be [B, H, NQ, KMAX] and block_cnt [B, H, NQ] with "
                         f"NQ=T//block_size={NQ}; got {tuple(block_idx.shape)} and "
                         f"{tuple(block_cnt.shape)} (use select_blocks with the same block_size)")
    if block_idx.dtype.is_floating_point or block_cnt.dtype.is_floating_point:
        raise ValueError("block_idx and block_cnt must be integer tensors (as from select_blocks)")
    if impl == "auto":
        impl = "triton" if q.is_cuda else "torch"
    if impl == "reference":
        return attention_reference(q, k, v, block_idx, block_cnt, block_size)
    if impl == "torch":
        if q.is_cuda:
            raise ValueError("impl='torch' is the CPU path (it runs PyTorch's CPU flash kernel on "
                             "the gathered blocks); on CUDA use impl='triton' or 'auto'")
        return attention_torch(q, k, v, block_idx, block_cnt, block_size)
    if q.is_cuda and q.element_size() * block_size * D > 4 * 64 * 128:
        raise ValueError("fp32 Triton on CUDA fits shared memory only for block_size * head_dim "
                         "<= 8192: use bf16/fp16 (autocast) or a smaller block")
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("impl='triton' needs a CUDA tensor, or TRITON_INTERPRET=1 set before "
                         "triton is imported; on CPU use impl='torch'")
    return _TritonBlockSparse.apply(q, k, v, block_idx, block_cnt, block_size)


def sparse_attention(q, k, v, topk, cu_seqlens=None, block_size=64, impl="auto"):
    """Select blocks with the MoBA gate, then attend: `select_blocks` + `block_sparse_attention`."""
    _check_qkv(q, k, v, block_size)
    block_idx, block_cnt = select_blocks(q, k, topk, cu_seqlens, block_size)
    return block_sparse_attention(q, k, v, block_idx, block_cnt, block_size, impl)


# ------------------------------------------------------------------------------ benchmark, check
def _budget_for_density(nq, density):
    """Smallest budget whose attended block pairs reach `density` of the causal block pairs."""
    pairs = lambda kb: kb * nq - kb * (kb - 1) // 2                         # noqa: E731
    return next(kb for kb in range(1, nq + 1) if pairs(kb) >= density * pairs(nq))


def _timed(fns, reps, cuda):
    """Best-of-`reps` milliseconds of each function, calling them in turn so that they share the
    same machine load (noise on a shared machine only adds time); on CUDA after one warm-up call
    each, which also compiles the kernels."""
    times = [[] for _ in fns]
    for rep in range(reps + cuda):
        for fn, t in zip(fns, times):
            if cuda:
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                t.append(start.elapsed_time(end) if rep else float("inf"))
            else:
                t0 = time.perf_counter()
                fn()
                t.append(1e3 * (time.perf_counter() - t0))
    return [min(t) for t in times]


def _fwd_bwd(attend, q, k, v, g):
    def run():
        for x in (q, k, v):
            x.grad = None
        attend(q, k, v).backward(g)
    return run


def bench(lengths, heads, dim, block, reps):
    """Print fwd and fwd+bwd ms of block-sparse attention at several densities next to dense
    causal SDPA (flash backend on CUDA), timed in turn with each row. CUDA: Triton in bf16; CPU:
    the torch path in fp32. TFLOP/s counts attended (causal) pairs, fwd+bwd = 3.5x fwd."""
    cuda = torch.cuda.is_available()
    dev, dtype, impl = ("cuda", torch.bfloat16, "triton") if cuda else ("cpu", torch.float32,
                                                                         "torch")
    print(f"device={dev} impl={impl} dtype={str(dtype)[6:]} B=1 H={heads} D={dim} block={block}")
    print(f"{'T':>6} {'density':>8} {'budget':>6} {'select ms':>9} {'fwd ms':>9} "
          f"{'fwd+bwd ms':>10} {'SDPA f+b ms':>11} {'speedup':>7}" + (" TFLOP/s" if cuda else ""))

    def sdpa(a, b, c):
        if not cuda:
            return F.scaled_dot_product_attention(a, b, c, is_causal=True)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(a, b, c, is_causal=True)

    for T in lengths:
        nq = T // block
        q, k, v, g = (torch.randn(1, heads, T, dim, device=dev, dtype=dtype) for _ in range(4))
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        for density in (1, 1 / 2, 1 / 4, 1 / 8):
            try:                                             # one failure must not end the table
                kb = _budget_for_density(nq, density)
                idx, cnt = select_blocks(q, k, kb, None, block)

                def attend(a, b, c):
                    return block_sparse_attention(a, b, c, idx, cnt, block, impl)
                with torch.no_grad():
                    sel, fwd = _timed([lambda: select_blocks(q, k, kb, None, block),
                                       lambda: attend(q, k, v)], reps, cuda)
                fb, dense = _timed([_fwd_bwd(attend, q, k, v, g), _fwd_bwd(sdpa, q, k, v, g)],
                                   reps, cuda)
                pairs = int(cnt.sum()) // heads                          # attended block pairs
                tokens = (pairs - nq) * block * block + nq * block * (block + 1) // 2
                flops = 3.5 * 4 * dim * tokens * heads                   # fwd 2 matmuls, bwd 5
                line = (f"{T:>6} {pairs / (nq * (nq + 1) / 2):>8.3f} {kb:>6} {sel:>9.2f} "
                        f"{fwd:>9.2f} {fb:>10.2f} {dense:>11.2f} {dense / fb:>6.2f}x")
                print(line + (f" {flops / fb / 1e9:>7.1f}" if cuda else ""), flush=True)
            except Exception as e:
                print(f"{T:>6} density {density:.3f} failed: {type(e).__name__}: {str(e)[:200]}",
                      flush=True)


def _grads(impl, x, idx, cnt, bs, dtype):
    """Output and dq, dk, dv of one impl, inputs cast to dtype; x = [q, k, v, do]."""
    q, k, v = (t.detach().to(dtype).clone().requires_grad_() for t in x[:3])
    o = block_sparse_attention(q, k, v, idx, cnt, bs, impl)
    o.backward(x[3].to(dtype))
    return [o.detach(), q.grad, k.grad, v.grad]


CHECK_CASES = [  # B, H, T, D, block, cu_seqlens, topk
    (2, 2, 512, 64, 64, [0, 64, 256, 512, 640, 1024], 3),
    (1, 4, 1024, 128, 64, None, 5),
    (1, 2, 1024, 128, 128, [0, 128, 512, 1024], torch.tensor([1, 2, 3])),
    (2, 2, 256, 32, 32, [0, 32, 256, 288, 512], 100),
]


def check(cases=CHECK_CASES, device="cuda"):
    """CUDA: the Triton kernels against the fp32 reference in bf16 and fp16 (outputs and grads,
    errors relative to the reference's max / mean magnitude), and bitwise-equal reruns."""
    tols = {torch.bfloat16: (3e-2, 1e-2), torch.float16: (5e-3, 2e-3)}   # relative max, mean
    failures = 0
    for dtype, (tol_max, tol_mean) in tols.items():
        for B, H, T, D, bs, cu, topk in cases:
            docs = B if cu is None else len(cu) - 1
            name = f"{str(dtype)[6:]:>8} B{B} H{H} T{T} D{D} block{bs} docs={docs}"
            try:
                x = [torch.randn(B, H, T, D, device=device).to(dtype) for _ in range(4)]
                cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=device)
                idx, cnt = select_blocks(x[0], x[1], topk, cu_t, bs)
                got = _grads("triton", x, idx, cnt, bs, dtype)
                want = _grads("reference", x, idx, cnt, bs, torch.float32)
                rerun = _grads("triton", x, idx, cnt, bs, dtype)
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
    ap = argparse.ArgumentParser(description="Block-sparse attention: speed table (--bench, "
                                 "the default) and, on CUDA, Triton correctness in bf16/fp16 "
                                 "(--check).")
    ap.add_argument("--bench", action="store_true", help="print the speed table (default action)")
    ap.add_argument("--check", action="store_true",
                    help="CUDA only: kernels vs reference in bf16/fp16; exit 1 on failure")
    ap.add_argument("--lengths", type=int, nargs="+",
                    help="sequence lengths (default: CPU 2048 8192, CUDA 8192 32768)")
    ap.add_argument("--heads", type=int, help="heads (default: CPU 4, CUDA 16)")
    ap.add_argument("--dim", type=int, help="head dim (default: CPU 64, CUDA 128)")
    ap.add_argument("--block", type=int, default=64, help="block size (default 64)")
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
        bench(args.lengths or ([8192, 32768] if cuda else [2048, 8192]),
              args.heads or (16 if cuda else 4), args.dim or (128 if cuda else 64), args.block,
              args.reps or (10 if cuda else 2))
