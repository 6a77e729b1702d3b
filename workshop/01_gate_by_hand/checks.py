"""Checks of exercise 1: your predictions of the MoBA gate (answers.py) against select_blocks and
against the rule itself, brute-forced here from the README's words."""
import os

import pytest

from attention import select_blocks
from workshop import load

HERE = os.path.dirname(os.path.abspath(__file__))
ex = load(os.path.join(HERE, "gate_example.py"))
answers = load(os.path.join(HERE, "answers.py"))
q, k, cu, budgets = ex.tensors()
sel = select_blocks(q, k, budgets, cu, block_size=ex.BLOCK)


def doc_of(t):
    return 0 if t < ex.CU_SEQLENS[1] else 1


def rule(t):
    """The gate as the README states it: score each earlier block j of t's document by
    q_t . mean(K_j); keep the budget - 1 best (ties: the lower j) and t's own block."""
    d, i = doc_of(t), t // ex.BLOCK
    first = ex.CU_SEQLENS[d] // ex.BLOCK
    scores = {j: float(q[0, 0, t] @ k[0, 0, j * ex.BLOCK:(j + 1) * ex.BLOCK].mean(0))
              for j in range(first, i)}
    best = sorted(scores, key=lambda j: (-scores[j], j))[:ex.BUDGETS[d] - 1]
    return sorted(best) + [i], scores


def prediction(name, key=None):
    if answers is None:
        pytest.fail("there is no workshop/01_gate_by_hand/answers.py yet: run python -m workshop start 1")
    value = getattr(answers, name)
    return value if key is None else value.get(key)


@pytest.mark.parametrize("t", sorted(ex.QUERIES))
def test_blocks_of_token(t):
    """The blocks token {t} attends to"""
    want, scores = rule(t)
    got = ex.selected(t, sel)
    assert got == want, f"select_blocks chose {got} for token {t}, the rule gives {want}: the gate is broken"
    guess = prediction("BLOCKS", t)
    assert guess is not None, f"no prediction for token {t} yet: fill in BLOCKS[{t}] in answers.py"
    d = doc_of(t)
    assert sorted(set(guess)) == want, (
        f"token {t} (block {t // ex.BLOCK}, document {'AB'[d]}, budget {ex.BUDGETS[d]}): you "
        f"predicted {sorted(guess)}. Its scores q . mean(K) for the earlier blocks of its document "
        f"are {', '.join(f'block {j}: {s:g}' for j, s in scores.items()) or 'none (first block)'}. "
        "It keeps its own block plus the budget - 1 best; ties go to the lower block")


def test_keys_of_token_70():
    """How many keys token 70 attends to"""
    blocks = ex.selected(70, sel)
    want = (len(blocks) - 1) * ex.BLOCK + 70 % ex.BLOCK + 1
    guess = prediction("KEYS_OF_TOKEN_70")
    assert guess is not None, "no answer yet: fill in KEYS_OF_TOKEN_70 in answers.py"
    assert guess == want, (
        f"you said {guess}. Token 70 attends to every key of its earlier chosen blocks, and inside "
        f"its own block {70 // ex.BLOCK} (tokens {70 // ex.BLOCK * ex.BLOCK}-"
        f"{70 // ex.BLOCK * ex.BLOCK + ex.BLOCK - 1}) only to the keys up to itself (causal)")
