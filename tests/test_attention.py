"""Tests for attention.py: the token-level MoBA gate against a brute-force gate, the naive twin
against MoBA's own reference (tests/fixtures), every implementation against the twin, causality,
coverage and the budget floor, sparse decoding, reruns, bad input. Triton runs under
TRITON_INTERPRET=1 on CPU (set in conftest.py), so its shapes are tiny."""
import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import attention as A

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "moba_naive_cases.pt")
# Triton exists for Linux only: elsewhere its tests skip, and everything else still runs.
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (Linux only)")


def impls(*names):
    """pytest params for attention impls, the Triton one marked `needs_triton`."""
    return [pytest.param(n, marks=needs_triton) if n == "triton" else n for n in names]

# (B, H, T, D, block, cu_seqlens): several documents of different lengths per row, single-block
# documents, B and H > 1
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


def _budget(topk, S):
    return torch.arange(S) % 3 + 1 if topk == "per_seq" else topk


def _run(impl, q, k, v, do, sel, bs):
    """Output and dq, dk, dv of one impl for the upstream gradient do."""
    q, k, v = [x.clone().requires_grad_() for x in (q, k, v)]
    o = A.block_sparse_attention(q, k, v, sel.block_idx, sel.block_cnt, bs, impl=impl)
    o.backward(do)
    return [o.detach(), q.grad, k.grad, v.grad]


def _close(got, want, max_tol, mean_tol):
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        err = (a.float() - b.float()).abs()
        assert err.max() <= max_tol and err.mean() <= mean_tol, (name, err.max(), err.mean())


