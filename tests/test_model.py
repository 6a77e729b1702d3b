"""Tests for model.py: the n-gram hash against a brute-force evaluation of the paper's formula,
decoding against the full forward, sparse against dense attention, the MoE router, parameter
counts, config validation and a few training steps."""
import math

import pytest
import torch
import torch.nn.functional as F

import model as M
from model import GPT, GPTConfig, NgramEmbedding

TINY = dict(n_layer=2, n_head=2, n_embd=32, max_seq_len=64, attn_block=16, topk=2)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**TINY, **kw})).eval()


# ------------------------------------------------------------------------------ n-gram hash
def brute_ids(idx, N, K, ratio, V, eos, context=None, cu=None):
    """Eq. 3's hash per position with Python integers: walk back from t_i, stop at a barrier (an
    EOS or a document start), pad with 0, h = sum_j t_{i-j} V^j mod size (no pre-reduction)."""
    B, T = idx.shape
    sizes = [int(ratio * V + 2 * c + 1) for c in range((N - 1) * K)]   # LongCat's public code
    starts = set() if cu is None else {int(c) for c in cu}
    out = torch.zeros(B, T, len(sizes), dtype=torch.long)
    for b in range(B):
        ctx = [0] * (N - 1) if context is None else context[b].tolist()
        seq = ctx + idx[b].tolist()
        for i in range(T):
            a = N - 1 + i
            win = [seq[a]]
            for j in range(1, N):                       # predecessor i-j valid if nothing between
                q = a - j                               # it and i is a barrier
                if seq[q] == eos or (b * T + i - j + 1) in starts:
                    break
                win.append(seq[q])
            win += [0] * (N - len(win))
            for c, size in enumerate(sizes):
                n = 2 + c // K
                out[b, i, c] = sum(win[j] * V ** j for j in range(n)) % size
    return out


HASH_CASES = [  # N, K, ratio, vocab, n_embd, n_head
    (2, 1, 1.3, 7, 32, 2), (3, 2, 10.37, 7, 32, 2), (4, 3, 2.5, 11, 144, 9),
    (5, 2, 10.37, 257, 32, 2), (8, 1, 3.37, 257, 112, 7),   # 257^8 > 2^63: powers pre-reduced
]


@pytest.mark.parametrize("N,K,ratio,V,D,H", HASH_CASES)
def test_hash_ids_match_brute_force(N, K, ratio, V, D, H):
    cfg = GPTConfig(vocab_size=V, eos_id=V - 1, n_embd=D, n_head=H, ngram_n=N, ngram_k=K, ngram_ratio=ratio)
    emb = NgramEmbedding(cfg)
    g = torch.Generator().manual_seed(N * 10 + K)
    idx = torch.randint(0, V, (3, 21), generator=g)
    idx[0, 5] = idx[0, 6] = idx[1, 0] = idx[2, 20] = V - 1          # EOS runs, at start, at end
    ctx = torch.randint(0, V, (3, N - 1), generator=g)
    ctx[1, -1] = V - 1                                               # EOS just before idx
    assert torch.equal(emb.hash_ids(idx), brute_ids(idx, N, K, ratio, V, V - 1))
    assert torch.equal(emb.hash_ids(idx, ctx), brute_ids(idx, N, K, ratio, V, V - 1, context=ctx))
    cu = torch.tensor([0, 7, 21, 30, 42, 63], dtype=torch.int32)    # packed documents
    assert torch.equal(emb.hash_ids(idx, cu_seqlens=cu), brute_ids(idx, N, K, ratio, V, V - 1, cu=cu))
    sizes = torch.tensor(cfg.ngram_sizes)
    assert (emb.hash_ids(idx) < sizes).all()


