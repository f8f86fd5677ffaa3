"""Offloading under a hard memory cap: layercake vs transformers + Accelerate disk offload.

Each case runs in its own process (``offload_worker.py``) under ``shared/tools/memlimit
--drop-caches CAP`` (the page cache counts against the cap, and starts cold), on the random
Llama-3.2-1B-shaped bf16 checkpoint (2.5 GB). This parent only orchestrates: it never imports
torch, so the capped child is charged for everything it maps. One JSON line per case with
FlexGen's figures: prefill, decode and total throughput (generated tokens / wall time, end to
end), peak memory of the cgroup, the policy, bytes read from storage per step (both engines),
whether the greedy tokens and the logits (max abs difference) equal the in-memory run's, and
the fraction of this machine's bound reached: sum over steps of max(bytes streamed / disk
rate, FLOPs / matmul peak at the step's rows), both rates from an independent probe run before
the cases (direct reads of the prepared layout, the loader's pattern, cold cache, best of
``--probe-passes``), never from the run judged. A fraction above 1 is a probe problem and is
reported as such, not as a result. Accelerate runs at each of ``--accelerate-fractions`` of the
cap (its ``max_memory``); its best is compared, and ``--repeats`` gives the ratios as ranges.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from agreement import tokens_agreement  # noqa: E402
from generation import model_path  # noqa: E402

WORKER = HERE / "offload_worker.py"
MEMLIMIT = next(  # the project's shared tools: beside the checkout, or the team's copy
    (p for p in (HERE.parent.parent / "shared/tools/memlimit", Path("/work/shared/tools/memlimit"))
     if p.is_file()),
    Path("memlimit"),
)  # fmt: skip
DEFAULT_OFFLOAD = Path(os.environ.get("LAYERCAKE_OFFLOAD_DIR", "/var/tmp/layercake-offload"))
ALL_DISK = [0, 0, 100, 0, 100, 0]


def measure_machine(offload_dir: Path, threads: int, passes: int = 3) -> dict:
    """The bound's rates from the probe, a child process of its own (see the module doc)."""
    cmd = [sys.executable, str(WORKER), "--probe", "--offload-dir", str(offload_dir),
           "--threads", str(threads), "--passes", str(passes)]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"the disk probe failed: {p.stderr.strip()[-300:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def cap_bytes(cap: str) -> int:
    """The cap as memlimit reads it (``numfmt --from=iec``: 1600M is 1600 MiB), so that the
    budget an engine is given is the memory it really has."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    s = cap.upper().removesuffix("B")
    return int(float(s.rstrip("KMGT")) * units[s[len(s.rstrip("KMGT")) :]])


def run_case(a: argparse.Namespace, engine: str, batch: int, cap: str | None) -> dict:
    """One case in a child process (under memlimit when capped); its record, or an error."""
    cmd = [sys.executable, str(WORKER), "--engine", engine, "--batch", str(batch)]
    cmd += ["--prompt-len", str(a.prompt_len), "--gen-len", str(a.gen_len)]
    cmd += ["--threads", str(a.threads), "--offload-dir", str(a.offload_dir)]
    cmd += ["--accelerate-fraction", str(a.accelerate_fraction), "--model", a.model]
    if a.micro_batch:
        cmd += ["--micro-batch", str(a.micro_batch)]
    if a.in_memory:
        cmd += ["--in-memory"]
    if a.percent:
        cmd += ["--percent", *map(str, a.percent)]
    if getattr(a, "compress_weight", False):
        cmd += ["--compress-weight", "--compress-bits", str(a.compress_bits)]
    if getattr(a, "policy", None):
        cmd += ["--policy", a.policy] + (["--allow-compression"] if a.allow_compression else [])
    logits = getattr(a, "logits_file", None)
    if logits:  # the reference writes its logits slice, every other case compares with it
        cmd += ["--logits-out" if a.in_memory else "--ref-logits", str(logits)]
    timeout = a.accelerate_timeout if engine == "accelerate" and a.accelerate_timeout else None
    return spawn(cmd, cap, timeout)


# Linux's autogroups give every session an equal share of the cores whatever its processes'
# nice values, so another session's niced work (a test suite) takes half the machine from a
# timed run (moe11 saw runs up to 9x slower and probes' matmul peaks halved, which made bounds
# too loose). A timed command runs in a session of its own with its autogroup raised (root
# only; elsewhere it runs as it is); the bench lock keeps timed runs apart.
RAISE_AUTOGROUP = """import os, sys
try:
    with open("/proc/self/autogroup", "w") as f:
        f.write("-20")
