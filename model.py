"""A GPT with the N-gram Embedding, an optional mixture of experts, block-sparse attention and
decoding caches.

Reads top to bottom: config, N-gram embedding, attention, MLP/MoE, block,
GPT, decoding cache. The collision and parameter reports are experiments/ngram_report.py.

- N-gram Embedding ("Scaling Embeddings Outperforms Scaling Experts in Language Models", the
  LongCat-Flash-Lite paper, Eq. 3): the token embedding is averaged with K hashed sub-table
  lookups per n-gram order n = 2..N, each projected back to the model width.
- Attention: token-level MoBA from attention.py (each token routes to its best earlier blocks;
  causal by construction), with per-sequence and per-layer budgets, packed documents
  (`cu_seqlens`) and DST's per-layer coverage floor (`k0`, `p`), as SparseBalance trains it.
  Decoding runs the same gate over the KV cache's block-mean keys: generation is as sparse as
  training, and prefill + decode gives the logits of one full forward.
- Optional mixture of experts FFN with top-k softmax routing and a load-balancing loss (the
  paper's baseline grows experts); optional n-gram draft head (the paper proposes it as a nearly
  free drafter).
"""
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, reduce

from attention import block_sparse_attention, budget_per_sequence, decode_attention, select_blocks
from data import EOS


