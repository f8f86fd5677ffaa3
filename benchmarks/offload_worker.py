"""The offload benchmark's child processes (``offload.py`` runs them, under ``memlimit``):
one case of one engine, or the disk probe. Everything that imports torch lives here, so the
capped child is charged for all of it and the parent for none.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from agreement import logits_agreement  # noqa: E402
from generation import model_path, process_read_bytes, prompts, run_transformers  # noqa: E402
from offload import cap_bytes  # noqa: E402

LOGIT_ROWS, LOGIT_TOKENS = 2, 16  # logits compared with the in-memory run's: a small slice


def load_options(ids: torch.Tensor, gen: int, a: argparse.Namespace) -> dict:
    """``layercake.load`` options of a case: in memory (the reference), the planner's policy, a
    fixed placement, or the cap's budget."""
    if a.in_memory:  # the reference: the whole model resident, no offloading
        return {}
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
        if getattr(a, "pass_tokens", 0):  # the job's prompt: activations planned for its pass
            kw["pass_tokens"] = a.pass_tokens
    if a.compress_weight:
        kw.update(compress_weight=True, compress_bits=a.compress_bits)
    return kw


def run_layercake(path: Path, ids: torch.Tensor, gen: int, a: argparse.Namespace) -> dict:
    import layercake

    t0, unix0 = time.perf_counter(), time.time()
    llm = layercake.load(path, **load_options(ids, gen, a))
    load_s = time.perf_counter() - t0
    r = llm.runner
    plan = getattr(r, "plan", None)
    if plan is not None:  # as many prompts as the planned block
        ids = ids[: r.block_size]
    extra0 = {} if plan is None else {"plan": plan.to_json(), "batch": ids.shape[0]}
    read0, rs0 = getattr(r, "bytes_read", 0), getattr(r, "read_s", 0.0)
    dq0, units0 = dequant_seconds(r), getattr(r, "dequant_units", 0)
    io0 = process_read_bytes()
    pass_reads, pass_unix = log_pass_reads(r)
    extra0["phase_unix"] = {"load": [round(unix0, 2), round(time.time(), 2)], "passes": pass_unix}
    out = llm.generate(ids.tolist(), max_new_tokens=gen, ignore_eos=True)
    extra0["pass_process_read_bytes"] = [b - a for a, b in zip([io0, *pass_reads], pass_reads)]
    extra0["gen_read_bytes"] = process_read_bytes() - io0  # from storage while generating
    extra0["logits_fn"] = llm.logits
    s = llm.last_stats
    extra = {}
    if a.compress_weight or (plan is not None and plan.compress is not None):
        extra = dict(dequant_s=dequant_seconds(r) - dq0, dequant_ms_per_layer=dequant_layer_ms(r))
        units = getattr(r, "dequant_units", 0) - units0
        if units:  # streamed: the time each compressed unit took to get ready, in this run
            extra["dequant_ms_per_unit_in_run"] = 1000 * extra["dequant_s"] / units
    extra.update(extra0)
    if not hasattr(r, "units"):  # in memory: the reference, or everything fit the budget
        policy = "in memory" + ("" if a.in_memory else f" ({getattr(r, 'policy', '')})")
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
        head_params=sum(e.numel for u in r.units if u.kind == "head" for e in u.entries),
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
        expert_stats=r.experts.stats() if getattr(r, "experts", None) else None,
        # per pass: tokens per row, seconds, of them waiting for weights, bytes read
        passes=[[t, round(s, 3), round(w, 3), b] for t, s, w, b in getattr(r, "passes", [])],
        memory_plan=getattr(r, "memory", None),  # the planned bytes per kind (budget runs)
        tokens=[x.token_ids for x in out],
    )