def test_table_sizes_truncate_like_the_official_code():
    """LongCat sizes sub-table c as int(ratio * V + 2c + 1): 10.37 * 257 = 2665.09, and
    10.4 * 257 = 2672.8, whose fraction is >= 0.5: rounding would give one row more."""
    assert GPTConfig(ngram_n=3, ngram_k=2, ngram_ratio=10.37).ngram_sizes == [2666, 2668, 2670, 2672]
    assert GPTConfig(ngram_n=3, ngram_k=2, ngram_ratio=10.4).ngram_sizes == [2673, 2675, 2677, 2679]
    assert GPTConfig(ngram_n=2, ngram_k=1, ngram_ratio=2.9, vocab_size=7, eos_id=6,
                     n_embd=32, n_head=2).ngram_sizes == [21]           # 20.3 + 1 -> 21


# Golden ids, worked out with Python integers and written out: N=3, K=2, ratio 10.4, V=257, so the
# sizes are 2673, 2675 (2-gram tables) and 2677, 2679 (3-gram tables). The 2-gram (a, b), b the
# current token, hashes to (b + 257 a) mod size; the 3-gram (z, a, b) to (b + 257 a + 66049 z) mod
# size; a missing predecessor (start, or at/before an earlier EOS) is 0.
GOLDEN = [
    # idx, context, ids[position][table]
    ([[0, 0, 0]], None, [[0, 0, 0, 0]] * 3),                            # token 0 = a missing one
    ([[255, 255, 255]], None,                                           # the largest byte:
     [[255, 255, 255, 255], [1638, 1590, 1542, 1494],                   # 65790 mod size
      [1638, 1590, 353, 1116]]),                                        # 16908285 mod size
    ([[256, 97, 98]], None,                                             # EOS first: a fresh start
     [[256, 256, 256, 256], [97, 97, 97, 97], [970, 952, 934, 916]]),   # 25027 mod size
    ([[97, 256, 98]], None,                                             # EOS in the middle sees its
     [[97, 97, 97, 97], [1128, 1110, 1092, 1074], [98, 98, 98, 98]]),   # document, the next not
    ([[97, 98, 256]], None,                                             # EOS last: 25442 (2-gram),
     [[97, 97, 97, 97], [970, 952, 934, 916], [1385, 1367, 2041, 2595]]),   # 6432195 (3-gram)
    ([[99]], [[97, 98]],                                                # decoding, context = last
     [[1228, 1210, 1884, 2438]]),                                       # N-1 ids: 25285, 6432038
    ([[99]], [[256, 98]],                                               # an EOS in the context
     [[1228, 1210, 1192, 1174]]),
]


@pytest.mark.parametrize("idx,context,want", GOLDEN)
def test_hash_ids_golden_cases(idx, context, want):
    emb = NgramEmbedding(GPTConfig(ngram_n=3, ngram_k=2, ngram_ratio=10.4))
    ctx = None if context is None else torch.tensor(context)
    assert emb.hash_ids(torch.tensor(idx), ctx)[0].tolist() == want


def test_eos_resets_lookback_and_context_continues_the_sequence():
    cfg = GPTConfig(**TINY, ngram_n=5, ngram_k=2)
    emb = NgramEmbedding(cfg)
    doc = torch.tensor([[72, 105, 33, 10, 256, 97, 98, 99, 100, 101]])
    other = doc.clone()
    other[0, :4] = torch.tensor([1, 2, 3, 4])                        # another document before EOS
    ids, ids_other = emb.hash_ids(doc), emb.hash_ids(other)
    assert torch.equal(ids[0, 5:], ids_other[0, 5:])                 # nothing crosses the EOS
    assert torch.equal(ids[0, 5:], emb.hash_ids(doc[:, 5:])[0])      # after EOS = fresh start
    assert not torch.equal(ids[0, 4], ids_other[0, 4])               # EOS sees its own document
    for t in range(1, 10):                                           # decoding: context = last N-1
        ctx = F.pad(doc[:, max(0, t - 4):t], (4 - min(t, 4), 0))
        assert torch.equal(emb.hash_ids(doc[:, t:], ctx), ids[:, t:])