# ------------------------------------------------------------------------------ config
@dataclass
class GPTConfig:
    vocab_size: int = EOS + 1       # 256 byte values + one end-of-document id
    eos_id: int = EOS               # end-of-document id (data.EOS): resets the n-gram look-back
    n_layer: int = 4                # transformer blocks
    n_head: int = 4                 # attention heads; head dim n_embd/n_head: power of two >= 16
    n_embd: int = 256               # model width D
    max_seq_len: int = 1024         # longest training row; default length of a decoding cache
    attn_block: int = 64            # block size of the sparse attention (not the context length!)
    topk: int = 8                   # default attention budget: blocks per token, its own included
    mlp: str = "swiglu"             # FFN activation: "swiglu" | "gelu"
    ffn_hidden: int = 0             # hidden width of the MLP and of each expert; 0 = 4*D (GELU) or
                                    # 8/3*D rounded up to 64 (SwiGLU: about the same parameters)
    n_experts: int = 0              # 0 = dense MLP; else a mixture of this many experts
    expert_topk: int = 2            # experts each token is routed to
    moe_aux_weight: float = 0.01    # weight of the Switch load-balancing loss (mean over layers)
    ngram_n: int = 3                # N: longest n-gram order; 0 or 1 = plain token embedding
    ngram_k: int = 2                # K: hashed sub-tables per order
    ngram_ratio: float = 10.37      # sub-table c has int(ratio * vocab + 2c + 1) rows; keep it away
                                    # from integers and simple fractions (collisions spike there)
    ngram_amp: str = "sqrt_d"       # amplify the embedding output (plain or n-gram): "none" |
                                    # "sqrt_d" (times sqrt(n_embd)) | "layernorm"
    ngram_draft_head: bool = False  # linear head on the embedding output that drafts the next token
    draft_weight: float = 0.1       # weight of the draft head's next-token loss
    rope_base: float = 10000.0      # RoPE frequency base
    coverage_stride: int = 8        # DST's floor averages routing coverage over every n-th token

    def __post_init__(self):
        def need(ok, msg):
            if not ok:
                raise ValueError(f"GPTConfig: {msg}")
        need(self.vocab_size >= 2, f"vocab_size must be >= 2, got {self.vocab_size}")
        need(0 <= self.eos_id < self.vocab_size, f"eos_id={self.eos_id} must be in [0, vocab_size)")
        need(self.n_layer >= 1 and self.n_head >= 1, "n_layer and n_head must be >= 1")
        need(self.n_embd % self.n_head == 0, f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        hd = self.n_embd // self.n_head
        need(hd >= 16 and hd & (hd - 1) == 0, f"head dim n_embd/n_head={hd} must be a power of two "
             ">= 16 (the attention kernels need it): change n_embd or n_head")
        need(self.attn_block >= 16 and self.attn_block & (self.attn_block - 1) == 0,
             f"attn_block={self.attn_block} must be a power of two >= 16")
        need(self.max_seq_len > 0 and self.max_seq_len % self.attn_block == 0,
             f"max_seq_len={self.max_seq_len} must be a positive multiple of attn_block={self.attn_block}")
        need(self.topk >= 1, f"topk={self.topk} must be >= 1 (its own block counts)")
        need(1 <= self.coverage_stride <= self.attn_block and not self.coverage_stride & (self.coverage_stride - 1),
             f"coverage_stride={self.coverage_stride} must be a power of two in [1, attn_block]")
        need(self.mlp in ("swiglu", "gelu"), f"mlp must be 'swiglu' or 'gelu', got {self.mlp!r}")
        need(self.ffn_hidden >= 0, "ffn_hidden must be >= 0 (0 = default width)")
        need(self.n_experts >= 0, "n_experts must be >= 0 (0 = dense MLP)")
        need(self.n_experts == 0 or 1 <= self.expert_topk <= self.n_experts,
             f"expert_topk={self.expert_topk} must be in [1, n_experts={self.n_experts}]")
        need(self.ngram_amp in ("none", "sqrt_d", "layernorm"),
             f"ngram_amp must be 'none', 'sqrt_d' or 'layernorm', got {self.ngram_amp!r}")
        need(min(self.moe_aux_weight, self.draft_weight) >= 0, "loss weights must be >= 0")
        need(self.ngram_n >= 0, f"ngram_n must be >= 0 (0 or 1 = off), got {self.ngram_n}")
        need(self.ngram_k >= 1, f"ngram_k must be >= 1, got {self.ngram_k}")
        if self.n_tables:
            need(self.n_embd % self.n_tables == 0, f"n_embd={self.n_embd} must be divisible by "
                 f"(ngram_n-1)*ngram_k={self.n_tables}: change n_embd, ngram_n or ngram_k")
            need(self.ngram_ratio > 0 and int(self.ngram_ratio * self.vocab_size) >= 1,
                 f"ngram_ratio={self.ngram_ratio} must give at least one row (ngram_ratio * "
                 f"vocab_size >= 1)")
            # each hash term t * (V^j mod M) stays below vocab * M: keep that inside int64
            need(self.vocab_size * max(self.ngram_sizes) < 2**62, "ngram_ratio too large for int64 hashing")

    @property
    def n_tables(self):             # T = (N-1)K sub-tables in all
        return (self.ngram_n - 1) * self.ngram_k if self.ngram_n >= 2 else 0

    @property
    def ngram_sizes(self):          # rows of each sub-table (see ngram_table_sizes)
        return ngram_table_sizes(self.ngram_ratio, self.vocab_size, self.n_tables)

    @property
    def hidden(self):
        if self.ffn_hidden:
            return self.ffn_hidden
        return 4 * self.n_embd if self.mlp == "gelu" else 64 * math.ceil(8 * self.n_embd / 3 / 64)


def ngram_table_sizes(ratio, vocab, n_tables):
    """Rows of sub-table c = 0..n_tables-1: int(ratio * vocab + 2c + 1), exactly as the paper's
    released configuration sizes them (truncated, not rounded: one row fewer whenever the fraction
    of ratio * vocab is at least 0.5). Consecutive tables differ by 2 rows, so the K tables of one order have different
    moduli and an n-gram rarely collides in all of them."""
    return [int(ratio * vocab + 2 * c + 1) for c in range(n_tables)]


# ------------------------------------------------------------------------------ n-gram embedding
def doc_positions(cu_seqlens, B, T):
    """Position of every token inside its packed document: [B, T] long (0 at each document start)."""
    cu = torch.as_tensor(cu_seqlens).to(torch.long)
    flat = torch.arange(B * T, device=cu.device)
    return (flat - cu[torch.searchsorted(cu, flat, right=True) - 1]).view(B, T)


def ngram_windows(idx, n, eos_id, context=None, doc_start=None):
    """The look-back windows t_i, t_{i-1}, ..., t_{i-n+1} of every position: [B, T, n] long.

    Missing predecessors count as token 0: before the start of the sequence (context = the n-1 ids
    before idx, 0 where there are none) and at or before the most recent barrier strictly before i.
    A barrier is an `eos_id` token (so the EOS itself still sees its own document) or the last token
    before a packed document start (`doc_start` [B, T] bool), so n-grams never cross documents."""
    B, T = idx.shape
    C = n - 1
    if context is None:
        context = idx.new_zeros(B, C)
    if tuple(context.shape) != (B, C):
        raise ValueError(f"context must be [B, N-1] = [{B}, {C}] (0 before the start), got {tuple(context.shape)}")
    x = torch.cat([context.to(idx), idx], dim=1)                       # (B, C+T)
    barrier = x == eos_id
    if doc_start is not None:
        barrier[:, C - 1:C + T - 1] |= doc_start                       # token before a document start
    ar = torch.arange(C + T, device=idx.device)
    last = torch.where(barrier, ar, -1).cummax(dim=1).values           # latest barrier at or before q
    a = ar[C:]                                                         # positions of idx inside x
    src = a[:, None] - torch.arange(n, device=idx.device)              # (T, n): i, i-1, ..., i-n+1
    keep = src > last[:, a - 1, None] if C else torch.ones_like(src, dtype=torch.bool)
    return torch.where(keep, x[:, src], 0)                             # (B, T, n)


def ngram_powers(vocab, sizes, orders, n_max):
    """V^j mod V_c for the look-back j < order of table c (0 beyond it): LongTensor [tables, n_max]."""
    return torch.tensor([[pow(vocab, j, M) if j < n else 0 for j in range(n_max)]
                         for M, n in zip(sizes, orders)])


def ngram_hash(windows, powers, sizes):
    """The paper's polynomial hash h_c = (t_i + t_{i-1} V + t_{i-2} V^2 + ...) mod V_c of look-back
    windows [..., N] (t_i first, as ngram_windows gives them) for every table c: [..., tables].
    Each term is reduced first, so nothing overflows int64 (V^j is pre-reduced in `powers`)."""
    terms = (windows[..., None, :] * powers) % sizes[:, None]          # (..., tables, N), each < V_c
    return terms.sum(-1) % sizes


class NgramEmbedding(nn.Module):
    """Paper Eq. 3: e_i = (E0[t_i] + sum_{n,k} W_{n,k} E_{n,k}[h_{n,k}(t_{i-n+1..i})]) / (T+1).

    Sub-table c = 0..T-1 (T = (N-1)K) has m + 2c + 1 rows of width D/T; order n uses the tables
    c = (n-2)K .. (n-2)K + K-1, so the K tables of one order differ only in their modulus. The hash
    is the polynomial h = (t_i + t_{i-1} V + t_{i-2} V^2 + ...) mod V_c with V^j pre-reduced modulo
    V_c. All sub-tables live in one nn.Embedding (rows offset per table), and the T bias-free maps
    W_c: D/T -> D, summed, are exactly one D x D linear map of the concatenated lookups. The mean is
    then amplified (`ngram_amp`), because the first attention output otherwise grows ~10x larger
    than the embedding and drowns it (the paper's -0.02 loss)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        V, D, T = config.vocab_size, config.n_embd, config.n_tables
        self.wte = nn.Embedding(V, D)                                  # E0
        if T:
            sizes = config.ngram_sizes
            orders = [2 + c // config.ngram_k for c in range(T)]
            powers = ngram_powers(V, sizes, orders, config.ngram_n)
            self.register_buffer("sizes", torch.tensor(sizes), persistent=False)     # (T,)
            self.register_buffer("powers", powers, persistent=False)                 # (T, N)
            self.register_buffer("offsets", torch.tensor([0] + sizes[:-1]).cumsum(0), persistent=False)
            self.tables = nn.Embedding(sum(sizes), D // T)             # all E_{n,k}, stacked
            self.proj = nn.Linear(D, D, bias=False)                    # all W_{n,k}, side by side
        self.norm = nn.LayerNorm(D) if config.ngram_amp == "layernorm" else None

    def hash_ids(self, idx, context=None, cu_seqlens=None):
        """Sub-table row of every position and table: LongTensor [B, T, (N-1)K], entry c in [0, V_c).

        context: [B, N-1] ids preceding idx (0 before the start), for incremental decoding.
        cu_seqlens: packed documents (n-grams never cross a document start)."""
        B, T = idx.shape
        if not self.config.n_tables:
            return idx.new_zeros(B, T, 0)
        start = None if cu_seqlens is None else doc_positions(cu_seqlens, B, T).to(idx.device) == 0
        w = ngram_windows(idx, self.config.ngram_n, self.config.eos_id, context, start)  # (B, T, N)
        return ngram_hash(w, self.powers, self.sizes)                   # (B, T, Tab)

    def forward(self, idx, context=None, ids=None, cu_seqlens=None):
        """idx [B, T] -> embeddings [B, T, D]; `ids`: precomputed `hash_ids` (skips the hashing)."""
        x = self.wte(idx)                                               # (B, T, D)
        if self.config.n_tables:
            if ids is None:
                ids = self.hash_ids(idx, context, cu_seqlens)
            sub = self.tables(ids + self.offsets)                       # (B, T, Tab, D/Tab)
            x = x + self.proj(rearrange(sub, "b t c d -> b t (c d)"))
        x = x / (1 + self.config.n_tables)
        if self.config.ngram_amp == "sqrt_d":
            return x * math.sqrt(self.config.n_embd)
        return self.norm(x) if self.norm is not None else x


# ------------------------------------------------------------------------------ attention
def rope(pos, head_dim, base):
    """cos, sin of rotary embeddings for positions pos [T] or [B, T]: [..., 1, T, head_dim/2]."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    freqs = pos.float()[..., None] * inv_freq                          # (..., T, hd/2)
    return freqs.cos().unsqueeze(-3), freqs.sin().unsqueeze(-3)


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


def causal_sparse_attention(q, k, v, topk, cu_seqlens, block, k0=None, p=None, stride=1):
    """Token-level MoBA for any T: pads q, k, v with zeros at the end up to a block multiple (the
    gate is causal, so no real token sees the padding). -> (y [B, H, T, hd], budgets used [S]).
    A budget that covers every block of every row (no packed documents, no p) is plain causal
    attention: SDPA runs it, without the gate (on CPU the pair path is 5x slower at density 1)."""
    T = q.size(2)
    pad = -T % block
    if cu_seqlens is None and p is None:
        budget = budget_per_sequence(topk, q.size(0), q.device)
        if q.size(0) and int(budget.min()) >= (T + pad) // block:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True), budget
    if pad and cu_seqlens is not None:
        raise ValueError(f"with cu_seqlens, T={T} must be a multiple of attn_block={block}")
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    sel = select_blocks(q, k, topk, cu_seqlens, block, k0=k0, p=p, coverage_stride=stride)
    y = block_sparse_attention(q, k, v, sel.block_idx, sel.block_cnt, block, validate=False)
    return y[:, :, :T], sel.budget


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.used_budget = None                                        # [S], after a forward

    def forward(self, x, cos, sin, topk, cu_seqlens=None, cache=None, layer=0, k0=None, p=None):
        """Training and prefill (no cache, or cache.pos == 0): token-level MoBA with budget `topk`
        (raised to this layer's coverage floor when `p` is set). Decoding steps (cache.pos > 0):
        the same gate over the cache's block-mean keys (`attention.decode_attention`)."""
        qkv = self.c_attn(x)
        q, k, v = rearrange(qkv, "b t (three h d) -> three b h t d", three=3, h=self.config.n_head)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)        # (B, H, T, hd)
        p0 = 0 if cache is None else cache.pos
        if cache is not None:
            cache.write(layer, k, v)
        if p0 > 0:                                                     # decoding step
            L = p0 + x.size(1)
            y = decode_attention(q, cache.k[layer][:, :, :L].to(q.dtype),
                                 cache.v[layer][:, :, :L].to(q.dtype), cache.k_mean[layer],
                                 p0, topk, self.config.attn_block)
            self.used_budget = topk
        else:
            y, self.used_budget = causal_sparse_attention(q, k, v, topk, cu_seqlens,
                                                          self.config.attn_block, k0, p,
                                                          self.config.coverage_stride)
        return self.c_proj(rearrange(y, "b h t d -> b t (h d)"))


