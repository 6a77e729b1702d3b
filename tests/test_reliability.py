"""train.py under hostile input: a diverged run stops without touching the good checkpoint, a stalled
rank ends the job, checkpoints load safely, FIFOs in --data are skipped, --out is locked, and every
bad flag is one line (exit status 1) before anything is written.

Runs are tiny (one layer, 128-token rows, a few steps: about a second each, in process); the
command line itself (exit status, one line on stderr) is checked with a few subprocesses.
"""
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import train
from data import load_documents

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--max-seq-len", "128", "--attn-block", "32",
        "--topk", "2", "--batch-size", "2", "--steps", "4", "--warmup", "1", "--eval-every", "4",
        "--eval-samples", "2", "--ckpt-every", "2", "--threads", "1", "--correction", "off"]
ERRORS = (ValueError, OSError, train.TrainingError)  # what train.py's __main__ prints as one line


@pytest.fixture(scope="module")
def data(stdlib_package):
    """Five files of the standard library's json package: enough for a train/validation split."""
    return stdlib_package("json")


@pytest.fixture
def done(data, tmp_path):
    """A finished 4-step run with checkpoints at steps 2 and 4: (flags, out, checkpoint path)."""
    out = str(tmp_path / "run")
    flags = ["--data", data, *TINY, "--out", out]
    train.main(flags)
    return flags, out, os.path.join(out, "ckpt.pt")


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def fails(flags, match, kind=ERRORS):
    """train.main(flags) must stop with a one-line error matching `match`."""
    with pytest.raises(kind, match=match) as e:
        train.main(flags)
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def cli(args, env=None, timeout=120, script="train.py"):
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout, env=dict(os.environ, **(env or {})))
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return r.returncode, [l for l in r.stderr.splitlines() if l.strip() and not ("Warning" in l or "it/s]" in l)]


# ----------------------------------------------------------------------------- a diverged run

def test_diverged_resume_exits_nonzero_and_keeps_the_checkpoint(done):
    """The issue's reproduction: resume a good run with --lr 1e30. Without --allow-changes the new
    lr is refused; with it, the first update overflows the weights and the run stops, exit 1."""
    flags, out, ckpt = done
    before = sha(ckpt)
    rc, err = cli(flags + ["--steps", "8", "--resume", "--lr", "1e30"])
    assert rc == 1 and len(err) == 1 and "--lr" in err[0] and "--allow-changes" in err[0], err
    rc, err = cli(flags + ["--steps", "8", "--resume", "--lr", "1e30", "--allow-changes"])
    assert rc == 1 and len(err) == 1, err
    assert "step 5" in err[0] and "non-finite" in err[0] and "still holds step 4" in err[0], err
    assert sha(ckpt) == before
    steps = [json.loads(l)["step"] for l in open(os.path.join(out, "metrics.jsonl"))]
    assert max(steps) == 4  # it stopped in the first bad step, before logging it


def test_consecutive_skips_stop_the_run_but_a_transient_nan_does_not(data, tmp_path, monkeypatch):
    real = train.step
    bad_steps = set()
    calls = []

    def step(*a):  # the loss of chosen steps turns NaN, as if a sample or kernel went wrong
        calls.append(1)
        loss, *rest = real(*a)
        return (float("nan") if len(calls) in bad_steps else loss), *rest
    monkeypatch.setattr(train, "step", step)
    out = str(tmp_path / "run")
    flags = ["--data", data, *TINY, "--steps", "6", "--out", out, "--max-skips", "2"]
    bad_steps.update({3})  # one bad step: skipped, reported, the run goes on
    train.main(flags)
    recs = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["skipped"] for r in recs if "loss" in r] == [False, False, True, False, False, False]
    before = sha(os.path.join(out, "ckpt.pt"))
    calls.clear()
    bad_steps.clear()
    bad_steps.update({1, 2})  # resumed at step 6: steps 7 and 8 skipped in a row
    msg = fails(flags + ["--steps", "10", "--resume", "--allow-changes"], "step 8: 2 steps in a row",
                train.TrainingError)
    assert "still holds step 6" in msg and sha(os.path.join(out, "ckpt.pt")) == before


def test_checkpoint_is_never_written_from_a_model_with_non_finite_outputs(done, monkeypatch):
    flags, out, ckpt = done
    before = sha(ckpt)
    forward = train.GPT.forward
    nan = lambda idx: torch.full((*idx.shape, 257), float("nan"))  # logits of a diverged model
    monkeypatch.setattr(train.GPT, "forward", lambda self, idx, targets=None, **kw: (
        forward(self, idx, targets, **kw) if targets is not None else (nan(idx), None)))
    fails(flags + ["--steps", "6", "--resume", "--allow-changes"], "step 6: the weights give non-finite",
          train.TrainingError)
    assert sha(ckpt) == before


