"""The default corpus: the running Python's own standard-library sources.

Every machine with Python has them, so training, benchmarks and analyses run offline with no
download. About 870 files and 13 MB (tests excluded), from 100 bytes to 750 KB: a naturally
long-tailed length distribution, which is what the load balancer is for. One file = one document;
its bytes are the tokens (train.py appends the end-of-document id 256).
"""
import os
import sysconfig

# Test suites and installed packages are not part of the corpus (tests would double its size).
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def stdlib_root():
    return sysconfig.get_paths()["stdlib"]


def stdlib_files():
    """Paths of the standard library's .py files in a fixed (sorted) order, test directories and
    installed packages excluded. Raises FileNotFoundError on a Python that ships no sources."""
    root, paths = stdlib_root(), []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS and not x.startswith("."))
        paths += [os.path.join(d, f) for f in sorted(files) if f.endswith(".py")]
    if not paths:
        raise FileNotFoundError(f"no .py files under {root}: this Python ships no standard-library "
                                "sources; pass --data with your own text files")
    return paths


def draw_mix(rng, lengths, n, mix=None, p=None, short_max=2048, long_min=12288):
    """Indices of the n samples of one step, drawn with the numpy Generator `rng` from samples of
    `lengths` tokens. mix None or "none": with probabilities p (uniform when None). "bimodal":
    half of at most `short_max` tokens and half of at least `long_min`, in random order, like the
    paper's ChatQA2-Long-SFT mix: round-robin batching then leaves real imbalance to balance."""
    import numpy as np
    lengths = np.asarray(lengths)
    if mix in (None, "none"):
        return rng.choice(len(lengths), n, replace=len(lengths) < n, p=p)
    if mix != "bimodal":
        raise ValueError(f"mix must be none or bimodal, got {mix!r}")
    short, long = np.flatnonzero(lengths <= short_max), np.flatnonzero(lengths >= long_min)
    if not len(short) or not len(long):
        raise ValueError(f"--mix bimodal needs samples of at most {short_max} and of at least "
                         f"{long_min} tokens; the data has {len(short)} and {len(long)}: raise "
                         "--max-seq-len to at least 12288 or use longer documents")
    k = n // 2
    ids = np.concatenate([rng.choice(short, n - k, replace=len(short) < n - k),
                          rng.choice(long, k, replace=len(long) < k)])
    return rng.permutation(ids)
