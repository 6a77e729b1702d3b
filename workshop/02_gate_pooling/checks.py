"""Checks of exercise 2: max pooling in the MoBA gate (attention.pool_keys, GATE_POOL), against a
brute-force max-pooled gate and a hand-made block with one strong key; then the coverage curves
and DST's floors, mean against max."""
import pytest
import torch

import attention as A


@pytest.fixture(autouse=True)
def mean_again():
    """Every check starts from MoBA's mean pooling and leaves it so."""
    if not hasattr(A, "pool_keys"):
        pytest.fail("attention.pool_keys does not exist: run python -m workshop start 2")
    A.GATE_POOL = "mean"
    yield
    A.GATE_POOL = "mean"


def keys(seed, kind, B=1, H=4, T=1024, D=32, bs=16):
    """q, k: 'topics' (each block's keys around their own random centre) or 'spikes' (weak noise,
    and one strong key in a random direction per block)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g)
    nb = T // bs
    if kind == "topics":
        k = 1.5 * torch.randn(B, H, nb, 1, D, generator=g) + torch.randn(B, H, nb, bs, D, generator=g)
    else:
        k = 0.3 * torch.randn(B, H, nb, bs, D, generator=g)
        at = torch.randint(0, bs, (B, H, nb), generator=g)
        spike = 4 * torch.randn(B, H, nb, 1, D, generator=g)
        k.scatter_(3, at[..., None, None].expand(B, H, nb, 1, D), spike)
    return q, k.flatten(2, 3)


def test_pool_keys_max():
    """pool_keys(k, block_size, "max") is the element-wise maximum over each block's keys"""
    _, k = keys(0, "spikes", H=2, T=64, D=16)
    got = A.pool_keys(k, 16, "max")
    want = torch.stack([k[:, :, j * 16:(j + 1) * 16].max(2).values for j in range(4)], 2)
    assert got.shape == want.shape, f"shape {tuple(got.shape)}, expected {tuple(want.shape)} [B, H, NQ, D]"
    assert torch.equal(got.float(), want), (
        "pool_keys(..., 'max') is not the maximum over each block's 16 keys, dimension by "
        "dimension: reduce the block axis (dim 3 of `blocks`) with amax")
    assert torch.allclose(A.pool_keys(k, 16, "mean"), k.unflatten(2, (4, 16)).mean(3)), "mean pooling changed"


def test_gate_follows_the_max_pooled_rule():
    """With GATE_POOL = "max", select_blocks keeps the best blocks by q . max(K) (brute force,
    packed documents)"""
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-2, 3, (1, 2, 128, 16), generator=g).float()    # small integers: ties
    k = torch.randint(-2, 3, (1, 2, 128, 16), generator=g).float()
    cu, budget, bs = [0, 80, 128], [3, 2], 16
    A.GATE_POOL = "max"
    sel = A.select_blocks(q, k, torch.tensor(budget), torch.tensor(cu, dtype=torch.int32), bs)
    for h in range(2):
        for t in range(128):
            d = 0 if t < cu[1] else 1
            i, first = t // bs, cu[d] // bs
            score = {j: float(q[0, h, t] @ k[0, h, j * bs:(j + 1) * bs].max(0).values)
                     for j in range(first, i)}
            want = sorted(sorted(score, key=lambda j: (-score[j], j))[:budget[d] - 1]) + [i]
            got = sel.block_idx[0, h, t, :int(sel.block_cnt[0, h, t])].tolist()
            assert got == want, (
                f"head {h}, token {t}: select_blocks chose {got}, the max-pooled rule gives {want}. "
                "Check pool_keys first; does select_blocks pool its keys with it?")


def test_one_strong_key():
    """A block with one strong key: max pooling routes to it, mean pooling does not"""
    q, k = torch.zeros(1, 1, 48, 16), torch.zeros(1, 1, 48, 16)
    q[..., 0] = 1.0
    k[0, 0, 0:16, 0] = 0.5                 # block 0: every key 0.5 along q
    k[0, 0, 16:32, 0] = -0.1               # block 1: weak keys against q ...
    k[0, 0, 20, 0] = 4.0                   # ... and one strong key along it
    chosen = {}
    for pool in ("mean", "max"):
        A.GATE_POOL = pool
        chosen[pool] = A.select_blocks(q, k, 2, None, 16).block_idx[0, 0, 40].tolist()
    assert chosen["mean"] == [0, 2], f"mean pooling chose {chosen['mean']} for token 40, expected [0, 2]"
    assert chosen["max"] == [1, 2], (
        f"max pooling chose {chosen['max']} for token 40, expected [1, 2]: block 1's maximum "
        "key (4.0) beats block 0's 0.5, while its mean (0.156) does not")


def test_coverage_stays_a_coverage_curve():
    """With max pooling, routing coverage is still non-decreasing in k and reaches 1"""
    q, k = keys(2, "spikes", H=2, T=256)
    A.GATE_POOL = "max"
    cov = A.routing_coverage(q, k, None, 16)
    assert bool((cov[:, 1:] >= cov[:, :-1] - 1e-6).all()), "C(k) decreases somewhere"
    assert torch.allclose(cov[:, -1], torch.ones_like(cov[:, -1])), f"C(NQ) = {cov[:, -1].tolist()}, not 1"


def test_curves_and_floors_move():
    """Observe: C(k) and DST's floors (k0 = 8), mean against max pooling, on two kinds of keys"""
    print(f"\n        keys    pool   {'C(1), C(2), .., C(8)':47}   floor at p = 0.1, 0.2, 0.3")
    curves = {}
    for kind in ("topics", "spikes"):
        q, k = keys(3, kind)
        for pool in ("mean", "max"):
            A.GATE_POOL = pool
            cov = A.routing_coverage(q, k, None, 16)
            floors = [int(A.coverage_floor(cov, 8, p)[0]) for p in (0.1, 0.2, 0.3)]
            curves[kind, pool] = cov[0, :8]
            print(f"        {kind:7} {pool:5}  " + " ".join(f"{float(c):.3f}" for c in cov[0, :8])
                  + "   " + "   ".join(map(str, floors)))
    moved = float((curves["spikes", "max"] - curves["spikes", "mean"]).abs().max())
    assert moved > 0.1, (
        f"on the spike keys, C(k) under max pooling is within {moved:.3f} of mean pooling's: with "
        "one strong key per block the two should differ clearly. Is GATE_POOL = 'max' used?")
