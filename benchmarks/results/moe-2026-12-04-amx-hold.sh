#!/bin/bash
# usage: hold.sh TAG SPEC... ; SPEC = amx:BATCH or noamx:BATCH ; a fresh probe first (AMX on: the bound the engine can run), copied to both ref dirs
tag=$1; shift
R=/work/wt/moe5/benchmarks/results
W=/work/wt/moe5
PY=$W/.venv/bin/python
disk() { awk '$3=="vda"{print "sectors_read", $6, "ms_reading", $7, "io_ms", $13}' /proc/diskstats; }
echo "hold $tag start $(date -u +%T)" >&2
rm -f /tmp/moe5-ref-amx/probe-6l.json
(cd $W && unset LAYERCAKE_NO_AMX && PYTHONPATH=$W LAYERCAKE_CACHE=/tmp/kc-moe5 $PY benchmarks/moe.py --batches 1 --engines none \
   --gen-len 8 --prompt-len 16 --offload-dir /var/tmp/moeoff-offload --reference-dir /tmp/moe5-ref-amx) | head -1 > $R/moe-2026-12-04-amx$tag-probe.json
cp /tmp/moe5-ref-amx/probe-6l.json /tmp/moe5-ref-noamx/probe-6l.json
echo "probe $(cut -c1-90 /tmp/moe5-ref-amx/probe-6l.json) $(date -u +%T)" >&2
for spec in "$@"; do
  IFS=: read mode batch <<< "$spec"
  if [ $mode = amx ]; then unset LAYERCAKE_NO_AMX; out=$R/moe-2026-12-04-amx$tag.jsonl
  else export LAYERCAKE_NO_AMX=1; out=$R/moe-2026-12-04-amx$tag-noamx.jsonl; fi
  ref=/tmp/moe5-ref-$mode
  d0=$(disk); l0=$(cut -d' ' -f1-3 /proc/loadavg); t0=$(date -u +%T)
  (cd $W && PYTHONPATH=$W LAYERCAKE_CACHE=/tmp/kc-moe5 $PY benchmarks/moe.py --batches $batch --engines layercake \
     --gen-len 8 --prompt-len 16 --offload-dir /var/tmp/moeoff-offload --reference-dir $ref) > /tmp/moe5/case.out
  d1=$(disk)
  D0="$d0" D1="$d1" L0="$l0" T0="$t0" MODE=$mode python3 -c "import json,os
for l in open('/tmp/moe5/case.out'):
  r=json.loads(l)
  if r.get('bench')=='moe-machine': continue
  r.update(amx=os.environ['MODE']=='amx', start_utc=os.environ['T0'], loadavg_before=os.environ['L0'], diskstats_before=os.environ['D0'], diskstats_after=os.environ['D1']); print(json.dumps(r))" >> $out
  python3 -c "
import json
for l in open('/tmp/moe5/case.out'):
  r=json.loads(l)
  if r.get('bench')=='moe-machine': continue
  print('$spec', r.get('engine'), r.get('batch'), r.get('throughput_tok_s'), r.get('prefill_s'), r.get('decode_s'), r.get('fraction_of_bound'), r.get('bound_s'), r.get('loader_gbps'), r.get('same_greedy_tokens_as_layercake_in_ram'), r.get('logits_max_abs_diff'), str(r.get('error',''))[:200])" >&2
  echo "$spec done $(date -u +%T)" >&2
done
unset LAYERCAKE_NO_AMX