# ------------------------------------------------------------------------------ decoding
CONFIGS = {
    "dense": dict(ngram_n=0),
    "moe": dict(ngram_n=0, n_experts=4, expert_topk=2, mlp="gelu"),
    "ngram": dict(ngram_n=3, ngram_k=2, ngram_draft_head=True, ngram_amp="layernorm"),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_prefill_and_decode_match_full_forward(name):
    """Sparse decoding (the gate over the cache's block-mean keys) gives the logits of one full
    forward at a sparse budget: 61 tokens are 4 blocks of 16, and each token keeps 2 of them."""
    model = tiny(**CONFIGS[name])
    idx = torch.randint(0, 257, (2, 61), generator=torch.Generator().manual_seed(1))
    idx[1, 9] = 256
    with torch.no_grad():
        full, _ = model(idx, topk=2)
        dense, _ = model(idx, topk=4)
        assert (full - dense).abs().max() > 1e-4                     # the budget really bites
        cache = model.new_cache(2, max_len=64)
        parts = [model(idx[:, :20], cache=cache, topk=2)[0]]        # prefill (padded to 32)
        for t in range(20, 40):
            parts.append(model(idx[:, t:t + 1], cache=cache, topk=2)[0])   # one token at a time
        parts.append(model(idx[:, 40:61], cache=cache, topk=2)[0])  # a chunk across a block end
    assert cache.pos == 61
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)
    cache.pos = 30                                  # roll back and fill 30..52 with other ids,
    with torch.no_grad():                           # then roll back again and rewrite: a chunk
        for t in range(30, 53):                     # and the steps after it must see its K/V,
            model((idx[:, t:t + 1] + 1) % 256, cache=cache)         # block means and ids, not
        cache.pos = 30                                              # the stale ones
        again = [model(idx[:, 30:34], cache=cache)[0]]
        again += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(34, 61)]
    torch.testing.assert_close(torch.cat(again, 1), full[:, 30:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_at_t_ignore_every_later_token(name):
    """Causality of the whole model at a sparse budget, N-gram embedding on and packed documents:
    changing the tokens after t leaves the logits at positions <= t bit for bit."""
    model = tiny(**CONFIGS[name])
    g = torch.Generator().manual_seed(4)
    idx = torch.randint(0, 256, (1, 64), generator=g)
    cu = torch.tensor([0, 16, 64], dtype=torch.int32)
    with torch.no_grad():
        base, _ = model(idx, cu_seqlens=cu, topk=2)
        for t in (5, 16, 25, 40, 57):
            other = idx.clone()
            other[:, t + 1:] = torch.randint(0, 256, (1, 63 - t), generator=g)
            logits, _ = model(other, cu_seqlens=cu, topk=2)
            assert torch.equal(logits[:, :t + 1], base[:, :t + 1]), t


def test_new_cache_refuses_bad_sizes():
    model = tiny()
    for kw, name in ((dict(batch_size=0), "batch_size"), (dict(batch_size=-2), "batch_size"),
                     (dict(batch_size=1, max_len=0), "max_len"), (dict(batch_size=1, max_len=-5), "max_len"),
                     (dict(batch_size=1.5), "batch_size")):
        with pytest.raises(ValueError, match=name):
            model.new_cache(**kw)
    assert model.new_cache(1, max_len=20).max_len == 20                # any length >= 1 is fine


def test_forward_refuses_ids_outside_the_vocabulary():
    model = tiny()
    for bad in (-1, 257, 10**6):
        idx = torch.tensor([[3, bad, 5]])
        with pytest.raises(ValueError, match="vocab_size"):
            model(idx)
        with pytest.raises(ValueError, match="vocab_size"):
            model(idx, cache=model.new_cache(1, max_len=16))
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 3))
    model(torch.tensor([[0, 256]]))                                     # both ends are valid ids


