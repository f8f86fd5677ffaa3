#!/bin/bash
# run diskexp2 with N spinning processes beside it
n=$1; shift
pids=()
for i in $(seq 1 $n); do python3 -c "while True: pass" & pids+=($!); done
"$@"
for p in "${pids[@]}"; do kill $p; done