# ------------------------------------------------------------------------------ MLP / MoE
class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        h = config.hidden
        self.swiglu = config.mlp == "swiglu"
        self.w_in = nn.Linear(config.n_embd, 2 * h if self.swiglu else h, bias=False)
        self.c_proj = nn.Linear(h, config.n_embd, bias=False)

    def forward(self, x):
        h = self.w_in(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return self.c_proj(F.silu(gate) * up)
        return self.c_proj(F.gelu(h))


class MoE(nn.Module):
    """Mixture of `n_experts` MLPs; each token goes to its top-`expert_topk` experts by router
    softmax, weighted by the renormalised probabilities. The load-balancing auxiliary loss
    E * sum_e f_e P_e (f_e: share of routed slots, P_e: mean router probability) is 1 when balanced
    and is left in `self.aux_loss`. Experts run one after another: clear, not fast; in eval mode
    those without tokens are skipped (what decoding at batch 1 gains from sparsity)."""

    def __init__(self, config):
        super().__init__()
        self.k = config.expert_topk
        self.router = nn.Linear(config.n_embd, config.n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(config) for _ in range(config.n_experts))
        self.aux_loss = None
        self.experts_used = 0                                          # after a forward

    def route(self, x):
        """x (N, D) -> weights (N, k) summing to 1, experts (N, k) distinct, aux loss (scalar)."""
        probs = self.router(x).float().softmax(dim=-1)                 # (N, E)
        weights, experts = probs.topk(self.k, dim=-1)                  # (N, k)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        f = reduce(F.one_hot(experts, len(self.experts)).float(), "n k e -> e", "mean")  # sums to 1
        aux = len(self.experts) * (f * probs.mean(dim=0)).sum()
        return weights, experts, aux

    def forward(self, x):
        B = x.size(0)
        x = rearrange(x, "b t d -> (b t) d")
        weights, experts, self.aux_loss = self.route(x)
        out = torch.zeros_like(x)
        self.experts_used = 0                       # distinct experts this forward read (decoding
        for e, expert in enumerate(self.experts):   # cost: each one's weights are loaded)
            tok, slot = torch.where(experts == e)
            if len(tok) == 0 and not self.training:  # in training an expert without tokens still
                continue                             # runs (on zero rows): DDP needs every gradient
            self.experts_used += len(tok) > 0
            out.index_add_(0, tok, (weights[tok, slot, None] * expert(x[tok])).to(out.dtype))
        return rearrange(out, "(b t) d -> b t d", b=B)


# ------------------------------------------------------------------------------ block
class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm1 = nn.RMSNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.norm2 = nn.RMSNorm(config.n_embd)
        self.ffn = MoE(config) if config.n_experts else MLP(config)

    def forward(self, x, cos, sin, topk, cu_seqlens=None, cache=None, layer=0, k0=None, p=None):
        x = x + self.attn(self.norm1(x), cos, sin, topk, cu_seqlens, cache, layer, k0, p)
        return x + self.ffn(self.norm2(x))


# ------------------------------------------------------------------------------ GPT
class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed = NgramEmbedding(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = nn.RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # untied from E0
        self.draft_head = nn.Linear(config.n_embd, config.vocab_size, bias=False) if config.ngram_draft_head else None
        for name, p in self.named_parameters():  # GPT-2 init: std 0.02, residual outputs / sqrt(2L)
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, std=std)
        if config.n_tables:   # each W_c keeps its lookup's scale, so every term of Eq. 3 starts like E0
            nn.init.normal_(self.embed.proj.weight, std=(config.n_embd // config.n_tables) ** -0.5)
        self.last_losses = {}
        self.used_budgets = None

    def num_params(self, active=False):
        """Total parameters, or those one token's LM logits use (active=True): one row of E0 and of
        each sub-table, `expert_topk` of `n_experts` experts, no draft head."""
        n = sum(p.numel() for p in self.parameters())
        if not active:
            return n
        cfg = self.config
        n -= self.embed.wte.weight.numel() - cfg.n_embd
        if cfg.n_tables:
            n -= self.embed.tables.weight.numel() - cfg.n_embd         # T rows of width D/T
        if self.draft_head is not None:
            n -= self.draft_head.weight.numel()
        if cfg.n_experts:
            per_expert = sum(p.numel() for p in self.blocks[0].ffn.experts[0].parameters())
            n -= cfg.n_layer * (cfg.n_experts - cfg.expert_topk) * per_expert
        return n

    def param_groups(self, weight_decay):
        """AdamW groups: decay on matrices; none on norms, biases, E0 and the n-gram tables."""
        tables = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        decay = [p for p in self.parameters() if p.dim() >= 2 and id(p) not in tables]
        rest = [p for p in self.parameters() if p.dim() < 2 or id(p) in tables]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]

    def forward(self, idx, targets=None, cu_seqlens=None, topk=None, cache=None, loss_mask=None,
                ngram_ids=None, k0=None, p=None):
        """idx [B, T] -> (logits [B, T, V], loss or None).

        topk: None (config.topk), int, LongTensor [S] (one budget per sequence) or [n_layer, S].
        k0, p: DST's in-layer half: every layer raises each budget to its own coverage floor, the
        smallest k with C(k) >= (1 - p) C(k0). `self.used_budgets` [n_layer, S] holds the budgets
        each layer used, after every forward.
        cache: decode with a `KVCache`: idx holds positions cache.pos .. cache.pos+T-1 (see KVCache).
        ngram_ids: precomputed `embed.hash_ids` output, reused by speculative decoding.
        loss = LM cross-entropy over counted tokens (targets != -1 and loss_mask) + moe_aux_weight *
        mean MoE aux loss + draft_weight * draft-head loss; the parts are in `self.last_losses`."""
        cfg = self.config
        if idx.dim() != 2:
            raise ValueError(f"idx must be [B, T] token ids, got shape {tuple(idx.shape)}")
        B, T = idx.shape
        if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise ValueError(f"idx must hold integer token ids, got dtype {idx.dtype}")
        if idx.numel():   # out-of-range ids would index garbage rows (CPU) or fault (CUDA) later
            lo, hi = torch.stack(torch.aminmax(idx)).tolist()          # one sync for both
            if lo < 0 or hi >= cfg.vocab_size:
                raise ValueError(f"idx holds ids in [{lo}, {hi}]; token ids must lie in "
                                 f"[0, vocab_size={cfg.vocab_size}): check the tokenizer or vocab_size")
        context = None
        if cache is not None:
            if cu_seqlens is not None:
                raise ValueError("decoding with a cache takes one sequence per row: pass cu_seqlens=None")
            if p is not None:
                raise ValueError("p (DST's coverage floor) is for training forwards; decoding "
                                 "with a cache uses fixed budgets: pass topk only")
            if cache.pos + T > cache.max_len:
                raise ValueError(f"cache holds {cache.max_len} positions; pos {cache.pos} + {T} new "
                                 "tokens overflow it: create it with a larger max_len")
            if cfg.n_tables and ngram_ids is None:                     # precomputed ids need none
                context = cache.context(cfg.ngram_n - 1)
            cache.tokens[:, cache.pos:cache.pos + T] = idx
            pos = torch.arange(cache.pos, cache.pos + T, device=idx.device)   # absolute positions
        elif cu_seqlens is not None:
            pos = doc_positions(cu_seqlens, B, T).to(idx.device)       # restart at each document
        else:
            pos = torch.arange(T, device=idx.device)
        topk = cfg.topk if topk is None else topk
        if torch.is_tensor(topk) and topk.dim() == 2:
            if topk.size(0) != cfg.n_layer:
                raise ValueError(f"per-layer topk must be [n_layer={cfg.n_layer}, S], got {tuple(topk.shape)}")
            budgets = list(topk)
        else:
            budgets = [topk] * cfg.n_layer

        x0 = self.embed(idx, context=context, ids=ngram_ids, cu_seqlens=cu_seqlens)   # (B, T, D)
        cos, sin = rope(pos, cfg.n_embd // cfg.n_head, cfg.rope_base)
        x = x0
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, budgets[layer], cu_seqlens, cache, layer, k0, p)
        S = B if cu_seqlens is None else len(cu_seqlens) - 1
        self.used_budgets = torch.stack([torch.as_tensor(b.attn.used_budget, device=idx.device)
                                         .expand(S) for b in self.blocks])   # [n_layer, S]
        logits = self.lm_head(self.norm_f(x))                          # (B, T, V)
        if cache is not None:
            cache.pos += T
        if targets is None:
            return logits, None

        lm = self._cross_entropy(logits, targets, loss_mask)
        zero = lm.new_zeros(())
        aux = [b.ffn.aux_loss for b in self.blocks if isinstance(b.ffn, MoE)]
        moe_aux = torch.stack(aux).mean() if aux else zero
        draft = self._cross_entropy(self.draft_head(x0), targets, loss_mask) if self.draft_head else zero
        self.last_losses = {"lm": lm.detach(), "moe_aux": moe_aux.detach(), "draft": draft.detach()}
        return logits, lm + cfg.moe_aux_weight * moe_aux + cfg.draft_weight * draft

    @staticmethod
    def _cross_entropy(logits, targets, loss_mask):
        ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1, reduction="none")
        w = (targets.flatten() != -1).float()
        if loss_mask is not None:
            w = w * loss_mask.flatten().float()
        return (ce * w).sum() / w.sum().clamp(min=1)

    def draft_logits(self, idx, context=None, ids=None):
        """Next-token logits [B, T, V] from the n-gram embedding alone (one lookup, one matmul):
        the paper's proposed ultra-fast drafter. Trained by the `draft_weight` auxiliary loss; it
        also shapes the tables (Adam makes the head itself learn at full speed at any weight)."""
        if self.draft_head is None:
            raise ValueError("this model has no draft head: build it with ngram_draft_head=True")
        return self.draft_head(self.embed(idx, context=context, ids=ids))

    def new_cache(self, batch_size, max_len=None, device=None, dtype=None):
        """A `KVCache` for batch_size rows of up to max_len positions (default config.max_seq_len).
        max_len need not be a multiple of attn_block: a token only scores the complete blocks
        before its own, so the last, partial block never needs a mean."""
        p = self.lm_head.weight
        cfg = self.config
        max_len = cfg.max_seq_len if max_len is None else max_len
        for name, v in (("batch_size", batch_size), ("max_len", max_len)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"new_cache: {name}={v!r} must be an int >= 1")
        return KVCache(cfg.n_layer, batch_size, cfg.n_head, cfg.n_embd // cfg.n_head,
                       max_len, device or p.device, dtype or p.dtype, cfg.attn_block)

    @classmethod
    def from_checkpoint(cls, path, map_location="cpu"):
        """Load {"model": state_dict, "config": asdict(config), ...} as written by train.py.
        weights_only=True: tensors and plain values only, so a crafted file cannot run code (an
        explicit True also overrides TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD). Any other file is a
        ValueError naming it."""
        if not os.path.exists(path):
            raise FileNotFoundError(f"no checkpoint at {path}: train one with train.py or fix the path")
        fix = "pass a checkpoint written by train.py"
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # empty, truncated, random bytes, or objects a safe load refuses
            raise ValueError(f"{path}: not a loadable checkpoint (empty, truncated, corrupt, or holding "
                             f"objects a weights-only load refuses: {type(e).__name__}): {fix}") from None
        if not (isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) and isinstance(ckpt.get("config"), dict)):
            raise ValueError(f"{path}: no 'model' and 'config' entries (a bare state_dict?): {fix}")
        try:
            model = cls(GPTConfig(**ckpt["config"]))
            state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in ckpt["model"].items()}
            model.load_state_dict(state)
        except (TypeError, ValueError, RuntimeError) as e:  # unknown field, bad value, weights != config
            raise ValueError(f"{path}: its config and weights do not make a GPT "
                             f"({' '.join(str(e).split())[:240]}): {fix}") from None
        return model.to(map_location) if isinstance(map_location, (str, torch.device)) else model


