"""The project installs and runs where Triton does not exist (macOS, Windows): Triton is imported
only by impl="triton", and everything else works without it."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import sys
sys.modules["triton"] = None          # any `import triton` now raises ImportError, as on macOS
import torch, attention, model, infer, balance, batching, train
q = torch.randn(1, 1, 64, 16)
print(attention.sparse_attention(q, q, q, 2, None, 16).shape)     # auto = torch on CPU
try:
    attention.sparse_attention(q, q, q, 2, None, 16, impl="triton")
except ValueError as e:
    print("triton:", e)
train.main(["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--max-seq-len", "128",
            "--attn-block", "32", "--topk", "2", "--batch-size", "2", "--steps", "2",
            "--eval-every", "2", "--eval-samples", "2", "--out", sys.argv[1]])
assert "triton" not in sys.modules or sys.modules["triton"] is None
print("trained")
"""


def test_import_and_a_train_step_without_triton(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "run")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "torch.Size([1, 1, 64, 16])" in r.stdout and "trained" in r.stdout
    assert "triton: impl='triton' needs the triton package" in r.stdout


def test_core_files_import_without_a_cycle():
    """Imports only go down DESIGN.md's flow: the graph of the core files has no cycle (a lazy
    import inside a function counts too)."""
    import ast
    core = ["attention", "balance", "batching", "data", "infer", "model", "train"]
    graph = {}
    for name in core:
        tree = ast.parse(open(os.path.join(ROOT, name + ".py")).read())
        deps = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        deps |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        graph[name] = deps & set(core) - {name}
    done, path = set(), []

    def visit(n):
        assert n not in path, f"import cycle: {' -> '.join(path[path.index(n):] + [n])}"
        if n not in done:
            path.append(n)
            for d in sorted(graph[n]):
                visit(d)
            path.pop()
            done.add(n)
    for n in core:
        visit(n)
    assert "balance" not in graph["batching"] and not graph["attention"]
