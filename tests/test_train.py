"""train.py: data pieces, a 2-rank gloo run, exact resume after a killed rank, uneven loads, bad input.

The distributed runs go through torchrun (`python -m torch.distributed.run`) exactly as users run
them; models are tiny and runs a few steps long, so the whole file takes about a minute.
"""
import hashlib
import json
import os
import subprocess
import sys
from contextlib import nullcontext

import numpy as np
import pytest
import torch

import checkpoint
import train
from data import COPY_ALPHABET, EOS, chunk, load_documents
from model import GPTConfig
from model import GPT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--max-seq-len", "256", "--attn-block", "32",
        "--topk", "2", "--batch-size", "6", "--steps", "8", "--warmup", "2", "--lr", "3e-3", "--eval-every", "4",
        "--eval-samples", "4", "--threads", "1", "--balance", "sab+dst", "--correction", "off",
        "--passkey-frac", "0.2"]


@pytest.fixture(scope="module")
def data(stdlib_package):
    """A small real corpus: the standard library's email package (about 30 files)."""
    return stdlib_package("email")


def torchrun(args, nproc=2, extra=(), timeout=120):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *extra, os.path.join(ROOT, "train.py"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def errors(r):
    """The Python errors in a failed run's output (torchrun's own summary hides them)."""
    return "\n".join(l for l in (r.stdout + r.stderr).splitlines() if "Error" in l or "error" in l)[-3000:]


def metrics(out):
    """Per-step train records (the last one wins: a restarted run repeats steps), and all records."""
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return {r["step"]: r for r in recs if "loss" in r}, recs


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# ---------------------------------------------------------------------------------- data pieces

def test_chunks_predict_every_token_once_and_microbatch_layout():
    rng = np.random.default_rng(0)
    doc = np.append(rng.integers(0, 256, 1000), EOS).astype(np.uint16)
    chunks = chunk([doc], 256)
    assert max(len(c) for c in chunks) == 257
    targets = np.concatenate([c[1:] for c in chunks])  # each token after the first, exactly once
    assert np.array_equal(targets, doc[1:])
    x, y, m, cu = train.make_microbatch(chunks, 64, "cpu")
    lens = [len(c) - 1 for c in chunks]
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == x.shape[1]
    assert all(int(c) % 64 == 0 for c in cu) and torch.all(cu[1:] > cu[:-1])
    assert m.sum().item() == sum(lens)
    for c, a, n in zip(chunks, cu[:-1].tolist(), lens):  # targets are the inputs shifted by one
        assert np.array_equal(x[0, a:a + n].numpy(), c[:-1]) and np.array_equal(y[0, a:a + n].numpy(), c[1:])
        assert m[0, a:a + n].all() and not m[0, a + n:a + -(-n // 64) * 64].any()
    x, y, m, cu = train.make_microbatch([], 64, "cpu")  # an empty microbatch: one masked block
    assert x.shape == (1, 64) and m.sum() == 0 and cu.tolist() == [0, 64]


def test_default_corpus_split_is_deterministic_and_disjoint():
    tr, va = load_documents(None, 0.1, 512)
    tr2, va2 = load_documents(None, 0.1, 512)
    assert all(map(np.array_equal, tr + va, tr2 + va2)) and len(tr) == len(tr2) and len(va) == len(va2)
    assert len(tr) > 200 and 0.03 < len(va) / (len(tr) + len(va)) < 0.2
    assert all(d[-1] == EOS and d[:-1].max() < 256 for d in tr[:50])
    # no validation file is also in training (files whose text occurs twice in the library aside)
    from collections import Counter
    count = Counter(bytes(d.astype(np.uint8)) for d in tr + va)
    val_texts = {bytes(d.astype(np.uint8)) for d in va}
    assert not any(count[t] == 1 and t in val_texts for t in (bytes(d.astype(np.uint8)) for d in tr))
    assert sum(count[t] == 1 for t in val_texts) > 10


def test_passkey_answer_positions():
    rng = np.random.default_rng(1)
    filler = np.frombuffer(b"def f(x):\n    return x\n", np.uint8).astype(np.uint16)
    toks, pos = train.passkey_sample(rng, filler, 300)
    assert len(toks) == 301 and toks[-1] == EOS
    text = bytes(toks[:-1].astype(np.uint8)).decode()
    key = text.rsplit(" ", 1)[1]
    assert len(key) == 5 and f"The passkey is {key}. Remember" in text
    assert bytes(toks[pos + 1].astype(np.uint8)).decode() == key  # target j is token j + 1


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save_checkpoint(path, {"step": 1})
    before = sha(path)

    def broken_save(obj, f):  # what torch.save does on a full disk: a partial file, then an error
        open(f, "wb").write(b"partial")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(train.TrainingError, match="writing the checkpoint failed.*previous one is intact"):
        checkpoint.save_checkpoint(path, {"step": 2})
    assert sha(path) == before and torch.load(path, weights_only=True)["step"] == 1
    assert not os.path.exists(path + ".tmp")  # the partial file is removed, not left behind


# ---------------------------------------------------------------------------------- runs

@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted 2-rank run: the baseline the restarted run must reproduce."""
    out = str(tmp_path_factory.mktemp("ref"))
    r = torchrun(["--data", data, "--out", out, *TINY])
    assert r.returncode == 0, errors(r)
    return out


def test_two_ranks_train_in_sync_and_log(reference):
    steps, recs = metrics(reference)
    assert sorted(steps) == list(range(1, 9))
    losses = [steps[s]["loss"] for s in range(1, 9)]
    assert np.mean(losses[-2:]) < losses[0] - 0.1  # loss falls
    assert all(len(steps[s]["compute"]) == 2 and steps[s]["imbalance"] >= 1 for s in steps)
    # the Balancer's logs: budgets per layer, floors above targets, predicted vs measured
    assert all(len(steps[s]["mean_budget_layer"]) == 1 and steps[s]["mean_budget"] >= 1
               and steps[s]["floor_above_target"] >= 0 and len(steps[s]["predicted"]) == 2 for s in steps)
    assert all(steps[s]["pred_err"] >= 0 for s in steps)
    evals = [r for r in recs if "val_bpb" in r]
    assert [r["step"] for r in evals] == [4, 8] and all(0 < r["val_bpb"] < 9 for r in evals)
    # needle accuracy (free running, and teacher forced) for contexts T/4, T/2, T at budgets k0/2,
    # k0, dense (8 blocks) and each layer's DST floor
    keys = {f"needle{tf}_T{L}_k{k}" for tf in ("", "_tf") for L in (64, 128, 256) for k in (1, 2, 8, "dst")}
    assert all(keys <= set(r) and all(r[k] in [i / 8 for i in range(9)] for k in keys) for r in evals)
    assert recs[-1]["replica_max_diff"] == 0.0  # parameters identical on both ranks
    cfg = json.load(open(os.path.join(reference, "config.json")))
    assert cfg["world_size"] == 2 and cfg["model"]["n_embd"] == 32


def test_killed_rank_restarts_and_matches_uninterrupted_run(data, reference, tmp_path):
    out = str(tmp_path)
    r = torchrun(["--data", data, "--out", out, *TINY, "--ckpt-every", "2", "--crash-at-step", "6",
                  "--resume"], extra=["--max-restarts=1"])
    assert r.returncode == 0, errors(r)
    assert os.path.exists(os.path.join(out, "crashed_at_6"))  # the crash did happen
    assert "resumed" in r.stdout + r.stderr
    got, _ = metrics(out)
    ref, _ = metrics(reference)
    assert sorted(got) == sorted(ref)
    for s in ref:  # same seed, same data, same state: the same losses as if never stopped
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-6, abs=1e-6), s


def test_ranks_with_different_loads_do_not_hang(data, tmp_path):
    # One sample for two ranks: rank 1 has only empty microbatches and must still join the
    # gradient all-reduce; a hang would hit the timeout.
    out = str(tmp_path)
    r = torchrun(["--data", data, "--out", out, *TINY, "--batch-size", "1", "--steps", "2",
                  "--eval-every", "2"], timeout=90)
    assert r.returncode == 0, errors(r)
    steps, recs = metrics(out)
    assert sorted(steps) == [1, 2] and recs[-1]["replica_max_diff"] == 0.0
    assert all(min(steps[s]["compute"]) < max(steps[s]["compute"]) for s in steps)


def test_single_process_resume_and_bad_inputs_leave_checkpoint_intact(data, tmp_path):
    ref, out = str(tmp_path / "ref"), str(tmp_path / "run")
    args = ["--data", data, *TINY, "--steps", "4", "--ckpt-every", "2", "--balance", "lbb"]
    train.main(args + ["--out", ref])
    crashed = subprocess.run([sys.executable, "train.py", *args, "--out", out, "--crash-at-step", "3"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert crashed.returncode != 0 and os.path.exists(os.path.join(out, "ckpt.pt"))
    assert torch.load(os.path.join(out, "ckpt.pt"))["step"] == 2  # loads with weights_only=True
    train.main(args + ["--out", out, "--resume"])
    model = GPT.from_checkpoint(os.path.join(out, "ckpt.pt"))  # what infer.py reads
    assert model.config.n_embd == 32 and model.num_params() > 0
    a, b = metrics(ref)[0], metrics(out)[0]
    assert [a[s]["loss"] for s in range(1, 5)] == pytest.approx([b[s]["loss"] for s in range(1, 5)], rel=1e-6)

    ckpt = os.path.join(out, "ckpt.pt")
    before = sha(ckpt)
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = [
        (FileNotFoundError, "no such file", ["--data", str(tmp_path / "missing")]),
        (FileNotFoundError, "no (non-empty, text) documents", ["--data", str(empty)]),
        (ValueError, "multiple of attn_block", ["--max-seq-len", "200"]),
        (ValueError, "unknown preset", ["--preset", "nope"]),
        (ValueError, "different config", ["--n-embd", "64"]),
        (ValueError, "exists: pass --resume", ["--steps", "6"]),  # a fresh run would overwrite it
        (ValueError, "--balance", ["--balance", "fast"]),
    ]
    for err, msg, extra in bad:
        flags = args + ["--out", out] + (["--resume"] if "--steps" not in extra else []) + extra
        with pytest.raises(err, match=msg.replace("(", r"\(").replace(")", r"\)")):
            train.main(flags)
        assert sha(ckpt) == before, extra


def test_ngram_vs_moe_variants_match_active_and_total_parameters():
    n = {}
    for v in ("dense", "moe", "ngram"):
        m = GPT(train.build_config(train.get_args(["--preset", "ngram-vs-moe", "--variant", v, "--n-embd", "64",
                                                   "--n-layer", "2"])))
        n[v] = (m.num_params(), m.num_params(active=True))
    assert n["moe"][1] == pytest.approx(n["dense"][1], rel=0.01)  # same active (router aside)
    assert n["ngram"][0] == pytest.approx(n["moe"][0], rel=0.001)  # same total
    assert n["moe"][0] > 1.3 * n["dense"][0]


# ---------------------------------------------------------------------------------- DST floors

def test_step_runs_dst_targets_raised_to_each_layers_floor():
    """DST's second half inside the layers: `step` runs each sample at its target, every layer
    raises it to its own coverage floor, and the budgets it reports are the ones the model used."""
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, max_seq_len=512, attn_block=32, topk=4)
    gpt = GPT(cfg)
    params = list(gpt.parameters())
    rng = np.random.default_rng(0)
    samples = [rng.integers(0, 256, n + 1).astype(np.uint16) for n in (480, 250, 100)]
    plan_r = [[0], [1, 2]]
    targets = [1, 2, 1]
    args = (gpt, params, samples, plan_r, targets)
    _, _, cpu, used = train.step(*args, dict(k0=4, p=0.1), 830.0, 1, torch.device("cpu"), nullcontext())
    assert cpu > 0 and used.shape == (2, 3)
    assert (used >= np.array(targets)).all() and (used > np.array(targets)).any()  # floors bite
    x, _, _, cu = train.make_microbatch([samples[1], samples[2]], 32, "cpu")
    with torch.no_grad():
        gpt(x, cu_seqlens=cu, topk=torch.tensor([2, 1]), k0=4, p=0.1)
    assert gpt.used_budgets.tolist() == used[:, [1, 2]].tolist()
    _, _, _, fixed = train.step(*args, {}, 830.0, 1, torch.device("cpu"), nullcontext())
    assert (fixed == np.array(targets)).all()                       # no p: the targets as given


def test_gradient_does_not_depend_on_how_the_batch_is_split():
    """SAB only moves samples between ranks and microbatches: `step` weights each microbatch's
    mean loss by its share of the step's tokens, so the summed gradient (here: both ranks'
    steps run in one process) is the same for the naive plan, SAB's and one sample per row."""
    from balance import Balancer, CostModel
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=32, max_seq_len=256, attn_block=32, topk=2)
    gpt = GPT(cfg)
    params = list(gpt.parameters())
    rng = np.random.default_rng(1)
    samples = [rng.integers(0, 256, n + 1).astype(np.uint16) for n in (250, 40, 130, 70, 200, 33, 96, 160)]
    lengths = [len(x) - 1 for x in samples]
    targets = [min(2, train.n_blocks(n, 32)) for n in lengths]

    def grad(plan):
        for p in params:
            p.grad = None
        for plan_r in plan:
            train.step(gpt, params, samples, plan_r, targets, {}, float(sum(lengths)), 1, torch.device("cpu"),
                       nullcontext())
        return torch.cat([p.grad.flatten() for p in params])

    def plan(policy):
        return Balancer(CostModel.analytic(32, 32, 2), 2, policy, k0=2, n_layer=1, capacity=256).plan(lengths).plan

    naive, sab = plan("none"), plan("sab")
    assert naive != sab                                              # the splits do differ
    want = grad([[[i] for i in range(8)]])                           # one sample per row, one rank
    for got in (grad(naive), grad(sab)):
        assert float((got - want).norm() / want.norm()) < 1e-5


def test_copy_sample_repeats_one_random_string():
    rng = np.random.default_rng(3)
    for length in (16, 63, 200, 512):
        toks = train.copy_sample(rng, length)
        assert len(toks) == length + 1 and np.isin(toks, COPY_ALPHABET).all()
        # the smallest period: every token equals the one m earlier, and at least two copies fit
        m = next(m for m in range(1, length + 1) if (toks[m:] == toks[:-m]).all())
        assert 8 <= m <= min(64, (length + 1) // 2)


def test_copy_frac_replaces_other_samples_and_keeps_passkey_ones():
    args = train.get_args(["--preset", "needle", "--batch-size", "64", "--passkey-frac", "0.3",
                           "--copy-frac", "0", "--induction-steps", "0"])
    cfg = train.build_config(args)
    train_docs = [np.arange(600, dtype=np.uint16) % 90 + 32 for _ in range(4)]
    lengths = [len(d) for d in train_docs]
    base = train.draw_samples(5, args, cfg, train_docs, lengths, None)
    args.copy_frac = 0.4
    mixed = train.draw_samples(5, args, cfg, train_docs, lengths, None)
    is_key = lambda s: b"The passkey is" in bytes(s.astype(np.uint8))  # noqa: E731
    is_copy = lambda s: np.isin(s, COPY_ALPHABET).all()  # noqa: E731  (the docs hold other bytes)
    keys = [i for i, s in enumerate(base) if is_key(s)]
    assert keys and keys == [i for i, s in enumerate(mixed) if is_key(s)]
    assert all((base[i] == mixed[i]).all() for i in keys)
    copies = [i for i, s in enumerate(mixed) if is_copy(s)]
    assert 10 <= len(copies) <= 40 and not set(copies) & set(keys)
    assert not any(is_copy(s) for s in base)


def test_copy_frac_must_leave_room_for_the_passkey_share():
    with pytest.raises(ValueError, match="--copy-frac 0.6"):
        train.build_config(train.get_args(["--passkey-frac", "0.5", "--copy-frac", "0.6"]))


def test_induction_steps_train_dense_on_copy_strings_then_switch(data, tmp_path):
    out = str(tmp_path)
    flags = ["--data", data, "--out", out, *TINY, "--steps", "3", "--eval-every", "3", "--needle-docs", "0",
             "--balance", "none", "--induction-steps", "2"]
    train.main(flags)
    steps, _ = metrics(out)
    args = train.get_args(flags)
    cfg = train.build_config(args)
    for s in (0, 1):  # the warm-up: copy strings only, every sample at its dense budget
        samples = train.draw_samples(s, args, cfg, [], [], None)
        assert all(np.isin(x, COPY_ALPHABET).all() for x in samples)
        dense = np.mean([train.n_blocks(len(x) - 1, 32) for x in samples])
        assert steps[s + 1]["mean_budget"] == pytest.approx(dense) and dense > 2
    assert steps[3]["mean_budget"] <= 2  # then the model's budget (k0 = 2, fewer in 1-block samples)