def _docs(B, T, cu, bs):
    """Per row and block: (first block of its document, sequence id), from the plain offsets."""
    NQ, cu = T // bs, cu or [r * T for r in range(B + 1)]
    out = {}
    for s, (a, b) in enumerate(zip(cu, cu[1:])):
        for g in range(a // bs, b // bs):
            out[g // NQ, g % NQ] = (a // bs - g // NQ * NQ, s)
    return out


def _brute_select(q, k, budgets, cu, bs):
    """Independent gate: a Python loop over tokens, scores in float64, sorted by (-score, j)."""
    B, H, T, D = q.shape
    km = k.double().reshape(B, H, T // bs, bs, D).mean(3)
    docs, out = _docs(B, T, cu, bs), {}
    for b in range(B):
        for t in range(T):
            i = t // bs
            first, s = docs[b, i]
            for h in range(H):
                cand = sorted(range(first, i), key=lambda j: (-float(q[b, h, t].double() @ km[b, h, j]), j))
                out[b, h, t] = sorted(cand[:budgets[s] - 1] + [i])
    return out


# ------------------------------------------------------------------------------ the gate
@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("topk", [1, 2, 3, 100, "per_seq"])
def test_select_blocks_matches_brute_force(name, topk):
    B, H, T, D, bs, cu = LAYOUTS[name]
    q, k, _, _ = _inputs(B, H, T, D, seed=1)
    S = _n_seq(B, cu)
    topk = _budget(topk, S)
    sel = A.select_blocks(q, k, topk, _cu(cu), bs)
    budgets = topk.tolist() if torch.is_tensor(topk) else [topk] * S
    assert sel.block_idx.dtype == sel.block_cnt.dtype == torch.int32
    assert sel.budget.tolist() == budgets and sel.coverage is None and sel.floor is None
    for (b, h, t), blocks in _brute_select(q, k, budgets, cu, bs).items():
        c = int(sel.block_cnt[b, h, t])
        row = sel.block_idx[b, h, t].tolist()
        assert row[:c] == blocks and all(x == -1 for x in row[c:]), (b, h, t)


def test_ties_go_to_the_lower_block_even_across_topk_cut():
    """Equal scores (identical key blocks) keep the lower block, whatever torch.topk returns."""
    q = torch.randn(1, 2, 128, 16, generator=torch.Generator().manual_seed(0))
    k = torch.ones(1, 2, 128, 16)                                     # every score of a token equal
    sel = A.select_blocks(q, k, 3, None, 16)
    for t in range(32, 128):
        assert sel.block_idx[0, :, t].tolist() == [[0, 1, t // 16]] * 2
    assert torch.equal(sel.block_idx, A.select_blocks(q, k, 3, None, 16).block_idx)


def _twin(q, k, v, do, topk, cu, bs):
    """Output and gradients of the naive twin (moba_naive: its own gate, a loop over documents)."""
    q, k, v = [x.clone().requires_grad_() for x in (q, k, v)]
    o = A.moba_naive(q, k, v, topk, cu, bs)
    o.backward(do)
    return [o.detach(), q.grad, k.grad, v.grad]


def test_twin_and_every_impl_match_moba_reference_fixture():
    """The twin, and the gate + every impl, against MoBA's own naive reference (tests/fixtures:
    its outputs and gradients on random inputs, several documents and budgets)."""
    for case in torch.load(FIXTURES):
        bs = case["block_size"]
        q, k, v, do = (case[n].permute(1, 0, 2)[None] for n in ("q", "k", "v", "grad_out"))
        cu = torch.tensor([0] + torch.tensor(case["lens"]).cumsum(0).tolist(), dtype=torch.int32)
        budgets = torch.tensor(case["budgets"])
        want = [case[n].permute(1, 0, 2)[None] for n in ("out", "dq", "dk", "dv")]
        _close(_twin(q, k, v, do, budgets, cu, bs), want, 1e-5, 1e-6)            # float64
        q, k, v, do = (x.float() for x in (q, k, v, do))
        sel = A.select_blocks(q, k, budgets, cu, bs)
        for impl in ("reference", "torch", "triton")[:3 if HAS_TRITON else 2]:
            _close(_run(impl, q, k, v, do, sel, bs), want, 1e-5, 1e-6)


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("topk", [1, 3, 100, "per_seq"])
def test_gate_and_reference_match_the_twin(name, topk):
    B, H, T, D, bs, cu = LAYOUTS[name]
    q, k, v, do = _inputs(B, H, T, D, seed=15)
    topk = _budget(topk, _n_seq(B, cu))
    sel = A.select_blocks(q, k, topk, _cu(cu), bs)
    _close(_run("reference", q, k, v, do, sel, bs), _twin(q, k, v, do, topk, _cu(cu), bs), 1e-5, 1e-6)


# ------------------------------------------------------------------------------ coverage, floor
@pytest.mark.parametrize("name", ["multi_doc", "one_doc"])
def test_coverage_matches_brute_force_monotone_ends_at_one(name):
    B, H, T, D, bs, cu = LAYOUTS[name]
    q, k, _, _ = _inputs(B, H, T, D, seed=2)
    C = A.routing_coverage(q, k, _cu(cu), bs)
    NQ = T // bs
    assert C.shape == (_n_seq(B, cu), NQ)
    assert (C.diff(dim=1) >= 0).all() and torch.allclose(C[:, -1], torch.ones(len(C)))
    # brute force for a 3-block sequence: per token and head, softmax over its earlier blocks only
    s, (a, b) = (1, cu[1:3]) if cu else (0, (0, T))
    n = (b - a) // bs
    km = k.transpose(0, 1).reshape(H, -1, D)[:, a:b].double().reshape(H, n, bs, D).mean(2)
    qs = q.transpose(0, 1).reshape(H, -1, D)[:, a:b].double()
    curves = []
    for h in range(H):
        for t in range(n * bs):
            i = t // bs
            mass = sorted(torch.softmax(qs[h, t] @ km[h, :i].T / math.sqrt(D), 0).tolist(),
                          reverse=True) if i else []
            curves.append([min(1.0, sum(mass[:kk - 1])) if kk - 1 < i else 1.0 for kk in range(1, NQ + 1)])
    assert torch.allclose(C[s].double(), torch.tensor(curves, dtype=torch.float64).mean(0), atol=1e-5)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.3, 0.6])
def test_floor_is_the_smallest_budget_keeping_coverage(p):
    B, H, T, D, bs, cu = LAYOUTS["multi_doc"]
    q, k, _, _ = _inputs(B, H, T, D, seed=3)
    requested = torch.tensor([1, 2, 1, 3, 1, 1, 2])
    sel = A.select_blocks(q, k, requested, _cu(cu), bs, k0=3, p=p)
    full = A.routing_coverage(q, k, _cu(cu), bs)
    for s in range(len(requested)):
        curve = full[s].tolist()
        floor = next(kk for kk in range(1, len(curve) + 1) if curve[kk - 1] >= (1 - p) * curve[2] - 1e-6)
        assert int(sel.floor[s]) == floor
        assert int(sel.budget[s]) == max(int(requested[s]), floor)   # smallest budget >= both
    assert torch.allclose(sel.coverage, full[:, :3], atol=1e-6)
    # and the layout really uses the raised budgets
    again = A.select_blocks(q, k, sel.budget, _cu(cu), bs)
    assert torch.equal(again.block_idx, sel.block_idx) and torch.equal(again.block_cnt, sel.block_cnt)


# ------------------------------------------------------------------------------ attention
@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("topk", [1, 2, 100, "per_seq"])
def test_torch_matches_twin_fp32(name, topk):
    B, H, T, D, bs, cu = LAYOUTS[name]
    q, k, v, do = _inputs(B, H, T, D, seed=3)
    sel = A.select_blocks(q, k, _budget(topk, _n_seq(B, cu)), _cu(cu), bs)
    _close(_run("torch", q, k, v, do, sel, bs), _run("reference", q, k, v, do, sel, bs), 1e-5, 1e-6)


@pytest.mark.parametrize("D", [16, 32, 64])
def test_torch_matches_twin_head_dims_and_long_rows(D):
    q, k, v, do = _inputs(2, 2, 512, D, seed=D)
    cu = _cu([0, 64, 256, 512, 544, 1024])
    sel = A.select_blocks(q, k, torch.tensor([2, 3, 4, 1, 5]), cu, 32)
    _close(_run("torch", q, k, v, do, sel, 32), _run("reference", q, k, v, do, sel, 32), 1e-5, 1e-6)


def test_torch_fp16_matches_fp32_twin():
    B, H, T, D, bs, cu = LAYOUTS["multi_doc"]
    q, k, v, do = _inputs(B, H, T, D, dtype=torch.float16, seed=8)
    sel = A.select_blocks(q, k, 3, _cu(cu), bs)
    got = _run("torch", q, k, v, do, sel, bs)
    assert all(x.dtype == torch.float16 for x in got)
    _close(got, _run("reference", *(x.float() for x in (q, k, v, do)), sel, bs), 1e-2, 1e-3)


@pytest.mark.parametrize("impl", impls("auto", "torch", "reference", "triton"))
def test_dense_budget_equals_causal_sdpa_per_document(impl):
    B, H, T, D, bs, cu = LAYOUTS["multi_doc"]
    q, k, v, _ = _inputs(B, H, T, D, seed=5)
    o = A.sparse_attention(q, k, v, 1000, _cu(cu), bs, impl=impl)
    flat = lambda x: x.transpose(0, 1).reshape(H, B * T, D)                  # noqa: E731
    for a, b in zip(cu, cu[1:]):
        want = F.scaled_dot_product_attention(*(flat(x)[:, a:b] for x in (q, k, v)), is_causal=True)
        assert (flat(o)[:, a:b] - want).abs().max() < 1e-5


@pytest.mark.parametrize("impl", impls("torch", "triton"))
def test_output_at_t_ignores_every_later_position(impl):
    """Causality of gate + attention at a sparse budget: changing q, k, v after t leaves o[:t+1]."""
    q, k, v, _ = _inputs(1, 2, 256, 16, seed=11)
    cu = _cu([0, 48, 256])
    base = A.sparse_attention(q, k, v, 2, cu, 16, impl=impl)
    for t in (20, 47, 70, 100, 133, 170, 205, 230):                     # mid-block positions
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[:, :, t + 1:] = torch.randn_like(x[:, :, t + 1:]) * 3
        o = A.sparse_attention(q2, k2, v2, 2, cu, 16, impl=impl)
        assert torch.equal(o[:, :, :t + 1], base[:, :, :t + 1]), t
        assert not torch.equal(o[:, :, t + 1:], base[:, :, t + 1:])   # later outputs did move


def test_with_p_the_budget_is_sequence_level_information():
    """With p set, a sequence's floor comes from all its tokens (as in the paper): when the later
    tokens route all their mass to one block, the floor drops and earlier outputs change with it.
    With a fixed budget the same change leaves every earlier output alone."""
    q, k, v, _ = _inputs(1, 1, 256, 16, seed=12)
    q2 = q.clone()
    q2[:, :, 128:] = 50 * k[:, :, :16].mean(2, keepdim=True)          # later tokens: all on block 0
    a, b = (A.select_blocks(x, k, 1, None, 16, k0=8, p=0.2).budget for x in (q, q2))
    assert int(b) < int(a)
    early = lambda x, topk, **kw: A.sparse_attention(x, k, v, topk, None, 16, **kw)[:, :, :128]  # noqa: E731
    assert not torch.equal(early(q, 1, k0=8, p=0.2), early(q2, 1, k0=8, p=0.2))
    assert torch.equal(early(q, int(b)), early(q2, int(b)))


# ------------------------------------------------------------------------- triton (interpreted)
# (layout, budget): several documents per row with 1-block documents, B and H > 1, budget 1,
# budget >= every block, per-sequence budgets. Each case costs a few seconds in the interpreter.
TRITON_CASES = [("multi_doc", 2), ("multi_doc", "per_seq"), ("one_doc", 1), ("single_blocks", 100),
                ("one_doc", 100)]


@needs_triton
@pytest.mark.parametrize("name,topk", TRITON_CASES)
def test_triton_matches_twin_and_torch_fp32(name, topk):
    B, H, T, D, bs, cu = LAYOUTS[name]
    q, k, v, do = _inputs(B, H, T, D, seed=7)
    sel = A.select_blocks(q, k, _budget(topk, _n_seq(B, cu)), _cu(cu), bs)
    got = _run("triton", q, k, v, do, sel, bs)
    _close(got, _run("reference", q, k, v, do, sel, bs), 1e-5, 1e-6)
    _close(got, _run("torch", q, k, v, do, sel, bs), 1e-5, 1e-6)


@needs_triton
def test_triton_head_dim_64_and_fp16():
    q, k, v, do = _inputs(1, 1, 64, 64, seed=13)
    sel = A.select_blocks(q, k, 2, None, 16)
    _close(_run("triton", q, k, v, do, sel, 16), _run("reference", q, k, v, do, sel, 16), 1e-5, 1e-6)
    B, H, T, D, bs, cu = LAYOUTS["multi_doc"]
    q, k, v, do = _inputs(B, H, T, D, dtype=torch.float16, seed=8)
    sel = A.select_blocks(q, k, 3, _cu(cu), bs)
    got = _run("triton", q, k, v, do, sel, bs)
    assert all(x.dtype == torch.float16 for x in got)
    _close(got, _run("reference", *(x.float() for x in (q, k, v, do)), sel, bs), 1e-2, 1e-3)


@pytest.mark.parametrize("impl,name,seed", [("torch", "multi_doc", 6),
                                            pytest.param("triton", "single_blocks", 9, marks=needs_triton)])
def test_two_runs_bitwise_equal(impl, name, seed):
    B, H, T, D, bs, cu = LAYOUTS[name]
    q, k, v, do = _inputs(B, H, T, D, seed=seed)
    sel = A.select_blocks(q, k, 2, _cu(cu), bs)
    first, second = (_run(impl, q, k, v, do, sel, bs) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_torch_path_reruns_bitwise_equal_on_two_threads():
    """The torch path's sums (per key block products, the CSR merge, index order) stay in a fixed
    order when intra-op threads split the work."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        q, k, v, do = _inputs(1, 2, 2048, 64, seed=21)
        sel = A.select_blocks(q, k, 5, None, 64)
        first, second = (_run("torch", q, k, v, do, sel, 64) for _ in range(2))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# ------------------------------------------------------------------------------ decoding
def test_decode_attention_equals_the_full_forward_rows():
    """Token by token through a cache of keys, values and block-mean keys, the same outputs as one
    full sparse forward: the decode gate is the training gate."""
    B, H, T, D, bs = 2, 2, 96, 16, 16
    q, k, v, _ = _inputs(B, H, T, D, seed=14)
    budget = torch.tensor([2, 3])
    want = A.sparse_attention(q, k, v, budget, None, bs, impl="reference")
    means = k.unflatten(2, (T // bs, bs)).mean(3)                        # what the cache keeps
    for pos, n in ((0, 5), (5, 1), (6, 30), (36, 1), (37, 59)):          # chunks and single tokens
        o = A.decode_attention(q[:, :, pos:pos + n], k, v, means, pos, budget, bs)
        torch.testing.assert_close(o, want[:, :, pos:pos + n], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ bad input
def _layout(**edit):
    """A valid layout for q [1, 1, 64, 16], block 16, budget 3, with one entry edited."""
    q = torch.randn(1, 1, 64, 16)
    sel = A.select_blocks(q, q, 3, None, 16)
    idx, cnt = sel.block_idx.clone(), sel.block_cnt.clone()
    t = 40                                                              # block 2: [a, b, 2]
    if "cnt" in edit:
        cnt[0, 0, t] = edit["cnt"]
    if "idx" in edit:
        idx[0, 0, t] = torch.tensor(edit["idx"])
    return q, idx, cnt


MALFORMED = {
    "count above width": dict(cnt=4),
    "negative count": dict(cnt=-1),
    "zero count": dict(cnt=0),
    "future block": dict(idx=[0, 1, 3]),
    "duplicate block": dict(idx=[1, 1, 2]),
    "own block missing": dict(idx=[0, 1, -1], cnt=2),
    "negative block": dict(idx=[-1, 1, 2]),
}


@pytest.mark.parametrize("impl", impls("torch", "triton", "reference"))
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_layout_raises_in_every_impl(case, impl):
    q, idx, cnt = _layout(**MALFORMED[case])
    with pytest.raises(ValueError, match="block"):
        A.block_sparse_attention(q, q, q, idx, cnt, 16, impl=impl)


def _bad_calls():
    q = torch.randn(1, 2, 64, 16)
    q40, q24, q8 = q[:, :, :40], torch.randn(1, 1, 32, 24), torch.randn(1, 1, 32, 8)
    q2 = torch.randn(2, 1, 32, 16)
    cu = lambda *c: torch.tensor(c, dtype=torch.int32)                       # noqa: E731
    sel = A.select_blocks(q, q, 2, None, 16)
    idx, cnt = sel.block_idx, sel.block_cnt
    return {
        "T not block aligned": lambda: A.sparse_attention(q40, q40, q40, 2),
        "empty batch": lambda: A.sparse_attention(q[:0], q[:0], q[:0], 2, block_size=16),
        "cu not block aligned": lambda: A.select_blocks(q, q, 2, cu(0, 24, 64), 16),
        "cu not increasing": lambda: A.select_blocks(q, q, 2, cu(0, 32, 32, 64), 16),
        "cu wrong end": lambda: A.select_blocks(q, q, 2, cu(0, 32), 16),
        "cu crosses row": lambda: A.select_blocks(q2, q2, 2, cu(0, 16, 48, 64), 16),
        "budget zero": lambda: A.select_blocks(q, q, 0, None, 16),
        "budget tensor < 1": lambda: A.select_blocks(q, q, torch.tensor([0]), None, 16),
        "budget wrong length": lambda: A.select_blocks(q, q, torch.tensor([2, 2]), None, 16),
        "budget float": lambda: A.select_blocks(q, q, 2.0, None, 16),
        "p without k0": lambda: A.select_blocks(q, q, 2, None, 16, p=0.1),
        "p out of range": lambda: A.select_blocks(q, q, 2, None, 16, k0=2, p=1.0),
        "p nan": lambda: A.select_blocks(q, q, 2, None, 16, k0=2, p=float("nan")),
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
        "float layout": lambda: A.block_sparse_attention(q, q, q, idx.float(), cnt, 16),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_input_raises_value_error(case):
    with pytest.raises(ValueError):
        _bad_calls()[case]()


# ------------------------------------------------------------------------------ scripts
@needs_triton
def test_check_script_passes_on_tiny_cases():
    """`python attention.py --check` logic (meant for CUDA), run here under the interpreter."""
    assert A.check([(1, 1, 64, 16, 16, [0, 16, 64], 2)], device="cpu") == 0


def test_bench_prints_every_row(capsys):
    A.bench([128], heads=1, dim=16, block=16, reps=1, densities=(1, 1 / 4))
    out = capsys.readouterr().out
    assert "failed" not in out and len(out.strip().splitlines()) == 3 + 2   # header + 2 densities


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning: Linux only")
@pytest.mark.parametrize("reuse", [False, True])
def test_reuse_cpu_memory_keeps_freed_large_tensors_in_the_process(reuse):
    """With reuse_cpu_memory, a freed 64 MB tensor stays resident (the next one reuses its pages, no
    page faults); without it, glibc hands it back to the OS at once and the resident size drops by
    64 MB. Run in a fresh process: the setting is process-wide."""
    code = ("import torch, attention\n" + ("assert attention.reuse_cpu_memory()\n" if reuse else "")
            + "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096 >> 20\n"
            "x = torch.ones(16 << 20); before = rss(); del x\n"
            "print(before - rss())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    dropped_mb = int(out.stdout.split()[-1])
    assert dropped_mb < 8 if reuse else dropped_mb >= 60
