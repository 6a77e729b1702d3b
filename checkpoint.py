"""What keeps a training run safe to stop, kill and resume: atomic checkpoints that a safe load
reads back, the check that a resumed run continues the same training, the lock that keeps two
runs off one output folder, and the random-number state. train.py calls these; none of them is
part of either paper, so a reader following a training step can skip this file.

    save_checkpoint(path, state)      # temporary file + atomic rename; a failed write says so
    read_checkpoint(path)             # weights_only load, validated keys -> dict
    check_resume(ckpt, path, config, args, must_match, allow_changes)
    lock_out(out) -> lock path        # one run per output folder; stale locks are taken over
    rng_state(), set_rng_state(s)
"""
import dataclasses
import json
import os
import random
import socket
from contextlib import suppress

import numpy as np
import torch


class TrainingError(RuntimeError):
    """The run cannot go on (diverged, a stalled rank, a failed write); the message says why."""


def save_checkpoint(path, state):
    """Write to a temporary file, then rename: os.replace is atomic, so a crash mid-write leaves the
    previous checkpoint intact, never a truncated one. A failed write (a full disk) removes the
    temporary file and says so."""
    tmp = path + ".tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        raise TrainingError(f"{path}: writing the checkpoint failed ({e}); the previous one is intact: "
                            "free disk space or choose another --out, then --resume") from None


CKPT_KEYS = ("model", "optimizer", "step", "rng", "sab_state", "correction", "config", "train_config")


def read_checkpoint(path):
    """torch.load with weights_only=True: tensors and plain values only, so a crafted file cannot run
    code (an explicit weights_only=True also overrides TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD). Anything
    that is not a train.py checkpoint is a one-line error naming the file."""
    fix = "move it away to start fresh, or choose another --out"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # empty, truncated, random bytes, or objects a safe load refuses
        raise ValueError(f"{path}: not a loadable checkpoint (empty, truncated, corrupt, or holding "
                         f"objects a weights-only load refuses: {type(e).__name__}): {fix}") from None
    missing = [k for k in CKPT_KEYS if k not in ckpt] if isinstance(ckpt, dict) else list(CKPT_KEYS)
    if missing or not all(isinstance(ckpt[k], dict) for k in ("model", "config", "train_config")):
        raise ValueError(f"{path}: not a train.py checkpoint (missing or malformed: "
                         f"{', '.join(missing) or 'model, config or train_config'}): {fix}")
    return ckpt


# Training flags added after some checkpoints were written, with the value those runs had.
ADDED_FLAGS = {"copy_frac": 0.0, "induction_steps": 0}


def check_resume(ckpt, path, config, args, must_match, allow_changes=False):
    """A resumed run must continue the same training: the model's fields must match the
    checkpoint's (they shape the weights) and so must the training flags in `must_match`, unless
    `allow_changes`. The data path is compared normalised (DIR/ equals DIR, links resolved)."""
    def flag(d, k):
        return os.path.realpath(d[k]) if k == "data" and d.get(k) else d.get(k, ADDED_FLAGS.get(k))
    bad = [k for k, v in dataclasses.asdict(config).items() if ckpt["config"].get(k) != v]
    bad += [k for k in ckpt["config"] if not hasattr(config, k)]  # a field this GPTConfig lacks
    flags = [] if allow_changes else ["--" + k.replace("_", "-") for k in must_match
                                      if flag(ckpt["train_config"], k) != flag(vars(args), k)]
    if bad or flags:
        raise ValueError(f"{path}: written with a different config ({', '.join(bad + flags)} "
                         "differ): use the same flags to continue it exactly" + ("" if bad else
                         ", --allow-changes to continue it with the new ones") + ", or another --out")


def lock_out(out):
    """Claim --out for this run (rank 0): two runs on one --out would overwrite each other's
    checkpoint. OUT/lock records the owner's pid, host and torchrun run id; it is stale, and taken
    over, when that process is gone (a crash, SIGKILL), is this very process (an earlier main() in
    it), or is an earlier attempt of this same torchrun job (--max-restarts). -> the lock's path."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file: choose a directory")
    path = os.path.join(out, "lock")
    me = dict(pid=os.getpid(), host=socket.gethostname(), run=os.environ.get("TORCHELASTIC_RUN_ID"))
    for _ in range(3):
        try:
            os.makedirs(out, exist_ok=True)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # atomic: one creator wins
        except FileExistsError:
            try:
                owner = json.load(open(path))
            except (OSError, ValueError):
                owner = {}  # being written right now, or damaged: treat as held
            restart = owner.get("run") is not None and owner["run"] == me["run"]
            here = owner.get("host") == me["host"]
            if not (restart or here and (owner.get("pid") == me["pid"] or not pid_alive(owner.get("pid")))):
                raise ValueError(f"--out {out} is in use by process {owner.get('pid')} on {owner.get('host')} "
                                 f"({path}): wait for it or choose another --out; delete {path} if no run "
                                 "uses it") from None
            with suppress(FileNotFoundError):
                os.remove(path)
            continue
        except OSError as e:
            raise ValueError(f"--out {out}: cannot write there ({e.strerror}): "
                             "choose a writable directory") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise ValueError(f"--out {out}: another run keeps taking {path}: choose another --out")


def pid_alive(pid):
    try:
        os.kill(int(pid), 0)  # signal 0: only checks that the process exists
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def rng_state():
    """RNG states as plain types and tensors, so the checkpoint loads with torch.load's default
    weights_only=True (GPT.from_checkpoint, infer.py). The data order does not depend on them: a
    step's samples are drawn from a generator seeded by (seed, step)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return dict(python=random.getstate(), numpy=(name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
                torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_state(s):
    name, keys, pos, has_gauss, gauss = s["numpy"]
    random.setstate(s["python"])
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
