"""The batch job's cost: ``layercake batch`` (JSONL in, continuous batching, fsync'd JSONL out)
vs the engine's own batched ``generate`` on the same prompts, same model, same run, alternating.

Both run blocks of ``--batch-size`` sequences, prompts grouped by length, greedy, a fixed number of
new tokens (EOS ignored, so both do the same work). Throughput is end to end: generated tokens /
wall time, tokenization and (for the job) parsing and writing included. Prints one JSON line
with the medians over ``--repeats`` alternations and the job/generate ratio (1.0 = no hidden cost).

  python benchmarks/batch.py --repeats 3
  python benchmarks/batch.py --prompts 64 --gen-len 8 --repeats 1     # a quick look
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

WORDS = (
    "the cake layer oven flour sugar butter egg milk cream berry apple lemon honey salt bake "
    "slice plate table kitchen recipe chef morning evening river mountain city train window "
    "garden music story letter friend market winter summer light shadow paper stone bridge"
).split()


def make_prompts(n: int, seed: int = 0) -> list[str]:
    """Prompts of varied lengths (about 8 to 80 tokens)."""
    rng = random.Random(seed)
    return [
        "Continue the story: " + " ".join(rng.choice(WORDS) for _ in range(rng.randrange(4, 60)))
        for _ in range(n)
    ]


def run_job(llm, prompts: list[str], gen: int, batch: int, tmp: Path) -> dict:
    from layercake.jobs.batch import run_batch

    inp, out = tmp / "in.jsonl", tmp / "out.jsonl"
    inp.write_text(
        "".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts))
    )
    out.unlink(missing_ok=True)
    defaults = dict(max_new_tokens=gen, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    s = run_batch(llm, inp, out, batch, defaults, log=open("/dev/null", "w"))
    wall = time.perf_counter() - t0
    texts = {r["id"]: r["text"] for r in map(json.loads, out.read_text().splitlines())}
    return dict(
        wall_s=wall,
        tokens=s["completion_tokens"],
        engine_tok_s=s["throughput_tok_s"],
        prefill_tok_s=s["prefill_tok_s"],
        decode_tok_s=s["decode_tok_s"],
        texts=[texts[i] for i in range(len(prompts))],
    )


def run_generate(llm, prompts: list[str], gen: int, batch: int) -> dict:
    llm.runner.block_size = batch  # blocks of similar lengths, as the offload runner's plan does
    t0 = time.perf_counter()
    out = llm.generate(prompts, max_new_tokens=gen, ignore_eos=True)
    wall = time.perf_counter() - t0
    s = llm.last_stats
    return dict(
        wall_s=wall,
        tokens=s.generated_tokens,
        engine_tok_s=s.throughput,
        prefill_tok_s=s.prefill_tok_s,
        decode_tok_s=s.decode_tok_s,
        texts=[r.text for r in out],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="HF directory or .gguf (default: the embedded SmolLM2)")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--gen-len", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="alternations; medians are reported")
    a = ap.parse_args()
    import layercake

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    llm = layercake.load(a.model)
    load_s = time.perf_counter() - t0
    prompts = make_prompts(a.prompts)
    # warm-up (first calls at new shapes are slow), on the longest prompts so the allocator has
    # grown to its working size before either engine is timed
    longest = sorted(prompts, key=len)[-a.batch_size :]
    llm.generate(longest, max_new_tokens=2, ignore_eos=True)
    runs: dict[str, list[dict]] = {"job": [], "generate": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            order = ["job", "generate"] if r % 2 == 0 else ["generate", "job"]
            for name in order:
                if name == "job":
                    runs[name].append(run_job(llm, prompts, a.gen_len, a.batch_size, Path(tmp)))
                else:
                    runs[name].append(run_generate(llm, prompts, a.gen_len, a.batch_size))
            print(
                f"repeat {r + 1}/{a.repeats}: job {runs['job'][-1]['wall_s']:.1f} s, generate "
                f"{runs['generate'][-1]['wall_s']:.1f} s",
                file=sys.stderr,
                flush=True,
            )

    def med(name: str, key: str) -> float:
        if key == "tok_s":
            return statistics.median(x["tokens"] / x["wall_s"] for x in runs[name])
        return statistics.median(x[key] for x in runs[name])

    same = sum(x == y for x, y in zip(runs["job"][0]["texts"], runs["generate"][0]["texts"]))
    rec = {
        "bench": "batch",
        "model": str(llm.path.name),
        "prompts": a.prompts,
        "prompt_tokens_mean": round(
            sum(len(llm.tokenizer.encode(p)) for p in prompts) / len(prompts), 1
        ),
        "gen_len": a.gen_len,
        "batch_size": a.batch_size,
        "threads": a.threads,
        "repeats": a.repeats,
        "load_s": round(load_s, 2),
        "job_tok_s": round(med("job", "tok_s"), 2),
        "generate_tok_s": round(med("generate", "tok_s"), 2),
        "ratio": round(med("job", "tok_s") / med("generate", "tok_s"), 3),
        "job_engine_tok_s": round(med("job", "engine_tok_s"), 2),
        "generate_engine_tok_s": round(med("generate", "engine_tok_s"), 2),
        "job_prefill_tok_s": round(med("job", "prefill_tok_s"), 2),
        "job_decode_tok_s": round(med("job", "decode_tok_s"), 2),
        "generate_prefill_tok_s": round(med("generate", "prefill_tok_s"), 2),
        "generate_decode_tok_s": round(med("generate", "decode_tok_s"), 2),
        "job_wall_s": [round(x["wall_s"], 2) for x in runs["job"]],
        "generate_wall_s": [round(x["wall_s"], 2) for x in runs["generate"]],
        "same_text": f"{same}/{a.prompts}",
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3),
        "weights": "real",
    }
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
