"""Checks of exercise 7: the speculative acceptance rule (infer.accept_drafts).

References are independent of the code under test: cases whose outcome is certain, the greedy rule
(one-hot p and q), and the exact law of the emitted tokens, tested by chi-square over 100k
independent rounds run as one batch."""
import copy
import math

import torch

from infer import accept_drafts, speculative_generate
from model import GPT, GPTConfig


def chi2(counts, probs):
    """Pearson's statistic and degrees of freedom; cells expecting < 5 are pooled into one."""
    exp = probs * counts.sum()
    small = exp < 5
    obs = torch.cat([counts[~small], counts[small].sum(0, keepdim=True)])
    exp = torch.cat([exp[~small], exp[small].sum(0, keepdim=True)])
    keep = exp > 0
    if bool((counts[probs == 0] > 0).any()):   # an outcome of probability 0 was drawn
        return float("inf"), int(keep.sum()) - 1
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


def chi2_limit(df, z=3.719):
    """Chi-square quantile at p = 1e-4 (Wilson-Hilferty): a correct rule fails 1 run in 10,000."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def run(p, q, drafts, seed=0):
    n, nxt = accept_drafts(p, q, drafts, torch.Generator().manual_seed(seed))
    B = drafts.shape[0]
    assert n.shape == (B,) and nxt.shape == (B,), (
        f"accept_drafts must return n_accepted [B] and next_token [B] (B = {B}), got shapes "
        f"{tuple(n.shape)} and {tuple(nxt.shape)}")
    return n.long(), nxt.long()


def test_sure_accept_and_sure_reject():
    """p(d) >= q(d) always keeps the draft; p(d) = 0 always rejects it and never emits it"""
    B = 2000
    p = torch.tensor([[.6, .2, .2], [.1, .1, .8]]).expand(B, 2, 3)
    q = torch.tensor([[.5, .3, .2]]).expand(B, 1, 3)
    n, nxt = run(p, q, torch.zeros(B, 1, dtype=torch.long))
    assert bool((n == 1).all()), (
        f"draft 0 has p = 0.6 >= q = 0.5, so it must always be accepted; {int((n == 0).sum())} of "
        f"{B} rounds rejected it. Accept when u < p/q with u uniform in [0, 1)")
    p = torch.tensor([[0., .5, .5], [.1, .1, .8]]).expand(B, 2, 3)
    n, nxt = run(p, q, torch.zeros(B, 1, dtype=torch.long))
    assert bool((n == 0).all()), (
        f"draft 0 has p = 0: it must always be rejected, got n = {n.unique().tolist()}")
    assert bool((nxt != 0).all()), (
        "after rejecting token 0 (p = 0) the replacement was token 0 again: sample the replacement "
        "from normalize(max(p - q, 0)), not from q")


def test_only_the_leading_run_counts():
    """A draft after a rejected one is never counted, even when it would have been accepted"""
    B = 500
    p = torch.tensor([[0., .5, .5], [0., 1., 0.], [1., 0., 0.]]).expand(B, 3, 3)
    q = torch.tensor([[1., 0., 0.], [0., 1., 0.]]).expand(B, 2, 3)
    n, nxt = run(p, q, torch.tensor([[0, 1]]).expand(B, 2))
    assert bool((n == 0).all()), (
        f"draft 0 is always rejected and draft 1 always acceptable: n must be 0, got "
        f"{n.unique().tolist()}. n is the length of the leading run of accepts (cumprod helps)")
    assert set(nxt.unique().tolist()) <= {1, 2}, "the replacement must come from max(p - q, 0) at draft 0"


def test_greedy_is_the_one_hot_case():
    """Greedy decoding is one-hot p and q: keep the drafts equal to the target's argmax, then its argmax"""
    g, V, B = 4, 6, 300
    gen = torch.Generator().manual_seed(1)
    target = torch.randint(0, V, (B, g + 1), generator=gen)        # the target's argmax per slot
    drafts = torch.where(torch.rand(B, g, generator=gen) < 0.7, target[:, :g],
                         torch.randint(0, V, (B, g), generator=gen))
    p = torch.nn.functional.one_hot(target, V).float()
    q = torch.nn.functional.one_hot(drafts, V).float()
    n, nxt = run(p, q, drafts)
    want_n = (drafts == target[:, :g]).long().cumprod(-1).sum(-1)
    assert torch.equal(n, want_n), (
        f"with one-hot p and q, n must be the number of leading drafts equal to the target's "
        f"argmax; {int((n != want_n).sum())} of {B} rows differ")
    assert torch.equal(nxt, target[torch.arange(B), want_n]), (
        "with one-hot p, the next token must be the target's argmax at position n (a rejection's "
        "residual max(p - q, 0) is then p itself; after full acceptance it is the bonus p[g])")


