"""Checks of exercise 6: the softmax step of the Triton forward kernel (attention.py, pair_fwd).

Without CUDA the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set before triton is
imported), so the shapes are tiny. The reference is attention.attention_reference (a dense masked
softmax in fp32) and PyTorch's own causal attention."""
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import attention as A  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (Linux only): this exercise needs it")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(B, H, T, D, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, T, D, generator=g) for _ in range(4))
    return [x.to(DEV) for x in (q * scale, k, v, do)]


def attend(impl, q, k, v, sel, bs, do=None):
    """Output (and dq, dk, dv when do is given) of one implementation for one layout."""
    q, k, v = (x.clone().requires_grad_(do is not None) for x in (q, k, v))
    o = A.block_sparse_attention(q, k, v, sel.block_idx, sel.block_cnt, bs, impl=impl)
    if do is None:
        return [o.detach()]
    o.backward(do)
    return [o.detach(), q.grad, k.grad, v.grad]


def compare(got, want, what, hint):
    for name, a, b in zip(("output", "dq", "dk", "dv"), got, want):
        if not torch.isfinite(a).all():
            raise AssertionError(f"{what}: the Triton {name} holds inf or nan. {hint}")
        err = (a - b).abs()
        assert err.max() <= 1e-4 * b.abs().max() and err.mean() <= 1e-5 * b.abs().mean(), (
            f"{what}: the Triton {name} differs from the reference by up to {float(err.max()):.2e} "
            f"(mean {float(err.mean()):.2e}). {hint}")


def against_reference(q, k, v, budget, what, hint, cu=None, do=None):
    """Triton against the dense-mask reference on the gate's layout at `budget` (blocks of 16)."""
    sel = A.select_blocks(q, k, budget, cu, 16)
    compare(attend("triton", q, k, v, sel, 16, do), attend("reference", q, k, v, sel, 16, do), what, hint)


def test_own_block_only():
    """Budget 1 (each token attends causally inside its own block): output equals the reference"""
    q, k, v, _ = inputs(1, 2, 32, 16, seed=0)
    against_reference(q, k, v, 1, "budget 1", "Every row of s has at least one finite entry (the diagonal "
                      "key): take m = tl.max(s, 1), p = tl.exp2(s - m[:, None]), l = tl.sum(p, 1)")


def test_several_tiles_per_token():
    """Budget 3 on packed documents: the partial outputs merge (attention._merge) into the reference"""
    q, k, v, _ = inputs(1, 2, 96, 16, seed=1)
    cu = torch.tensor([0, 64, 96], dtype=torch.int32)
    against_reference(q, k, v, 3, "budget 3", "Each tile's o must be normalised by its own l, and its lse = "
                      "m + log2(l) lets _merge weigh the tiles of a token: o = sum exp(lse_p - lse) o_p", cu=cu)


def test_gradients_rebuild_p_from_the_stored_lse():
    """Gradients equal the reference: the backward rebuilds p = exp2(s - lse) from your lse"""
    q, k, v, do = inputs(1, 1, 64, 16, seed=2)
    against_reference(q, k, v, 2, "budget 2, forward + backward", "pair_bwd recomputes p = exp2(s - lse): with "
                      "o right but l or m wrong, the stored lse (m + log2(l), in log2 units) is wrong", do=do)


def test_large_scores_do_not_overflow():
    """Scores in the thousands (q x 60): still the reference, no inf or nan (subtract the row max)"""
    q, k, v, _ = inputs(1, 1, 64, 16, seed=3, scale=60.0)
    against_reference(q, k, v, 2, "large scores", "exp2 of a score in the thousands overflows fp32: subtract "
                      "the row max m before exp2, and add it back in lse")


def test_dense_budget_is_causal_attention():
    """A budget covering every block is plain causal attention (torch's scaled_dot_product_attention)"""
    q, k, v, _ = inputs(1, 2, 64, 32, seed=4)
    sel = A.select_blocks(q, k, 4, None, 16)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    compare(attend("triton", q, k, v, sel, 16), [want], "dense budget",
            "check the scale: s is already multiplied by log2(e) / sqrt(D), so use exp2, not exp")
