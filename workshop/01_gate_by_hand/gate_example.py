"""Exercise 1's example (workshop/01_gate_by_hand/README.md): one row of 128 tokens holding two
documents, A (tokens 0-79, blocks 0-4) and B (tokens 80-127, blocks 5-7), blocks of 16 tokens,
budget 3 for A and 2 for B. Every key in block j is the vector KEYS[j] (so the block's mean key is
KEYS[j]); token t's query is QUERIES[t] (zero for the tokens not listed). Vectors have 16
dimensions, all zero after the first three.

    python workshop/01_gate_by_hand/gate_example.py           # the example, as tables
    python workshop/01_gate_by_hand/gate_example.py --show    # and the blocks select_blocks chose
"""
import os
import sys

import torch

KEYS = [(1, 0, 0), (0, 2, 0), (1, 1, 0), (0, 0, 3), (1, 1, 1), (3, 0, 0), (0, 1, 0), (1, 0, 1)]
QUERIES = {5: (1, 1, 1), 20: (0, 0, 1), 50: (0, 1, 0), 70: (1, 0, 1), 79: (0, 0, 0),
           85: (1, 1, 0), 100: (0, 0, 1), 120: (0, 1, 0), 127: (1, 0, 0)}
CU_SEQLENS = [0, 80, 128]     # document A: tokens 0-79, document B: tokens 80-127
BUDGETS = [3, 2]              # blocks per token, its own block included: A 3, B 2
BLOCK, T, D = 16, 128, 16


def tensors():
    """q, k [1, 1, T, D], cu_seqlens and the per-document budgets, ready for select_blocks."""
    q, k = torch.zeros(1, 1, T, D), torch.zeros(1, 1, T, D)
    for j, key in enumerate(KEYS):
        k[0, 0, j * BLOCK:(j + 1) * BLOCK, :3] = torch.tensor(key, dtype=torch.float)
    for t, query in QUERIES.items():
        q[0, 0, t, :3] = torch.tensor(query, dtype=torch.float)
    return q, k, torch.tensor(CU_SEQLENS, dtype=torch.int32), torch.tensor(BUDGETS)


def selected(t, sel):
    """The blocks token t attends to (ascending, own block last), from a Selection."""
    return sel.block_idx[0, 0, t, :int(sel.block_cnt[0, 0, t])].tolist()


if __name__ == "__main__":
    print("block | tokens  | document | every key (first 3 dims)")
    for j, key in enumerate(KEYS):
        print(f"{j:5} | {j * BLOCK:3}-{(j + 1) * BLOCK - 1:3} | {'A' if j < 5 else 'B':8} | {key}")
    print("\ntoken | block | query (first 3 dims)")
    for t, query in QUERIES.items():
        print(f"{t:5} | {t // BLOCK:5} | {query}")
    if "--show" in sys.argv:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        from attention import select_blocks
        q, k, cu, budgets = tensors()
        sel = select_blocks(q, k, budgets, cu, block_size=BLOCK)
        print("\ntoken | blocks it attends to (select_blocks)")
        for t in QUERIES:
            print(f"{t:5} | {selected(t, sel)}")