def test_resume_of_a_checkpoint_holding_nan_is_refused(done):
    flags, out, ckpt = done
    state = torch.load(ckpt, weights_only=True)
    next(iter(state["model"].values())).view(-1)[0] = float("nan")
    torch.save(state, ckpt)
    fails(flags + ["--resume"], "non-finite weights")


def test_resume_refuses_changed_training_flags_unless_allowed(done, tmp_path):
    flags, out, ckpt = done
    other = shutil.copytree(flags[1], tmp_path / "other")  # the same files elsewhere: other data
    for extra in (["--steps", "6"], ["--weight-decay", "0.2"], ["--balance", "sab"], ["--length-bias", "1"],
                  ["--warmup", "2"], ["--data", str(other)]):
        fails(flags + ["--resume"] + extra, f"different config \\({extra[0]} differ\\).*--allow-changes")
    fails(flags + ["--resume", "--n-embd", "64"], r"different config \(n_embd differ\)")  # never allowed
    train.main(flags + ["--resume", "--data", flags[1] + os.sep])  # DIR/ is DIR: nothing left to do
    train.main(flags + ["--resume", "--steps", "5", "--allow-changes"])
    assert torch.load(ckpt, weights_only=True)["step"] == 5


# ----------------------------------------------------------------------------- bad flags, at start

BAD_FLAGS = [  # (flags, what the one-line error must say)
    (["--lr", "inf"], "--lr inf: must be a finite"), (["--lr", "0"], "--lr 0.0: must be > 0"),
    (["--lr=-1e-3"], "--lr -0.001"), (["--min-lr-frac", "nan"], "--min-lr-frac nan"),
    (["--min-lr-frac", "2"], "--min-lr-frac 2.0"), (["--weight-decay", "nan"], "--weight-decay nan"),
    (["--weight-decay", "-1"], "--weight-decay -1.0"), (["--grad-clip", "nan"], "--grad-clip nan"),
    (["--rope-base", "0"], "--rope-base 0.0"), (["--length-bias", "nan"], "--length-bias nan"),
    (["--eval-every", "0"], "--eval-every 0"), (["--eval-every", "-2"], "--eval-every -2"),
    (["--ckpt-every", "-1"], "--ckpt-every -1"), (["--warmup", "-1"], "--warmup -1"),
    (["--threads", "0"], "--threads 0"), (["--threads", "-2"], "--threads -2"),
    (["--eval-samples", "0"], "--eval-samples 0"), (["--batch-size", "1000000000"], "--batch-size"),
    (["--device", "foo"], "--device 'foo'"), (["--ngram-draft-head", "maybe"], "'maybe' is not a boolean"),
    (["--steps", "abc"], "--steps: invalid int"), (["--max-skips", "0"], "--max-skips 0"),
    (["--pg-timeout", "0"], "--pg-timeout 0.0"), (["--p", "nan"], "--p nan"),
    (["--passkey-frac", "0.5", "--max-seq-len", "64"], "--passkey-frac needs max_seq_len >= 82 "),
    (["--vocab-size", "200", "--eos-id", "199"], "--vocab-size 200: the data holds token ids up to 256"),
]


