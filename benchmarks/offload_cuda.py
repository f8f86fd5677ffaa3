"""Offloading with compute on a CUDA GPU: layercake's placements against transformers (in GPU
memory, and with Accelerate's CPU offload) on the random Llama-3.2-1B-shaped bf16 checkpoint.

Each case runs in a fresh process (this script with ``--case``), the cases alternating over
``--repeats``; one JSON line per run with FlexGen's figures: generated tokens / (prefill +
decode wall time), prefill and decode separately, time to first token (= prefill: every row's
first token comes from it), peak GPU memory, peak RSS, bytes moved host -> device per step, and
the greedy tokens' and logits' agreement with the run that holds everything on the GPU
(``lc-gpu``, the reference: same engine, same bf16 compute). The host -> device bound (the
weights' bytes per step / the pinned copy rate, probed on its own before the cases) gives the
streamed cases' fraction of their limit.

    python benchmarks/offload_cuda.py --batch 32 --gen-len 32 --repeats 2 --out gpu.jsonl
    python benchmarks/offload_cuda.py --device cpu --model DIR --cases lc-gpu lc-ram  # dry run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from generation import model_path, process_read_bytes, prompts  # noqa: E402

# (W_DEV, W_CPU, KV_DEV, KV_CPU, ACT_DEV, ACT_CPU): disk gets the weights' rest
PLACEMENTS = {
    "lc-gpu": [100, 0, 100, 0, 100, 0],  # everything on the GPU: the reference
    "lc-ram": [0, 100, 100, 0, 100, 0],  # weights in pinned host RAM, streamed layer by layer
    "lc-half": [50, 50, 100, 0, 100, 0],  # half the weights on the GPU, half streamed
    "lc-disk": [0, 0, 100, 0, 100, 0],  # weights read from the offload directory every step
    "lc-kvram": [100, 0, 0, 100, 100, 0],  # weights on the GPU, KV cache in pinned host RAM
}
CASES = [*PLACEMENTS, "hf-gpu", "hf-offload"]
LOGIT_ROWS, LOGIT_TOKENS = 2, 16


def run_layercake(path: Path, ids, a: argparse.Namespace) -> dict:
    import torch

    import layercake

    kw = dict(device=a.device, percent=PLACEMENTS[a.case], offload_dir=a.offload_dir,
              batch_size=a.micro_batch or ids.shape[0],
              num_batches=ids.shape[0] // (a.micro_batch or ids.shape[0]))  # fmt: skip
    t0 = time.perf_counter()
    llm = layercake.load(path, **kw)
    load_s = time.perf_counter() - t0
    r = llm.runner
    llm.generate(ids[:, :8].tolist(), max_new_tokens=2, ignore_eos=True)  # warm-up: same for all
    read0, io0 = getattr(r, "bytes_read", 0), process_read_bytes()
    out = llm.generate(ids.tolist(), max_new_tokens=a.gen_len, ignore_eos=True)
    s = llm.last_stats
    # the rows not on the device cross to it every step (from pinned RAM or the disk)
    streamed = sum(p.entry.nbytes - p.a * p.entry.row_bytes
                   for ps in getattr(r, "placed", []) for p in ps)  # fmt: skip
    rec = dict(load_s=load_s, prefill_s=s.prefill_s, decode_s=s.decode_s,
               steps=1 + s.decode_steps, policy=str(getattr(r, "policy", "in memory")),
               bytes_read=getattr(r, "bytes_read", 0) - read0,
               process_read_bytes=process_read_bytes() - io0,
               h2d_bytes_per_step=streamed,
               tokens=[x.token_ids for x in out])  # fmt: skip
    rows = ids[:LOGIT_ROWS, -LOGIT_TOKENS:].tolist()
    rec["logits"] = llm.logits(rows).float().cpu()
    del llm
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
    return rec


def run_transformers(path: Path, ids, a: argparse.Namespace) -> dict:
    import torch
    import transformers

    kw: dict = dict(dtype=torch.bfloat16 if a.device != "cpu" else torch.float32)
    if a.case == "hf-offload":  # Accelerate: the layers over the GPU's budget stay in host RAM
        kw.update(device_map="auto", max_memory={0: a.hf_gpu_memory, "cpu": "100GiB"})
    else:
        kw.update(device_map=a.device)
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, **kw).eval()
    load_s = time.perf_counter() - t0
    dev = next(model.parameters()).device if a.case != "hf-offload" else torch.device(a.device)
    x = ids.to(dev)
    gen = dict(attention_mask=torch.ones_like(x), do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(x[:, :8], max_new_tokens=2, min_new_tokens=2, **gen)  # warm-up
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        model.generate(x, max_new_tokens=1, min_new_tokens=1, **gen)  # the prefill alone
        sync()
        t1 = time.perf_counter()
        out = model.generate(x, max_new_tokens=a.gen_len, min_new_tokens=a.gen_len, **gen)
        sync()
        t2 = time.perf_counter()
        rows = x[:LOGIT_ROWS, -LOGIT_TOKENS:]
        logits = model(rows).logits.float().cpu()
    prefill = t1 - t0
    return dict(load_s=load_s, prefill_s=prefill, decode_s=(t2 - t1) - prefill,
                steps=a.gen_len, policy=str(kw.get("max_memory", kw["device_map"])),
                tokens=out[:, ids.shape[1]:].tolist(), logits=logits)  # fmt: skip


def case(a: argparse.Namespace) -> None:
    import numpy as np
    import torch

    path = model_path(a.model)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    ids = prompts(a.batch, a.prompt_len, vocab)
    cuda = a.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    fn = run_transformers if a.case.startswith("hf-") else run_layercake
    r = fn(path, ids, a)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    r.update(case=a.case, batch=a.batch, prompt_len=a.prompt_len, gen_len=a.gen_len,
             device=a.device, rss_hwm_bytes=rss,
             gpu_peak_bytes=torch.cuda.max_memory_allocated() if cuda else 0)  # fmt: skip
    logits = r.pop("logits").numpy()
    ref = Path(a.reference)
    if a.case == "lc-gpu" and not ref.with_suffix(".npy").is_file():
        np.save(ref.with_suffix(".npy"), logits)
        ref.with_suffix(".json").write_text(json.dumps(r["tokens"]))
    if ref.with_suffix(".npy").is_file():
        want = np.load(ref.with_suffix(".npy"))
        toks = json.loads(ref.with_suffix(".json").read_text())
        r["logits_max_abs_diff"] = float(np.abs(want - logits).max())
        r["tokens_equal"] = sum(x == y for a_, b_ in zip(toks, r["tokens"]) for x, y in zip(a_, b_))
        r["tokens_total"] = sum(len(t) for t in toks)
    r["tokens"] = r["tokens"][:2]  # a sample; the agreement above counts all of them
    print("RESULT " + json.dumps(r))


def h2d_probe(device: str) -> float | None:
    code = ("from layercake.offload.measure import h2d_gbps; import json; "
            f"print(json.dumps(h2d_gbps({device!r})))")  # fmt: skip
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama1b", help="llama1b (written on first use) or a dir")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--micro-batch", type=int, default=0, help="rows per micro-batch (0: all)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=240, help="seconds a case may run")
    ap.add_argument("--hf-gpu-memory", default="1GiB", help="Accelerate's GPU budget")
    ap.add_argument("--offload-dir", default=None)
    ap.add_argument("--out", default=None, help="append the JSON lines here too")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--reference", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case:
        return case(a)
    work = Path(tempfile.mkdtemp(prefix="lc-cuda-"))
    off = a.offload_dir or str(work / "offload")
    probe = h2d_probe(a.device) if a.device.startswith("cuda") else None
    order = ["lc-gpu"] + [c for c in a.cases if c != "lc-gpu"]  # the reference runs first
    runs: dict[str, list[dict]] = {}
    for rep in range(a.repeats):
        for c in order if rep % 2 == 0 else [order[0], *reversed(order[1:])]:
            cmd = [sys.executable, __file__, "--case", c, "--model", a.model, "--device",
                   a.device, "--batch", str(a.batch), "--micro-batch", str(a.micro_batch),
                   "--prompt-len", str(a.prompt_len), "--gen-len", str(a.gen_len),
                   "--hf-gpu-memory", a.hf_gpu_memory, "--offload-dir", off,
                   "--reference", str(work / "ref")]  # fmt: skip
            t0 = time.perf_counter()
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
                line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
                rec = json.loads(line[7:]) if line else {"case": c, "error": p.stderr[-1500:]}
            except subprocess.TimeoutExpired:
                rec = {"case": c, "error": f"timed out after {a.timeout:.0f} s"}
            rec.update(repeat=rep, wall_s=round(time.perf_counter() - t0, 1), h2d_gbps=probe)
            if "prefill_s" in rec:
                t = rec["prefill_s"] + rec["decode_s"]
                rec["tok_s"] = a.batch * a.gen_len / t
                rec["decode_tok_s"] = a.batch * (a.gen_len - 1) / max(rec["decode_s"], 1e-9)
                rec["ttft_s"] = rec["prefill_s"]
                if probe and rec.get("h2d_bytes_per_step"):
                    bound = rec["steps"] * rec["h2d_bytes_per_step"] / (probe * 1e9)
                    rec["h2d_bound_fraction"] = round(bound / t, 3)
            runs.setdefault(c, []).append(rec)
            line = json.dumps(rec)
            print(line, flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(line + "\n")
    print(f"\n{'case':11} {'tok/s median (range)':>26} {'decode tok/s':>13} {'TTFT s':>7} "
          f"{'GPU GB':>7} {'logits diff':>11} {'tokens':>9}")  # fmt: skip
    for c, rs in runs.items():
        ok = [r for r in rs if "tok_s" in r]
        if not ok:
            print(f"{c:11} {rs[0].get('error', '')[-200:]}")
            continue
        ts = [r["tok_s"] for r in ok]
        med = statistics.median
        print(f"{c:11} {med(ts):10.1f} ({min(ts):.1f}-{max(ts):.1f}){'':6} "
              f"{med(r['decode_tok_s'] for r in ok):13.1f} {med(r['ttft_s'] for r in ok):7.3f} "
              f"{max(r['gpu_peak_bytes'] for r in ok) / 1e9:7.2f} "
              f"{max(r.get('logits_max_abs_diff', float('nan')) for r in ok):11.2e} "
              f"{ok[0].get('tokens_equal', '?')}/{ok[0].get('tokens_total', '?')}")  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
