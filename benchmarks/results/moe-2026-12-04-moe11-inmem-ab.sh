#!/bin/bash
# moe11's in-memory A/B of the prompt's pass: moe9's moe-2026-12-04-moe9-inmem.py (B=64 x 16, every
# weight in RAM, 2 threads, N passes of one token a process) under one hold, the trees
# /tmp/moe11-TAG (git archive of a commit) alternating, ROUNDS rounds; one JSON line a process
# into moe-2026-12-04-moe11-inmem.jsonl (WHAT: a note). Both trees' kernels prebuilt in one cache
# dir (a build deletes the others: both .so files copied back in), so no case compiles.
#   flock /tmp/layercake-bench.lock env WHAT=... TAGS="new old" bash this.sh
cd /work/wt/moe11
OUT=benchmarks/results/moe-2026-12-04-moe11-inmem.jsonl
export LAYERCAKE_CACHE=/tmp/lc-cache-moe11
for i in $(seq ${ROUNDS:-3}); do for t in ${TAGS:-new old}; do
  line=$(env PYTHONPATH=/tmp/moe11-$t TAG=$t .venv/bin/python benchmarks/results/moe-2026-12-04-moe9-inmem.py ${N:-4} 2>/dev/null | tail -1)
  echo "$line" | python3 -c "import json,sys,os; r=json.loads(sys.stdin.read()); r['what']=os.environ['WHAT']; r['loadavg_after']=float(open('/proc/loadavg').read().split()[0]); print(json.dumps(r))" >> $OUT
  tail -1 $OUT | cut -c1-120
done; done
