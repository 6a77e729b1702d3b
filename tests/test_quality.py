"""Needle evaluation (train.needle_eval) and the quality driver (experiments/quality.py).

The scores are checked on models whose answer is known, never on a trained model: a model that
copies its input (it predicts what followed the last earlier occurrence of its recent context,
the induction rule a retrieval model has to learn) scores 100%, an untrained GPT about 0%; the
budget each cell asks for reaches the decoding steps. No test asserts a quality number.
"""
import json
import os
import subprocess
import sys

import numpy as np
import torch

import train
from data import EOS, passkey_sample
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILLER = np.frombuffer(b"def f(x):\n    return x + 1  # passkey\n", np.uint8).astype(np.uint16)


class StubCache:
    def __init__(self, batch_size, max_len):
        self.tokens = torch.zeros(batch_size, max_len, dtype=torch.long)
        self.pos = 0


class CopyModel(torch.nn.Module):
    """Logits with all mass on the token that followed the last earlier occurrence of the last
    `window` tokens (an induction oracle); uniform where the context never occurred. Records the
    budget of every forward (`seen`); with `p` set, reports fixed per-layer floors like DST's."""

    def __init__(self, config, window=12, oracle=True):
        super().__init__()
        self.config, self.window, self.oracle = config, window, oracle
        self.w = torch.nn.Parameter(torch.zeros(()))  # a device for needle_eval to read
        self.seen, self.used_budgets = [], None

    def new_cache(self, batch_size, max_len=None, device=None, dtype=None):
        return StubCache(batch_size, max_len or self.config.max_seq_len)

    def predict(self, seq):
        """Next token after every position of the 1-D list seq."""
        last, out = {}, []
        for t in range(len(seq)):
            key = tuple(seq[max(0, t - self.window + 1):t + 1])
            out.append(seq[last[key] + 1] if key in last and self.oracle else -1)
            last[key] = t  # after the lookup: the earlier occurrence, never t itself
        return out

    def forward(self, idx, targets=None, cu_seqlens=None, topk=None, cache=None, k0=None, p=None, **kw):
        topk = self.config.topk if topk is None else topk
        self.seen.append(topk.tolist() if torch.is_tensor(topk) else topk)
        n_layer, S = self.config.n_layer, idx.size(0)
        self.used_budgets = (torch.tensor([[3], [2]]) if p is not None
                             else torch.as_tensor(topk).expand(n_layer, S)[:, :S].clone())
        if cache is not None:
            cache.tokens[:, cache.pos:cache.pos + idx.size(1)] = idx
            cache.pos += idx.size(1)
            seq, new = cache.tokens[0, :cache.pos].tolist(), idx.size(1)
        else:
            seq, new = idx[0].tolist(), idx.size(1)
        logits = torch.zeros(1, new, self.config.vocab_size)
        for j, tok in enumerate(self.predict(seq)[-new:]):
            if tok >= 0:
                logits[0, j, tok] = 100.0
        return logits, None


def stub_config():
    return GPTConfig(n_layer=2, n_head=2, n_embd=32, max_seq_len=256, attn_block=16, topk=4)


def test_passkey_depth_places_the_needle():
    for depth in (0.0, 0.5, 1.0):
        toks, pos = passkey_sample(np.random.default_rng(0), FILLER, 300, depth=depth)
        text = bytes(toks[:-1].astype(np.uint8)).decode()
        at = text.index("\n# The passkey is")
        assert len(toks) == 301 and toks[-1] == EOS
        assert abs(at / (300 - 82) - depth) < 0.02  # 82 tokens of needle, question and key
        assert text.endswith(bytes(toks[pos + 1].astype(np.uint8)).decode())


def test_copy_model_scores_every_needle_and_random_model_none():
    cfg = stub_config()
    copy = CopyModel(cfg)
    for L in (64, 128, 256):
        for k in train.needle_budgets(cfg):
            free, forced, used = train.needle_eval(copy, FILLER, L, k, 4, seed=0)
            assert free == [1] * 4 and forced == [1] * 4, (L, k, free, forced)
    blind = CopyModel(cfg, oracle=False)  # uniform logits: argmax is token 0, never a digit
    assert train.needle_eval(blind, FILLER, 256, 4, 4, seed=0)[:2] == ([0] * 4, [0] * 4)
    torch.manual_seed(0)
    rand = GPT(cfg).eval()
    hits = [sum(train.needle_eval(rand, FILLER, 256, k, 4, seed=0)[0]) for k in (2, "dst")]
    assert sum(hits) <= 1  # about 0%: five random digits match one time in 10^5