def test_cache_errors():
    model = tiny()
    cache = model.new_cache(1, max_len=16)
    model(torch.zeros(1, 10, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 7, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache, cu_seqlens=torch.tensor([0, 16]))
    with pytest.raises(ValueError):
        cache.pos = 17


# ------------------------------------------------------------------------------ attention
def dense_attention(q, k, v, topk, cu_seqlens=None, block=64, k0=None, p=None, stride=1):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True), topk


def test_full_budget_equals_dense_attention(monkeypatch):
    """A budget of every block is dense causal attention, through the gate and the pair tiles (p
    set: the SDPA shortcut is skipped) and through the shortcut itself."""
    model = tiny(ngram_n=3, ngram_k=2)
    idx = torch.randint(0, 257, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        gate, _ = model(idx, topk=4, k0=1, p=0.0)     # floors <= 4: the budget stays 4
        shortcut, _ = model(idx, topk=4)
        per_layer, _ = model(idx, topk=torch.full((2, 2), 4))
        monkeypatch.setattr(M, "causal_sparse_attention", dense_attention)
        dense, _ = model(idx)
    for got in (gate, shortcut, per_layer):
        torch.testing.assert_close(got, dense, atol=1e-5, rtol=0)


@pytest.mark.parametrize("topk", [3, 5, torch.tensor([3, 7])])
def test_dense_shortcut_matches_the_gate_path(topk):
    """causal_sparse_attention runs SDPA when every budget covers every block: same output and
    budgets as the gate + pair tiles (forced by p = 0, whose floors never raise a budget), T not a
    multiple of the block included."""
    q, k, v = torch.randn(3, 2, 2, 40, 16, generator=torch.Generator().manual_seed(5))
    y, used = M.causal_sparse_attention(q, k, v, topk, None, 16)
    y_gate, used_gate = M.causal_sparse_attention(q, k, v, topk, None, 16, k0=1, p=0.0)
    torch.testing.assert_close(y, y_gate, atol=1e-5, rtol=0)
    assert torch.equal(used, used_gate)


def test_packed_documents_equal_separate_rows():
    """cu_seqlens: RoPE positions restart, attention and n-grams stay inside each document."""
    model = tiny(ngram_n=3, ngram_k=2)
    idx = torch.randint(0, 255, (1, 64), generator=torch.Generator().manual_seed(3))
    cu = torch.tensor([0, 16, 64], dtype=torch.int32)               # no EOS between the documents
    with torch.no_grad():
        packed, _ = model(idx, cu_seqlens=cu, topk=torch.tensor([4, 4]))
        first, _ = model(idx[:, :16], topk=4)
        second, _ = model(idx[:, 16:], topk=4)
    torch.testing.assert_close(packed, torch.cat([first, second], 1), atol=1e-5, rtol=0)


def test_per_layer_budgets_reach_each_layer_and_are_reported():
    model = tiny()
    idx = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(5))
    budgets = torch.tensor([[1, 2], [3, 4]])                        # [n_layer, S]
    with torch.no_grad():
        logits, _ = model(idx, topk=budgets)
        assert model.used_budgets.tolist() == [[1, 2], [3, 4]]
        # each layer really ran its own budget: layer 1 at budget 1 changes the logits
        other, _ = model(idx, topk=torch.tensor([[1, 2], [1, 4]]))
    assert not torch.equal(logits[0], other[0]) and torch.equal(logits[1], other[1])
    with pytest.raises(ValueError, match="n_layer"):
        model(torch.zeros(2, 32, dtype=torch.long), topk=torch.ones(3, 2, dtype=torch.long))


