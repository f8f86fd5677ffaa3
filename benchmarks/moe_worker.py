"""The MoE benchmark's child processes (``moe.py`` runs them, under ``memlimit`` when capped):
one case of one engine, or the probe. Everything that imports torch lives here.

Engines: ``layercake`` (under the cap: its offload runner; without: in memory), ``layercake-ram``
(no cap, every weight in RAM as stored, computed as the capped run computes: its oracle of
greedy tokens and logits), ``transformers``
(in memory, no cap: the oracle of tokens, logits and routing), ``accelerate`` (transformers with
Accelerate's disk offload, ``max_memory`` a fraction of the cap) and ``llama.cpp`` (the same
weights as a bf16 GGUF, batch 1, mmap as it loads by default). Every transformers run records the
router's choices (a forward hook on each layer's top-k router): distinct experts per layer and
step, and selections per expert over the decode steps.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

T0 = time.perf_counter()
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from decode import run_llama_cpp  # noqa: E402
from generation import process_read_bytes, prompts, run_transformers  # noqa: E402
from offload_worker import cap_bytes, compare_logits  # noqa: E402
from offload_worker import run_layercake as run_layercake_offload  # noqa: E402

PROGRESS = [""]  # the latest router call, for ``heartbeat``


class RouterLog:
    """Records each top-k router call (a global forward hook, filtered by the router's class):
    calls in layer order, prefill first, then one per decode step."""

    def __init__(self) -> None:
        self.layer_of: dict[int, int] = {}
        self.masks: list[list[int]] = []  # [layer][call]: bit e set when expert e ran
        self.counts: list[torch.Tensor] = []  # [layer] selections per expert, decode steps
        self.handle = torch.nn.modules.module.register_module_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args, out) -> None:
        if type(module).__name__ != "OlmoeTopKRouter":
            return
        idx = out[2]  # (tokens, k) selected experts
        j = self.layer_of.setdefault(id(module), len(self.layer_of))
        # progress on stderr: a run stopped by its timeout (or killed) still says how far it got
        n = len(self.masks[j]) if j < len(self.masks) else 0
        PROGRESS[0] = f"pass {n} layer {j} routed at {time.perf_counter() - T0:.1f} s"
        print(f"moe_worker: {PROGRESS[0]}", file=sys.stderr, flush=True)
        if j == len(self.masks):
            self.masks.append([])
            self.counts.append(torch.zeros(module.num_experts, dtype=torch.long))
        self.masks[j].append(sum(1 << e for e in idx.unique().tolist()))
        if len(self.masks[j]) > 1:  # decode steps only: what the hottest experts are
            self.counts[j] += torch.bincount(idx.flatten(), minlength=module.num_experts)

    def summary(self) -> dict:
        self.handle.remove()
        if not self.masks:
            return {}
        distinct = [[m.bit_count() for m in calls[1:]] for calls in self.masks]
        steps = [sum(d[s] for d in distinct) / len(distinct) for s in range(len(distinct[0]))]
        return dict(
            routing_masks=self.masks,  # [layer][call], call 0 the prefill
            routing_decode_counts=[c.tolist() for c in self.counts],
            routing_decode_distinct_per_layer_mean=round(sum(steps) / max(1, len(steps)), 2),
        )


def run_hf(path: Path, ids: torch.Tensor, gen: int, a: argparse.Namespace) -> dict:
    """transformers in memory (no cap), or with Accelerate's disk offload under the cap."""
    kw = dict(dtype=getattr(torch, a.hf_dtype))
    if a.engine == "accelerate":
        folder = Path(a.offload_dir) / "accelerate"
        folder.mkdir(parents=True, exist_ok=True)
        budget = int(a.accelerate_fraction * cap_bytes(a.cap))
        kw.update(device_map="auto", max_memory={"cpu": budget}, offload_folder=str(folder))
    log = RouterLog()
    if a.engine == "accelerate":
        heartbeat(20.0)
    r = run_transformers(path, ids, gen, False, **kw)
    r.update(log.summary())
    model = r.pop("model")

    def logits(rows: list[list[int]]) -> torch.Tensor:
        with torch.inference_mode():
            return model(torch.tensor(rows)).logits

    r["logits_fn"] = logits
    r["steps"] = gen
    if a.engine == "accelerate":
        r["accelerate_fraction"] = a.accelerate_fraction
        r["policy"] = f"device_map=auto max_memory cpu {budget / 1e9:.2f} GB, offload_folder"
    else:
        r["policy"] = f"whole model in memory ({a.hf_dtype})"
    return r


def heartbeat(every: float) -> None:
    """Every ``every`` seconds, on stderr: the bytes this process has read from storage and its
    resident bytes (a run stopped by its timeout says whether it was still reading: working,
    or thrashing the page cache, or idle)."""
    import threading

    def beat() -> None:
        while True:
            time.sleep(every)
            rss = process_rss_bytes()
            print(f"moe_worker: at {time.perf_counter() - T0:.0f} s: read "
                  f"{process_read_bytes() / 1e9:.2f} GB so far, RSS {rss / 2**20:.0f} MiB "
                  f"(last: {PROGRESS[0]})",
                  file=sys.stderr, flush=True)  # fmt: skip

    threading.Thread(target=beat, daemon=True).start()


def run_llama(path: Path, ids: torch.Tensor, gen: int, a: argparse.Namespace) -> dict:
    if ids.shape[0] != 1:
        raise SystemExit("llama.cpp runs one sequence (batch 1)")
    sys.path.insert(0, "/tmp/llcpp/site")  # llama-cpp-python's build without AMX (see README)
    from moe_checkpoint import olmoe_gguf

    r = run_llama_cpp(olmoe_gguf(a.layers, a.skew), ids, gen, a.threads, warmup=0)
    r["policy"] = "llama.cpp, bf16 GGUF, mmap"
    r["steps"] = gen
    return r


def run_layercake(path: Path, ids: torch.Tensor, gen: int, a: argparse.Namespace) -> dict:
    """The offload runner under the cap (its budget: the whole cap), or in memory without one;
    with the runner's expert statistics where it keeps them."""
    a.in_memory, a.percent, a.compress_weight, a.policy = a.cap is None, None, False, None
    if a.engine == "layercake-ram":  # every weight in RAM as stored: the capped run's math
        a.in_memory, a.percent = False, [0, 100, 100, 0, 100, 0]
    if os.environ.get("MOE_NO_FIRST_READ_AHEAD"):  # A/B: without ``begin_pass``'s read-ahead
        from layercake.offload.experts import ExpertUnits

        ExpertUnits.begin_pass = lambda self, *a: None
    cap, a.cap = a.cap, a.budget or a.cap  # its --cpu-memory: the cap unless told less
    r = run_layercake_offload(path, ids, gen, a)
    a.cap = cap
    r["budget"] = a.budget or cap
    return r


def worker(a: argparse.Namespace) -> None:
    from moe_checkpoint import olmoe

    torch.set_num_threads(a.threads)
    path = olmoe(a.layers, a.skew)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    ids = prompts(max(a.batch, 1), a.prompt_len, vocab)[: a.batch]
    fn = {"layercake": run_layercake, "layercake-ram": run_layercake,
          "llama.cpp": run_llama}.get(a.engine, run_hf)  # fmt: skip
    read0 = process_read_bytes()
    r = fn(path, ids, a.gen_len, a)
    r["process_disk_read_bytes"] = process_read_bytes() - read0  # load and generation
    r["major_faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    r["rss_hwm_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if "logits_fn" in r:
        r.update(compare_logits(r.pop("logits_fn"), ids, a))
    print(json.dumps(r))


def probe(a: argparse.Namespace) -> None:
    """The bound's rates on their own: direct reads of every expert file of the offload layout
    by the best of two readers (``best_reader_probe``: file by file, and the engine's own
    loader; cold cache each pass, best of ``passes`` each) and the matmul peak per row
    count."""
    from moe_checkpoint import olmoe

    from layercake.bench.limits import matmul_gflops_per_rows

    torch.set_num_threads(a.threads)
    src = olmoe(a.layers, a.skew).name
    files = sorted(Path(a.offload_dir).glob(f"{src}-*/layer.*.expert.*.bin"))  # as the loader
    if not files:
        raise SystemExit("no expert layout in the offload dir: run a layercake case first")
    rec = best_reader_probe(files, a.passes)
    if a.disk_only:  # a probe of the disk alone, right before or after a timed case
        print(json.dumps(rec))
        return
    rec["matmul_gflops"] = matmul_gflops_per_rows()
    # the process's own pages, as any engine's (torch imported, its matmul libraries paged in
    # by the peak's runs): what the bound's cap has to leave to the process
    rec["process_bytes"] = process_rss_bytes()
    print(json.dumps(rec))


def best_reader_probe(files: list[Path], passes: int) -> dict:
    """The disk's rate for the bound, the best of two readers, each pass cold (the page cache
    dropped first): ``files`` (every expert file in name order, opened, read whole with the
    loader's direct reader and ``READ_STREAMS``, closed: the probe before moe8) and ``loader``
    (the engine's own ``offload.loader.Loader``: its thread, its ring of ``expert_slots``
    buffers, each expert file read once into a free slot in the loader's order, layer by layer,
    a slot handed back as soon as its read is waited for). With each pass the request size the
    device saw (``/proc/diskstats``: sectors per read request): the loader's runs got 2-4 MiB
    requests where the file-by-file probe got about 0.5 MiB."""
    from layercake.offload.measure import direct_read_gbps

    out: dict[str, list] = {k: [] for k in ("files", "loader", "files_kib", "loader_kib")}
    for _ in range(passes):  # the two readers alternate: a slow moment hits both
        d0 = read_requests(files[0])
        out["files"].append(round(direct_read_gbps(files, passes=1, drop_caches=True), 3))
        out["files_kib"].append(request_kib(d0, read_requests(files[0])))
        gbps, kib = loader_pass(files)
        out["loader"].append(round(gbps, 3))
        out["loader_kib"].append(kib)
    rec = {"disk_gbps": max(out["files"] + out["loader"]),
           "disk_gbps_passes": out["files"] + out["loader"],
           "disk_gb_per_pass": round(sum(f.stat().st_size for f in files) / 1e9, 2)}  # fmt: skip
    for k in ("files", "loader"):
        rec.update({f"{k}_gbps": max(out[k]), f"{k}_gbps_passes": out[k],
                    f"{k}_request_kib": out[f"{k}_kib"]})  # fmt: skip
    return rec


def loader_pass(files: list[Path]) -> tuple[float, int | None]:
    """One cold pass of the engine's expert loader over ``files``: GB/s (wall, from the first
    submit to the last read waited for) and the mean read request in KiB (None without
    ``/proc/diskstats``)."""
    import re

    from layercake.offload.loader import Loader
    from layercake.offload.measure import drop_page_cache
    from layercake.offload.policy import expert_slots
    from layercake.offload.tiers import ALIGN, DirectReader, host_buffer

    def order(f: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", f.name))

    files = sorted(files, key=order)
    readers = {j: DirectReader(f) for j, f in enumerate(files)}
    ranges = {j: (0, f.stat().st_size) for j, f in enumerate(files)}
    size = max(n for _, n in ranges.values())
    drop_page_cache()
    # the ring allocated after the drop, as the engine's is after memlimit's: its pages then
    # come from the memory the drop freed (physically contiguous runs; see the docstring)
    loader = Loader(readers, ranges, [host_buffer(size + ALIGN) for _ in range(expert_slots(size))])
    d0, t0 = read_requests(files[0]), time.perf_counter()
    for j in readers:
        loader.submit(j)
    for j in readers:
        loader.wait(j)
        loader.free(j)
    dt, d1 = time.perf_counter() - t0, read_requests(files[0])
    loader.close()
    for r in readers.values():
        r.close()
    return loader.bytes_read / dt / 1e9, request_kib(d0, d1)


def request_kib(d0: tuple[int, int] | None, d1: tuple[int, int] | None) -> int | None:
    """Mean read request (KiB) between two ``read_requests`` samples."""
    if not d0 or not d1 or d1[0] <= d0[0]:
        return None
    return round((d1[1] - d0[1]) * 512 / (d1[0] - d0[0]) / 1024)


def read_requests(path: Path) -> tuple[int, int] | None:
    """(read requests completed, sectors read) of the block device holding ``path`` (its whole
    disk's line in ``/proc/diskstats``), or None."""
    try:
        dev = os.stat(path).st_dev
        name = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve().name
        for line in open("/proc/diskstats"):
            f = line.split()
            if f[2] == name:
                return int(f[3]), int(f[5])
    except OSError:
        return None
    return None


def process_rss_bytes() -> int:
    """Resident bytes of this process now (``/proc/self/statm``)."""
    import mmap

    return int(Path("/proc/self/statm").read_text().split()[1]) * mmap.PAGESIZE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--probe", action="store_true")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--disk-only", action="store_true", help="the probe: the disk's rate only")
    ap.add_argument("--engine", default="layercake")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--skew", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--micro-batch", type=int, default=0)
    ap.add_argument("--cap")
    ap.add_argument("--accelerate-fraction", type=float, default=0.5)
    ap.add_argument("--budget", help="layercake's --cpu-memory under the cap (default: the cap)")
    ap.add_argument(
        "--pass-tokens",
        type=int,
        default=0,
        help="layercake's pass_tokens (0: not given, the plan's pass is the context)",
    )
    ap.add_argument("--hf-dtype", default="bfloat16", help="transformers' dtype (as stored)")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--gen-len", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--offload-dir", type=Path)
    ap.add_argument("--logits-out", help="write the logits slice here (the reference run)")
    ap.add_argument("--ref-logits", help="compare the logits slice with this file")
    a = ap.parse_args()
    probe(a) if a.probe else worker(a)


if __name__ == "__main__":
    main()
