"""Dynamic block-sparse attention: a MoBA-style gate, a Triton kernel (forward + backward), a torch twin.

The gate (SparseBalance sec. "sparse attention used", after MoBA). The sequence is cut into blocks
of `block_size` tokens. Query block i scores every earlier key block j of its own document by
    score(i, j) = mean(q of block i) . mean(k of block j)
keeps the top `topk - 1` of them plus its own (diagonal) block, and attends only to those, with the
causal mask applied inside the diagonal block. `topk` is the per-sequence budget that the balancer
(DST) turns up and down at run time; a budget >= the blocks available is plain causal attention.

The layout is data you can print: per query block, the ascending list of selected key blocks and a
count. Two documents of 3 and 2 blocks in one row (cu_seqlens = [0, 192, 320], block 64), topk=2:
    block_idx[b, h] = [[0, -1],      block_cnt[b, h] = [1,
                       [0,  1],                         2,
                       [1,  2],   <- block 2 kept 1 of {0, 1}        2,
                       [3, -1],   <- a new document starts: 3 sees only itself     1,
                       [3,  4]]                         2]
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

Run `python attention.py --bench` for the speed table, `python attention.py --check` (CUDA) for
correctness of the Triton kernels against the reference in bf16 and fp16.
"""
import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from einops import rearrange

IMPLS = ("auto", "triton", "torch", "reference")


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
            raise ValueError(f"topk must be an int or an integer tensor with one budget per sequence "
                             f"({S}); got {topk.dtype} with {topk.numel()} entries")
        budget = topk.reshape(S).to(device=device, dtype=torch.long)
    elif isinstance(topk, int) and not isinstance(topk, bool):
        budget = torch.full((S,), topk, dtype=torch.long, device=device)
    else:
        raise ValueError(f"topk must be an int or a LongTensor [S], got {type(topk).__name__}")
    if S and int(budget.min()) < 1:
        raise ValueError(f"every budget must be >= 1 (the diagonal block), got min {int(budget.min())}")
    return budget


