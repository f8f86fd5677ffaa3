#!/bin/bash
# One hold of issue 20's B=64 measurement (helper moe7): moe6's hold script with moe7's paths.
# old: main at 14dd4b6 (a copy at OLD); new: 953d799, a layer's experts run as their reads arrive
# (a copy at NEW); diet: 93c18ca, also an expert ring of 4 and the rest of the RAM share as whole
# experts in some layers (a copy at DIET); the harness is NEW's benchmarks/moe.py. Holds a-f
# (13:08-14:02) ran this script's first version: the same steps, its own copy of the loop.
# Before the first hold (untimed, niced, outside the lock): the offload layout under OFF (any
# layercake.load of the checkpoint with offload_dir=OFF writes it) and the uncapped references in
# REF (benchmarks/moe.py --engines transformers layercake-ram ... --reference-dir REF), else the
# hold's probe finds no expert files and its first case runs the references inside the hold.
# usage: hold.sh TAG SPEC...   SPEC = old:BATCH, new:BATCH or diet:BATCH
W=/work/wt/moe7 NEW=/tmp/moe7-new OLD=/tmp/moe7-old DIET=/tmp/moe7-diet NAME=moe7 \
  REF=/tmp/moe7-ref-amx OFF=/var/tmp/moe7-offload TMP=/tmp/moe7/out LAYERCAKE_CACHE=/tmp/kc-moe7 \
  exec "$(dirname "$0")/moe-2026-12-04-moe6-hold.sh" "$@"
