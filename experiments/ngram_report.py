"""Two reports on the N-gram Embedding (LongCat-Flash-Lite, "Scaling Embeddings Outperforms Scaling
Experts in Language Models", Sec. 3) that call the model's own functions, so they always measure
what the model computes:

- collisions: how many distinct n-grams of the default corpus share a bucket, for table sizes at
  and off integer multiples of the vocabulary (the paper's warning), and with K tables per order
  (model.ngram_table_sizes, hashed by model.ngram_hash, the function NgramEmbedding uses);
- params: total and per-token active parameters of the paper's comparison at equal active
  parameters (COMPARE: more experts vs n-gram tables), counted by GPT.num_params.

    python experiments/ngram_report.py --collisions     # 4 MB of stdlib sources, 15-35 s
    python experiments/ngram_report.py --params
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import EOS, corpus_tokens  # noqa: E402
from model import GPT, GPTConfig, ngram_hash, ngram_powers, ngram_table_sizes, ngram_windows  # noqa: E402

# The paper's comparison at equal active parameters: spend extra total parameters on experts
# ("moe", "moe_wide") or on n-gram tables ("ngram", "ngram_moe"); "ngram" matches "moe" in total,
# "ngram_moe" matches "moe_wide". Overrides of GPTConfig's defaults (train.py's --variant builds the
# same comparison at any width).
COMPARE = {
    "dense": dict(ngram_n=0),
    "moe": dict(ngram_n=0, n_experts=4, expert_topk=2, ffn_hidden=352),
    "moe_wide": dict(ngram_n=0, n_experts=8, expert_topk=2, ffn_hidden=352),
    "ngram_moe": dict(ngram_n=3, ngram_k=2, ngram_ratio=65.37, n_experts=4, expert_topk=2, ffn_hidden=352),
    "ngram": dict(ngram_n=3, ngram_k=2, ngram_ratio=32.37),
}


def distinct_ngrams(tokens, n, eos_id=EOS):
    """The distinct look-back windows (t_i, t_{i-1}, ..., t_{i-n+1}) the embedding hashes for the
    positions of `tokens` [L], with the model's own look-back rules (ngram_windows): [U, n]."""
    return torch.unique(ngram_windows(tokens[None], n, eos_id)[0], dim=0)


def buckets(windows, sizes, vocab=EOS + 1):
    """Rows of every window [U, n] in tables of `sizes`, by the model's hash: [U, len(sizes)]."""
    n = windows.shape[1]
    return ngram_hash(windows, ngram_powers(vocab, sizes, [n] * len(sizes), n), torch.tensor(sizes))


def collided(rows, sizes):
    """rows [U, tables] (buckets of distinct n-grams). Per n-gram: does it share its bucket with
    another n-gram in every table? And does another n-gram land in exactly the same buckets of all
    tables (indistinguishable)?"""
    every = torch.ones(len(rows), dtype=torch.bool)
    for b, M in zip(rows.T, sizes):
        every &= torch.bincount(b, minlength=M)[b] > 1
    _, inv, cnt = torch.unique(rows, dim=0, return_inverse=True, return_counts=True)
    return every, cnt[inv] > 1


def collision_report(max_bytes=4_000_000, vocab=EOS + 1, multiples=(40, 400), ratios=(10.37, 40.37)):
    """Print the paper's collision analysis: 2- and 3-gram collisions for table sizes M swept around
    integer multiples of the vocabulary and around non-integer ratios (r + 0.37), then, for K = 1,
    2, 4 tables of sizes m + 2c + 1, the share of n-grams that collide in all K tables at once."""
    t0 = time.time()
    tokens = torch.from_numpy(corpus_tokens(max_bytes).astype("int64"))
    grams = {n: distinct_ngrams(tokens, n) for n in (2, 3)}
    print(f"corpus: {len(tokens):,} tokens of stdlib sources; distinct 2-grams {len(grams[2]):,}, "
          f"3-grams {len(grams[3]):,}")
    print("share of distinct n-grams sharing their bucket (uniform = what a random hash would give)")
    print(f"{'rows M':>8} {'M/V':>8} {'2-gram':>8} {'uniform':>8} {'3-gram':>8} {'uniform':>8}")
    for r in multiples:
        sizes = [r * vocab + d for d in (-16, -2, -1, 0, 1, 2, 16)]
        sizes += [round((r + 0.37) * vocab) + d for d in (-1, 0, 1)]
        for M in sizes:
            row = [f"{M:>8} {M / vocab:>8.3f}"]
            for n in (2, 3):
                row.append(f"{collided(buckets(grams[n], [M], vocab), [M])[0].float().mean():>8.2%}")
                row.append(f"{1 - (1 - 1 / M) ** (len(grams[n]) - 1):>8.2%}")
            print(" ".join(row))
        print()
    print("K tables per order, sizes int(ratio V + 2c + 1) (N = 3 layout): share of n-grams whose bucket is shared")
    print("in all K tables (all-K), and share with another n-gram in exactly the same K buckets (same)")
    print(f"{'ratio':>7} {'m':>6} {'K':>3} {'2g all-K':>9} {'2g same':>8} {'3g all-K':>9} {'3g same':>8}")
    for ratio in ratios:
        m = int(ratio * vocab)
        for K in (1, 2, 4):
            row = [f"{ratio:>7} {m:>6} {K:>3}"]
            sizes = ngram_table_sizes(ratio, vocab, 2 * K)             # N = 3: orders 2 and 3
            for n in (2, 3):
                mine = sizes[(n - 2) * K:(n - 1) * K]
                every, same = collided(buckets(grams[n], mine, vocab), mine)
                row.append(f"{every.float().mean():>9.2%} {same.float().mean():>8.2%}")
            print(" ".join(row))
    print(f"({time.time() - t0:.1f} s)")


def params_report():
    """Total and per-token active parameters of the COMPARE configurations."""
    print(f"{'config':>10} {'total':>12} {'active':>12} {'n-gram tables':>14}")
    for name, kw in COMPARE.items():
        model = GPT(GPTConfig(**kw))
        tables = model.embed.tables.weight.numel() if model.config.n_tables else 0
        print(f"{name:>10} {model.num_params():>12,} {model.num_params(active=True):>12,} "
              f"{tables / model.num_params():>14.1%}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--collisions", action="store_true",
                    help="n-gram hash collisions near integer multiples of the vocabulary, and with K tables")
    ap.add_argument("--max-bytes", type=int, default=4_000_000,
                    help="corpus bytes for --collisions (default 4,000,000, under a minute; the stdlib has ~12 MB)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[10.37, 40.37],
                    help="sub-table ratios for the all-K collision table")
    ap.add_argument("--params", action="store_true", help="parameter counts of the COMPARE configs")
    args = ap.parse_args(argv)
    if args.max_bytes < 1 or min(args.ratios) <= 0:
        ap.error("--max-bytes must be >= 1 and every --ratios value > 0")
    if args.collisions:
        collision_report(args.max_bytes, ratios=args.ratios)
    if args.params:
        params_report()
    if not (args.collisions or args.params):
        ap.print_help()


if __name__ == "__main__":
    main()
