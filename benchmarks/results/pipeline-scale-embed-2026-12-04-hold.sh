#!/bin/bash
# one hold of the bench lock: ORDER is a list of old/new; each runs `one two --split 10`
OUT=$1; shift
export LAYERCAKE_HOSTSIM=/work/shared/tools/hostsim
for who in "$@"; do
  if [ $who = old ]; then W=/tmp/pipe7-old; else W=/tmp/pipe7-new; fi
  KR=--keep-reference; [ -f /var/tmp/pipe7/tokens.json ] || KR=
  echo "{\"who\": \"$who\", \"commit\": \"$(git -C $W rev-parse --short HEAD)\", \"dirty\": \"$(git -C $W status --porcelain -uno | wc -l)\", \"start\": \"$(date -u +%T)\"}" >> $OUT
  (cd $W && PYTHONPATH=$W LAYERCAKE_CACHE=/tmp/kc-pipe .venv/bin/python benchmarks/pipeline.py --cases one two --split 10 $KR --no-lock --offload-dir /var/tmp/pipe7 >> $OUT 2>>/tmp/pipe7/hold.err)
done
echo "{\"end\": \"$(date -u +%T)\"}" >> $OUT
