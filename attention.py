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


# ------------------------------------------------------------------------------ torch path
def attention_torch(q, k, v, block_idx, block_cnt, block_size, chunk_elems=1 << 25):
    """Block-sparse attention in plain torch: time and memory scale with the budget, not with T^2.

    Each query block gathers only its selected off-diagonal key/value blocks (index_select on K/V
    viewed as [B*H*NQ, block, D]) and needs no mask inside them; its diagonal block is a separate
    small matmul with a fixed causal mask. Query blocks are processed in chunks so the score tensor
    stays under `chunk_elems` elements. Differentiable through autograd (the CPU training path)."""
    B, H, T, D = q.shape
    NQ, bs, BH = T // block_size, block_size, B * H
    idx = block_idx.reshape(BH, NQ, -1).long()
    cnt = block_cnt.reshape(BH, NQ).long()
    i = torch.arange(NQ, device=q.device)
    slot = torch.arange(idx.shape[-1], device=q.device)
    valid = (slot < cnt[..., None]) & (idx >= 0)
    has_diag = (valid & (idx == i[:, None])).any(-1)                       # [BH, NQ]
    # ascending + causal layout: the off-diagonal blocks are the first cnt - has_diag slots
    n_off = cnt - has_diag.long()
    width = int(n_off.max()) if n_off.numel() else 0
    off_ok = slot[:width] < n_off[..., None]                                # [BH, NQ, width]
    qb = rearrange(q, "b h (n s) d -> (b h) n s d", s=bs)
    kb = rearrange(k, "b h (n s) d -> (b h) n s d", s=bs)
    vb = rearrange(v, "b h (n s) d -> (b h) n s d", s=bs)
    causal = torch.ones(bs, bs, dtype=torch.bool, device=q.device).tril()
    neg = torch.tensor(float("-inf"), device=q.device, dtype=q.dtype)
    scale = D ** -0.5
    step = max(1, chunk_elems // max(1, BH * bs * bs * (width + 1)))
    outs = []
    for c0 in range(0, NQ, step):
        c1 = min(NQ, c0 + step)
        qc = qb[:, c0:c1] * scale                                           # [BH, C, bs, D]
        s_diag = qc @ kb[:, c0:c1].transpose(-1, -2)                        # [BH, C, bs, bs]
        s_diag = s_diag.masked_fill(~(causal & has_diag[:, c0:c1, None, None]), neg)
        if width == 0:
            p = torch.softmax(s_diag, dim=-1)
            outs.append(p @ vb[:, c0:c1])
            continue
        rows = torch.arange(BH, device=q.device)[:, None, None] * NQ
        flat = (rows + idx[:, c0:c1, :width].clamp(min=0)).reshape(-1)     # [BH * C * width]
        ks = kb.reshape(BH * NQ, bs, D).index_select(0, flat)
        vs = vb.reshape(BH * NQ, bs, D).index_select(0, flat)
        ks = rearrange(ks, "(z c w) s d -> z c (w s) d", z=BH, w=width)    # [BH, C, width*bs, D]
        vs = rearrange(vs, "(z c w) s d -> z c (w s) d", z=BH, w=width)
        s_off = qc @ ks.transpose(-1, -2)                                   # [BH, C, bs, width*bs]
        bias = torch.where(off_ok[:, c0:c1], 0.0, float("-inf")).to(q.dtype)
        s_off = (s_off.unflatten(-1, (width, bs)) + bias[:, :, None, :, None]).flatten(-2)
        p = torch.softmax(torch.cat([s_off, s_diag], dim=-1), dim=-1)      # one softmax over both
        outs.append(p[..., :width * bs] @ vs + p[..., width * bs:] @ vb[:, c0:c1])
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
