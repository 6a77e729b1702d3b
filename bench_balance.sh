#!/usr/bin/env bash
# SparseBalance measured: the same training run (preset balance-demo: a bimodal mix of documents,
# half <= 2K and half >= 12K tokens, 16 a step, a narrow model so attention dominates) with
# --balance none / lbb / sab / sab+dst, same seed and data, on 4 CPU ranks and on 2, one thread
# each. Per policy it prints:
#   step wall    median wall time of a step (on a shared 2-core machine: mostly scheduling)
#   critical     median over steps of the max over ranks of each rank's compute CPU time: what the
#                step would take on dedicated cores (CPU time does not grow when other ranks or
#                jobs take the core), and its speedup over none
#   imbalance    median of max/mean of the ranks' compute CPU times
#   budget       mean budget the layers used (DST's target, raised to each layer's floor)
#   floor>tgt    samples per step whose floor was above their DST target (quality first)
#   DST ms       DST's pre-step half (planning, CPU ms) and its in-layer half (the coverage
#                floors, measured apart: one 16K document forward+backward with and without them)
#   pred err     median |predicted - measured| / measured per rank, after the online correction
#   val bpb      validation bits per byte at the end
# The first 2 steps are dropped (warm-up). The cost model is profiled once on this machine
# (balance.py --profile) over the preset's lengths and shared by all runs; it is kept in
# $OUT/cost_model.json: delete it to profile again.
#
#   ./bench_balance.sh                       # 10 steps per run, 4 and 2 ranks
#   STEPS=20 RANKS="4" ./bench_balance.sh --p 0.2 --anchor max   # extra flags go to train.py
#   POLICIES=sab+dst ./bench_balance.sh      # re-run one policy; the table reads the others' logs
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-out/bench_balance}
STEPS=${STEPS:-10}
RANKS=${RANKS:-"4 2"}
POLICIES=${POLICIES:-"none lbb sab sab+dst"}   # e.g. POLICIES=sab+dst to re-run one; the table reads all
mkdir -p "$OUT"
COST="$OUT/cost_model.json"
if [ ! -f "$COST" ]; then
  OMP_NUM_THREADS=1 "$PY" balance.py --profile "$COST" --lengths 128 256 512 1024 2048 4096 8192 16384 \
        --budgets 1 2 4 8 16 32 --n-embd 64 --n-head 2 --block-size 64 --threads 1
fi
for n in $RANKS; do
  for b in $POLICIES; do
    rm -rf "${OUT:?}/r$n-$b"
    echo "--balance $b on $n ranks ($STEPS steps, log in $OUT/r$n-$b.log)"
    OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --standalone --nproc_per_node="$n" train.py \
      --preset balance-demo --balance "$b" --steps "$STEPS" --eval-every "$STEPS" --threads 1 \
      --cost-model "$COST" --out "$OUT/r$n-$b" "$@" > "$OUT/r$n-$b.log" 2>&1
  done
done
OMP_NUM_THREADS=1 "$PY" - "$OUT" "$RANKS" <<'EOF'
import json, statistics, sys, time
import torch
from model import GPT, GPTConfig
out, ranks = sys.argv[1], sys.argv[2].split()
torch.set_num_threads(1)

def layer_dst_overhead(reps=3):
    """CPU seconds of one 16K-token document's forward+backward through the preset's model with
    and without the in-layer coverage floors, timed in turn."""
    torch.manual_seed(0)
    cfg = json.load(open(f"{out}/r{ranks[0]}-sab+dst/config.json"))["model"]
    model = GPT(GPTConfig(**cfg))
    x = torch.randint(0, 256, (1, cfg["max_seq_len"]))
    t = {True: [], False: []}
    for _ in range(reps):
        for floors in (False, True):
            c = time.process_time()
            kw = dict(k0=cfg["topk"], p=0.1) if floors else {}
            model(x, x, **kw)[1].backward()
            t[floors].append(time.process_time() - c)
    return min(t[True]) - min(t[False]), min(t[False])

extra, base = layer_dst_overhead()
med = statistics.median
for n in ranks:
    rows, ref = [], None
    for b in ["none", "lbb", "sab", "sab+dst"]:
        recs = [json.loads(line) for line in open(f"{out}/r{n}-{b}/metrics.jsonl")]
        steps = [r for r in recs if "loss" in r][2:]
        bpb = [r["val_bpb"] for r in recs if "val_bpb" in r][-1]
        crit = med(r["critical_path"] for r in steps)
        ref = ref or crit
        plan = med(r["plan_ms"] for r in steps)
        rows.append((b, med(r["step_time"] for r in steps), crit, ref / crit,
                     med(r["imbalance"] for r in steps), statistics.mean(r["mean_budget"] for r in steps),
                     statistics.mean(r["floor_above_target"] for r in steps),
                     plan, med(r["pred_err"] for r in steps if r["pred_err"] is not None), bpb))
    print(f"\n{n} ranks, {len(steps) + 2} steps (first 2 dropped), preset balance-demo, one thread per rank")
    print("| --balance | step wall (s) | critical path (CPU s) | speedup | imbalance | budget | "
          "floor>tgt | DST pre-step (ms) | pred err | val bpb |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for b, w, c, sp, imb, k, fl, pl, err, bpb in rows:
        print(f"| {b} | {w:.2f} | {c:.2f} | {sp:.2f}x | {imb:.3f} | {k:.2f} | {fl:.1f} | {pl:.2f} | "
              f"{100 * err:.1f}% | {bpb:.4f} |")
print(f"\nDST's in-layer half (coverage floors in every layer): {1e3 * extra:+.1f} ms CPU on one "
      f"{json.load(open(f'{out}/r{ranks[0]}-sab+dst/config.json'))['model']['max_seq_len']}-token "
      f"document's forward+backward of {1e3 * base:.0f} ms ({100 * extra / base:+.1f}%)")
EOF