except OSError:
    pass
os.execvp(sys.argv[1], sys.argv[1:])"""


def raised(cmd: list[str]) -> list[str]:
    """``cmd`` run with its session's autogroup raised first (start it in a new session)."""
    return [sys.executable, "-c", RAISE_AUTOGROUP, *cmd]


def spawn(cmd: list[str], cap: str | None, timeout: float | None) -> dict:
    """Run a worker in a session of its own, its autogroup raised (under ``memlimit
    --drop-caches CAP`` when capped, its cap passed on as ``--cap``); its last stdout line as a
    record with ``wall_s`` and the cgroup's ``peak_bytes``, or an error record (OOM-killed, exit
    code, stopped after ``timeout``)."""
    if cap:
        cmd = [str(MEMLIMIT), "--drop-caches", cap, *cmd, "--cap", cap]
    cmd = raised(cmd)
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)  # fmt: skip
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # its own process group: memlimit and the worker
        os.killpg(p.pid, signal.SIGTERM)
        out, err = p.communicate()
        err += f"\nstopped after {timeout} s"
    wall = time.perf_counter() - t0
    peak = None
    for line in err.splitlines():  # the cgroup's peak: page cache included
        if line.startswith("memlimit: peak_bytes="):
            peak = int(line.split("=")[1].split()[0])
    if p.returncode != 0:
        tail = err.strip().splitlines()[-6:]
        why = "OOM-killed" if p.returncode in (137, -9) else f"exit {p.returncode}"
        if tail and tail[-1].startswith("stopped after"):
            why = f"stopped after {timeout} s"
        return {"error": why, "stderr_tail": tail, "wall_s": round(wall, 1), "peak_bytes": peak}
    r = json.loads(out.strip().splitlines()[-1])
    r["wall_s"], r["peak_bytes"] = wall, peak
    return r


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama1b", help="llama1b (default) or a model path")
    ap.add_argument("--engines", nargs="+", default=["layercake", "accelerate"])
    ap.add_argument("--batches", nargs="+", type=int, default=[8, 32, 128])
    ap.add_argument(
        "--caps",
        nargs="+",
        default=["1600M", "2200M"],
        help="memory caps (page cache included): every batch size runs at the first, "
        "batch 32 (or the first batch size) at the others, for both engines",
    )
    ap.add_argument(
        "--accelerate-fractions",
        nargs="+",
        type=float,
        default=[0.3, 0.5, 0.7],
        help="Accelerate's max_memory['cpu'] as fractions of its cap: each runs, the best counts",
    )
    ap.add_argument(
        "--accelerate-timeout",
        type=float,
        default=600,
        help="stop an Accelerate case after this many seconds (0: never); its result is then "
        "a throughput below batch x gen-len / this",
    )
    ap.add_argument("--repeats", type=int, default=1, help="runs of every case (ratio ranges)")
    ap.add_argument("--micro-batch", type=int, default=32, help="micro-batch size (0: whole)")
    ap.add_argument("--percent", nargs=6, type=float, help="a fixed policy instead of the cap")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--offload-dir", type=Path, default=DEFAULT_OFFLOAD)
    ap.add_argument("--probe-passes", type=int, default=3, help="disk probe passes (best kept)")
    ap.add_argument("--no-reference", action="store_true", help="skip the in-memory run")
    ap.add_argument(
        "--reuse-layout",
        action="store_true",
        help="the offload dir already holds the prepared layout: skip the preparing run",
    )
    ap.add_argument("--compress-weight", action="store_true", help="layercake: int4/int8 weights")
    ap.add_argument("--compress-bits", type=int, default=4)
    ap.add_argument("--policy", choices=["auto"], help="layercake: the planner picks the policy")
    ap.add_argument("--allow-compression", action="store_true", help="with --policy auto")
    a = ap.parse_args()
    a.in_memory, a.accelerate_fraction = False, a.accelerate_fractions[0]
    return a


