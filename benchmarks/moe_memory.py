"""Where a capped MoE run's memory goes: one ``moe_worker`` case under ``memlimit`` (cold cache),
sampled every ``--every`` seconds while it runs.

Per sample: the worker's mappings from ``/proc/PID/smaps`` grouped (anonymous: the heap, the
tensors; the libraries' file pages: ``.so`` and Python's own files; the checkpoint's mapped
pages: the experts and weights held in RAM as file views; other files), and the cgroup's
``memory.stat`` (page cache, anonymous, unevictable). Prints one JSON line: the sample at the
cgroup's largest anonymous + locked bytes, the largest value of each group over the run (with
``--trace``: every sample), the worker's own record (with ``memory_plan``: the runner's planned
bytes per kind) and the cgroup's peak.

    python benchmarks/moe_memory.py --batch 64 --cap 2500M --budget 2150M
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from offload import MEMLIMIT  # noqa: E402

GROUPS = (  # (group, test on the mapping's path), first match wins
    ("anon", lambda p: p in ("", "[heap]", "[stack]") or p.startswith("[anon")),
    ("libraries", lambda p: ".so" in p or p.endswith((".py", ".pyc"))),
    ("checkpoint", lambda p: p.endswith((".safetensors", ".gguf"))),
    ("offload_layout", lambda p: p.endswith(".bin")),
    ("shared_anon", lambda p: p.startswith("/dev/zero")),  # ``tiers.host_buffer``: staging
)


def smaps_groups(pid: int) -> dict[str, int]:
    """Resident bytes of the process's mappings, by group (``GROUPS``, else ``other``)."""
    out: dict[str, int] = {}
    path = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if not head:
            continue
        if "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line
            path = head[5] if len(head) > 5 else ""
        elif head[0] == "Rss:":
            group = next((g for g, test in GROUPS if test(path)), "other")
            out[group] = out.get(group, 0) + int(head[1]) * 1024
    return out


STAT = ("cache", "rss", "shmem", "mapped_file", "unevictable", "inactive_anon", "active_anon",
        "inactive_file", "active_file", "workingset_refault_file", "pgmajfault")  # fmt: skip
ROLLUP = ("Rss", "Anonymous", "Shared_Clean", "Private_Clean", "Shared_Dirty", "Private_Dirty",
          "Locked")  # fmt: skip


def rollup(pid: int) -> dict[str, int]:
    """The worker's ``/proc/PID/smaps_rollup`` (bytes): resident, anonymous, clean/dirty file
    and shared pages, locked."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        k, v = line.split()[:2]
        if k.rstrip(":") in ROLLUP:
            out[k.rstrip(":")] = int(v) * 1024
    return out


def mappings(pid: int, least: int = 2**20) -> list[list]:
    """The worker's mappings of at least ``least`` resident bytes: [path or "anon", size MiB,
    Rss MiB, Anonymous MiB, Locked MiB]; the smaller ones summed per path kind."""
    out, cur = [], None
    small: dict[str, list] = {}

    def flush() -> None:
        if cur is None:
            return
        if cur[2] >= least:
            out.append([cur[0], *(round(x / 2**20, 1) for x in cur[1:5])])
        else:
            key = "small:" + next((g for g, test in GROUPS if test(cur[5])), "other")
            acc = small.setdefault(key, [key, 0, 0, 0, 0])
            for i in range(1, 5):
                acc[i] += cur[i]

    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if not head:
            continue
        if "-" in head[0] and not head[0].endswith(":"):
            flush()
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            path = head[5] if len(head) > 5 else ""
            cur = [path or "anon", hi - lo, 0, 0, 0, path]
        elif head[0] in ("Rss:", "Anonymous:", "Locked:") and cur is not None:
            cur[{"Rss:": 2, "Anonymous:": 3, "Locked:": 4}[head[0]]] += int(head[1]) * 1024
    flush()
    out += [[k, *(round(x / 2**20, 1) for x in v[1:])] for k, v in small.items()]
    return sorted(out, key=lambda m: -m[2])


KEEP = ("cache", "rss", "mapped_file", "unevictable", "total_inactive_file", "total_active_file")


def cgroup_stat(cg: Path, keep: tuple[str, ...] = KEEP) -> dict[str, int]:
    """The cgroup's ``memory.stat`` fields in ``keep`` and its usage (bytes; events: counts)."""
    stat = {}
    for line in (cg / "memory.stat").read_text().splitlines():
        k, v = line.split()
        if k in keep:
            stat[k] = int(v)
    stat["usage"] = int((cg / "memory.usage_in_bytes").read_text())
    return stat


