#!/bin/bash
out=$1
declare -A mx at cmd
while [ -e /tmp/memsample.on ]; do
  for cg in /sys/fs/cgroup/memory/memlimit.*; do
    n=${cg##*/}
    line=$(awk '$1=="total_rss"{r=$2} $1=="total_shmem"{s=$2} $1=="total_cache"{c=$2} $1=="total_dirty"{d=$2} $1=="total_writeback"{w=$2} END{printf "%d %d %d %d %d", (r+s)/1048576, r/1048576, s/1048576, c/1048576, (d+w)/1048576}' $cg/memory.stat 2>/dev/null) || continue
    k=$(( $(cat $cg/memory.kmem.usage_in_bytes 2>/dev/null || echo 0) / 1048576 ))
    set -- $line
    [ -z "${cmd[$n]}" ] && cmd[$n]=$(for p in $(cat $cg/cgroup.procs 2>/dev/null); do tr '\0' ' ' < /proc/$p/cmdline 2>/dev/null | grep -o "worker\|topology" | head -1; done | head -1)
    if [ "${1:-0}" -gt "${mx[$n]:-0}" ]; then mx[$n]=$1; at[$n]="rss=$2 shmem=$3 cache=$4 dirty+wb=$5 kmem=$k"; fi
  done
  sleep 0.02
done
for n in "${!mx[@]}"; do echo "$n ${cmd[$n]} max(rss+shmem)=${mx[$n]} at: ${at[$n]}"; done > $out