def prepare(a: argparse.Namespace) -> dict:
    """The disk layout, prepared once (every unit on disk) and reused; then the probe."""
    model_path(a.model)  # written once to the cache (by a child process)
    t0 = time.perf_counter()
    prep = None
    if "layercake" in a.engines and not a.reuse_layout:
        saved, a.percent, gen, a.gen_len = a.percent, ALL_DISK, a.gen_len, 2
        prep = run_case(a, "layercake", 1, None)
        a.percent, a.gen_len = saved, gen
        if "error" in prep:
            raise SystemExit(f"preparing the offload layout failed: {prep}")
    machine = (
        measure_machine(a.offload_dir, a.threads, a.probe_passes) if prep or a.reuse_layout else {}
    )
    if prep:
        machine["prepare_and_first_run_s"] = round(time.perf_counter() - t0, 1)
    return machine


def main() -> None:
    a = parse_args()
    machine = prepare(a)
    print(json.dumps({"bench": "offload-machine", **machine}), flush=True)
    a.logits_file = Path(tempfile.mkdtemp(prefix="layercake-bench-")) / "ref-logits.npy"
    ref = None
    if not a.no_reference:
        a.in_memory = True
        ref = run_case(a, "layercake", max(a.batches), None)  # in memory, no cap
        a.in_memory = False
        rec = report(a, "layercake-in-memory", max(a.batches), None, ref, {}, None)
        print(json.dumps(rec), flush=True)
        if "error" in ref:
            ref = None
    main_b = 32 if 32 in a.batches else a.batches[0]
    cases = []
    for i, cap in enumerate(a.caps):
        for engine in a.engines:
            for b in a.batches if engine == "layercake" and i == 0 else [main_b]:
                fracs = a.accelerate_fractions if engine == "accelerate" else [None]
                cases += [(engine, b, cap, f) for f in fracs]
    results: dict[tuple, list[dict]] = {}
    for rep in range(a.repeats):  # the engines alternate within a repeat
        for engine, B, cap, frac in cases:
            a.accelerate_fraction = frac or a.accelerate_fraction
            r = run_case(a, engine, B, cap)
            rec = report(a, engine, B, cap, r, machine, ref)
            rec["repeat"] = rep
            results.setdefault((engine, B, cap), []).append(rec)
            print(json.dumps(rec), flush=True)
    for line in ratios(results, a.repeats):
        print(json.dumps(line), flush=True)


def ratios(results: dict[tuple, list[dict]], repeats: int) -> list[dict]:
    """layercake's end-to-end throughput over Accelerate's best ``max_memory`` of the same
    repeat, for each (batch, cap): the range over the repeats, never one best run."""
    out = []
    for (engine, B, cap), recs in results.items():
        lc = results.get(("layercake", B, cap))
        if engine != "accelerate" or not lc:
            continue
        per_rep = []
        for rep in range(repeats):
            acc = [r for r in recs if r["repeat"] == rep and "throughput_tok_s" in r]
            mine = [r for r in lc if r["repeat"] == rep and "throughput_tok_s" in r]
            if acc and mine:
                best = max(acc, key=lambda r: r["throughput_tok_s"])
                per_rep.append((mine[0]["throughput_tok_s"] / best["throughput_tok_s"],
                                best["accelerate_max_memory_fraction"]))  # fmt: skip
        rec = {"bench": "offload-ratio", "batch": B, "cap": cap}
        if not per_rep:
            rec["accelerate"] = "no finished run"
        else:
            rs = sorted(round(x, 2) for x, _ in per_rep)
            rec.update(layercake_over_accelerate_best_range=[rs[0], rs[-1]], runs=len(rs),
                       accelerate_best_fractions=[f for _, f in per_rep])  # fmt: skip
        out.append(rec)
    return out