# ------------------------------------------------------------------------------ reference
def attention_reference(q, k, v, block_idx, block_cnt, block_size):
    """Obviously correct twin: expand the block layout to a dense token mask, softmax in fp32."""
    B, H, T, D = q.shape
    NQ = T // block_size
    slot = torch.arange(block_idx.shape[-1], device=q.device)
    keep = (slot < block_cnt[..., None]) & (block_idx >= 0)                 # [B, H, NQ, KMAX]
    blocks = torch.zeros(B, H, NQ, NQ + 1, dtype=torch.bool, device=q.device)
    blocks.scatter_(-1, torch.where(keep, block_idx.long(), NQ), True)      # column NQ = padding
    mask = blocks[..., :NQ].repeat_interleave(block_size, 2).repeat_interleave(block_size, 3)
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
    sequence s (1 where fewer than j+1 blocks exist). Float [S, KMAX_all], non-decreasing, ends at 1.
    DST uses it as the quality floor when it cuts a budget."""
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
    BH, NQ, KMAX = block_idx.shape
    keep = (torch.arange(KMAX, device=block_idx.device) < block_cnt[..., None]) & (block_idx >= 0)
    sel = torch.zeros(BH, NQ, NQ + 1, dtype=torch.bool, device=block_idx.device)
    sel.scatter_(-1, torch.where(keep, block_idx.long(), NQ), True)     # sel[z, i, j]: i uses j
    selT = sel[..., :NQ].transpose(1, 2)                                  # [BH, key j, query i]
    qi = torch.arange(NQ, device=block_idx.device)
    qidx = torch.where(selT, qi, NQ).sort(dim=-1).values                 # selecting blocks first
    return qidx.masked_fill(qidx == NQ, 0).to(torch.int32).contiguous(), selT.sum(-1, dtype=torch.int32)


def _launch_cfg(block, head_dim):
    """num_warps / num_stages sized for H100 shared memory at D=128."""
    return dict(num_warps=4 if block * head_dim <= 64 * 128 else 8, num_stages=2)


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
        _fwd_kernel[(NQ, B * H)](q, k, v, o, lse, idx, cnt, sm_scale * 1.4426950408889634,
                                 T * D, D, T, NQ, idx.shape[-1], UPCAST=not q.is_cuda,
                                 BLOCK=block_size, HEAD_DIM=D, **_launch_cfg(block_size, D))
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
        common = dict(UPCAST=not q.is_cuda, BLOCK=BS, HEAD_DIM=D, **_launch_cfg(BS, D))
        _dkdv_kernel[(NQ, B * H)](q, k, v, do, dk, dv, lse, delta, qidx, qcnt, sm_scale,
                                  sm_scale * 1.4426950408889634, T * D, D, T, NQ, **common)
        _dq_kernel[(NQ, B * H)](q, k, v, do, dq, lse, delta, idx, cnt, sm_scale,
                                sm_scale * 1.4426950408889634, T * D, D, T, NQ, idx.shape[-1],
                                **common)
        return dq, dk, dv, None, None, None


# ------------------------------------------------------------------------------ torch path
def attention_torch(q, k, v, block_idx, block_cnt, block_size, chunk_elems=1 << 25):
    """Block-sparse attention in plain torch: time and memory scale with the budget, not with T^2.

    Each query block gathers only its selected key/value blocks (index_select on K/V viewed as
    [B*H*NQ, block, D]), its diagonal block last, and runs one batched matmul - softmax - matmul.
    Masks stay small: one flag per gathered block (padding) and one [block, block] causal mask
    applied in place to the diagonal slot only. Query blocks run in chunks so the score tensor
    stays under `chunk_elems` elements. Differentiable through autograd (the CPU training path)."""
    B, H, T, D = q.shape
    NQ, bs, BH = T // block_size, block_size, B * H
    idx = block_idx.reshape(BH, NQ, -1).long()
    cnt = block_cnt.reshape(BH, NQ).long()
    i = torch.arange(NQ, device=q.device)
    slot = torch.arange(idx.shape[-1], device=q.device)
    valid = (slot < cnt[..., None]) & (idx >= 0)
    has_diag = (valid & (idx == i[:, None])).any(-1)                       # [BH, NQ]
    n_off = cnt - has_diag.long()       # ascending + causal: off-diagonal blocks come first
    width = int(n_off.max()) + 1 if n_off.numel() else 1                   # + the diagonal slot
    slots = torch.cat([idx[..., :width - 1].clamp(min=0), i.expand(BH, NQ)[..., None]], -1)
    slot_ok = torch.cat([slot[:width - 1] < n_off[..., None], has_diag[..., None]], -1)
    flat = (torch.arange(BH, device=q.device)[:, None, None] * NQ + slots)  # [BH, NQ, width]
    causal = torch.ones(bs, bs, dtype=torch.bool, device=q.device).tril()
    kb = rearrange(k, "b h (n s) d -> (b h n) s d", s=bs)
    vb = rearrange(v, "b h (n s) d -> (b h n) s d", s=bs)
    qb = rearrange(q, "b h (n s) d -> (b h) n s d", s=bs) * D ** -0.5
    step = max(1, chunk_elems // (BH * bs * bs * width))
    outs = []
    for c0 in range(0, NQ, step):
        sel = flat[:, c0:c0 + step].reshape(-1)                             # [BH * C * width]
        ks = rearrange(kb.index_select(0, sel), "(z c w) s d -> z c (w s) d", z=BH, w=width)
        vs = rearrange(vb.index_select(0, sel), "(z c w) s d -> z c (w s) d", z=BH, w=width)
        s = qb[:, c0:c0 + step] @ ks.transpose(-1, -2)                      # [BH, C, bs, width*bs]
        s5 = s.unflatten(-1, (width, bs))                                   # [BH, C, bs, width, bs]
        s5.masked_fill_(~slot_ok[:, c0:c0 + step, None, :, None], float("-inf"))
        s5[..., -1, :].masked_fill_(~causal, float("-inf"))                 # diagonal slot only
        outs.append(torch.softmax(s, dim=-1) @ vs)                          # [BH, C, bs, D]
    o = torch.cat(outs, dim=1)                                              # [BH, NQ, bs, D]
    return rearrange(o, "(b h) n s d -> b h (n s) d", b=B)


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
        return attention_torch(q, k, v, block_idx, block_cnt, block_size)
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("impl='triton' needs a CUDA tensor, or TRITON_INTERPRET=1 set before "
                         "triton is imported; on CPU use impl='torch'")
    return _TritonBlockSparse.apply(q, k, v, block_idx, block_cnt, block_size)


def sparse_attention(q, k, v, topk, cu_seqlens=None, block_size=64, impl="auto"):
    """Select blocks with the MoBA gate, then attend: `select_blocks` + `block_sparse_attention`."""
    _check_qkv(q, k, v, block_size)
    block_idx, block_cnt = select_blocks(q, k, topk, cu_seqlens, block_size)
    return block_sparse_attention(q, k, v, block_idx, block_cnt, block_size, impl)