def sample(proc: subprocess.Popen, every: float, found: dict) -> None:
    """Until ``proc`` ends: the cgroup (memlimit's, by its pid) and its worker, sampled."""
    cg = Path(f"/sys/fs/cgroup/memory/memlimit.{proc.pid}")
    while proc.poll() is None:
        try:
            pids = [int(x) for x in (cg / "cgroup.procs").read_text().split()]
            worker = max(pids)  # the python worker (memlimit's bash execs it)
            s = {"t": round(time.perf_counter() - found["t0"], 1), **cgroup_stat(cg)}
            s["smaps"] = smaps_groups(worker)
            if found["series"] is not None:  # every sample: cgroup's stat, the worker's rollup
                found["series"].append({"unix": round(time.time(), 2), **cgroup_stat(cg, STAT),
                                        **rollup(worker), "smaps": s["smaps"]})  # fmt: skip
                if len(found["series"]) % 10 == 1:  # and about once a second, by mapping
                    found["series"][-1]["mappings"] = mappings(worker)
        except (OSError, ValueError):
            time.sleep(every)
            continue
        for k, v in s["smaps"].items():  # (an exiting worker's smaps is empty)
            found["max"][k] = max(found["max"].get(k, 0), v)
        found["max"]["total"] = max(found["max"].get("total", 0), sum(s["smaps"].values()))
        found.setdefault("trace", []).append(
            [s["t"], *(round(s["smaps"].get(g, 0) / 2**20) for g, _ in GROUPS)]
        )
        held = s["rss"] + s["unevictable"]  # what reclaim cannot take: anonymous and locked
        if held >= found.get("top", {}).get("held", -1):
            found["top"] = {**s, "held": held}
        time.sleep(every)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--cap", default="2500M")
    ap.add_argument("--budget", default="", help="layercake's --cpu-memory (default: the cap)")
    ap.add_argument("--gen-len", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--offload-dir", default="/var/tmp/layercake-offload")
    ap.add_argument("--every", type=float, default=0.5)
    ap.add_argument("--trace", action="store_true", help="every sample: t, MiB per group")
    ap.add_argument(
        "--series",
        help="write every sample's memory.stat and smaps_rollup here "
        "(JSON lines; the worker's phase times in the last line)",
    )
    ap.add_argument("--pass-tokens", type=int, help="layercake's (default: --prompt-len)")
    a = ap.parse_args()
    cmd = [str(MEMLIMIT), "--drop-caches", a.cap, sys.executable, str(HERE / "moe_worker.py"),
           "--engine", "layercake", "--batch", str(a.batch), "--gen-len", str(a.gen_len),
           "--prompt-len", str(a.prompt_len), "--offload-dir", a.offload_dir,
           "--cap", a.cap, "--pass-tokens",
           str(a.prompt_len if a.pass_tokens is None else a.pass_tokens)]  # fmt: skip
    if a.budget:
        cmd += ["--budget", a.budget]
    found: dict = {"t0": time.perf_counter(), "max": {}, "series": [] if a.series else None}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t = threading.Thread(target=sample, args=(proc, a.every, found), daemon=True)
    t.start()
    out, err = proc.communicate()
    t.join()
    rec = dict(bench="moe-memory", batch=a.batch, cap=a.cap, budget=a.budget or a.cap,
               exit=proc.returncode, at_peak_held=found.get("top"), smaps_max=found["max"],
               memlimit=[x for x in err.splitlines() if x.startswith("memlimit:")])  # fmt: skip
    if a.trace:
        rec["trace"] = [["t", *(g for g, _ in GROUPS)], *found.get("trace", [])]
    if proc.returncode == 0:
        r = json.loads(out.strip().splitlines()[-1])
        keep = ("memory_plan", "policy", "prefill_s", "decode_s", "rss_hwm_bytes", "times",
                "expert_stats", "phase_unix", "major_faults", "pass_process_read_bytes",
                "passes")  # fmt: skip
        rec["worker"] = {k: r[k] for k in keep if k in r}
    else:
        rec["stderr_tail"] = err.strip().splitlines()[-4:]
    if a.series:
        with open(a.series, "w") as f:
            for x in found["series"]:
                f.write(json.dumps(x) + "\n")
            f.write(json.dumps({"phase_unix": rec.get("worker", {}).get("phase_unix")}) + "\n")
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
