"""Reads a ``benchmarks/moe_memory.py --series`` file (helper moe10): per phase (load, prompt,
decode: the worker's own times) the cgroup's memory.stat and the worker's smaps_rollup, MiB, with
the file pages refaulted and the major faults since the start; ``--at T ...``: the worker's
mappings by kind about T s after its load began.

    tar -xJf benchmarks/results/moe-2026-12-04-moe10-memory-series.tar.xz -C /tmp
    python3 benchmarks/results/moe-2026-12-04-moe10-series.py /tmp/series-fix-b64.jsonl --at 5 9
Runs in the tar: old (main at a4a920b, B=64 beside another helper's process mapping the same
checkpoint: its file pages were charged to that process; B=8 clean), fix (892f674: the moved
experts' pages given back), ex (4ba47c8 less the heap trim: decode extras), ex2 (4ba47c8; its
B=64 load beside the lead's runs).
"""

import json
import sys

KEYS = ("usage", "rss", "cache", "shmem", "mapped_file", "unevictable", "active_file",
        "inactive_file", "Anonymous", "Locked")  # fmt: skip


def mib(x: float) -> int:
    return round(x / 2**20)


def main() -> None:
    path, rest = sys.argv[1], sys.argv[2:]
    rows = [json.loads(line) for line in open(path)]
    phases, rows = rows[-1]["phase_unix"], rows[:-1]
    load0, load1 = phases["load"]
    ends = phases["passes"]

    def phase(t: float) -> str:
        if t < load0:
            return "start"
        if t < load1:
            return "load"
        return "prompt" if t < ends[0] else "decode" if t < ends[-1] else "end"

    r0 = rows[0]
    print("t phase", *KEYS, "refault majflt")
    for i, r in enumerate(rows):
        if i % 10 == 0:
            refault = (r["workingset_refault_file"] - r0["workingset_refault_file"]) * 4096
            print(round(r["unix"] - load0, 1), phase(r["unix"]), *(mib(r.get(k, 0)) for k in KEYS),
                  mib(refault), r["pgmajfault"] - r0["pgmajfault"])  # fmt: skip
    print("passes end (s after load began):", [round(e - load0, 1) for e in ends])
    if "--at" in rest:
        for want in (float(x) for x in rest[rest.index("--at") + 1 :]):
            r = min(
                (r for r in rows if "mappings" in r), key=lambda r: abs(r["unix"] - load0 - want)
            )
            print(
                f"== t {r['unix'] - load0:.1f}: mapping kind, count, size, rss, anonymous, locked"
            )
            kinds: dict[str, list[float]] = {}
            for m in r["mappings"]:
                name = m[0].rsplit("/", 1)[-1]
                key = ("checkpoint" if name.endswith(".safetensors") else
                       "library" if ".so" in name else m[0])  # fmt: skip
                acc = kinds.setdefault(key, [0, 0, 0, 0, 0])
                acc[0] += 1
                for j in range(4):
                    acc[j + 1] += m[j + 1]
            for k, a in sorted(kinds.items(), key=lambda kv: -kv[1][2]):
                print(f"  {k[:40]:40s} {a[0]:4d} {a[1]:8.1f} {a[2]:7.1f} {a[3]:7.1f} {a[4]:7.1f}")


if __name__ == "__main__":
    main()
