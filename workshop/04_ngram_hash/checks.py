"""Checks of exercise 4: the polynomial n-gram hash (model.ngram_hash), against values worked out by
hand and Python's exact integers, through the model's embedding, then the collision spike at
integer multiples of the vocabulary (experiments/ngram_report.py, which calls the same hash)."""
import os
import random
import sys

import torch

import model
from model import GPTConfig, NgramEmbedding, ngram_hash, ngram_powers, ngram_table_sizes, ngram_windows

sys.path.insert(0, os.path.join(os.path.dirname(model.__file__), "experiments"))


def exact(window, vocab, size, order):
    """h = (t_i + t_{i-1} V + ... + t_{i-order+1} V^(order-1)) mod size, with Python's unbounded ints."""
    return sum(t * vocab ** j for j, t in enumerate(window[:order])) % size


def test_by_hand():
    """V = 257, tables of 1000 rows: (5 + 3 x 257) mod 1000 = 776 and
    (5 + 3 x 257 + 2 x 257^2) mod 1000 = 874"""
    sizes = [1000, 1000]                                       # an order-2 and an order-3 table
    powers = ngram_powers(257, sizes, [2, 3], 3)               # [[1, 257, 0], [1, 257, 49]]
    got = ngram_hash(torch.tensor([[5, 3, 2]]), powers, torch.tensor(sizes))
    assert got.shape == (1, 2), f"shape {tuple(got.shape)}: windows [..., N] give [..., tables]"
    assert got.tolist() == [[776, 874]], (
        f"got {got.tolist()}, expected [[776, 874]]: the window is (t_i, t_(i-1), t_(i-2)) = "
        "(5, 3, 2); term j is t_(i-j) x V^j, and `powers` holds V^j mod V_c (0 past the order)")


def test_exact_at_the_papers_scale():
    """V = 131072, N = 5, K = 2, ratio 10.37 (LongCat-like): equal to exact integer arithmetic,
    no int64 overflow"""
    V, N, K = 131072, 5, 2
    sizes = ngram_table_sizes(10.37, V, (N - 1) * K)
    orders = [2 + c // K for c in range((N - 1) * K)]
    rng = random.Random(0)
    windows = [[rng.randrange(V) for _ in range(N)] for _ in range(60)] + [[V - 1] * N]
    got = ngram_hash(torch.tensor(windows).view(61, 1, N), ngram_powers(V, sizes, orders, N),
                     torch.tensor(sizes))
    assert got.shape == (61, 1, len(sizes)), f"shape {tuple(got.shape)}, expected (61, 1, {len(sizes)})"
    for w, row in zip(windows, got[:, 0].tolist()):
        want = [exact(w, V, M, n) for M, n in zip(sizes, orders)]
        assert row == want, (
            f"window {w}: got {row}, exact {want}. V^4 = 2^68 does not fit in int64: use the "
            "pre-reduced `powers`, and reduce each term modulo V_c before summing")


def test_each_term_reduced():
    """Tables of 10^12 rows, a vocabulary of 8 million: each term reduced before the sum (int64
    holds one product, not five)"""
    V, sizes, N = 8_000_000, [10 ** 12 + 39, 10 ** 12 + 41], 5
    rng = random.Random(1)
    windows = [[rng.randrange(V) for _ in range(N)] for _ in range(40)]
    got = ngram_hash(torch.tensor(windows), ngram_powers(V, sizes, [N, N], N), torch.tensor(sizes))
    for w, row in zip(windows, got.tolist()):
        want = [exact(w, V, M, N) for M in sizes]
        assert row == want, (
            f"window {w}: got {row}, exact {want}. One term t x (V^j mod V_c) is below 2^63 here, "
            "a sum of five is not: reduce each term modulo V_c, then sum (then reduce again)")


def test_the_embedding_uses_it():
    """NgramEmbedding.hash_ids (documents separated by EOS) equals the exact hash of every look-back window"""
    cfg = GPTConfig(vocab_size=257, eos_id=256, n_layer=1, n_head=1, n_embd=32, max_seq_len=64,
                    attn_block=16, ngram_n=3, ngram_k=2)
    idx = torch.tensor([[104, 105, 32, 256, 104, 105, 105, 33]])
    ids = NgramEmbedding(cfg).hash_ids(idx)
    windows = ngram_windows(idx, 3, 256)[0].tolist()
    orders = [2, 2, 3, 3]
    for t, (w, row) in enumerate(zip(windows, ids[0].tolist())):
        want = [exact(w, 257, M, n) for M, n in zip(cfg.ngram_sizes, orders)]
        assert row == want, f"position {t}, window {w}: hash_ids gave {row}, exact {want}"


def test_collisions_at_multiples_of_v():
    """Observe: shares of distinct n-grams that share a bucket, at and off integer multiples of V
    (400 KB of stdlib sources)"""
    from data import corpus_tokens
    from ngram_report import buckets, collided, distinct_ngrams
    V = 257
    tokens = torch.from_numpy(corpus_tokens(400_000).astype("int64"))
    share = {}
    print(f"\n        {'n':>3} {'rows M':>8} {'M / V':>8} {'shared':>8} {'uniform hash':>13}")
    for n, multiples in ((2, (40 * V - 1, 40 * V, 40 * V + 1, round(40.37 * V))),
                         (3, (400 * V, round(400.37 * V)))):
        grams = distinct_ngrams(tokens, n)
        for M in multiples:
            share[n, M] = float(collided(buckets(grams, [M], V), [M])[0].float().mean())
            uniform = 1 - (1 - 1 / M) ** (len(grams) - 1)
            print(f"        {n:>3} {M:>8} {M / V:>8.3f} {share[n, M]:>8.1%} {uniform:>13.1%}")
    assert share[2, 40 * V] > 3 * share[2, round(40.37 * V)], (
        f"2-grams: {share[2, 40 * V]:.1%} share a bucket at M = 40 V, {share[2, round(40.37 * V)]:.1%} "
        "at 40.37 V: the spike at the multiple should be clear")
    assert share[3, 400 * V] > 2 * share[3, round(400.37 * V)], "3-grams: no spike at M = 400 V"
