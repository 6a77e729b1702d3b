"""The default corpus: which files it holds, and the token stream built from them."""
import os

import numpy as np

import data


def test_stdlib_files_are_sources_without_tests_in_a_fixed_order():
    paths = data.stdlib_files()
    root = data.stdlib_root()
    assert len(paths) > 100 and paths == data.stdlib_files()
    assert all(p.endswith(".py") and p.startswith(root) for p in paths)
    parts = {part for p in paths for part in os.path.relpath(p, root).split(os.sep)[:-1]}
    assert not parts & data.SKIP_DIRS
    assert os.path.join(root, "os.py") in paths


def test_corpus_tokens_are_file_bytes_each_followed_by_eos():
    paths = data.stdlib_files()[:3]
    want = []
    for p in paths:
        want += list(open(p, "rb").read()) + [256]
    got = data.corpus_tokens(max_bytes=len(want) - 1)
    assert np.array_equal(got, np.array(want[:-1]))