@pytest.mark.parametrize("extra,msg", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_fail_at_start_and_touch_nothing(done, extra, msg):
    flags, out, ckpt = done
    before = sorted(os.listdir(out)), sha(ckpt), sha(os.path.join(out, "metrics.jsonl"))
    fails(flags + ["--resume"] + extra, msg.replace("(", r"\(").replace(")", r"\)"))
    assert (sorted(os.listdir(out)), sha(ckpt), sha(os.path.join(out, "metrics.jsonl"))) == before


def test_bad_flag_on_the_command_line_is_one_line_and_status_1(tmp_path):
    for extra in (["--lr", "nan"], ["--ngram-draft-head", "maybe"]):
        rc, err = cli([*TINY, "--out", str(tmp_path / "x"), *extra])
        assert rc == 1 and len(err) == 1 and err[0].startswith("train.py: error: "), err
    assert not os.path.exists(tmp_path / "x")


def test_cost_model_that_is_not_a_cost_table(data, tmp_path):
    for i, text in enumerate(["[1, 2]", "not json", '{"format": "sparsebalance-costmodel-v1"}']):
        path = tmp_path / f"cost{i}.json"
        path.write_text(text)
        fails(["--data", data, *TINY, "--out", str(tmp_path / "o"), "--cost-model", str(path)],
              "not a cost table.*balance.py --profile")


# ----------------------------------------------------------------------------- checkpoints

class Payload:
    """Unpickling this creates a file: proof that loading a checkpoint ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def corrupt_checkpoints(good, folder):
    """Files that are not train.py checkpoints, each with the reason it must be refused."""
    state = torch.load(good, weights_only=True)
    raw = open(good, "rb").read()
    files = {"truncated": raw[:len(raw) // 2], "random": np.random.default_rng(0).bytes(4096), "empty": b""}
    for name, b in files.items():
        open(os.path.join(folder, name), "wb").write(b)
    objs = {"bare_state_dict": state["model"],
            "no_config": {k: v for k, v in state.items() if k != "config"},
            "unknown_field": dict(state, config=dict(state["config"], new_field=1)),
            "weights_not_config": dict(state, model={k: v[..., :1] for k, v in state["model"].items()})}
    for name, obj in objs.items():
        torch.save(obj, os.path.join(folder, name))
    return [os.path.join(folder, n) for n in [*files, *objs]]


@pytest.mark.parametrize("forced", ["", "1"])
def test_checkpoint_with_a_payload_is_refused(done, tmp_path, monkeypatch, forced):
    """torch.load(weights_only=True) refuses pickled objects, also with the environment variable
    that turns off weights-only loading where a caller did not ask for it explicitly."""
    flags, out, ckpt = done
    marker = str(tmp_path / "payload_ran")
    state = torch.load(ckpt, weights_only=True)
    torch.save(dict(state, sab_state=Payload(marker)), ckpt)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", forced)
    fails(flags + ["--resume"], "ckpt.pt: not a loadable checkpoint.*weights-only")
    with pytest.raises(ValueError, match="not a loadable checkpoint"):
        train.GPT.from_checkpoint(ckpt)  # what infer.py --ckpt reads
    assert not os.path.exists(marker)
    if forced:  # and through the command line, as the issue reproduced it
        rc, err = cli(["--ckpt", ckpt], env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}, script="infer.py")
        assert rc == 1 and len(err) == 1 and "not a loadable checkpoint" in err[0], err
        assert not os.path.exists(marker)


def test_corrupt_or_foreign_checkpoints_are_one_line_errors(done, tmp_path):
    flags, out, ckpt = done
    why = {"unknown_field": r"written with a different config \(new_field differ\)", "weights_not_config": "its contents do not fit"}
    for bad in corrupt_checkpoints(ckpt, str(tmp_path)):
        with pytest.raises(ValueError, match=bad) as e:  # infer.py --ckpt
            train.GPT.from_checkpoint(bad)
        assert "\n" not in str(e.value)
        shutil.copy(bad, ckpt)  # train.py --resume
        fails(flags + ["--resume"], ckpt + ": " + why.get(os.path.basename(bad), "not a"))


# ----------------------------------------------------------------------------- files and --out

def test_fifo_in_data_folder_is_skipped_and_counted(data, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(data, d)
    os.mkfifo(d / "pipe.py")
    code = f"import data; tr, va = data.load_documents({str(d)!r}, 0.2, 128); print(len(tr) + len(va))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.split()[-1] == str(len(os.listdir(data))), r.stderr
    assert "skipped 1 entries that are not regular files" in r.stdout
    with pytest.raises(ValueError, match="not a regular file or directory"):
        load_documents(str(d / "pipe.py"), 0.2, 128)


def test_odd_sized_token_file_is_refused(tmp_path):
    path = tmp_path / "tokens.bin"
    path.write_bytes(np.arange(1000, dtype=np.uint16).tobytes() + b"\x01")
    with pytest.raises(ValueError, match="odd count"):
        load_documents(str(path), 0.1, 128)


def test_out_is_locked_while_a_run_lives(done, tmp_path):
    flags, out, ckpt = done
    lock = os.path.join(out, "lock")
    assert not os.path.exists(lock)  # a finished run releases it
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        owner = dict(pid=live.pid, host=socket.gethostname(), run=None)
        json.dump(owner, open(lock, "w"))
        fails(flags + ["--resume"], f"in use by process {live.pid}")
    finally:
        live.kill()
        live.wait()
    open(ckpt + ".tmp", "wb").write(b"partial")  # a crash mid-write left it
    train.main(flags + ["--resume"])  # the owner is gone: the lock is stale and taken over
    assert not os.path.exists(lock) and not os.path.exists(ckpt + ".tmp")


def test_out_that_is_a_file_or_not_writable(data, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    fails(["--data", data, *TINY, "--out", str(f)], "is a file: choose a directory")
    fails(["--data", data, *TINY, "--out", str(f / "sub")], "cannot write there")


# ----------------------------------------------------------------------------- a stalled rank

def test_stalled_rank_ends_the_job_with_the_step(data, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), "--data", data, *TINY, "--out", str(tmp_path),
           "--pg-timeout", "6", "--stall-at-step", "2"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = [l for l in r.stderr.splitlines() if "train.py: error:" in l]
    assert r.returncode != 0 and lines, r.stderr[-2000:]
    assert "step 2: rank 0 waited more than --pg-timeout 6 s" in lines[0]
