"""Tests for infer.py: plain and speculative decoding agree, sampling is exact, caches are right.

References are independent of the code under test: a full forward without caches, brute-force
hash ids of the whole sequence, and exact next-token distributions from full forwards.
"""
import copy
import math
from dataclasses import asdict

import pytest
import torch

import infer
from infer import accept_drafts, generate, generate_recompute, logits_to_probs, speculative_generate
from model import GPT, GPTConfig


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(seed, **kw):
    """A random tiny fp32 model (n-gram embedding with draft head unless overridden)."""
    cfg = dict(vocab_size=257, eos_id=256, n_layer=2, n_head=2, n_embd=32, max_seq_len=64,
               attn_block=16, topk=4, ngram_n=3, ngram_k=2, ngram_draft_head=True)
    cfg.update(kw)
    torch.manual_seed(seed)
    return GPT(GPTConfig(**cfg)).eval()


def noisy_copy(model, scale, seed):
    """A draft that agrees with the target often but not always (exercises accept and reject)."""
    d = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(scale * p.std().nan_to_num(0.02) * torch.randn(p.shape, generator=g))
    return d


def chi2_threshold(df, z=3.719):
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.719: p = 1e-4)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts, probs):
    """Pearson's statistic; cells with expected count < 5 are pooled into one."""
    n = counts.sum()
    exp = probs * n
    small = exp < 5
    obs_c = torch.cat([counts[~small], counts[small].sum(0, keepdim=True)])
    exp_c = torch.cat([exp[~small], exp[small].sum(0, keepdim=True)])
    keep = exp_c > 0
    if bool((counts[exp == 0] > 0).any()):  # an impossible outcome was observed
        return float("inf"), int(keep.sum()) - 1
    return float(((obs_c[keep] - exp_c[keep]) ** 2 / exp_c[keep]).sum()), int(keep.sum()) - 1


PROMPTS = [[65], [100, 101, 102], [10, 256, 32, 32, 105, 102, 32]]  # incl. an EOS in the prompt


# ----------------------------------------------------------------------------- plain decoding