def report(a, engine, B, cap, r, machine, ref) -> dict:
    rec = {
        "bench": "offload",
        "engine": engine,
        "model": "llama1b-random-bf16",
        "batch": B,
        "prompt_len": a.prompt_len,
        "gen_len": a.gen_len,
        "cap": cap,
        "threads": a.threads,
    }
    if "error" in r:
        return {**rec, **r}
    total = r["prefill_s"] + r["decode_s"]
    rec.update(
        policy=r.get("policy", "whole model in memory (fp32)"),
        load_s=round(r["load_s"], 2),
        prefill_s=round(r["prefill_s"], 2),
        decode_s=round(r["decode_s"], 2),
        prefill_tok_s=round(B * a.prompt_len / r["prefill_s"], 2),
        decode_tok_s=round(B * (a.gen_len - 1) / r["decode_s"], 2),
        throughput_tok_s=round(B * a.gen_len / total, 2),
        # the same, the load (preparing, quantizing) counted too: what a user waits for
        throughput_incl_load_tok_s=round(B * a.gen_len / (total + r["load_s"]), 2),
        peak_mb=round(r["peak_bytes"] / 2**20, 1) if r.get("peak_bytes") else None,
        wall_s=round(r["wall_s"], 1),
        peak_rss_mb=round(r["rss_hwm_bytes"] / 2**20, 1) if "rss_hwm_bytes" in r else None,
        process_gb_read=round(r.get("process_disk_read_bytes", 0) / 1e9, 2),
        major_faults=r.get("major_faults"),
    )
    if ref and "tokens" in ref:  # greedy tokens and logits against the in-memory run's
        same = tokens_agreement(ref["tokens"][:B], r["tokens"])
        rec["same_greedy_tokens_as_in_memory"] = same["tokens_agree"]
        rec["same_tokens_share"] = same["same_tokens"]
    for k in ("logits_max_abs_diff", "logits_ref_std", "same_argmax", "logits_agree"):
        if k in r:
            rec[k] = r[k]
    if "accelerate_fraction" in r:
        rec["accelerate_max_memory_fraction"] = r["accelerate_fraction"]
    if r.get("gen_read_bytes") is not None:  # from storage while generating, either engine
        rec["gen_gb_read_per_step"] = round(r["gen_read_bytes"] / r["steps"] / 1e9, 3)
    for k in ("dequant_s", "dequant_ms_per_layer", "kv_gb_read", "kv_gb_written"):
        if k in r:
            rec[k] = round(r[k], 2)
    if r.get("times"):  # where the executor's time went (blocked on reads, converting weights)
        rec["times"] = r["times"]
    if engine == "layercake" and machine and "disk_bytes_per_step" in r:
        rec.update(bound(a, B, r, machine, total))
    return rec


def bound(a: argparse.Namespace, B: int, r: dict, machine: dict, total: float) -> dict:
    """Time the machine needs at least: per step, max(bytes streamed / the probe's disk rate,
    FLOPs / the matmul peak at the step's rows). The loader's own rate is reported beside it,
    never used: a bound built from it could not reveal a slow loader."""
    peaks = {int(k): v for k, v in machine["matmul_gflops"].items()}

    def peak(rows: int) -> float:  # more rows can always run as several products of fewer
        return max([v for k, v in peaks.items() if k <= rows] or [peaks[min(peaks)]])

    disk_s = r["disk_bytes_per_step"] / (machine["disk_gbps"] * 1e9)
    # linear FLOPs: every layer on every token; the head only on each row's last token
    head = r.get("head_params", 0)
    layers = r["params"] - head

    def flops_s(tokens: int) -> float:
        return 2 * (layers * tokens + head * B) / (peak(tokens) * 1e9)

    t = max(disk_s, flops_s(B * a.prompt_len)) + (r["steps"] - 1) * max(disk_s, flops_s(B))
    loader = r["bytes_read"] / r["read_s"] / 1e9 if r.get("read_s") else 0.0
    out = dict(gb_read=round(r["bytes_read"] / 1e9, 2), loader_gbps=round(loader, 3),
               probe_disk_gbps=machine["disk_gbps"], kv_layers_on_disk=r["kv_layers_on_disk"],
               bound_s=round(t, 2))  # fmt: skip
    if t > total:  # faster than the bound: the probe measured the disk (or matmul) too slow
        out["probe_problem"] = (f"fraction {t / total:.2f} > 1: the probe's rates are below "
                                "what this run reached; not a result")  # fmt: skip
    else:
        out["fraction_of_bound"] = round(t / total, 3)
    return out


if __name__ == "__main__":
    main()
