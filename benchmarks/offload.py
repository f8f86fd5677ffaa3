"""Offloading under a hard memory cap: layercake vs transformers + Accelerate disk offload.

Each case runs in its own process under ``shared/tools/memlimit --drop-caches CAP`` (the page
cache counts against the cap, and starts cold), on the random Llama-3.2-1B-shaped bf16 checkpoint
(2.5 GB). Prints one JSON line per case with FlexGen's figures: prefill, decode and total
throughput (generated tokens / wall time, end to end), peak memory of the cgroup, the policy, bytes
read from disk, whether the greedy tokens equal the in-memory run's, and the fraction of this
machine's bound reached: sum over steps of max(bytes streamed / disk bandwidth, FLOPs / matmul
peak), both measured here at the start of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from generation import model_path, prompts, run_transformers  # noqa: E402
from generation import run_layercake as run_generate  # noqa: E402

MEMLIMIT = HERE.parent.parent / "shared/tools/memlimit"
DEFAULT_OFFLOAD = Path(os.environ.get("LAYERCAKE_OFFLOAD_DIR", "/var/tmp/layercake-offload"))


def run_layercake(path: Path, ids: torch.Tensor, gen: int, a: argparse.Namespace) -> dict:
    import layercake

    if a.in_memory:  # the reference: the whole model resident, no offloading
        return run_generate(path, ids, gen, False)
    t0 = time.perf_counter()
    kw = dict(offload_dir=a.offload_dir, batch_size=min(a.micro_batch or 10**9, ids.shape[0]))
    kw["num_batches"] = max(1, ids.shape[0] // kw["batch_size"])
    if a.policy == "auto":  # the planner picks batch, micro-batches, placement (and compression)
        kw = dict(offload_dir=a.offload_dir, cpu_memory=a.cap, policy="auto",
                  max_context=ids.shape[1] + gen, max_sequences=ids.shape[0],
                  prompt_len=ids.shape[1],
                  allow_compression=a.allow_compression)  # fmt: skip
    elif a.percent:
        kw["percent"] = a.percent
    else:
        kw["cpu_memory"] = cap_bytes(a.cap)  # all of the cap memlimit enforces
        kw["max_context"] = ids.shape[1] + gen
    if a.compress_weight:
        kw.update(compress_weight=True, compress_bits=a.compress_bits)
    llm = layercake.load(path, **kw)
    load_s = time.perf_counter() - t0
    r = llm.runner
    plan = getattr(r, "plan", None)
    if plan is not None:  # as many prompts as the planned block
        ids = ids[: r.block_size]
    extra0 = {} if plan is None else {"plan": plan.to_json(), "batch": ids.shape[0]}
    read0, rs0 = getattr(r, "bytes_read", 0), getattr(r, "read_s", 0.0)
    dq0, units0 = dequant_seconds(r), getattr(r, "dequant_units", 0)
    out = llm.generate(ids.tolist(), max_new_tokens=gen, ignore_eos=True)
    s = llm.last_stats
    extra = {}
    if a.compress_weight or (plan is not None and plan.compress is not None):
        extra = dict(dequant_s=dequant_seconds(r) - dq0, dequant_ms_per_layer=dequant_layer_ms(r))
        units = getattr(r, "dequant_units", 0) - units0
        if units:  # streamed: the time each compressed unit took to get ready, in this run
            extra["dequant_ms_per_unit_in_run"] = 1000 * extra["dequant_s"] / units
    extra.update(extra0)
    if not hasattr(r, "units"):  # everything fit the budget: the in-memory runner
        policy = f"in memory ({getattr(r, 'policy', '')})"
        return dict(load_s=load_s, prefill_s=s.prefill_s, decode_s=s.decode_s,
                    steps=1 + s.decode_steps, policy=policy, **extra,
                    tokens=[x.token_ids for x in out])  # fmt: skip
    return dict(
        **extra,
        load_s=load_s,
        prefill_s=s.prefill_s,
        decode_s=s.decode_s,
        steps=1 + s.decode_steps,
        params=sum(e.numel for u in r.units for e in u.entries),
        head_params=sum(e.numel for u in r.units if u.kind != "layer" for e in u.entries),
        disk_bytes_per_step=r.disk_bytes,
        bytes_read=r.bytes_read - read0,
        read_s=r.read_s - rs0,
        policy=str(r.policy),
        percent=list(r.policy.percent),
        micro_batch=r.policy.batch_size,
        num_batches=r.policy.num_batches,
        kv_layers_on_disk=getattr(r, "kv_on_disk", 0),
        kv_gb_read=r.kv_stream.bytes_read / 1e9 if hasattr(r, "kv_stream") else 0.0,
        kv_gb_written=r.kv_stream.bytes_written / 1e9 if hasattr(r, "kv_stream") else 0.0,
        times={k: round(v, 2) for k, v in getattr(r, "times", {}).items()},
        tokens=[x.token_ids for x in out],
    )


def dequant_seconds(r) -> float:
    """Time spent dequantizing weights so far (offload runner, or quantized linears)."""
    if hasattr(r, "dequant_s"):
        return r.dequant_s
    ws = {
        id(m.workspace): m.workspace
        for s in r.slices
        for m in s.modules()
        if hasattr(m, "workspace")
    }
    return sum(w.seconds for w in ws.values())


def dequant_layer_ms(r, repeats: int = 5) -> float:
    """Dequantizing one decoder layer's weights into fp32, measured on its own (median, ms)."""
    from layercake.quant import QTensor, QuantLinear, dequantize

    if hasattr(r, "placed"):
        j = next(j for j, u in enumerate(r.units) if u.kind == "layer")
        mats = [
            (p.dev if p.dev is not None else p.cpu, p.entry.shape, p.entry.spec)
            for p in r.placed[j]
            if p.entry.quant and p.a + (p.b - p.a) == p.entry.shape[0]
        ]
        if len(mats) < sum(1 for p in r.placed[j] if p.entry.quant):  # rows on disk: read them
            return float("nan")
    else:
        block = next(iter(r.slices[0].blocks().values()))
        mats = [
            (m.rows, (m.out_features, m.in_features), m.spec)
            for m in block.modules()
            if isinstance(m, QuantLinear)
        ]
    outs = [torch.empty(shape) for _, shape, _ in mats]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for (rows, shape, spec), out in zip(mats, outs):
            dequantize(QTensor.from_rows(rows, shape, spec), out)
        times.append(time.perf_counter() - t0)
    return round(1000 * sorted(times)[len(times) // 2], 1)


def run_accelerate(path: Path, ids: torch.Tensor, gen: int, a: argparse.Namespace) -> dict:
    folder = Path(a.offload_dir) / "accelerate"
    folder.mkdir(parents=True, exist_ok=True)
    budget = int(a.accelerate_fraction * cap_bytes(a.cap))
    r = run_transformers(
        path,
        ids,
        gen,
        False,
        device_map="auto",
        max_memory={"cpu": budget},
        offload_folder=str(folder),
    )
    r["steps"] = gen
    r["policy"] = f"device_map=auto max_memory cpu {budget / 1e9:.2f} GB, offload_folder"
    return r


def cap_bytes(cap: str) -> int:
    """The cap as memlimit reads it (``numfmt --from=iec``: 1600M is 1600 MiB), so that the
    budget an engine is given is the memory it really has."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    s = cap.upper().removesuffix("B")
    return int(float(s.rstrip("KMGT")) * units[s[len(s.rstrip("KMGT")) :]])


def worker(a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    path = model_path(a.model)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    ids = prompts(max(a.batch, 1), a.prompt_len, vocab)[: a.batch]
    fn = run_layercake if a.engine == "layercake" else run_accelerate
    r = fn(path, ids, a.gen_len, a)
    io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    r["process_disk_read_bytes"] = int(io["read_bytes"])  # direct reads and page faults alike
    r["major_faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    r["rss_hwm_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(r))


def measure_machine(offload_dir: Path, threads: int) -> dict:
    """Disk bandwidth and fp32 matmul peak, the two rates the bound is made of (the planner's
    own measurements). Disk: direct reads of every prepared unit file (the executor's reader and
    number of concurrent reads, cold page cache), two passes, the faster one kept."""
    from layercake.offload.measure import direct_read_gbps, matmul_gflops

    files = sorted(offload_dir.glob("*/layer.*.bin")) + sorted(offload_dir.glob("*/head.*.bin"))
    disk = direct_read_gbps(files, passes=2, drop_caches=True)
    return {"disk_gbps": round(disk, 3), "matmul_gflops": round(matmul_gflops(threads), 1)}


def run_case(a: argparse.Namespace, engine: str, batch: int, cap: str | None) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", "--engine", engine, "--batch", str(batch)]
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
    if cap:
        cmd = [str(MEMLIMIT), "--drop-caches", cap, *cmd, "--cap", cap]
    t0 = time.perf_counter()
    timeout = a.accelerate_timeout if engine == "accelerate" and a.accelerate_timeout else None
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
        tail = err.strip().splitlines()[-3:]
        why = "OOM-killed" if p.returncode in (137, -9) else f"exit {p.returncode}"
        if tail and tail[-1].startswith("stopped after"):
            why = f"stopped after {timeout} s"
        return {"error": why, "stderr_tail": tail, "wall_s": round(wall, 1), "peak_bytes": peak}
    r = json.loads(out.strip().splitlines()[-1])
    r["wall_s"], r["peak_bytes"] = wall, peak
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", default="layercake")
    ap.add_argument("--model", default="llama1b", help="llama1b (default) or a model path")
    ap.add_argument("--engines", nargs="+", default=["layercake", "accelerate"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", nargs="+", type=int, default=[8, 32, 128])
    ap.add_argument(
        "--caps",
        nargs="+",
        default=["1600M", "2200M"],
        help="memory caps (page cache included): every batch size runs at the first, "
        "batch 32 (or the first batch size) at the others, for both engines",
    )
    ap.add_argument("--cap", help=argparse.SUPPRESS)
    ap.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument(
        "--accelerate-fraction",
        type=float,
        default=0.5,
        help="Accelerate's max_memory['cpu'] as a fraction of its cap",
    )
    ap.add_argument(
        "--accelerate-timeout",
        type=float,
        default=600,
        help="stop an Accelerate case after this many seconds (0: never); its result is then "
        "a throughput below batch x gen-len / this",
    )
    ap.add_argument("--micro-batch", type=int, default=32, help="micro-batch size (0: whole)")
    ap.add_argument("--percent", nargs=6, type=float, help="a fixed policy instead of the cap")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--offload-dir", type=Path, default=DEFAULT_OFFLOAD)
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
    if a.worker:
        return worker(a)
    model_path(a.model)  # written once to the cache
    # prepare the disk layout once (reused by every run), timed on its own
    t0 = time.perf_counter()
    prep = None
    if "layercake" in a.engines and not a.reuse_layout:  # all weights on disk: every unit
        saved, a.percent = a.percent, [0, 0, 100, 0, 100, 0]
        prep = run_case(a, "layercake", 1, None)
        a.percent = saved
        if "error" in prep:
            raise SystemExit(f"preparing the offload layout failed: {prep}")
    machine = measure_machine(a.offload_dir, a.threads) if prep or a.reuse_layout else {}
    if prep:
        machine["prepare_and_first_run_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps({"bench": "offload-machine", **machine}), flush=True)
    ref = None
    if not a.no_reference:
        a.in_memory = True
        ref = run_case(a, "layercake", max(a.batches), None)  # in memory, no cap
        a.in_memory = False
        if ref and "error" not in ref:
            rec = report(a, "layercake-in-memory", max(a.batches), None, ref, {}, None)
            print(json.dumps(rec), flush=True)
    main_b = 32 if 32 in a.batches else a.batches[0]
    cases = []
    for i, cap in enumerate(a.caps):
        for engine in a.engines:
            for b in a.batches if engine == "layercake" and i == 0 else [main_b]:
                cases.append((engine, b, cap))
    results = {}
    for engine, B, cap in cases:
        r = run_case(a, engine, B, cap)
        results[engine, B, cap] = r
        print(json.dumps(report(a, engine, B, cap, r, machine, ref)), flush=True)
    for (engine, B, cap), r in results.items():
        lc = results.get(("layercake", B, cap))
        if engine == "accelerate" and lc and "error" not in lc:
            rec = {"bench": "offload-ratio", "batch": B, "cap": cap}
            if "error" in r:
                rec["accelerate"] = r["error"]
            else:
                ratio = (r["prefill_s"] + r["decode_s"]) / (lc["prefill_s"] + lc["decode_s"])
                rec["layercake_over_accelerate"] = round(ratio, 2)
            print(json.dumps(rec))


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
        peak_mb=round(r["peak_bytes"] / 2**20, 1) if r.get("peak_bytes") else None,
        wall_s=round(r["wall_s"], 1),
        peak_rss_mb=round(r["rss_hwm_bytes"] / 2**20, 1) if "rss_hwm_bytes" in r else None,
        process_gb_read=round(r.get("process_disk_read_bytes", 0) / 1e9, 2),
        major_faults=r.get("major_faults"),
    )
    if ref and "tokens" in ref:
        rec["same_greedy_tokens_as_in_memory"] = r["tokens"] == ref["tokens"][:B]
    for k in ("dequant_s", "dequant_ms_per_layer", "kv_gb_read", "kv_gb_written"):
        if k in r:
            rec[k] = round(r[k], 2)
    if r.get("times"):  # where the executor's time went (blocked on reads, converting weights)
        rec["times"] = r["times"]
    if engine == "layercake" and machine and "disk_bytes_per_step" in r:
        # the disk's rate: the probe's, or the loader's own in this run where it read faster (the
        # probe reads alone, one file after another; it has measured 1.1-1.7 GB/s on one day)
        loader = r["bytes_read"] / r["read_s"] / 1e9 if r.get("read_s") else 0.0
        disk = max(machine["disk_gbps"], loader)
        disk_s = r["disk_bytes_per_step"] / (disk * 1e9)
        # linear FLOPs: every layer on every token; the head only on each row's last token
        layers = r["params"] - r.get("head_params", 0)
        flops = lambda tokens: (  # noqa: E731
            2 * (layers * tokens + r.get("head_params", 0) * B) / (machine["matmul_gflops"] * 1e9)
        )
        bound = max(disk_s, flops(B * a.prompt_len)) + (r["steps"] - 1) * max(disk_s, flops(B))
        rec.update(
            gb_read=round(r["bytes_read"] / 1e9, 2),
            loader_gbps=round(loader, 3),
            bound_disk_gbps=round(disk, 3),
            kv_layers_on_disk=r["kv_layers_on_disk"],
            bound_s=round(bound, 2),
            fraction_of_bound=round(bound / total, 3),
        )
    return rec


if __name__ == "__main__":
    main()
