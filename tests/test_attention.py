"""Tests for attention.py: the gate, coverage, and three attention impls checked against each other,
against a dense-mask reference and against torch's own causal attention. Triton runs under
TRITON_INTERPRET=1 on CPU (set in conftest.py), so its shapes are tiny."""
import math

import pytest
import torch
import torch.nn.functional as F

import attention as A

# (B, H, T, D, block, cu_seqlens): several documents per row, single-block documents, B, H > 1
LAYOUTS = {
    "one_doc": (1, 2, 64, 16, 16, None),
    "multi_doc": (2, 2, 128, 16, 16, [0, 16, 64, 112, 128, 160, 176, 256]),
    "single_blocks": (1, 1, 64, 32, 16, [0, 16, 32, 48, 64]),
}


def _inputs(B, H, T, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g).to(dtype) for _ in range(4)]    # q, k, v, do


def _cu(cu):
    return None if cu is None else torch.tensor(cu, dtype=torch.int32)


def _n_seq(B, cu):
    return B if cu is None else len(cu) - 1


def _run(impl, q, k, v, do, idx, cnt, bs):
    """Output and dq, dk, dv of one impl for the upstream gradient do."""
    q, k, v = [x.clone().requires_grad_() for x in (q, k, v)]
    o = A.block_sparse_attention(q, k, v, idx, cnt, bs, impl=impl)
    o.backward(do)
    return [o.detach(), q.grad, k.grad, v.grad]


def _close(got, want, max_tol, mean_tol):
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        err = (a.float() - b.float()).abs()
        assert err.max() <= max_tol and err.mean() <= mean_tol, (name, err.max(), err.mean())


def _brute_select(q, k, budget_of_block, first, bs):
    """Independent gate: loops over query blocks, Python sort with the same tie-break."""
    B, H, T, D = q.shape
    NQ = T // bs
    qm = q.reshape(B, H, NQ, bs, D).double().mean(3)
    km = k.reshape(B, H, NQ, bs, D).double().mean(3)
    out = {}
    for b in range(B):
        for h in range(H):
            for i in range(NQ):
                cand = list(range(first[b][i], i))
                cand.sort(key=lambda j: (-float(qm[b, h, i] @ km[b, h, j]), j))
                out[b, h, i] = sorted(cand[:budget_of_block[b][i] - 1] + [i])
    return out