def test_emitted_tokens_follow_the_target():
    """Exact: over 100k rounds the first two emitted tokens follow p, not q (chi-square)"""
    V, B = 5, 100_000
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([[.5, .2, .1, .1, .1], [.05, .05, .3, .3, .3], [.2, .2, .2, .2, .2]])
    q = torch.tensor([[.1, .1, .1, .2, .5], [.6, .1, .1, .1, .1]])
    drafts = torch.stack([torch.multinomial(q[i], B, replacement=True, generator=gen) for i in range(2)], 1)
    n, nxt = run(p.expand(B, 3, V), q.expand(B, 2, V), drafts, seed=2)
    first = torch.where(n >= 1, drafts[:, 0], nxt)
    second = torch.where(n >= 2, drafts[:, 1], torch.where(n == 1, nxt, -1))
    c1 = torch.bincount(first, minlength=V).float()
    stat, df = chi2(c1, p[0])
    assert stat < chi2_limit(df), (
        f"the first emitted token's counts {c1.long().tolist()} do not follow "
        f"p = {p[0].numpy().round(2).tolist()} "
        f"(chi-square {stat:.0f} > {chi2_limit(df):.0f}). Accept with probability min(1, p/q); "
        "on rejection, sample from max(p - q, 0) normalised")
    two = second >= 0
    c2 = torch.bincount(second[two], minlength=V).float()
    stat, df = chi2(c2, p[1])
    assert stat < chi2_limit(df), (
        f"the second emitted token's counts {c2.long().tolist()} do not follow p[1] = "
        f"{p[1].numpy().round(2).tolist()} (chi-square {stat:.0f}): after an accepted first draft, "
        "the second is "
        "judged by p[:, 1] and q[:, 1]")
    assert chi2(c1, q[0])[0] > 10 * chi2_limit(df), "the check has no power: p and q look alike"


def test_acceptance_rate():
    """A draft is kept with probability sum_x min(p(x), q(x)): 0.5 for the first draft here"""
    V, B = 5, 100_000
    gen = torch.Generator().manual_seed(3)
    p = torch.tensor([[.5, .2, .1, .1, .1], [.2, .2, .2, .2, .2]])
    q = torch.tensor([[.1, .1, .1, .2, .5]])
    drafts = torch.multinomial(q[0], B, replacement=True, generator=gen)[:, None]
    n, _ = run(p.expand(B, 2, V), q.expand(B, 1, V), drafts, seed=4)
    rate = float(n.float().mean())
    assert abs(rate - 0.5) < 0.01, (
        f"acceptance rate {rate:.3f}, expected 0.5 = sum_x min(p(x), q(x)) (standard error 0.002)")


def test_full_acceptance_adds_a_bonus_from_the_last_row():
    """When every draft is kept (p = q), the extra token comes from p[:, g], the bonus row"""
    V, B = 4, 40_000
    row = torch.tensor([.25, .25, .25, .25])
    bonus = torch.tensor([.7, .1, .1, .1])
    p = torch.stack([row, row, bonus]).expand(B, 3, V)
    q = torch.stack([row, row]).expand(B, 2, V)
    drafts = torch.randint(0, V, (B, 2), generator=torch.Generator().manual_seed(5))
    n, nxt = run(p, q, drafts, seed=6)
    assert bool((n == 2).all()), f"p == q: every draft must be kept, got n = {n.unique().tolist()}"
    stat, df = chi2(torch.bincount(nxt, minlength=V).float(), bonus)
    assert stat < chi2_limit(df), (
        f"the bonus token's counts {torch.bincount(nxt, minlength=V).tolist()} do not follow "
        f"p[:, g] = {bonus.numpy().round(2).tolist()}: after full acceptance, sample from the last row of p")


def test_acceptance_histogram():
    """Observe: speculative sampling with a noisy copy as the draft; its acceptance histogram"""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=257, eos_id=256, n_layer=2, n_head=2, n_embd=32, max_seq_len=128,
                    attn_block=16, topk=4, ngram_n=3, ngram_k=2)
    target = GPT(cfg).eval()
    with torch.no_grad():
        target.lm_head.weight.mul_(30)       # sharper than a random init, as a trained model is
    draft = copy.deepcopy(target)
    with torch.no_grad():
        for w in draft.parameters():
            w.add_(0.3 * w.std().nan_to_num(0.02) * torch.randn_like(w))
    idx = torch.tensor([[100, 101, 102]])
    out, st = speculative_generate(target, draft, idx, 60, gamma=4, temperature=1.0,
                                   generator=torch.Generator().manual_seed(7))
    hist = st["hist"]
    print(f"\n        acceptance histogram (rounds that kept 0, 1, 2, 3, 4 drafts): {hist}; "
          f"{st['accepted']} of {st['drafted']} drafts kept, {out.size(1) - 3} tokens in "
          f"{st['rounds']} target forwards")
    assert out.size(1) == 63 and sum(hist) == st["rounds"], "speculative_generate did not finish"
    assert 0 < st["accepted"] < st["drafted"], (
        f"{st['accepted']} of {st['drafted']} drafts kept: a noisy copy should be kept sometimes, "
        "not always")
