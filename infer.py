"""
Generation for the N-gram Embedding GPT: a KV cache plus an n-gram cache, exact speculative
decoding, and the N-gram drafter (ngram_embedding.md, "Inference").

Checkpoints come from train.py: a target with the N-gram draft head, and a small draft model:
    python train.py --ngram-draft-head true            # -> out/cpu-quick/ckpt.pt
    python train.py --preset draft                     # -> out/draft/ckpt.pt
Sample (bytes stream to stdout as they are produced):
    python infer.py --ckpt out/cpu-quick/ckpt.pt --prompt "def " --max-new-tokens 200
    python infer.py --ckpt out/cpu-quick/ckpt.pt --temperature 0.8 --top-p 0.95 --seed 1
Speculative decoding with the draft model, or with the target's own N-gram drafter:
    python infer.py --ckpt out/cpu-quick/ckpt.pt --draft model --draft-ckpt out/draft/ckpt.pt --gamma 4
    python infer.py --ckpt out/cpu-quick/ckpt.pt --draft ngram --gamma 4
    python infer.py --ckpt out/cpu-quick/ckpt.pt --draft lookup --gamma 4    # prompt lookup
Benchmark (recompute-everything, plain KV, speculative with each drafter at gamma 2/4/6, then
where a round's CPU time goes):
    python infer.py --bench --ckpt out/cpu-quick/ckpt.pt --draft-ckpt out/draft/ckpt.pt --threads 1

Library: `generate(model, idx, max_new_tokens, ...)` and
`speculative_generate(target, draft, idx, max_new_tokens, gamma=4, ...) -> (tokens, stats)`
side by side, timed by the same harness (`bench`). Speculative decoding runs one sequence
(batch size 1), as serving engines do per request.
"""
import argparse
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from attention import timed
from data import EOS, corpus_tokens, passkey_sample
from model import GPT

# -----------------------------------------------------------------------------
# Loading and checking inputs (errors are raised here, at the boundary)


def load_model(path, device="cpu"):
    """Load a GPT from a checkpoint written by train.py ({"model": state_dict, "config": ...})."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path!r}; pass --ckpt with a file written "
                                f"by train.py (e.g. out/cpu-quick/ckpt.pt)")
    model = GPT.from_checkpoint(path, map_location=device)
    return model.to(device).eval()


def check_sampling(temperature, top_k, top_p):
    """Validate the sampling knobs; temperature 0 means greedy (argmax)."""
    if not isinstance(temperature, (int, float)) or not (0.0 <= temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (int(top_k) != top_k or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k}")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def check_prompt(model, idx, max_new_tokens, batch_one=False, name="model"):
    """The prompt plus the new tokens must fit the model's context (the KV cache has that size).
    `name` says which model an error is about (the target or the draft model)."""
    if not (torch.is_tensor(idx) and idx.dim() == 2 and idx.dtype == torch.long and idx.size(1) >= 1):
        raise ValueError("idx must be a LongTensor [B, T] with T >= 1 (encode the prompt first)")
    if batch_one and idx.size(0) != 1:
        raise ValueError(f"speculative decoding runs one sequence at a time; got batch size "
                         f"{idx.size(0)}, pass idx[i:i+1]")
    if int(idx.min()) < 0 or int(idx.max()) >= model.config.vocab_size:
        raise ValueError(f"token ids must lie in [0, {model.config.vocab_size})")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ctx = model.config.max_seq_len
    if idx.size(1) >= ctx:
        raise ValueError(f"prompt has {idx.size(1)} tokens but the {name}'s context is {ctx}; "
                         f"shorten the prompt to at most {ctx - 1} tokens")
    if idx.size(1) + max_new_tokens > ctx:
        raise ValueError(f"prompt ({idx.size(1)}) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"{name}'s context {ctx}; use max_new_tokens <= {ctx - idx.size(1)}")


def ngram_embedding(model):
    """The target's N-gram embedding module, or None when the model uses a plain embedding."""
    return model.embed if model.config.n_tables else None


# -----------------------------------------------------------------------------
# Turning logits into a distribution


def logits_to_probs(logits, temperature=0.0, top_k=None, top_p=None):
    """Next-token distribution [..., V] after temperature, top-k and top-p (nucleus) filtering.

    temperature 0 gives the one-hot distribution of the argmax, so greedy decoding is the special
    case of sampling where every distribution is a point mass. That is what makes greedy
    speculative decoding reproduce greedy plain decoding exactly: the acceptance test below
    accepts a draft iff it equals the target's argmax, and the residual is the target's argmax.
    """
    logits = logits.float()
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.size(-1)).float()
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, int(top_k), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(-1)