def test_dst_floor_in_every_layer():
    """With k0 and p each layer raises each budget to its own coverage floor (never below the
    requested budget), and reports what it used."""
    model = tiny(n_layer=3)
    idx = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(6))
    cu = torch.tensor([0, 16, 64], dtype=torch.int32)
    with torch.no_grad():
        model(idx, cu_seqlens=cu, topk=torch.tensor([1, 1]), k0=4, p=0.1)
        raised = model.used_budgets.clone()
        model(idx, cu_seqlens=cu, topk=torch.tensor([1, 1]))
    assert model.used_budgets.tolist() == [[1, 1]] * 3
    assert raised.shape == (3, 2) and (raised >= 1).all() and (raised <= 4).all()
    assert (raised[:, 1] > 1).all()                                 # 3 earlier blocks to route to
    with pytest.raises(ValueError, match="decoding"):
        model(idx[:, :8], cache=model.new_cache(1, 64), k0=4, p=0.1)


# ------------------------------------------------------------------------------ MoE
def test_moe_routing_and_output():
    model = tiny(ngram_n=0, n_experts=4, expert_topk=2)
    moe = model.blocks[0].ffn
    x = torch.randn(1, 9, 32)
    flat = x[0]
    w, e, aux = moe.route(flat)
    torch.testing.assert_close(w.sum(-1), torch.ones(9))
    assert all(len(set(row)) == 2 for row in e.tolist())            # exactly expert_topk experts
    probs = torch.softmax(flat @ moe.router.weight.T, -1)
    f = torch.tensor([(e == i).float().sum() / e.numel() for i in range(4)])
    torch.testing.assert_close(aux, 4 * (f * probs.mean(0)).sum())
    assert math.isfinite(aux.item())
    ref = torch.stack([sum(w[n, j] * moe.experts[e[n, j]](flat[n]) for j in range(2)) for n in range(9)])
    torch.testing.assert_close(moe(x)[0], ref, atol=1e-6, rtol=1e-5)
    assert moe.experts_used == len(set(e.flatten().tolist()))
    with torch.no_grad():                                            # route everything to 0 and 1
        moe.router.weight.zero_()
        moe.router.weight[:2] = 1.0
        y_eval = moe(x.abs())                                        # eval: experts 2, 3 skipped
        assert moe.experts_used == 2
    moe.train()
    y = moe(x.abs())
    torch.testing.assert_close(y, y_eval, atol=0, rtol=0)           # skipping changes nothing
    y.sum().backward()
    assert all(p.grad is not None for p in moe.parameters())        # unused experts too (DDP)