def test_needle_budget_reaches_the_decoding_steps():
    cfg = stub_config()
    copy = CopyModel(cfg)
    train.needle_eval(copy, FILLER, 128, 2, 1, seed=0)
    assert copy.seen == [2] * len(copy.seen) and len(copy.seen) == 1 + 1 + 5  # forced, prefill, 5 steps
    assert cfg.topk == 4  # restored
    copy.seen.clear()
    free, forced, used = train.needle_eval(copy, FILLER, 128, "dst", 1, seed=0)
    # the floor pass (target 1, k0 = config.topk), then every layer at its floor: [[3], [2]]
    assert copy.seen[0] == 1 and all(s == [[3], [2]] for s in copy.seen[1:]) and used == [2.5]
    assert cfg.topk == 4


def test_quality_driver_runs_a_tiny_case(tmp_path):
    """The whole driver: a few steps of two arms, needle evaluation of their checkpoints, tables."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(6):
        (data / f"f{i}.py").write_bytes(b"def f(x):\n    return x + %d\n" % i * 20)
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "quality.py"), "curves", "--data", str(data),
           "--out", str(out), "--arms", "dense", "k0", "--seeds", "1", "--nproc", "0", "--steps", "2",
           "--needle-docs", "1", "--no-plots", "--", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
           "--max-seq-len", "128", "--attn-block", "16", "--topk", "2", "--batch-size", "2",
           "--eval-samples", "2", "--warmup", "1", "--induction-steps", "1"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    table = r.stdout.split("| arm | trained budget |")[1].split("\n\n")[0]  # the summary table
    assert [line.split(" | ")[0] for line in table.splitlines()[2:4]] == ["| dense", "| k0"]
    assert "k0 - dense:" in r.stdout and "free running" in r.stdout
    res = [json.loads(line) for line in open(out / "results.jsonl")]
    assert sorted(x["arm"] for x in res) == ["dense", "k0"]
    assert all(0 < x["val_bpb"] < 20 and "T128_k2" in x["needle"] for x in res)
    # the per-digit table of one of those checkpoints: 3 lengths x 2 budgets, 5 digits + all five
    r = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "quality.py"), "digits", "--data",
                        str(data), "--needle-docs", "2", "--ckpt", str(out / "k0-s1" / "ckpt.pt")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line.split(" | ")[2:] for line in r.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 6 and all(len(x) == 6 and all(0 <= float(v.strip(" |")) <= 1 for v in x) for x in rows)


def test_induction_losses_tell_a_copying_model_from_a_blind_one():
    """The repeated-string probe (quality.py induction): the copying oracle predicts every repeat,
    so its later passes cost a tenth of the first or less (the first tokens after a boundary,
    whose context spans it, are new to it); uniform logits cost the same on every pass."""
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import quality
    cfg = stub_config()
    first, *later = quality.induction_losses(CopyModel(cfg, window=3))
    assert first > 3 and max(later) < first / 10, (first, later)
    blind = quality.induction_losses(CopyModel(cfg, oracle=False))
    assert max(blind) - min(blind) < 1e-6 and blind[0] > 3, blind


def test_anchor_grid_is_two_sweeps_through_the_curves_run_or_the_full_grid():
    """anchors: by default the anchors at --p plus p at the mean anchor (5 runs, (mean, --p) once:
    it is the curves' sab+dst run); --full-grid: every anchor x every p."""
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import quality
    from argparse import Namespace
    a = Namespace(anchors=["mean", "min", "max"], ps=[0.1, 0.2, 0.3], p=0.1, full_grid=False)
    assert quality.anchor_grid(a) == [("mean", 0.1), ("min", 0.1), ("max", 0.1), ("mean", 0.2), ("mean", 0.3)]
    full = quality.anchor_grid(Namespace(**{**vars(a), "full_grid": True}))
    assert len(full) == 9 and len(set(full)) == 9 and set(quality.anchor_grid(a)) <= set(full)