# ------------------------------------------------------------------------------ decoding cache
class KVCache:
    """Position-indexed decoding cache (a write position, no per-step reallocation) with the n-gram context and block means.

    k[l], v[l]: [B, H, max_len, hd] per layer; k_mean[l]: [B, H, max_len // block, hd], the mean
    key of every complete block (what the MoBA gate scores), recomputed whenever a write reaches a
    block's last position; tokens: [B, max_len] ids written so far (the n-gram context of the next
    token is tokens[:, pos-(N-1):pos], 0 before the start); pos: positions filled, equal for all
    rows. Rolling back rejected draft tokens is `cache.pos = n`: later writes overwrite them, and a
    block's mean is only read once the block is complete again, so it is rewritten first."""

    def __init__(self, n_layer, batch_size, n_head, head_dim, max_len, device, dtype, block=64):
        shape = (batch_size, n_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        mshape = (batch_size, n_head, max_len // block, head_dim)
        self.k_mean = [torch.zeros(mshape, device=device, dtype=torch.float32) for _ in range(n_layer)]
        self.tokens = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.max_len, self.block = max_len, block
        self.pos = 0

    def write(self, layer, k, v):
        """Store k, v [B, H, n, hd] at positions pos .. pos+n-1 and refresh the means of the
        blocks this write completes."""
        p, n, bs = self.pos, k.size(2), self.block
        self.k[layer][:, :, p:p + n] = k
        self.v[layer][:, :, p:p + n] = v
        done = range(p // bs, min((p + n) // bs, self.k_mean[layer].size(2)))   # complete now
        if len(done):
            keys = self.k[layer][:, :, done.start * bs:done.stop * bs].float()
            self.k_mean[layer][:, :, done.start:done.stop] = keys.unflatten(2, (len(done), bs)).mean(3)

    @property
    def pos(self):
        return self._pos

    @pos.setter
    def pos(self, n):
        if not 0 <= n <= self.max_len:
            raise ValueError(f"cache.pos={n} must be in [0, max_len={self.max_len}]")
        self._pos = int(n)

    def context(self, n):
        """The n ids before pos per row: [B, n], left-padded with 0 before the start."""
        ctx = self.tokens[:, max(0, self.pos - n):self.pos]
        return F.pad(ctx, (n - ctx.size(1), 0))
