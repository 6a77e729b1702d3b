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
