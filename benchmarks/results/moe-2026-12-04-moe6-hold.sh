#!/bin/bash
# One hold of issue 20's B=64 measurement (helper moe6): old (main at 5acea98) alternating with
# new (this branch: NEW, a worktree of it at a commit, edits elsewhere cannot reach a hold), the
# same harness (NEW's benchmarks/moe.py; PYTHONPATH picks the engine). Hold a ran the branch's
# working tree as new and its harness (cases after 10:28 at cf80576's code). Per case: a one-pass
# disk probe right before and right after (the same direct reads of every expert file as the
# hold's probe), /proc/diskstats, /proc/stat's CPU time (niced: the other helpers' work) and
# loadavg before and after.
# The record keeps the hold-start probe's fraction (best of 3 passes, as before) and adds
# fraction_of_bound_adjacent: the bound recomputed with the faster of the two adjacent probes
# (the shorter bound: the stricter fraction). A fraction above 1 means the probe failed.
# usage: hold.sh TAG SPEC...   SPEC = old:BATCH, new:BATCH or noextra:BATCH (new without the
# decode steps' extra experts: MOE_NO_DECODE_EXTRA, read by moe_worker at 022a5cd-e850fad, the
# snapshots of holds c-e; the extras were then dropped), or noahead:BATCH (new without the first
# layer's read-ahead at a pass's start: MOE_NO_FIRST_READ_AHEAD, read by moe_worker)
# Every path below can be set from the environment (moe7's hold script does; defaults: moe6's);
# NAME names the files (moe-2026-12-04-$NAME$tag*); diet:BATCH runs the tree at DIET.
tag=$1; shift
W=${W:-/work/wt/moe6}; NEW=${NEW:-/tmp/moe6-new}; OLD=${OLD:-/tmp/moe6-old}; DIET=${DIET:-$NEW}
R=$W/benchmarks/results; PY=$W/.venv/bin/python; NAME=${NAME:-moe6}
REF=${REF:-/tmp/moe6-ref-amx}; OFF=${OFF:-/var/tmp/moe6-offload}; TMP=${TMP:-/tmp/moe6/out}
export LAYERCAKE_CACHE=${LAYERCAKE_CACHE:-/tmp/kc-moe6}
mkdir -p $TMP
disk() { awk '$3=="vda"{print $6, $7, $13}' /proc/diskstats; }  # sectors read, ms reading, io ms
cpu() { awk '$1=="cpu"{print $2, $3, $4, $5, $6, $9}' /proc/stat; }  # user nice system idle iowait steal
dprobe() { (cd $W && PYTHONPATH=$W $PY benchmarks/moe_worker.py --probe --disk-only --passes 1 \
  --offload-dir $OFF) | python3 -c "import json,sys; print(json.loads(sys.stdin.read())['disk_gbps'])"; }
echo "hold $tag start $(date -u +%T)" >&2
rm -f $REF/probe-6l.json
(cd $W && PYTHONPATH=$W $PY benchmarks/moe.py --batches 64 --engines none --gen-len 8 \
  --prompt-len 16 --offload-dir $OFF --reference-dir $REF) | head -1 > $R/moe-2026-12-04-$NAME$tag-probe.json
echo "probe $(cut -c1-100 $REF/probe-6l.json)" >&2
for spec in "$@"; do
  IFS=: read which batch <<< "$spec"
  case $which in old) src=$OLD;; diet) src=$DIET;; *) src=$NEW;; esac
  if [ $which = noextra ]; then export MOE_NO_DECODE_EXTRA=1; else unset MOE_NO_DECODE_EXTRA; fi
  if [ $which = noahead ]; then export MOE_NO_FIRST_READ_AHEAD=1; else unset MOE_NO_FIRST_READ_AHEAD; fi
  p0=$(dprobe); d0=$(disk); c0=$(cpu); l0=$(cut -d' ' -f1-3 /proc/loadavg); t0=$(date -u +%T)
  (cd $NEW && PYTHONPATH=$src $PY benchmarks/moe.py --batches $batch --engines layercake --gen-len 8 \
     --prompt-len 16 --offload-dir $OFF --reference-dir $REF) > $TMP/case.out
  d1=$(disk); c1=$(cpu); p1=$(dprobe)
  P0=$p0 P1=$p1 D0="$d0" D1="$d1" C0="$c0" C1="$c1" L0="$l0" T0=$t0 WHICH=$which TAG=$tag REF=$REF \
    python3 $R/moe-2026-12-04-moe6-adjacent.py < $TMP/case.out \
    >> $R/moe-2026-12-04-$NAME$tag.jsonl
  tail -1 $R/moe-2026-12-04-$NAME$tag.jsonl | python3 -c "
import json,sys; r=json.loads(sys.stdin.read())
print('$spec', r.get('throughput_tok_s'), r.get('prefill_s'), r.get('decode_s'), 'frac', r.get('fraction_of_bound'), 'adj', r.get('fraction_of_bound_adjacent'), r.get('probe_adjacent_gbps'), 'loader', r.get('loader_gbps'), 'others_gb', r.get('others_gb_read'), r.get('same_greedy_tokens_as_layercake_in_ram'), r.get('logits_max_abs_diff'), str(r.get('error',''))[:200])" >&2
done
echo "hold $tag end $(date -u +%T)" >&2