def log_pass_reads(runner) -> tuple[list[int], list[float]]:
    """This process's read bytes after each of ``runner``'s passes from now on (appended to the
    first list returned): direct reads and page faults alike, i.e. weights and refaulted file
    pages; and when each pass ended (the second, Unix time: for a memory trace's phases)."""
    out: list[int] = []
    ends: list[float] = []
    forward = runner.forward

    def logged(*args, **kw):
        y = forward(*args, **kw)
        out.append(process_read_bytes())
        ends.append(round(time.time(), 2))
        return y

    runner.forward = logged
    return out, ends


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
    from layercake.ops.linear import Dequant, Linear
    from layercake.quant import QTensor, dequantize

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
        block = next(iter(r.slices[0].layers().values()))
        mats = [
            (m.weight.rows, m.weight.shape, m.weight.spec)
            for m in block.modules()
            if isinstance(m, Linear) and isinstance(m.weight, Dequant)
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
    model = r.pop("model")

    def logits(rows: list[list[int]]) -> torch.Tensor:
        with torch.inference_mode():
            return model(torch.tensor(rows)).logits

    r["logits_fn"] = logits
    r["accelerate_fraction"] = a.accelerate_fraction
    r["steps"] = gen
    r["policy"] = f"device_map=auto max_memory cpu {budget / 1e9:.2f} GB, offload_folder"
    return r


def compare_logits(fn, ids: torch.Tensor, a: argparse.Namespace) -> dict:
    """Logits of the first prompts (untimed): written for the reference run, compared with
    the reference's file otherwise (max abs difference stored, not only the tokens)."""
    rows = ids[:LOGIT_ROWS, -LOGIT_TOKENS:].tolist()
    got = fn(rows).float().numpy()
    if a.logits_out:
        np.save(a.logits_out, got)
        return {}
    if a.ref_logits and Path(a.ref_logits).is_file():
        return logits_agreement(np.load(a.ref_logits), got)
    return {}


def worker(a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    path = model_path(a.model)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    ids = prompts(max(a.batch, 1), a.prompt_len, vocab)[: a.batch]
    fn = run_layercake if a.engine == "layercake" else run_accelerate
    read0 = process_read_bytes()
    r = fn(path, ids, a.gen_len, a)
    r["process_disk_read_bytes"] = process_read_bytes() - read0  # load and generation
    r["major_faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    r["rss_hwm_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    r.update(compare_logits(r.pop("logits_fn"), ids, a))
    print(json.dumps(r))


def disk_probe(files: list[Path], passes: int) -> dict:
    """Direct reads of ``files`` as the loader reads them, the page cache dropped before each
    pass: the best pass's GB/s and every pass."""
    from layercake.offload.measure import direct_read_gbps

    rates = [round(direct_read_gbps(files, passes=1, drop_caches=True), 3) for _ in range(passes)]
    return {"disk_gbps": max(rates), "disk_gbps_passes": rates,
            "disk_gb_per_pass": round(sum(f.stat().st_size for f in files) / 1e9, 2)}  # fmt: skip


def probe(a: argparse.Namespace) -> None:
    """The bound's rates, measured on their own (never the loader's rate in a run): disk by
    the loader's access pattern (large concurrent direct reads of every prepared unit file, the
    page cache dropped before each pass), the best of ``passes``; matmul per row count."""
    from layercake.bench.limits import matmul_gflops_per_rows

    torch.set_num_threads(a.threads)
    d = a.offload_dir
    files = sorted(d.glob("*/layer.*.bin")) + sorted(d.glob("*/head.*.bin"))
    rec = disk_probe(files, a.passes)
    if not a.disk_only:
        rec["matmul_gflops"] = matmul_gflops_per_rows()
    print(json.dumps(rec))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--probe", action="store_true")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--disk-only", action="store_true")
    ap.add_argument("--engine", default="layercake")
    ap.add_argument("--model", default="llama1b")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--cap")
    ap.add_argument("--in-memory", action="store_true")
    ap.add_argument("--accelerate-fraction", type=float, default=0.5)
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--percent", nargs=6, type=float)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--offload-dir", type=Path)
    ap.add_argument("--compress-weight", action="store_true")
    ap.add_argument("--compress-bits", type=int, default=4)
    ap.add_argument("--policy", choices=["auto"])
    ap.add_argument("--allow-compression", action="store_true")
    ap.add_argument("--logits-out", help="write the logits slice here (the reference run)")
    ap.add_argument("--ref-logits", help="compare the logits slice with this file")
    a = ap.parse_args()
    probe(a) if a.probe else worker(a)


if __name__ == "__main__":
    main()
