"""The default corpus: the running Python's own standard-library sources.

Every machine with Python has them, so training, benchmarks and analyses run offline with no
download. About 870 files and 13 MB (tests excluded), from 100 bytes to 750 KB: a naturally
long-tailed length distribution, which is what the load balancer is for. One file = one document;
its bytes are the tokens (train.py appends the end-of-document id 256).
"""
import os
import sysconfig

import numpy as np

EOS = 256  # end-of-document id; byte ids are 0..255

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


# Synthetic needle documents: what passkey training mixes in and what needle evaluation asks.
NEEDLE, QUESTION = "\n# The passkey is {key}. Remember it.\n", "\n# What is the passkey? The passkey is "


def passkey_sample(rng, filler, length, depth=None):
    """A synthetic retrieval document of `length` + 1 tokens: code filler with a 5-digit key hidden
    at a depth (a fraction of the filler in [0, 1]; drawn uniformly when None), asked for at the end
    (the needle-in-a-haystack passkey test of Mohtashami and Jaggi 2023, in code comments).
    -> (tokens, positions of the answer digits' targets): the prompt a model must answer is
    tokens[:pos[0] + 1], the answer tokens[pos[0] + 1:pos[-1] + 2]."""
    key = str(rng.integers(10_000, 100_000))
    needle = NEEDLE.format(key=key)
    n_fill = max(0, length + 1 - len(needle) - len(QUESTION) - len(key) - 1)
    fill = np.resize(filler, n_fill) if len(filler) else np.full(n_fill, 32, np.uint16)
    at = int(rng.integers(0, n_fill + 1)) if depth is None else int(round(depth * n_fill))
    enc = lambda s: np.frombuffer(s.encode(), np.uint8).astype(np.uint16)  # noqa: E731
    toks = np.concatenate([fill[:at], enc(needle), fill[at:], enc(QUESTION + key), [EOS]]).astype(np.uint16)
    first = len(toks) - 1 - len(key)  # index of the key's first digit in toks
    return toks, np.arange(first - 1, first - 1 + len(key))  # targets y[j] = toks[j + 1]