# ------------------------------------------------------------------------------ parameters
def test_num_params_hand_count():
    kw = dict(vocab_size=11, eos_id=10, n_layer=2, n_head=2, n_embd=32, ngram_n=3, ngram_k=2,
              ngram_ratio=2.1, n_experts=3, expert_topk=2, ffn_hidden=8, ngram_draft_head=True)
    model = GPT(GPTConfig(**kw))
    D, V, L, m = 32, 11, 2, round(2.1 * 11)
    tables = sum(m + 2 * c + 1 for c in range(4)) * (D // 4)
    expert = D * 2 * 8 + 8 * D                                        # SwiGLU in (2 halves), out
    block = 2 * D + 4 * D * D + D * 3 + 3 * expert                    # 2 norms, qkv+proj, router
    total = V * D + tables + D * D + L * block + D + V * D + V * D    # E0, tables, W, blocks, norm, heads
    assert model.num_params() == total
    active = D + D + D * D + L * (block - expert) + D + V * D         # one row each, 2 of 3 experts
    assert model.num_params(active=True) == active


def test_param_groups_cover_everything_once():
    model = tiny(n_experts=2, ngram_draft_head=True, ngram_amp="layernorm")
    decay, rest = model.param_groups(0.1)
    assert sorted(map(id, decay["params"] + rest["params"])) == sorted(map(id, model.parameters()))
    no_decay = {id(p) for p in rest["params"]}
    assert id(model.embed.tables.weight) in no_decay and id(model.embed.wte.weight) in no_decay
    assert id(model.lm_head.weight) not in no_decay and decay["weight_decay"] == 0.1


BAD = [dict(n_embd=48, n_head=5), dict(n_embd=96, n_head=2), dict(n_head=32), dict(attn_block=48),
       dict(attn_block=8, max_seq_len=64), dict(max_seq_len=100), dict(topk=0), dict(mlp="relu"),
       dict(n_experts=2, expert_topk=3), dict(n_experts=-1), dict(ngram_amp="x"), dict(ngram_n=-1),
       dict(ngram_n=3, ngram_k=0), dict(ngram_n=3, ngram_k=3), dict(ngram_ratio=0.0),
       dict(ngram_ratio=1e17), dict(eos_id=257), dict(vocab_size=1, eos_id=0), dict(n_layer=0),
       dict(moe_aux_weight=-1.0), dict(ffn_hidden=-1)]


@pytest.mark.parametrize("kw", BAD)
def test_config_errors(kw):
    with pytest.raises(ValueError):
        GPTConfig(**kw)


# ------------------------------------------------------------------------------ losses, training
def test_losses_draft_head_and_mask():
    model = tiny(ngram_draft_head=True, n_experts=2, expert_topk=1)
    idx = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(4))
    tgt = torch.roll(idx, -1, 1)
    mask = torch.rand(2, 32, generator=torch.Generator().manual_seed(5)) > 0.3
    logits, loss = model(idx, tgt, loss_mask=mask)
    lm = F.cross_entropy(logits[mask], tgt[mask])
    draft = F.cross_entropy(model.draft_logits(idx)[mask], tgt[mask])
    parts = model.last_losses
    torch.testing.assert_close(parts["lm"], lm.detach())
    torch.testing.assert_close(parts["draft"], draft.detach())
    torch.testing.assert_close(loss, lm + 0.01 * parts["moe_aux"] + 0.1 * draft)
    # the drafter sees only the local n-gram: tokens N-1 or more back do not change it
    other = idx.clone()
    other[:, :5] = 7
    torch.testing.assert_close(model.draft_logits(other)[:, 7:], model.draft_logits(idx)[:, 7:])
    with pytest.raises(ValueError, match="ngram_draft_head"):
        tiny().draft_logits(idx)


def test_training_steps_lower_the_loss():
    model = tiny(n_experts=2, ngram_draft_head=True).train()
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-2)
    idx = torch.randint(0, 20, (2, 32), generator=torch.Generator().manual_seed(6))
    losses = []
    for _ in range(8):
        _, loss = model(idx, torch.roll(idx, -1, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(model.last_losses["lm"].item())
    assert losses[-1] < losses[0] - 1.0


def test_checkpoint_roundtrip(tmp_path):
    from dataclasses import asdict
    model = tiny(n_experts=2)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "config": asdict(model.config), "step": 3}, path)
    again = GPT.from_checkpoint(str(path))
    idx = torch.randint(0, 257, (1, 16))
    torch.testing.assert_close(again(idx)[0], model(idx)[0])
    with pytest.raises(FileNotFoundError):
        GPT.from_checkpoint(str(tmp_path / "missing.pt"))


def test_embedding_amplification():
    """ngram_amp (paper: the embedding output amplified, about -0.02 loss): sqrt_d multiplies the
    plain output by sqrt(D); layernorm normalises every token's vector."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=257, n_embd=32, n_head=2, ngram_n=3, ngram_k=2)
    plain = NgramEmbedding(GPTConfig(**cfg, ngram_amp="none"))
    idx = torch.randint(0, 257, (2, 9))
    for amp in ("sqrt_d", "layernorm"):
        emb = NgramEmbedding(GPTConfig(**cfg, ngram_amp=amp))
        emb.load_state_dict(plain.state_dict(), strict=False)
        out, base = emb(idx), plain(idx)
        if amp == "sqrt_d":
            torch.testing.assert_close(out, base * math.sqrt(32))
        else:
            torch.testing.assert_close(out, F.layer_norm(base, (32,), emb.norm.weight, emb.norm.bias))
