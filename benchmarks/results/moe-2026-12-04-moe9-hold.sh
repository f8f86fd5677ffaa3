#!/bin/bash
# One hold of issue 20's measurement (helper moe9; moe8's hold script with other paths): old
# (main at dbe5abb, a copy at OLD: git archive dbe5abb) alternating with new (this branch at a
# commit, a copy at NEW: hold a ran 5629107's layercake/ and benchmarks/), both with the same
# plan (the job's prompt length as pass_tokens); the harness is NEW's benchmarks/moe.py
# (PYTHONPATH picks the engine). Per case, in their own processes, right before and right after:
# the best-reader disk probe (moe_worker.py --probe --disk-only --passes 1), /proc/diskstats,
# /proc/stat's CPU time and loadavg; the record (moe-2026-12-04-moe8-adjacent.py) adds the honest
# fraction (the bound at max(adjacent probes, the run's own loader rate)). REF: a copy of moe8's
# reference dir (/tmp/moe8-ref: the uncapped in-RAM oracle and transformers' routing).
# usage: hold.sh TAG SPEC...   SPEC = old:BATCH or new:BATCH (or new2:BATCH: the tree at NEW2, a
# third engine; moe11's hold a)
tag=$1; shift
W=${W:-/work/wt/moe9}; NEW=${NEW:-/tmp/moe9-new}; OLD=${OLD:-/tmp/moe9-old}
R=$W/benchmarks/results; PY=$W/.venv/bin/python; NAME=${NAME:-moe9}
REF=${REF:-/tmp/moe9-ref}; OFF=${OFF:-/var/tmp/moe7-offload}; TMP=${TMP:-/tmp/moe9/out}
export LAYERCAKE_CACHE=${LAYERCAKE_CACHE:-/tmp/lc-cache-moe9}
mkdir -p $TMP
disk() { awk '$3=="vda"{print $6, $7, $13, $4}' /proc/diskstats; }  # sectors, ms reading, io ms, reads
cpu() { awk '$1=="cpu"{print $2, $3, $4, $5, $6, $9}' /proc/stat; }  # user nice system idle iowait steal
dprobe() { (cd $NEW && PYTHONPATH=$NEW $PY benchmarks/moe_worker.py --probe --disk-only --passes 1 \
  --offload-dir $OFF) > $TMP/probe-$1.json; python3 -c "import json,sys; print(json.load(open('$TMP/probe-$1.json'))['disk_gbps'])"; }
echo "hold $tag start $(date -u +%T)" >&2
rm -f $REF/probe-6l.json
(cd $NEW && PYTHONPATH=$NEW $PY benchmarks/moe.py --batches 64 --engines none --gen-len 8 \
  --prompt-len 16 --offload-dir $OFF --reference-dir $REF) | head -1 > $R/moe-2026-12-04-$NAME$tag-probe.json
echo "probe $(cut -c1-160 $REF/probe-6l.json)" >&2
for spec in "$@"; do
  IFS=: read which batch <<< "$spec"
  case $which in old) src=$OLD; pt="";; new2) src=$NEW2; pt="";; *) src=$NEW; pt="";; esac
  p0=$(dprobe before); d0=$(disk); c0=$(cpu); l0=$(cut -d' ' -f1-3 /proc/loadavg); t0=$(date -u +%T)
  (cd $NEW && PYTHONPATH=$src $PY benchmarks/moe.py --batches $batch --engines layercake --gen-len 8 \
     --prompt-len 16 $pt --offload-dir $OFF --reference-dir $REF) > $TMP/case.out
  d1=$(disk); c1=$(cpu); p1=$(dprobe after)
  P0=$p0 P1=$p1 D0="$d0" D1="$d1" C0="$c0" C1="$c1" L0="$l0" T0=$t0 WHICH=$which TAG=$tag REF=$REF \
    PROBES="$TMP/probe-before.json $TMP/probe-after.json" \
    python3 $R/moe-2026-12-04-moe8-adjacent.py < $TMP/case.out >> $R/moe-2026-12-04-$NAME$tag.jsonl
  tail -1 $R/moe-2026-12-04-$NAME$tag.jsonl | python3 -c "
import json,sys; r=json.loads(sys.stdin.read())
print('$spec', r.get('throughput_tok_s'), r.get('prefill_s'), r.get('decode_s'), 'frac', r.get('fraction_of_bound'), 'adj', r.get('fraction_of_bound_adjacent'), r.get('probe_adjacent_gbps'), 'loader', r.get('loader_gbps'), 'honest', r.get('fraction_of_bound_honest'), 'held', r.get('experts_held_per_layer'), 'read', (r.get('expert_stats') or {}).get('experts_read_per_layer'), 'peak', r.get('peak_rss_mb'), 'nice', (r.get('cpu_s') or {}).get('nice'), r.get('same_greedy_tokens_as_layercake_in_ram'), r.get('logits_max_abs_diff'), str(r.get('error',''))[:200])" >&2
done
echo "hold $tag end $(date -u +%T)" >&2