def sample(probs, generator=None):
    """One token per row from probs [B, V] -> LongTensor [B, 1]."""
    return torch.multinomial(probs, 1, generator=generator)


def next_token(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """One token per row from logits [B, V] -> [B, 1]. Greedy is the argmax itself: the same token
    as sampling its one-hot distribution, without building it (a per-token cost at small sizes)."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    return sample(logits_to_probs(logits, temperature, top_k, top_p), generator)


# -----------------------------------------------------------------------------
# Plain generation: prefill once, then one token per forward over the KV cache


def prefill(model, idx, max_len):
    """A KV cache of max_len positions holding all of idx [B, T] but its last token, which is the
    input of the first decoding step. Every new token is then computed the same way by `generate`
    and `speculative_generate` (the same gate as training, over the cache's block-mean keys), so
    their greedy outputs match for prompts of any length."""
    cache = model.new_cache(idx.size(0), max_len=max_len, device=idx.device)
    if idx.size(1) > 1:
        model(idx[:, :-1], cache=cache)
    return cache


@torch.inference_mode()
def generate(model, idx, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
             generator=None, eos_id=None, callback=None):
    """Autoregressive decoding with the position-indexed KV cache and the n-gram cache.

    The prompt is prefilled in one forward (the model's sparse attention handles long prompts);
    every later step feeds one token, whose K/V are appended and whose n-gram ids come from the
    last N-1 ids kept in the cache (ngram_embedding.md, "N-gram cache"). Returns idx extended by
    up to max_new_tokens tokens ([B, T + n]); stops early when every row emitted eos_id (if given).
    callback(new_tokens [B, 1]) is called with each new token (used to stream bytes).
    """
    check_sampling(temperature, top_k, top_p)
    check_prompt(model, idx, max_new_tokens)
    cache = prefill(model, idx, idx.size(1) + max_new_tokens)
    out, tok = [idx], idx[:, -1:]
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        logits, _ = model(tok, cache=cache)  # (B, 1, V)
        tok = next_token(logits[:, -1], temperature, top_k, top_p, generator)  # (B, 1)
        out.append(tok)
        if callback is not None:
            callback(tok)
        if eos_id is not None:
            done |= tok[:, 0] == eos_id
            if bool(done.all()):
                break
    return torch.cat(out, dim=1)


@torch.inference_mode()
def generate_recompute(model, idx, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
                       generator=None):
    """Decoding without any cache: the whole sequence is re-run for every token (the baseline the
    KV cache removes; O(T^2) work instead of O(T)). The same logits as `generate` up to float rounding:
    cached decoding runs the training gate over block-mean keys, so prefill + decode equals a
    full forward (tests/test_model.py)."""
    check_sampling(temperature, top_k, top_p)
    check_prompt(model, idx, max_new_tokens)
    for _ in range(max_new_tokens):
        logits, _ = model(idx)  # (B, T, V), every position recomputed
        tok = next_token(logits[:, -1], temperature, top_k, top_p, generator)
        idx = torch.cat([idx, tok], dim=1)
    return idx


# -----------------------------------------------------------------------------
# Speculative decoding (N-gram Embedding paper, "Inference"), exact for sampling and greedy


def accept_drafts(p, q, drafts, generator=None):
    """The acceptance rule that makes speculative sampling exact, batched over leading dims.

    p: target distributions [B, g+1, V] (p[:, i] judges drafts[:, i]; p[:, g] is for the bonus),
    q: draft distributions [B, g, V], drafts: [B, g] tokens sampled from q.
    Draft i is accepted with probability min(1, p(d_i) / q(d_i)); at the first rejection the
    replacement is sampled from normalize(max(p - q, 0)); if all g are accepted, a bonus token is
    sampled from p[:, g]. Every emitted token is then distributed exactly as the target alone would
    have sampled it. Returns (n_accepted [B], next_token [B]).
    """
    B, g = drafts.shape
    pd = p[:, :g].gather(-1, drafts[..., None])[..., 0]  # (B, g) target prob of each draft
    qd = q.gather(-1, drafts[..., None])[..., 0]  # (B, g) draft prob of each draft (> 0: sampled)
    u = torch.rand(B, g, generator=generator, device=p.device)
    accepted = u * qd < pd  # u < p/q without dividing; p >= q always accepts
    n = accepted.long().cumprod(dim=-1).sum(dim=-1)  # (B,) length of the leading run of accepts
    # A zero row appended to q makes the bonus token the same formula: max(p[g] - 0, 0) = p[g].
    q = torch.cat([q, q.new_zeros(B, 1, p.size(-1))], dim=1)  # (B, g+1, V)
    rows = torch.arange(B, device=p.device)
    p_n, q_n = p[rows, n], q[rows, n]  # (B, V) each, at the first rejection (or the bonus slot)
    resid = (p_n - q_n).clamp_min(0)
    mass = resid.sum(-1, keepdim=True)
    # mass is 0 only when p == q there, which cannot reject in exact arithmetic; fall back to p.
    resid = torch.where(mass > 0, resid / mass.clamp_min(1e-30), p_n)
    return n, torch.multinomial(resid, 1, generator=generator)[:, 0]


class ModelDrafter:
    """Drafts with a small, separate GPT (plain embedding, as in the paper) and its own KV cache."""

    uses_ids = False  # it never needs the target's n-gram ids

    def __init__(self, draft, target):
        if draft.config.vocab_size != target.config.vocab_size:
            raise ValueError(f"draft vocabulary ({draft.config.vocab_size}) differs from the "
                             f"target's ({target.config.vocab_size}); train the draft on the same "
                             f"tokenizer (train.py --preset draft)")
        self.model = draft

    def start(self, idx, max_len):  # the same prefill as the target's
        self.cache = prefill(self.model, idx, max_len)
        self.pending = None  # an accepted draft this cache still lacks (see catch_up)

    def step(self, tok, ids):  # ids (the target's n-gram ids) are not needed by a plain draft
        if self.pending is not None:  # feed the missing draft with the new token: one forward
            tok, self.pending = torch.cat([self.pending, tok], dim=1), None
        return self.model(tok, cache=self.cache)[0][:, -1]  # (1, V)

    def catch_up(self, tok):
        # After full acceptance the cache lacks the last draft. Rather than a forward of its own
        # (a whole draft step for one token), it rides along with the next round's first step.
        self.pending = tok

    def rollback(self, pos):  # hold pos tokens, the pending one counted
        self.cache.pos = pos - (self.pending is not None)


class NgramDrafter:
    """The N-gram drafter: the target's own `draft_logits` head on its N-gram embedding output.

    The paper proposes it (ngram_embedding.md, "Proposed but not built"): one embedding lookup and
    one matrix product per drafted token, no attention, no second model, no draft cache. It sees
    only the last N tokens, so it drafts well where text is locally predictable.
    """

    uses_ids = True  # drafting needs the target's n-gram ids of each token; verification reuses them

    @staticmethod
    def available(target):
        return target.config.ngram_draft_head and ngram_embedding(target) is not None

    def __init__(self, target):
        if not self.available(target):
            raise ValueError("the target has no N-gram draft head; train it with "
                             "ngram_draft_head=True (and ngram_n >= 2) or use --draft model")
        self.model = target

    def start(self, idx, max_len):
        pass

    def step(self, tok, ids):
        return self.model.draft_logits(tok, ids=ids)[:, -1]  # (1, V)

    def catch_up(self, tok):
        pass

    def rollback(self, pos):
        pass


class PromptLookupDrafter:
    """Prompt-lookup decoding, the training-free baseline: find the last `max_ngram`
    (then fewer, down to `min_ngram`) tokens earlier in the sequence, most recent match first, and
    propose the tokens that followed. No model, no cache: a few tensor comparisons per round. Its
    draft distribution is a point mass on the proposed token, so the exact acceptance rule
    accepts a draft d with probability p(d) (greedy: when it is the target's argmax)."""

    uses_ids = False

    def __init__(self, max_ngram=3, min_ngram=1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"prompt lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def start(self, idx, max_len):
        pass

    def propose(self, seq, g):
        """Up to g tokens [1, <= g] continuing seq [1, L] (empty when its tail occurs nowhere else)."""
        s = seq[0]
        L = s.numel()
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            windows = s[:L - 1].unfold(0, n, 1)  # (L-n, n): every earlier n-gram (not the tail itself)
            hits = (windows == s[L - n:]).all(dim=1).nonzero()
            if len(hits):
                start = int(hits[-1]) + n  # the most recent match; what followed it
                return seq[:, start:start + g]
        return seq[:, :0]

    def catch_up(self, tok):
        pass

    def rollback(self, pos):
        pass


def draft_stats(rounds, drafted, accepted, hist):
    """Speculative decoding's counts and the rates derived from them."""
    return {
        "rounds": rounds, "drafted": drafted, "accepted": accepted,
        "acceptance": accepted / max(drafted, 1),  # share of drafted tokens kept
        "mean_accepted": accepted / max(rounds, 1),  # drafts kept per round (tokens/round - 1)
        "hist": hist,  # hist[n]: rounds that kept exactly n drafts
    }


def make_drafter(draft, target):
    """draft: a GPT (the draft model), "ngram" (the target's N-gram drafter) or "lookup" (prompt
    lookup) -> the drafter object speculative_generate drives."""
    if isinstance(draft, str) and draft == "ngram":
        return NgramDrafter(target)
    if isinstance(draft, str) and draft == "lookup":
        return PromptLookupDrafter()
    if not isinstance(draft, GPT):
        raise ValueError(f"draft must be a GPT, 'ngram' or 'lookup', got {draft!r}")
    return ModelDrafter(draft, target)


class PhaseClock:
    """CPU seconds (this process, all threads) and wall seconds spent in each phase of a round."""

    def __init__(self):
        self.cpu, self.wall = {}, {}
        self.phase, self.t = None, None

    def __call__(self, phase):  # close the running phase, start `phase` (None: stop)
        now = (time.process_time(), time.perf_counter())
        if self.phase is not None:
            self.cpu[self.phase] = self.cpu.get(self.phase, 0.0) + now[0] - self.t[0]
            self.wall[self.phase] = self.wall.get(self.phase, 0.0) + now[1] - self.t[1]
        self.phase, self.t = phase, now


@torch.inference_mode()
def speculative_generate(target, draft, idx, max_new_tokens, gamma=4, temperature=0.0,
                         top_k=None, top_p=None, generator=None, eos_id=None, callback=None):
    """Speculative decoding: draft gamma tokens cheaply, verify them in one target forward.

    draft: a GPT (the draft model), "ngram" for the target's N-gram drafter, or "lookup" for
    prompt lookup (training-free). idx [1, T].
    Each round: the drafter proposes g <= gamma tokens; the target scores [cur, d_1..d_g] in one
    forward over its position-indexed KV cache; `accept_drafts` keeps a prefix and adds one token
    of its own (greedy: the drafts that equal the target's argmax, then its argmax). Rejected
    positions need no rollback beyond moving `cache.pos` back: later writes overwrite them. The
    n-gram context is the last N-1 accepted ids. Output is distributed exactly as `generate`'s
    (greedy: identical tokens). Returns (tokens [1, T + n], stats); stats["cpu"] and
    stats["wall"] hold the seconds spent drafting, verifying and in the rest of each round.
    """
    check_sampling(temperature, top_k, top_p)
    check_prompt(target, idx, max_new_tokens, batch_one=True, name="target")
    if not (isinstance(gamma, int) and gamma >= 1):
        raise ValueError(f"gamma (draft tokens per round) must be an int >= 1, got {gamma}")
    gamma = min(gamma, max_new_tokens)  # never more drafts than tokens wanted (nor a huge histogram)
    drafter = make_drafter(draft, target)
    if isinstance(drafter, ModelDrafter):
        check_prompt(draft, idx, max_new_tokens, batch_one=True, name="draft model")
    emb = ngram_embedding(target)
    greedy = temperature == 0
    probs = lambda logits: logits_to_probs(logits, temperature, top_k, top_p)  # noqa: E731
    clock = PhaseClock()
    t0 = time.perf_counter()

    clock("prefill")
    L = idx.size(1) + max_new_tokens  # final length
    # The last prompt token is `cur`, the first input of round one, so even the first new token
    # goes through drafting and verification.
    cache = prefill(target, idx, L)
    drafter.start(idx, L)
    seq, cur = idx, idx[:, -1:]  # seq: every accepted token; cur = seq[:, -1:], not yet in the caches
    hist = [0] * (gamma + 1)
    rounds = drafted = accepted = 0
    while seq.size(1) < L:
        clock("draft")
        P = cache.pos  # == seq.size(1) - 1: tokens whose K/V the target holds
        g = min(gamma, L - seq.size(1) - 1)  # never draft past the requested length
        # ---- draft g tokens ----
        # n-gram cache: the N-1 ids before cur, which the target's cache holds
        ctx = cache.context(target.config.ngram_n - 1) if emb is not None else None
        tok, ids, drafts, qs = cur, [], [], []
        if isinstance(drafter, PromptLookupDrafter):
            found = drafter.propose(seq, g)  # (1, g') with g' <= g: what followed the match
            drafts = list(found.split(1, dim=1))
            g = len(drafts)
            if not greedy:  # a point mass on each proposed token
                qs = [F.one_hot(d[0], target.config.vocab_size).float() for d in drafts]
        else:
            for _ in range(g):
                if drafter.uses_ids:  # n-gram cache: the ids of `tok` from the last N-1 ids only
                    ids.append(emb.hash_ids(tok, context=ctx))  # (1, 1, (N-1)K)
                    ctx = torch.cat([ctx[:, 1:], tok], dim=1)
                logits = drafter.step(tok, ids[-1] if ids else None)  # (1, V)
                if greedy:
                    tok = logits.argmax(-1, keepdim=True)  # (1, 1)
                else:
                    q = probs(logits)  # (1, V)
                    tok = sample(q, generator)  # (1, 1)
                    qs.append(q)
                drafts.append(tok)
        # ---- verify: one target forward over [cur, d_1..d_g] ----
        clock("verify")
        # The +1: `cur` (the last accepted token) is not in the target's cache yet, so the input
        # has g+1 tokens at positions P..P+g, giving g+1 distributions: p[i] judges d_{i+1}, and
        # p[g] is the bonus distribution if every draft is accepted.
        verify = torch.cat([cur] + drafts, dim=1)  # (1, g+1)
        if emb is None:
            ngram_ids = None
        elif drafter.uses_ids:
            # The paper's trick: the ids of cur, d_1..d_{g-1} were computed while drafting and are
            # reused here; only the last draft d_g still needs hashing.
            ngram_ids = torch.cat(ids + [emb.hash_ids(tok, context=ctx)], dim=1)  # (1, g+1, (N-1)K)
        else:
            # A drafter without the target's ids: hash the block once, same context.
            ngram_ids = emb.hash_ids(verify, context=ctx)  # (1, g+1, (N-1)K)
        logits, _ = target(verify, cache=cache, ngram_ids=ngram_ids)  # (1, g+1, V)
        clock("accept")
        if greedy:  # accept_drafts with one-hot p and q, without building them
            best = logits[0].argmax(-1)  # (g+1,) the target's own choices
            n = int((verify[0, 1:] == best[:g]).long().cumprod(0).sum())
            nxt = best[n]
        else:
            q = torch.cat(qs, dim=0)[None] if qs else logits.new_zeros(1, 0, logits.size(-1))
            n, nxt = accept_drafts(probs(logits[0])[None], q, verify[:, 1:], generator)
            n = int(n)
        # Keep cur and the n accepted drafts; K/V of rejected drafts stay but are overwritten later.
        cache.pos = P + 1 + n
        if n == g and g > 0:
            # The extra draft step after full acceptance: the drafter sampled d_g but never ran on
            # it, so its cache lacks d_g. It must see d_g before its next draft (ModelDrafter feeds
            # it together with the next round's first token).
            drafter.catch_up(drafts[-1])
        drafter.rollback(P + 1 + n)
        new = torch.cat(drafts[:n] + [nxt.view(1, 1)], dim=1)  # (1, n+1)
        if eos_id is not None and bool((new == eos_id).any()):
            new = new[:, : int((new[0] == eos_id).nonzero()[0]) + 1]
            L = seq.size(1) + new.size(1)  # stop after the end-of-document id
        seq, cur = torch.cat([seq, new], dim=1), new[:, -1:]
        if callback is not None:
            callback(new)
        rounds, drafted, accepted = rounds + 1, drafted + g, accepted + n
        hist[n] += 1
    clock(None)
    dt = time.perf_counter() - t0
    new_tokens = seq.size(1) - idx.size(1)
    return seq, {**draft_stats(rounds, drafted, accepted, hist), "tokens_per_s": new_tokens / dt,
                 "seconds": dt, "cpu": clock.cpu, "wall": clock.wall}


# -----------------------------------------------------------------------------
# Needle retrieval, generated free running (train.py's evaluation and experiments/quality.py)

def needle_budgets(cfg):
    """The budgets needle evaluation asks about: k0/2, k0, dense (every block of a full row) and
    "dst", each layer at its own coverage floor (see `needle_eval`)."""
    return sorted({max(1, cfg.topk // 2), cfg.topk, cfg.max_seq_len // cfg.attn_block}) + ["dst"]


@torch.no_grad()
def needle_eval(model, filler, length, budget, n, seed, p=0.1, ctx=nullcontext(), mine=None):
    """Needle retrieval on n passkey documents of `length` tokens (data.passkey_sample), document i
    with its needle at depth (i + 0.5) / n, so every depth band is asked.

    Free running: the prompt (everything up to "The passkey is ") is prefilled into the KV cache
    and the answer generated greedily by `generate`, i.e. through sparse decoding at the same
    budget; a hit is an exact match of all five digits. Teacher forced (second score): one forward
    over the whole document, a hit when the argmax at every answer position is the right digit
    (the model sees the earlier answer digits as inputs). budget: an int (every layer), or "dst":
    each layer at its routing-coverage floor at `p` (the lowest budget DST's in-layer half allows:
    the smallest k keeping (1 - p) of the coverage at k0 = config.topk), computed from the prompt.
    mine: the documents this caller runs (ranks split them; default all n). -> (free hits,
    teacher-forced hits, budgets used), one entry per document run."""
    cfg, dev = model.config, next(model.parameters()).device
    free, forced, used = [], [], []
    for t in range(n) if mine is None else mine:
        toks, pos = passkey_sample(np.random.default_rng([seed, 99, length, t]), filler, length,
                                   depth=(t + 0.5) / n)
        x = torch.from_numpy(toks[:-1].astype(np.int64))[None].to(dev)    # (1, length)
        prompt, answer = x[:, :pos[0] + 1], x[0, pos + 1]                  # answer = the 5 digits
        with ctx:
            if budget == "dst":  # a target of 1 block, raised in every layer to its floor
                model(prompt, topk=1, k0=cfg.topk, p=p)
                k = model.used_budgets.clone()                             # [n_layer, 1]
            else:
                k = int(budget)
            logits, _ = model(x, topk=k)                                   # (1, length, V)
            forced.append(int((logits[0, pos].argmax(-1) == answer).all()))
            topk, cfg.topk = cfg.topk, k  # generate decodes at config.topk
            try:
                out = generate(model, prompt, len(pos))
            finally:
                cfg.topk = topk
        free.append(int(torch.equal(out[0, prompt.size(1):], answer)))
        used.append(float(torch.as_tensor(k, dtype=torch.float).mean()))
    return free, forced, used


# -----------------------------------------------------------------------------
# Benchmark: every method timed by the same harness on the same prompts


def encode(text):
    return torch.tensor([list(text.encode("utf-8"))], dtype=torch.long)


def corpus_prompts(n, length=64):
    """n prompts of `length` tokens from the default corpus (the standard library's sources), each
    starting after a newline at evenly spaced offsets: the same prompts on every run."""
    data = torch.from_numpy(corpus_tokens().astype("int64"))
    prompts = []
    for i in range(n):
        start = (2 * i + 1) * len(data) // (2 * n)
        newline = (data[start:start + 4096] == 10).nonzero()
        start += int(newline[0]) + 1 if len(newline) else 0
        prompts.append(data[None, start:start + length])
    return prompts


def format_hist(hist):
    return " ".join(str(h) for h in hist)


def bench(target, draft, prompts, max_new_tokens, gammas=(2, 4, 6), temperature=0.0, repeats=1):
    """Tokens/s of plain KV decoding, full recompute, and speculative decoding with the draft model,
    the N-gram drafter and prompt lookup, summed over the prompts; prints one table, then where a
    speculative round's time goes. Speedups are relative to plain KV decoding, in wall time and in
    this process's CPU time (which other jobs on a shared machine do not inflate); "same output"
    compares with plain decoding token for token (greedy only)."""
    greedy = temperature == 0
    kw = dict(temperature=temperature)
    methods = [("plain, recompute all", lambda i, g: generate_recompute(target, i, max_new_tokens, generator=g, **kw)),
               ("plain, KV cache", lambda i, g: generate(target, i, max_new_tokens, generator=g, **kw))]
    drafters = [("draft model", draft)] if draft is not None else []
    if NgramDrafter.available(target):
        drafters.append(("N-gram drafter", "ngram"))
    drafters.append(("prompt lookup", "lookup"))
    for name, d in drafters:
        for gamma in gammas:
            methods.append((f"{name}, gamma {gamma}", lambda i, g, d=d, gamma=gamma: speculative_generate(
                target, d, i, max_new_tokens, gamma=gamma, generator=g, **kw)))
    # Repeats are interleaved (every method on every prompt once per repeat) and the best time
    # per prompt is kept (attention.timed), so a change of load hits every method alike.
    results = [[None] * len(prompts) for _ in methods]

    def run(m, j):
        def call():
            gen = torch.Generator(prompts[j].device).manual_seed(0)  # fresh: every repeat draws alike
            res = methods[m][1](prompts[j], gen)
            results[m][j] = res if isinstance(res, tuple) else (res, None)
        return call
    pairs = [(m, j) for m in range(len(methods)) for j in range(len(prompts))]
    ms = dict(zip(pairs, timed([run(m, j) for m, j in pairs], repeats, warmup=0, desc="bench repeats")))
    best = [[ms[m, j][0] / 1e3 for j in range(len(prompts))] for m in range(len(methods))]
    best_cpu = [[ms[m, j][1] / 1e3 for j in range(len(prompts))] for m in range(len(methods))]
    rows = []
    for m, (name, _) in enumerate(methods):
        outs = [out for out, _ in results[m]]
        sts = [st for _, st in results[m] if st is not None]
        st = None
        if sts:
            st = draft_stats(*(sum(x[k] for x in sts) for k in ("rounds", "drafted", "accepted")),
                             [sum(h) for h in zip(*(x["hist"] for x in sts))])
            st["cpu"] = {k: sum(x["cpu"].get(k, 0.0) for x in sts) for k in ("prefill", "draft", "verify", "accept")}
        tokens = sum(o.size(1) - p.size(1) for o, p in zip(outs, prompts))
        rows.append({"name": name, "tps": tokens / sum(best[m]), "cpu_tps": tokens / sum(best_cpu[m]),
                     "cpu_s": sum(best_cpu[m]), "tokens": tokens, "outs": outs, "st": st})
    ref = rows[1]
    mode = "greedy" if greedy else f"sampling at temperature {temperature}"
    print(f"\n{mode}; {len(prompts)} prompt(s) of {prompts[0].size(1)} tokens, {max_new_tokens} new "
          f"tokens each; {torch.get_num_threads()} thread(s); best of {repeats} interleaved runs per prompt")
    print("| method | tokens/s | speedup | CPU tokens/s | CPU speedup | acceptance | drafts kept/round "
          "| same output | histogram |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|")
    for r in rows:
        st = r["st"]
        same = "-" if not greedy else "yes" if all(torch.equal(a, b) for a, b in zip(r["outs"], ref["outs"])) else "NO"
        acc = "-" if st is None else f"{st['acceptance']:.2f}"
        kept = "-" if st is None else f"{st['mean_accepted']:.2f}"
        hist = "-" if st is None else format_hist(st["hist"])
        print(f"| {r['name']} | {r['tps']:.1f} | {r['tps'] / ref['tps']:.2f}x | {r['cpu_tps']:.1f} | "
              f"{r['cpu_tps'] / ref['cpu_tps']:.2f}x | {acc} | {kept} | {same} | {hist} |")
    # Where the time goes: CPU ms per round in each phase (last repeat), against plain decoding's
    # CPU ms per token. A round pays for its drafts, one verification forward of g+1 tokens and
    # the acceptance test; it pays off when it yields more tokens than that costs in plain steps.
    print(f"\nwhere the time goes (CPU ms, last repeat): plain KV decoding "
          f"{1e3 * ref['cpu_s'] / ref['tokens']:.2f} ms per token")
    print("| method | tokens/round | draft/round | verify/round | accept + bookkeeping/round | "
          "prefill total | CPU ms per token |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        st = r["st"]
        if st is None:
            continue
        c, n = st["cpu"], max(st["rounds"], 1)
        print(f"| {r['name']} | {r['tokens'] / n:.2f} | {1e3 * c['draft'] / n:.2f} | {1e3 * c['verify'] / n:.2f} | "
              f"{1e3 * c['accept'] / n:.2f} | {1e3 * c['prefill']:.1f} | {1e3 * sum(c.values()) / r['tokens']:.2f} |")
    return rows


# -----------------------------------------------------------------------------
# Command line


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # a bad flag is one line and exit status 1, like every other bad input
        raise ValueError(message)


def check_device(name):
    """--device: cpu, cuda or cuda:N, and CUDA only where a CUDA device is visible."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: choose cpu, cuda or cuda:N")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: {torch.cuda.device_count()} CUDA device(s) visible; "
                         "use --device cpu")
    return device


def main(argv=None):
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="target checkpoint written by train.py")
    ap.add_argument("--prompt", default=None, help="text to continue (UTF-8 bytes are the tokens); "
                    "default 'def ', or for --bench a few prompts from the default corpus")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens")
    ap.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep mass p")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--draft", choices=["none", "model", "ngram", "lookup"], default="none",
                    help="speculative decoding: a draft model (--draft-ckpt), the target's N-gram "
                         "draft head, prompt lookup (training-free), or none (plain decoding)")
    ap.add_argument("--draft-ckpt", default=None, help="draft checkpoint (train.py --preset draft)")
    ap.add_argument("--gamma", type=int, default=4, help="draft tokens per verification")
    ap.add_argument("--stop-at-eos", action="store_true", help="stop at the end-of-document id")
    ap.add_argument("--bench", action="store_true", help="print the speed table and exit")
    ap.add_argument("--bench-repeats", type=int, default=1, help="best of this many runs per prompt")
    ap.add_argument("--bench-prompts", type=int, default=4, help="prompts taken from the default corpus")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0 = torch's default); 1 is fastest for tiny models on a busy CPU")
    args = ap.parse_args(argv)
    for k in ("max_new_tokens", "gamma", "bench_repeats", "bench_prompts"):
        if getattr(args, k) < 1:
            raise ValueError(f"--{k.replace('_', '-')} {getattr(args, k)}: must be at least 1")
    if args.prompt == "":
        raise ValueError("--prompt '': give at least one character (or leave --prompt out)")
    if args.threads < 0:
        raise ValueError(f"--threads {args.threads}: must be >= 0 (0 = torch's default)")
    if args.threads:
        torch.set_num_threads(args.threads)
    check_device(args.device)
    check_sampling(args.temperature, args.top_k, args.top_p)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    target = load_model(args.ckpt, args.device)
    draft = None
    if args.draft == "model" or (args.bench and args.draft_ckpt):
        if not args.draft_ckpt:
            raise ValueError("--draft model needs --draft-ckpt (a checkpoint of train.py --preset draft)")
        draft = load_model(args.draft_ckpt, args.device)
        ModelDrafter(draft, target)  # checks the vocabulary now, before any work
    if args.bench:
        prompts = [encode(args.prompt)] if args.prompt is not None else corpus_prompts(args.bench_prompts)
        bench(target, draft, [p.to(args.device) for p in prompts], args.max_new_tokens,
              temperature=args.temperature, repeats=args.bench_repeats)
        return
    if args.draft == "ngram":
        NgramDrafter(target)  # checks the draft head now
    idx = encode("def " if args.prompt is None else args.prompt).to(args.device)
    # Every check before the first byte is streamed: an error must not follow half an output.
    check_prompt(target, idx, args.max_new_tokens, name="target")
    if draft is not None:
        check_prompt(draft, idx, args.max_new_tokens, name="draft model")
    eos = target.config.eos_id if args.stop_at_eos else None

    def stream(tokens):  # bytes as they are produced; the end-of-document id prints nothing
        sys.stdout.buffer.write(bytes(t for t in tokens[0].tolist() if t < EOS))
        sys.stdout.buffer.flush()

    stream(idx)
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=gen,
              eos_id=eos, callback=stream)
    if args.draft == "none":
        generate(target, idx, args.max_new_tokens, **kw)
        print()
    else:
        _, st = speculative_generate(target, draft if args.draft == "model" else args.draft, idx,
                                     args.max_new_tokens, gamma=args.gamma, **kw)
        print()
        print(f"{st['tokens_per_s']:.1f} tokens/s, acceptance {st['acceptance']:.2f}, "
              f"{st['mean_accepted']:.2f} drafts kept per round; histogram of drafts kept per "
              f"round (0..{len(st['hist']) - 1}): {format_hist(st['hist'])}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # bad input: the message says what to change
        sys.exit(f"infer.py: error: {e}")
