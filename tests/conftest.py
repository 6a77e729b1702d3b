"""Shared test set-up: make the repository importable and run Triton kernels on the CPU.

TRITON_INTERPRET must be set before triton is imported for the first time (importing torch does
not import triton), so it is done here, at collection time, when no CUDA device is present.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