@pytest.mark.parametrize("seed", [0, 1])
def test_kv_cache_decode_equals_full_forward(seed):
    model = tiny(seed)
    idx = torch.tensor([[1, 2, 3, 256, 5], [7, 7, 7, 7, 7]])
    out = generate(model, idx, 12)
    assert torch.equal(out, generate_recompute(model, idx, 12))
    # sampling with the same generator state draws the same tokens from the same distributions
    a = generate(model, idx, 12, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = generate_recompute(model, idx, 12, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    # and the logits of the last step, decoded through the cache, match one full forward
    cache = model.new_cache(2, max_len=out.size(1))
    with torch.no_grad():
        model(out[:, :5], cache=cache)
        for t in range(5, out.size(1)):
            step, _ = model(out[:, t:t + 1], cache=cache)
        full, _ = model(out)
    torch.testing.assert_close(step[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)


def test_logits_to_probs_filters():
    torch.manual_seed(0)
    logits = torch.randn(4, 11)
    p = logits_to_probs(logits, temperature=0.7, top_k=3)
    for r in range(4):
        keep = logits[r].topk(3).indices
        ref = torch.zeros(11)
        ref[keep] = (logits[r, keep] / 0.7).softmax(-1)
        torch.testing.assert_close(p[r], ref)
    p = logits_to_probs(logits, temperature=1.0, top_p=0.6)
    for r in range(4):  # the smallest set of most likely tokens whose mass reaches 0.6
        full = logits[r].softmax(-1)
        order = full.argsort(descending=True)
        k = int((full[order].cumsum(0) < 0.6).sum()) + 1
        ref = torch.zeros(11)
        ref[order[:k]] = full[order[:k]] / full[order[:k]].sum()
        torch.testing.assert_close(p[r], ref)
    g = logits_to_probs(logits, temperature=0.0)
    assert torch.equal(g.argmax(-1), logits.argmax(-1)) and torch.equal(g.sum(-1), torch.ones(4))


# ----------------------------------------------------------------------------- speculative, greedy

@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_speculative_equals_plain(seed):
    target = tiny(seed)
    drafts = {
        "small model": tiny(seed + 10, n_layer=1, n_head=1, n_embd=16, ngram_n=0, ngram_draft_head=False),
        "noisy copy": noisy_copy(target, 0.5, seed),
        "ngram": "ngram",
        "prompt lookup": "lookup",
    }
    kept = rejected = 0
    for prompt in PROMPTS[seed:seed + 2]:
        idx = torch.tensor([prompt])
        ref = generate(target, idx, 16)
        for name, d in drafts.items():
            for gamma in (1, 4):
                out, st = speculative_generate(target, d, idx, 16, gamma=gamma)
                assert torch.equal(out, ref), (name, prompt, gamma)
                assert sum(st["hist"]) == st["rounds"] and st["accepted"] <= st["drafted"]
                kept += st["accepted"]
                rejected += st["drafted"] - st["accepted"]
    assert kept > 0 and rejected > 0  # both branches were exercised


def brute_lookup(seq, g, max_ngram=3):
    """Prompt lookup by hand: the longest tail (<= max_ngram) that occurs earlier, its latest
    occurrence, and the up to g tokens after it."""
    for n in range(min(max_ngram, len(seq) - 1), 0, -1):
        tail = seq[-n:]
        for start in range(len(seq) - n - 1, -1, -1):
            if seq[start:start + n] == tail:
                return seq[start + n:start + n + g]
    return []


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    drafter = infer.PromptLookupDrafter()
    g = torch.Generator().manual_seed(0)
    cases = [[5], [1, 2, 3, 1, 2], [1, 2, 3, 9, 2, 3, 7, 2, 3], [4, 4, 4, 4], [1, 2, 3, 4]]
    cases += [torch.randint(0, 4, (n,), generator=g).tolist() for n in (2, 7, 30, 60)]
    for seq in cases:
        for gamma in (1, 3, 6):
            got = drafter.propose(torch.tensor([seq]), gamma)[0].tolist()
            assert got == brute_lookup(seq, gamma), (seq, gamma)
    assert drafter.propose(torch.tensor([[1, 2, 3, 1, 2]]), 4)[0].tolist() == [3, 1, 2]   # "1 2" began the sequence
    with pytest.raises(ValueError):
        infer.PromptLookupDrafter(max_ngram=0)


def test_identical_draft_accepts_everything():
    target = tiny(3)
    for temperature in (0.0, 1.0):
        out, st = speculative_generate(target, copy.deepcopy(target), torch.tensor([[1, 2, 3]]), 30,
                                       gamma=4, temperature=temperature,
                                       generator=torch.Generator().manual_seed(0))
        assert st["drafted"] > 0 and st["accepted"] == st["drafted"]
        assert st["hist"][4] >= st["rounds"] - 1  # every full round; the last one may be shorter
        assert out.size(1) == 33


def test_ngram_context_across_acceptance_and_rejection():
    """The n-gram ids handed to every verification equal hash ids of the whole sequence so far."""
    target = tiny(4)
    emb = infer.ngram_embedding(target)
    for draft in (noisy_copy(target, 0.5, 4), "ngram"):
        for prompt in PROMPTS:
            calls, forward = [], target.forward

            def spy(idx, *a, cache=None, ngram_ids=None, **kw):
                if cache is not None and ngram_ids is not None:
                    calls.append((cache.pos, idx.clone(), ngram_ids.clone()))
                return forward(idx, *a, cache=cache, ngram_ids=ngram_ids, **kw)

            target.forward = spy
            try:
                out, st = speculative_generate(target, draft, torch.tensor([prompt]), 24, gamma=3)
            finally:
                del target.forward
            assert len(calls) == st["rounds"]
            for pos, idx, ids in calls:  # out[:, :pos] are accepted tokens; idx = cur + drafts
                ref = emb.hash_ids(torch.cat([out[:, :pos], idx], dim=1))[:, pos:]
                assert torch.equal(ids, ref)
            assert 0 < st["accepted"] < st["drafted"] or draft == "ngram"


# ----------------------------------------------------------------------------- speculative, exact sampling

def test_accept_drafts_is_exact_batched():
    """One round, vectorised over 100k independent trials: the first two emitted tokens follow p."""
    g = torch.Generator().manual_seed(0)
    V, B = 5, 100_000
    p = torch.tensor([[.5, .2, .1, .1, .1], [.05, .05, .3, .3, .3], [.2, .2, .2, .2, .2]])
    q = torch.tensor([[.1, .1, .1, .2, .5], [.6, .1, .1, .1, .1]])
    drafts = torch.stack([torch.multinomial(q[i], B, replacement=True, generator=g) for i in range(2)], 1)
    n, nxt = accept_drafts(p.expand(B, 3, V), q.expand(B, 2, V), drafts, g)
    first = torch.where(n >= 1, drafts[:, 0], nxt)
    second = torch.where(n >= 2, drafts[:, 1], torch.where(n == 1, nxt, -1))
    two = second >= 0  # rounds that emitted at least two tokens
    c1 = torch.bincount(first, minlength=V).float()
    c2 = torch.bincount(first[two] * V + second[two], minlength=V * V).float()
    stat, df = chi2(c1, p[0])
    assert stat < chi2_threshold(df)
    # given two tokens were emitted, the second follows p[1] (the rows here ignore the prefix)
    joint = (c2.view(V, V).sum(0))
    stat, df = chi2(joint, p[1])
    assert stat < chi2_threshold(df)
    # the test has power: the draft's own distribution is clearly rejected
    assert chi2(c1, q[0])[0] > 10 * chi2_threshold(df)
    # each draft is kept with probability sum_x min(p(x), q(x)): 0.5 for the first, 0.4 for the
    # second once the first was kept (standard errors about 0.002)
    assert abs(float((n >= 1).float().mean()) - 0.5) < 0.01
    assert abs(float((n == 2).sum() / (n >= 1).sum()) - 0.4) < 0.01


def test_speculative_sampling_matches_target_distribution():
    """End to end on a 4-token vocabulary: the first token and the first two tokens sampled by
    speculative_generate follow the target's exact distribution (computed by full forwards), for
    the draft model with top-k, the N-gram drafter with top-p, and prompt lookup (a point-mass
    draft: the acceptance rule then keeps it with probability p(d))."""
    kw = dict(vocab_size=4, eos_id=3, n_layer=1, n_head=1, n_embd=16, max_seq_len=32, ngram_n=3, ngram_k=2)
    target, draft = tiny(6, **kw), tiny(7, **kw, ngram_draft_head=False)
    with torch.no_grad():  # sharpen the random heads so target and drafts clearly disagree
        for m, s in ((target.lm_head, 20), (target.draft_head, 60), (draft.lm_head, 20)):
            m.weight.mul_(s)
    V, n_samples = 4, 400
    g = torch.Generator().manual_seed(0)
    for d, filt, idx in ((draft, dict(top_k=3), torch.tensor([[1, 2, 0]])),
                         ("ngram", dict(top_p=0.9), torch.tensor([[1, 2, 0]])),
                         ("lookup", dict(), torch.tensor([[1, 2, 1]]))):   # proposes 2, then 1
        T = idx.size(1)
        with torch.no_grad():
            p1 = logits_to_probs(target(idx)[0][0, -1], 1.0, **filt)  # (V,)
            both = torch.cat([idx.expand(V, T), torch.arange(V)[:, None]], 1)  # every first token
            p2 = logits_to_probs(target(both)[0][:, -1], 1.0, **filt)  # (V, V): row = first token
            if d == "lookup":
                q1 = torch.nn.functional.one_hot(torch.tensor(2), V).float()
            else:
                logits = draft(idx)[0] if d is draft else target.draft_logits(idx)
                q1 = logits_to_probs(logits[0, -1], 1.0, **filt)
        exact = (p1[:, None] * p2).flatten()  # (V*V,) exact law of the first two tokens
        pairs = torch.zeros(V * V)
        rejected = 0
        for _ in range(n_samples):
            out, st = speculative_generate(target, d, idx, 2, gamma=2, temperature=1.0, generator=g, **filt)
            pairs[out[0, T] * V + out[0, T + 1]] += 1
            rejected += st["drafted"] - st["accepted"]
        first = pairs.view(V, V).sum(1)
        stat, df = chi2(first, p1)
        assert stat < chi2_threshold(df), (d, stat)
        stat, df = chi2(pairs, exact)
        assert stat < chi2_threshold(df), (d, stat)
        assert rejected > 0.1 * n_samples  # the residual resampling path was exercised
        if d == "lookup":  # power: the point-mass draft alone would emit only token 2
            assert int((first > 0).sum()) >= 2
            continue
        stat, df = chi2(first, q1)  # power: the draft's own law would be rejected
        assert stat > 3 * chi2_threshold(df)


# ----------------------------------------------------------------------------- bad inputs and CLI

def test_bad_inputs_raise(tmp_path):
    target = tiny(0)
    idx = torch.tensor([[1, 2, 3]])
    with pytest.raises(FileNotFoundError, match="--ckpt"):
        infer.load_model(str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(target, tiny(1, vocab_size=300, eos_id=299), idx, 4)
    with pytest.raises(ValueError, match="context"):
        generate(target, torch.zeros(1, 64, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(target, idx, 62)
    for bad in (dict(temperature=-1.0), dict(temperature=float("nan")), dict(top_p=0.0),
                dict(top_p=1.5), dict(top_k=0)):
        with pytest.raises(ValueError):
            generate(target, idx, 4, **bad)
        with pytest.raises(ValueError):
            speculative_generate(target, "ngram", idx, 4, **bad)
    with pytest.raises(ValueError, match="gamma"):
        speculative_generate(target, "ngram", idx, 4, gamma=0)
    with pytest.raises(ValueError, match="batch"):
        speculative_generate(target, "ngram", idx.expand(2, 3), 4)
    with pytest.raises(ValueError, match="draft head"):
        speculative_generate(tiny(0, ngram_draft_head=False), "ngram", idx, 4)


def test_cli_generate_and_bench(tmp_path, capsysbinary):
    target, draft = tiny(0), tiny(1, n_layer=1, ngram_n=0, ngram_draft_head=False)
    for name, m in (("t.pt", target), ("d.pt", draft)):
        torch.save({"model": m.state_dict(), "config": asdict(m.config)}, tmp_path / name)
    t, d = str(tmp_path / "t.pt"), str(tmp_path / "d.pt")
    infer.main(["--ckpt", t, "--prompt", "ab", "--max-new-tokens", "6"])
    plain = capsysbinary.readouterr().out
    infer.main(["--ckpt", t, "--prompt", "ab", "--max-new-tokens", "6", "--draft", "model",
                "--draft-ckpt", d])
    assert capsysbinary.readouterr().out == plain  # greedy: the same bytes either way
    infer.main(["--ckpt", t, "--prompt", "abab", "--max-new-tokens", "6", "--draft", "lookup"])
    lookup = capsysbinary.readouterr().out
    infer.main(["--ckpt", t, "--prompt", "abab", "--max-new-tokens", "6"])
    assert lookup == capsysbinary.readouterr().out
    infer.main(["--bench", "--ckpt", t, "--draft-ckpt", d, "--max-new-tokens", "8", "--prompt", "ab"])
    table = capsysbinary.readouterr().out.decode()
    for name in ("draft model", "N-gram drafter", "prompt lookup"):  # speed table + breakdown
        assert table.count(f"| {name}, gamma") == 6, name
    assert "NO" not in table


def test_cli_bad_inputs_fail_in_one_line_before_any_output(tmp_path, capsysbinary):
    """Every flag and the prompt are checked before the prompt is streamed; context errors name
    the model whose context is too short."""
    target, small = tiny(0), tiny(1, max_seq_len=32, ngram_n=0, ngram_draft_head=False)
    for name, m in (("t.pt", target), ("d.pt", small)):
        torch.save({"model": m.state_dict(), "config": asdict(m.config)}, tmp_path / name)
    t, d = str(tmp_path / "t.pt"), str(tmp_path / "d.pt")
    bad = [(["--device", "foo"], "--device 'foo'"),
           (["--device", f"cuda:{torch.cuda.device_count()}"], "CUDA device\\(s\\) visible"),
           (["--bench", "--bench-prompts", "0"], "--bench-prompts 0"),
           (["--bench", "--bench-repeats", "0"], "--bench-repeats 0"),
           (["--draft", "ngram", "--gamma", "0"], "--gamma 0"), (["--max-new-tokens", "0"], "--max-new-tokens 0"),
           (["--threads", "-1"], "--threads -1"), (["--top-k", "two"], "--top-k: invalid int"),
           (["--prompt", "x" * 70], "the target's context is 64"),
           (["--max-new-tokens", "40", "--draft", "model", "--draft-ckpt", d], "the draft model's context 32")]
    for flags, msg in bad:
        with pytest.raises(ValueError, match=msg) as e:
            infer.main(["--ckpt", t, *flags])
        assert "\n" not in str(e.value) and capsysbinary.readouterr().out == b"", flags


def test_huge_gamma_is_clamped_to_max_new_tokens():
    out, st = speculative_generate(tiny(0), "ngram", torch.tensor([[1, 2, 3]]), 5, gamma=10**12)
    assert out.size(1) == 8 and len(st["hist"]) == 6  # drafts per round: 0..5
