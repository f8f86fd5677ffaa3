#!/usr/bin/env bash
# A/B: the same worker script (a snapshot of benchmarks/offload.py) against two code trees,
# alternating, each case under memlimit with a cold page cache. One JSON line per run. (The
# 2026-12-03 lines ran offload.py --worker of d9faf3c, which offload_worker.py took over.)
set -u
cd "$(dirname "$0")/.."
export LAYERCAKE_BENCH_CACHE=${LAYERCAKE_BENCH_CACHE:-$HOME/.cache/layercake-bench}
OUT=${OUT:-offload-ab.jsonl}
# the two trees, their offload dirs, and extra worker arguments (e.g. --compress-weight);
# WORKER=tree runs each tree's own copy of offload_worker.py (when the worker uses an API the
# other tree lacks)
BEFORE_TREE=${BEFORE_TREE:-/work/wt/before}; AFTER_TREE=${AFTER_TREE:-/work/main}
OFF_PREFIX=${OFF_PREFIX:-/var/tmp/lc-ab-}; EXTRA=${EXTRA:-}
for rep in ${REPS:-1 2}; do
  for B in ${BATCHES:-8 32 128}; do
    # ABBA=1 reverses the order on even reps, so neither tree always runs second (the disk's
    # rate can depend on what ran just before it)
    order="before main"; [ "${ABBA:-0}" = 1 ] && [ $((rep % 2)) = 0 ] && order="main before"
    for tree in $order; do
      d=$BEFORE_TREE; [ $tree = main ] && d=$AFTER_TREE
      off=$OFF_PREFIX$tree
      worker=offload_worker.py; [ "${WORKER:-}" = tree ] && worker=$d/benchmarks/offload_worker.py
      line=$(LAYERCAKE_CACHE=/tmp/kc-$(basename $d) PYTHONPATH=$d /work/shared/tools/memlimit --drop-caches 1.6G /work/main/.venv/bin/python $worker --engine layercake --batch $B --micro-batch 32 --model llama1b --cap 1.6G --offload-dir $off --prompt-len 32 --gen-len 32 --threads 2 $EXTRA 2>err-$tree.log | tail -1)
      peak=$(grep -o "peak_bytes=[0-9]*" err-$tree.log | tail -1)
      echo "{\"tree\": \"$tree\", \"rep\": $rep, \"B\": $B, \"$peak\": 0, \"r\": $line}" | sed 's/"peak_bytes=\([0-9]*\)": 0/"peak_bytes": \1/' >> $OUT
      tail -c 300 $OUT | tr -d '\n' | cut -c1-200; echo
    done
  done
done
