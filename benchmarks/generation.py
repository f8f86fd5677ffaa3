"""In-memory generation: layercake vs transformers ``generate`` on the same checkpoint, same run.

Each (model, batch, engine) case runs in its own process (so peak RSS is its own) and prints one
JSON line. Throughput is FlexGen's: generated tokens / (prefill + decode wall time).

  python benchmarks/generation.py                          # SmolLM2 and Llama-1B-shaped, B=1 and 32
  python benchmarks/generation.py --models smollm2 --batches 1 --gen-len 64
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported by the workers only: the parent orchestrates, free of torch
    import torch

HERE = Path(__file__).resolve().parent


def model_path(name: str) -> Path:
    if name == "smollm2":
        from layercake.llm import embedded_model_path

        return embedded_model_path()
    if name == "llama1b":
        sys.path.insert(0, str(HERE))
        from checkpoints import llama_1b

        return llama_1b()
    return Path(name)


def process_read_bytes() -> int:
    """Bytes this process has read from storage so far: direct reads and page faults alike."""
    io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(io["read_bytes"])


def prompts(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    import torch

    g = torch.Generator().manual_seed(seed)
    low = min(100, vocab // 2)  # 100 for any real vocabulary; tiny test vocabularies too
    return torch.randint(low, min(vocab, 32000), (batch, length), generator=g)


def linear_params(model: torch.nn.Module) -> int:
    """Weights that take part in matmuls (every linear layer, the head included; embedding
    lookups are not matmuls): 2 FLOPs per weight per token."""
    return sum(m.in_features * m.out_features for m in model.modules() if hasattr(m, "in_features"))


def run_layercake(
    path: Path, ids: torch.Tensor, gen: int, compile: bool, warmup: int = 0, **load_kw
) -> dict:
    """``load_kw`` go to ``layercake.load``; ``warmup`` tokens are generated once before the
    timed run (a compiled step compiles then), their time reported as ``warmup_s``."""
    import layercake
    from layercake.bench.roofline import head_params, weight_bytes

    t0 = time.perf_counter()
    llm = layercake.load(path, compile=compile, **load_kw)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    if warmup:
        llm.generate(ids.tolist(), max_new_tokens=warmup, ignore_eos=True)
    warmup_s = time.perf_counter() - t0
    out = llm.generate(ids.tolist(), max_new_tokens=gen, ignore_eos=True)
    s = llm.last_stats
    return dict(
        load_s=load_s,
        warmup_s=warmup_s,
        prefill_s=s.prefill_s,
        decode_s=s.decode_s,
        params=sum(linear_params(sl) for sl in llm.runner.slices),
        head_params=head_params(llm.runner),
        weight_bytes=weight_bytes(llm.runner),
        tokens=[r.token_ids for r in out],
    )


def run_transformers(
    path: Path, ids: torch.Tensor, gen: int, compile: bool, warmup: int = 0, **load_kw
) -> dict:
    """transformers ``generate``, greedy; ``load_kw`` go to ``from_pretrained`` (e.g. an
    Accelerate ``device_map`` with ``max_memory`` and ``offload_folder``); ``warmup`` tokens
    generated once first, untimed but reported (``warmup_s``)."""
    import torch
    import transformers
    from transformers.generation.streamers import BaseStreamer

    t0 = time.perf_counter()
    kw = dict(gguf_file=path.name) if path.suffix == ".gguf" else {}
    kw = {"dtype": torch.float32, **kw, **load_kw}  # fp32 unless the caller asks otherwise
    src = path.parent if path.suffix == ".gguf" else path
    model = transformers.AutoModelForCausalLM.from_pretrained(src, **kw).eval()
    load_s = time.perf_counter() - t0

    class Clock(BaseStreamer):  # put() is called with the prompt, then with each new token
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    clock = Clock()
    t0 = time.perf_counter()
    if warmup:
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=warmup,
                           min_new_tokens=warmup, do_sample=False, pad_token_id=0)  # fmt: skip
    warmup_s = time.perf_counter() - t0
    read0 = process_read_bytes()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=gen,
            min_new_tokens=gen,
            do_sample=False,
            streamer=clock,
            pad_token_id=0,
        )
    end = time.perf_counter()
    first = clock.times[1]  # the first generated token
    return dict(
        load_s=load_s,
        warmup_s=warmup_s,
        prefill_s=first - t0,
        decode_s=end - first,
        params=linear_params(model),
        head_params=linear_params(model.lm_head),  # prefill: each row's last position only
        weight_bytes=model.dtype.itemsize * linear_params(model),  # as loaded
        gen_read_bytes=process_read_bytes() - read0,  # from storage while generating
        tokens=out[:, ids.shape[1] :].tolist(),
        model=model,  # for callers that compare logits; not a JSON field
    )


def worker(a: argparse.Namespace) -> None:
    import torch

    from layercake.bench.limits import machine_limits
    from layercake.bench.roofline import roofline

    torch.set_num_threads(a.threads)
    path = model_path(a.model)
    from layercake.checkpoint import open_checkpoint

    vocab = open_checkpoint(path).config_dict()["vocab_size"]
    ids = prompts(a.batch, a.prompt_len, vocab)
    if a.engine == "layercake-no-amx":  # the bf16 form without its AMX path (as before it)
        os.environ["LAYERCAKE_NO_AMX"] = "1"
    if a.engine.startswith("layercake"):  # layercake: no flags; layercake-exact: --exact
        r = run_layercake(path, ids, a.gen_len, a.compile, exact=a.engine == "layercake-exact")
    else:
        r = run_transformers(path, ids, a.gen_len, a.compile)
    B, gen = a.batch, a.gen_len
    total = r["prefill_s"] + r["decode_s"]
    limits = machine_limits()  # measured on their own, once, cached (layercake bench's)
    # a decode step reads every weight once as held, whatever the batch: the bound is
    # max(weight bytes / RAM bandwidth, FLOPs / matmul peak at B rows)
    bound = roofline(dict(batch=B, prompt_len=a.prompt_len, prefill_s=r["prefill_s"],
                          decode_s=r["decode_s"], decode_steps=gen - 1, params=r["params"],
                          head_params=r["head_params"],
                          ram_bytes_per_step=r["weight_bytes"]), limits)  # fmt: skip
    rec = dict(
        bench="generation",
        engine=a.engine,
        model=a.model,
        weights="real" if a.model == "smollm2" else "random",
        batch=B,
        prompt_len=a.prompt_len,
        gen_len=gen,
        threads=a.threads,
        compile=a.compile,
        load_s=round(r["load_s"], 3),
        ttft_s=round(r["prefill_s"], 3),
        prefill_tok_s=round(B * a.prompt_len / r["prefill_s"], 2),
        decode_tok_s=round(B * (gen - 1) / r["decode_s"], 2) if r["decode_s"] > 0 else None,
        throughput_tok_s=round(B * gen / total, 2),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        weight_mb=round(r["weight_bytes"] / 2**20, 1),
        limits=dict(ram_gbps=limits.ram_gbps, matmul_gflops=limits.matmul_gflops),
        **bound,
    )
    print(json.dumps(rec))
    print(json.dumps({"tokens": r["tokens"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2", "llama1b"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--engines", nargs="+", default=["layercake", "transformers"],
                    choices=["layercake", "layercake-exact", "layercake-no-amx",
                             "transformers"])  # fmt: skip
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--repeats", type=int, default=1, help="runs per case; the median is reported")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    for m in a.models:
        if m != "smollm2":
            model_path(m)  # write the random checkpoint once, outside the timed processes
        for B in a.batches:
            runs: dict[str, list[tuple[dict, list]]] = {e: [] for e in a.engines}
            for _ in range(a.repeats):  # engines alternate, so drift in the machine hits both
                for e in a.engines:
                    r = run_case(a, m, B, e)
                    if r is not None:
                        runs[e].append(r)
            report(runs, a.repeats)


def run_case(a: argparse.Namespace, m: str, B: int, e: str) -> tuple[dict, list] | None:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--model",
        m,
        "--batch",
        str(B),
        "--engine",
        e,
        "--prompt-len",
        str(a.prompt_len),
        "--gen-len",
        str(a.gen_len),
        "--threads",
        str(a.threads),
    ] + (["--compile"] * a.compile)
    p = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or len(lines) < 2:
        print(
            json.dumps(
                dict(
                    bench="generation",
                    engine=e,
                    model=m,
                    batch=B,
                    error=p.stderr.strip().splitlines()[-1:],
                )
            ),
            flush=True,
        )
        return None
    rec = json.loads(lines[0])
    print(json.dumps({**rec, "line": "run"}), flush=True)  # every run's raw line, then medians
    return rec, json.loads(lines[1])["tokens"]


def report(runs: dict[str, list[tuple[dict, list]]], repeats: int) -> None:
    """One line per engine: its median-throughput run, compared with layercake's."""
    best: dict[str, tuple[dict, list]] = {}
    for e, rs in runs.items():
        if not rs:
            continue
        rs = sorted(rs, key=lambda r: r[0]["throughput_tok_s"])
        rec, toks = rs[len(rs) // 2]
        rec["runs"] = len(rs)
        rec["throughput_runs"] = [r[0]["throughput_tok_s"] for r in rs]
        best[e] = (rec, toks)
        if e != "layercake" and "layercake" in best:
            lc, lt = best["layercake"]
            rec["layercake_speedup"] = round(lc["throughput_tok_s"] / rec["throughput_tok_s"], 3)
            rec["layercake_rss_ratio"] = round(lc["peak_rss_mb"] / rec["peak_rss_mb"], 3)
            rec["same_greedy_tokens"] = sum(x == y for x, y in zip(lt, toks)) / len(toks)
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
