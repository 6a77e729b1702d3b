"""Shared test set-up: make the repository importable and run Triton kernels on the CPU.

TRITON_INTERPRET must be set before triton is imported for the first time (importing torch does
not import triton), so it is done here, at collection time, when no CUDA device is present.
"""
import os
import shutil
import sys
import sysconfig

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: a second intra-op thread only adds waiting (token-by-
    token decoding was 5-30x slower with two). Modules opt in with pytest.mark.usefixtures."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def stdlib_package(tmp_path_factory):
    """copy(name) -> a folder holding the .py files of one standard-library package: a small real
    corpus for train.py's --data."""
    def copy(name):
        d = tmp_path_factory.mktemp(name)
        src = os.path.join(sysconfig.get_paths()["stdlib"], name)
        for f in sorted(os.listdir(src)):
            if f.endswith(".py"):
                shutil.copy(os.path.join(src, f), d / f)
        return str(d)
    return copy
