"""Tests for the N-gram paper's experiment drivers (experiments/ngram_*.py): the arms have the
totals and activated counts they claim (counted here by hand from GPTConfig), and the sweep runs a
tiny case end to end through train.py."""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import ngram_infer_cost as cost  # noqa: E402
import ngram_report as report  # noqa: E402
import ngram_sweep as sweep  # noqa: E402
from model import GPT, GPTConfig, ngram_windows  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def hand_count(cfg):
    """(total, activated) from the config alone: embeddings, attention, norms, FFN or experts,
    n-gram tables and their projection, LM head (no draft head in these arms)."""
    D, V, L = cfg["n_embd"], 257, cfg["n_layer"]
    E, k = cfg.get("n_experts", 0), cfg.get("expert_topk", 2)
    ffn = 3 * D * cfg["ffn_hidden"]                                   # SwiGLU: in (2 halves), out
    n, K = cfg.get("ngram_n", 0), cfg.get("ngram_k", 2)
    T = (n - 1) * K if n >= 2 else 0
    rows = sum(int(cfg.get("ngram_ratio", 10.37) * V + 2 * c + 1) for c in range(T))
    norm_ln = 2 * D if cfg.get("ngram_amp") == "layernorm" else 0
    attn = 4 * D * D + 2 * D                                          # qkv + proj, two RMSNorms
    block_total = attn + (E * ffn + E * D if E else ffn)              # experts + router
    block_active = attn + (k * ffn + E * D if E else ffn)
    emb_total = V * D + rows * (D // T if T else 0) + (D * D if T else 0) + norm_ln
    emb_active = D + (D + D * D if T else 0) + norm_ln                # one row of E0, T rows of D/T
    head = D + V * D                                                  # final norm + LM head
    return emb_total + L * block_total + head, emb_active + L * block_active + head


def test_sweep_arms_have_the_totals_and_activated_counts_they_claim():
    args = sweep.get_args([])
    runs = sweep.sweep_runs(args)
    by = {name: kw for name, _, _, kw in runs}
    for name, arm, size, kw in runs:
        assert sweep.counts(kw)[:2] == hand_count(kw), name
    base_active = hand_count(by[f"moe{args.base_experts}"])[1]
    dense_active = hand_count(by["dense"])[1]
    assert abs(dense_active / base_active - 1) < 0.01                 # same activated as the MoE
    for e in args.sizes:
        moe, ne = by[f"moe{e}"], by[f"ne_as_moe{e}"]
        t_moe, a_moe = hand_count(moe)
        t_ne, a_ne = hand_count(ne)
        assert moe["expert_topk"] == args.expert_topk and moe["n_experts"] == e
        assert abs(t_ne / t_moe - 1) < 0.005                          # equal totals
        assert a_moe - base_active == args.n_layer * (e - args.base_experts) * args.n_embd  # router only
        assert abs(a_ne / a_moe - 1) < 0.05                           # NE adds its D x D projection
        assert ne["n_experts"] == args.base_experts and sweep.counts(ne)[2] <= 0.5   # the paper's cap
        assert abs(ne["ngram_ratio"] - round(ne["ngram_ratio"])) >= 0.1            # off integers


def test_ablations_hold_the_table_budget_and_vary_one_thing():
    args = sweep.get_args([])
    runs = sweep.ablation_runs(args)
    nk = [kw for _, group, _, kw in runs if group == "N, K"]
    totals = [hand_count(kw)[0] for kw in nk]
    assert max(totals) / min(totals) - 1 < 0.005                      # about ratio x V x D in tables
    assert {(kw["ngram_n"], kw["ngram_k"]) for kw in nk} == {(2, 2), (3, 2), (4, 2), (3, 1), (3, 4)}
    amps = [kw.get("ngram_amp", "sqrt_d") for _, group, _, kw in runs if group == "amplification"]
    assert amps == ["none", "sqrt_d", "layernorm"]
    ratios = [kw["ngram_ratio"] for _, group, _, kw in runs if group == "ratio"]
    assert ratios[0] == int(ratios[0]) and abs(ratios[1] - ratios[0] - 0.37) < 1e-9


def test_infer_cost_arms_have_equal_totals():
    ns = sweep.argparse.Namespace(n_layer=2, n_embd=64, n_head=2, max_len=128, attn_block=64, topk=2,
                                  experts=8, base_experts=4, expert_topk=2, expert_hidden=64,
                                  ngram_n=3, ngram_k=2)
    cfgs = cost.configs(ns)
    counts = {name: hand_count(kw) for name, kw in cfgs.items()}
    moe, ne, wide, small = (counts[n] for n in ("MoE 8 experts", "MoE 4 + N-gram", "dense (same total)",
                                                "dense (same activated)"))
    assert abs(ne[0] / moe[0] - 1) < 0.01 and abs(wide[0] / moe[0] - 1) < 0.1
    assert abs(small[1] / moe[1] - 1) < 0.02


def test_sweep_runs_a_tiny_case_end_to_end(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["--parts", "sweep", "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--max-seq-len", "64",
            "--attn-block", "16", "--topk", "2", "--base-experts", "2", "--expert-hidden", "64",
            "--sizes", "3", "--steps", "1", "--warmup", "1", "--batch-size", "2", "--eval-samples", "2",
            "--seeds", "1", "--jobs", "2", "--out", str(out)]
    rows = sweep.main(argv)["sweep"]
    assert [r["arm"] for r in rows] == ["dense", "base MoE", "experts", "N-gram"]
    assert all(2 < r["mean"] < 12 for r in rows)                     # a bits-per-byte, not a crash
    lines = [json.loads(line) for line in open(out / "results.jsonl")]
    assert len(lines) == 4 and not any((out / "runs" / f"{r['name']}_s1" / "ckpt.pt").exists() for r in lines)
    table = capsys.readouterr().out
    assert "| N-gram | moe2 + NE" in table
    again = sweep.main(argv)["sweep"]                                 # cached: nothing is trained
    assert len(open(out / "results.jsonl").readlines()) == 4
    assert [r["mean"] for r in again] == [r["mean"] for r in rows]


def test_collision_counting():
    tokens = torch.tensor([1, 2, 256, 1, 2, 3])                     # 2-grams (t_i, t_{i-1}), EOS resets
    grams = report.distinct_ngrams(tokens, 2)
    assert {tuple(g) for g in grams.tolist()} == {(1, 0), (2, 1), (256, 2), (3, 2)}
    rows = report.buckets(grams, [5, 7])                            # (t_i + 257 t_{i-1}) mod M, by hand
    want = [[(a + 257 * b) % M for M in (5, 7)] for a, b in grams.tolist()]
    assert rows.tolist() == want
    every, same = report.collided(torch.tensor([[0], [5 % 5], [10 % 5], [3]]), [5])  # buckets 0, 0, 0, 3
    assert every.tolist() == [True, True, True, False] and same.tolist() == every.tolist()
    every, same = report.collided(torch.tensor([[0, 0], [0, 5], [0, 3], [3, 3]]), [5, 7])
    assert every.tolist() == [False, False, True, False] and not same.any()


def test_report_buckets_are_the_models_hash():
    """The report hashes with the model's own function: the bucket of every window equals the row
    NgramEmbedding.hash_ids gives that position (for the order's first table)."""
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=32, ngram_n=3, ngram_k=2, ngram_ratio=3.37)
    emb = GPT(cfg).embed
    idx = torch.randint(0, 257, (1, 64), generator=torch.Generator().manual_seed(0))
    ids = emb.hash_ids(idx)[0]                                      # (T, tables)
    for n in (2, 3):
        w = ngram_windows(idx, n, cfg.eos_id)[0]
        sizes = cfg.ngram_sizes[(n - 2) * 2:(n - 1) * 2]
        assert torch.equal(report.buckets(w, sizes), ids[:, (n - 2) * 2:(n - 1) * 2])


def test_reports_run(capsys):
    report.main(["--collisions", "--max-bytes", "20000", "--ratios", "3.37"])
    report.main(["--params"])
    out = capsys.readouterr().out
    assert "distinct 2-grams" in out and "ngram_moe" in out
