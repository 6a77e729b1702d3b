#!/usr/bin/env bash
# SparseBalance on two CPU ranks: the same training run (preset balance-demo: long documents, a
# narrow model, so attention dominates) with --balance none / lbb / sab / sab+dst, same seed and
# data, then one table of what was measured:
#   median step time (first 2 steps dropped: warm-up), speedup over none, median imbalance
#   (max/mean of the ranks' measured compute seconds), mean budget (key blocks per sequence, a
#   budget above a sequence's blocks counted as its blocks), validation bits per byte at the end.
# The cost model is profiled once on this machine (balance.py --profile) and shared by all runs;
# it is kept in $OUT/cost_model.json: delete it to re-profile (a table profiled under heavy load
# is noisy, and DST's budgets follow its predictions). sab+dst's step time includes computing
# the routing-coverage curves for DST's floors (logged per step as dst_ms).
#
#   ./bench_balance.sh                 # 12 steps each
#   STEPS=40 ./bench_balance.sh --p 0.2 --anchor mean     # extra flags go to every train.py run
#
# Timings on a shared machine are noisy: compare the rows of one table, not numbers across runs.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-out/bench_balance}
STEPS=${STEPS:-12}
mkdir -p "$OUT"
COST="$OUT/cost_model.json"
if [ ! -f "$COST" ]; then
  # the grid spans the preset's lengths; budgets above 32 blocks are extrapolated per visited block
  "$PY" balance.py --profile "$COST" --lengths 1024 2048 4096 8192 --budgets 1 2 4 8 16 32 \
        --n-embd 64 --n-head 2 --block-size 64
fi
for b in none lbb sab sab+dst; do
  rm -rf "${OUT:?}/$b"
  echo "--balance $b ($STEPS steps, log in $OUT/$b.log)"
  OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 train.py \
    --preset balance-demo --balance "$b" --steps "$STEPS" --eval-every "$STEPS" \
    --cost-model "$COST" --out "$OUT/$b" "$@" > "$OUT/$b.log" 2>&1
done
"$PY" - "$OUT" <<'EOF'
import json, statistics, sys
out = sys.argv[1]
rows, base = [], None
for b in ["none", "lbb", "sab", "sab+dst"]:
    recs = [json.loads(line) for line in open(f"{out}/{b}/metrics.jsonl")]
    steps = [r for r in recs if "loss" in r][2:]
    bpb = [r["val_bpb"] for r in recs if "val_bpb" in r][-1]
    t = statistics.median(r["step_time"] for r in steps)
    base = base or t
    rows.append((b, t, base / t, statistics.median(r["imbalance"] for r in steps),
                 statistics.mean(r["mean_budget"] for r in steps), bpb))
print("| --balance | median step (s) | speedup | imbalance (max/mean) | mean budget (blocks) | val bpb |")
print("|---|---|---|---|---|---|")
for b, t, s, imb, k, bpb in rows:
    print(f"| {b} | {t:.2f} | {s:.2f}x | {imb:.3f} | {k:.2f} | {bpb:.3f} |")
EOF