# ------------------------------------------------------------------------------ selection
@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("topk", [1, 2, 3, 100, "per_seq"])
def test_select_blocks_matches_brute_force_and_invariants(name, topk):
    B, H, T, D, bs, cu = LAYOUTS[name]
    q, k, _, _ = _inputs(B, H, T, D, seed=1)
    S, NQ = _n_seq(B, cu), T // bs
    if topk == "per_seq":
        topk = torch.arange(S) % 3 + 1
    idx, cnt = A.select_blocks(q, k, topk, _cu(cu), bs)
    budgets = topk.tolist() if torch.is_tensor(topk) else [topk] * S
    starts = [c // bs for c in (cu or [r * T for r in range(B + 1)])]
    seq_of = lambda g: max(s for s in range(S) if starts[s] <= g)            # noqa: E731
    first = [[starts[seq_of(b * NQ + i)] - b * NQ for i in range(NQ)] for b in range(B)]
    budget = [[budgets[seq_of(b * NQ + i)] for i in range(NQ)] for b in range(B)]
    assert idx.dtype == cnt.dtype == torch.int32
    assert idx.shape == (B, H, NQ, min(max(budgets), NQ)) and cnt.shape == (B, H, NQ)
    want = _brute_select(q, k, budget, first, bs)
    for (b, h, i), blocks in want.items():
        c = int(cnt[b, h, i])
        assert c == min(budget[b][i], i - first[b][i] + 1)           # min(budget, available)
        row = idx[b, h, i].tolist()
        assert row[:c] == blocks and all(x == -1 for x in row[c:])   # sorted, same doc, padded
        assert row[c - 1] == i                                        # diagonal present, last


def test_select_ties_go_to_earlier_blocks():
    q = torch.ones(1, 1, 128, 16)
    k = torch.ones(1, 1, 128, 16)                                     # every score equal
    idx, cnt = A.select_blocks(q, k, 3, None, 16)
    assert idx[0, 0, 7].tolist() == [0, 1, 7]
    again, _ = A.select_blocks(q, k, 3, None, 16)
    assert torch.equal(idx, again)


# ------------------------------------------------------------------------------ coverage
@pytest.mark.parametrize("name", ["multi_doc", "one_doc"])
def test_routing_coverage_monotone_ends_at_one_and_matches_brute_force(name):
    B, H, T, D, bs, cu = LAYOUTS[name]
    q, k, _, _ = _inputs(B, H, T, D, seed=2)
    C = A.routing_coverage(q, k, _cu(cu), bs)
    assert C.shape[0] == _n_seq(B, cu)
    assert (C.diff(dim=1) >= 0).all() and torch.allclose(C[:, -1], torch.ones(len(C)))
    # brute force for the first sequence of row 0: diagonal mass, then best blocks one by one
    n = (cu[1] if cu else T) // bs
    qm = q[0, :, :n * bs].reshape(H, n, bs, D).mean(2)
    km = k[0, :, :n * bs].reshape(H, n, bs, D).mean(2)
    curves = []
    for h in range(H):
        for i in range(n):
            p = torch.softmax((qm[h, i] @ km[h, :i + 1].T) / math.sqrt(D), 0)
            mass = [float(p[i])] + sorted(p[:i].tolist(), reverse=True)
            cum = torch.tensor(mass).cumsum(0).clamp(max=1)
            curves.append(torch.cat([cum, torch.ones(C.shape[1] - len(cum))]))
    assert torch.allclose(C[0], torch.stack(curves).mean(0), atol=1e-5)


# ------------------------------------------------------------------------------ attention
@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("topk", [1, 2, 100, "per_seq"])
def test_torch_matches_reference_fp32(name, topk):
    B, H, T, D, bs, cu = LAYOUTS[name]
    q, k, v, do = _inputs(B, H, T, D, seed=3)
    if topk == "per_seq":
        topk = torch.arange(_n_seq(B, cu)) % 3 + 1
    idx, cnt = A.select_blocks(q, k, topk, _cu(cu), bs)
    want = _run("reference", q, k, v, do, idx, cnt, bs)
    _close(_run("torch", q, k, v, do, idx, cnt, bs), want, 1e-5, 1e-6)


def test_torch_chunking_does_not_change_the_result():
    B, H, T, D, bs, cu = LAYOUTS["multi_doc"]
    q, k, v, _ = _inputs(B, H, T, D, seed=4)
    idx, cnt = A.select_blocks(q, k, 3, _cu(cu), bs)
    whole = A.attention_torch(q, k, v, idx, cnt, bs)
    chunked = A.attention_torch(q, k, v, idx, cnt, bs, chunk_elems=1)     # one query block a chunk
    assert (whole - chunked).abs().max() < 1e-6


@pytest.mark.parametrize("impl", ["auto", "torch", "reference", "triton"])
def test_dense_budget_equals_causal_sdpa_per_document(impl):
    B, H, T, D, bs, cu = LAYOUTS["multi_doc"]
    q, k, v, _ = _inputs(B, H, T, D, seed=5)
    o = A.sparse_attention(q, k, v, 1000, _cu(cu), bs, impl=impl)
    flat = lambda x: x.transpose(0, 1).reshape(H, B * T, D)                  # noqa: E731
    for a, b in zip(cu, cu[1:]):
        want = F.scaled_dot_product_attention(*(flat(x)[:, a:b] for x in (q, k, v)), is_causal=True)
        assert (flat(o)[:, a:b] - want).abs().max() < 1e-5


# ------------------------------------------------------------------------- triton (interpreted)
# (layout, budget): several documents per row with 1-block documents, B and H > 1, budget 1,
# budget >= every block, per-sequence budgets. Each case costs a few seconds in the interpreter.
TRITON_CASES = [("multi_doc", 2), ("multi_doc", "per_seq"), ("one_doc", 1), ("single_blocks", 100),
                ("one_doc", 100)]


@pytest.mark.parametrize("name,topk", TRITON_CASES)
def test_triton_matches_reference_and_torch_fp32(name, topk):
    B, H, T, D, bs, cu = LAYOUTS[name]
    q, k, v, do = _inputs(B, H, T, D, seed=7)
    if topk == "per_seq":
        topk = torch.tensor([3, 1, 2, 4, 1, 2, 3][:_n_seq(B, cu)])
    idx, cnt = A.select_blocks(q, k, topk, _cu(cu), bs)
    got = _run("triton", q, k, v, do, idx, cnt, bs)
    _close(got, _run("reference", q, k, v, do, idx, cnt, bs), 1e-5, 1e-6)
    _close(got, _run("torch", q, k, v, do, idx, cnt, bs), 1e-5, 1e-6)


def test_triton_fp16_matches_fp32_reference():
    B, H, T, D, bs, cu = LAYOUTS["multi_doc"]
    q, k, v, do = _inputs(B, H, T, D, dtype=torch.float16, seed=8)
    idx, cnt = A.select_blocks(q, k, 3, _cu(cu), bs)
    want = _run("reference", *(x.float() for x in (q, k, v, do)), idx, cnt, bs)
    got = _run("triton", q, k, v, do, idx, cnt, bs)
    assert all(x.dtype == torch.float16 for x in got)
    _close(got, want, 1e-2, 1e-3)


@pytest.mark.parametrize("impl,name,seed", [("torch", "multi_doc", 6),
                                            ("triton", "single_blocks", 9)])
def test_two_runs_bitwise_equal(impl, name, seed):
    B, H, T, D, bs, cu = LAYOUTS[name]
    q, k, v, do = _inputs(B, H, T, D, seed=seed)
    idx, cnt = A.select_blocks(q, k, 2, _cu(cu), bs)
    first, second = (_run(impl, q, k, v, do, idx, cnt, bs) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# ------------------------------------------------------------------------------ bad input
def _bad_calls():
    q = torch.randn(1, 2, 64, 16)
    q40, q24, q8 = q[:, :, :40], torch.randn(1, 1, 32, 24), torch.randn(1, 1, 32, 8)
    q2 = torch.randn(2, 1, 32, 16)
    cu = lambda *c: torch.tensor(c, dtype=torch.int32)                       # noqa: E731
    idx, cnt = A.select_blocks(q, q, 2, None, 16)
    return {
        "T not block aligned": lambda: A.sparse_attention(q40, q40, q40, 2),
        "cu not block aligned": lambda: A.select_blocks(q, q, 2, cu(0, 24, 64), 16),
        "cu not increasing": lambda: A.select_blocks(q, q, 2, cu(0, 32, 32, 64), 16),
        "cu wrong end": lambda: A.select_blocks(q, q, 2, cu(0, 32), 16),
        "cu crosses row": lambda: A.select_blocks(q2, q2, 2, cu(0, 16, 48, 64), 16),
        "budget zero": lambda: A.select_blocks(q, q, 0, None, 16),
        "budget tensor < 1": lambda: A.select_blocks(q, q, torch.tensor([0]), None, 16),
        "budget wrong length": lambda: A.select_blocks(q, q, torch.tensor([2, 2]), None, 16),
        "budget float": lambda: A.select_blocks(q, q, 2.0, None, 16),
        "shape mismatch": lambda: A.sparse_attention(q, q, q[:, :1], 2, block_size=16),
        "dtype mismatch": lambda: A.sparse_attention(q, q.double(), q, 2, block_size=16),
        "block not pow2": lambda: A.sparse_attention(q, q, q, 2, block_size=24),
        "block too small": lambda: A.sparse_attention(q, q, q, 2, block_size=8),
        "head dim not pow2": lambda: A.sparse_attention(q24, q24, q24, 2, None, 16),
        "head dim too small": lambda: A.sparse_attention(q8, q8, q8, 2, None, 16),
        "not 4-d": lambda: A.sparse_attention(q[0], q[0], q[0], 2, block_size=16),
        "bad impl": lambda: A.block_sparse_attention(q, q, q, idx, cnt, 16, impl="cuda"),
        "layout shape": lambda: A.block_sparse_attention(q, q, q, idx[:, :, :2], cnt, 16),
        "layout block size": lambda: A.block_sparse_attention(q, q, q, idx, cnt, 32),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_input_raises_value_error(case):
    with pytest.raises(ValueError):
        _bad_calls()[case]()


# ------------------------------------------------------------------------------ scripts
def test_check_script_passes_on_tiny_cases():
    """`python attention.py --check` logic (meant for CUDA), run here under the interpreter."""
    assert A.check([(1, 1, 64, 16, 16, [0, 16, 64], 2)], device="cpu") == 0


def test_bench_prints_every_row(capsys):
    A.bench([128], heads=1, dim=16, block=16, reps=1)
    out = capsys.readouterr().out
    assert "failed" not in out and len(out.strip().splitlines()) == 2 + 4   # header + 4 densities
