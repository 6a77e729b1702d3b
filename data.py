"""Every way the project reads documents, and the synthetic ones it makes.

The default corpus is the running Python's own standard-library sources: every machine with
Python has them, so training, benchmarks and analyses run offline with no download. About 870
files and 13 MB (tests excluded), from 100 bytes to 750 KB: a naturally long-tailed length
distribution, which is what the load balancer is for. One file = one document; its bytes are the
tokens, followed by the end-of-document id EOS = 256. `--data` may instead name a directory of
text files, one text file, or a `.bin` of uint16 tokens.

    documents(path)                  -> (name, tokens ending in EOS) pairs, lazily
    load_documents(path, val_frac, max_seq_len) -> (train, val) lists of token arrays
    chunk(docs, max_seq_len)         -> samples of at most max_seq_len + 1 tokens
    corpus_tokens(max_bytes)         -> the default corpus as one token stream (analyses, prompts)
    stdlib_lengths(crop)             -> the default corpus's document lengths (the simulator)
    draw_mix, passkey_sample         -> a step's length mix; a synthetic needle document
    copy_sample                      -> a random string repeated to the length (trains copying)
"""
import os
import sysconfig
import zlib

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


def text_files(root, note=print):
    """Every regular file under a --data directory, in sorted order, hidden files and folders
    skipped. Only regular files: opening a FIFO (or socket, device) would block or fail. `note`
    reports how many entries were skipped for that."""
    paths, skipped = [], 0
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        found = [os.path.join(d, f) for f in sorted(files) if not f.startswith(".")]
        regular = [f for f in found if os.path.isfile(f)]  # regular files, or links to them
        paths, skipped = paths + regular, skipped + len(found) - len(regular)
    if skipped:
        note(f"--data {root}: skipped {skipped} entries that are not regular files (FIFOs, sockets, devices)")
    return paths


def documents(path=None, max_seq_len=None, note=print):
    """Yield (name, 1-D uint16 tokens ending in EOS) for every document of `path`: None = the
    default corpus, a directory = its text files (empty and binary files skipped), a `.bin` file =
    uint16 tokens cut at EOS (or into max_seq_len pieces when it has none), another file = one text
    stream cut into max_seq_len pieces."""
    if path is not None and os.path.exists(path) and not (os.path.isdir(path) or os.path.isfile(path)):
        raise ValueError(f"--data {path}: not a regular file or directory (a FIFO, socket or device?)")
    if path is None or os.path.isdir(path):
        root = path or stdlib_root()
        for f in stdlib_files() if path is None else text_files(path, note):
            with open(f, "rb") as fh:
                b = fh.read()
            if b and b"\0" not in b[:4096]:  # skip empty and binary files
                yield os.path.relpath(f, root), np.append(np.frombuffer(b, np.uint8).astype(np.uint16), EOS)
        return
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data {path}: no such file or directory")
    if path.endswith(".bin"):  # uint16 tokens; documents end at EOS if it occurs
        if os.path.getsize(path) % 2:
            raise ValueError(f"--data {path}: {os.path.getsize(path)} bytes, an odd count, so not "
                             "uint16 tokens (truncated?); write 2 bytes per token")
        toks = np.fromfile(path, dtype=np.uint16)
        ends = np.flatnonzero(toks == EOS) + 1
        parts = np.split(toks, ends) if len(ends) else np.array_split(toks, max(1, len(toks) // max_seq_len))
    else:  # one text file: a stream cut into max_seq_len pieces, so that a split exists
        with open(path, "rb") as fh:
            b = np.frombuffer(fh.read(), np.uint8).astype(np.uint16)
        parts = [np.append(b[i:i + max_seq_len], EOS) for i in range(0, len(b), max_seq_len)]
    yield from ((str(i), a) for i, a in enumerate(parts) if len(a) >= 2)


def load_documents(path, val_frac, max_seq_len, note=print):
    """Read the corpus and split it by a hash of each document's name, which is stable across
    machines and Python versions (unlike positions or `hash()`). -> (train, val): lists of 1-D uint16
    arrays ending in EOS."""
    named = list(documents(path, max_seq_len, note))
    if not named:
        raise FileNotFoundError(f"--data {path or stdlib_root()}: no (non-empty, text) documents found")
    if max(int(a.max()) for _, a in named) > EOS:
        raise ValueError(f"--data {path}: token ids above {EOS}; this model has a byte vocabulary")
    held = [zlib.crc32(n.encode()) % 10_000 < val_frac * 10_000 for n, _ in named]
    val = [a for (_, a), h in zip(named, held) if h]
    train = [a for (_, a), h in zip(named, held) if not h]
    if not val or not train:  # tiny corpora: hold out the last document, or share the only one
        train, val = ([a for _, a in named[:-1]], [named[-1][1]]) if len(named) > 1 else ([named[0][1]],) * 2
    return train, val


def chunk(docs, max_seq_len):
    """Cut documents into samples of at most max_seq_len + 1 tokens (inputs and shifted targets);
    consecutive chunks overlap by one token so every token is predicted exactly once."""
    return [d[i:i + max_seq_len + 1] for d in docs for i in range(0, len(d) - 1, max_seq_len)]


def corpus_tokens(max_bytes=4_000_000):
    """The default corpus as one uint16 token stream: documents in sorted path order, each followed
    by EOS, cut after max_bytes tokens."""
    parts, total = [], 0
    for _, toks in documents():
        parts.append(toks)
        total += len(toks)
        if total >= max_bytes:
            break
    return np.concatenate(parts)[:max_bytes]


def stdlib_lengths(crop=None):
    """Byte lengths of the default corpus's files, empty files dropped, optionally cropped."""
    sizes = [os.path.getsize(path) for path in stdlib_files()]
    return [size if crop is None else min(size, crop) for size in sizes if size]


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
    (the needle-in-a-haystack passkey test SparseBalance reports, in code comments).
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


COPY_ALPHABET = np.r_[48:58, 97:123].astype(np.uint16)  # the digits 0-9 and the letters a-z


def copy_sample(rng, length, alphabet=COPY_ALPHABET, longest=64):
    """`length` + 1 tokens: a random string of 8 to `longest` tokens of `alphabet` (at most half
    the length) repeated back to back. After the first copy every token is predictable only by
    finding the earlier occurrence of the current context and copying what followed it:
    induction, the mechanism passkey retrieval needs. Passkey documents alone (5 answer digits
    each) and repeated text (which the model first learns to predict as text) give it too little
    signal to form on a CPU budget; random strings leave copying as the only way to lower the loss
    (docs/quality.md)."""
    m = int(rng.integers(8, max(9, min(longest, (length + 1) // 2) + 1)))
    return np.resize(rng.choice(alphabet, m), length + 1).astype(np.uint16)
