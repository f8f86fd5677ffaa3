"""Single-stream decode and prompt speed: layercake with no flags (the fast default) and
``--compile``, ``--exact`` (fp32), ``--packed`` (eager and compiled), transformers and llama.cpp
(llama-cpp-python, when installed) on the same checkpoint, same run.

Each (model, engine) case runs in its own process and prints one JSON line; ``--repeats``
alternates the engines and reports each one's median-decode run. Greedy tokens are compared with
layercake --exact's (fp32; ``same_tokens``: positions equal; ``same_prefix``: equal until the first
difference). llama.cpp only reads GGUF files, so it runs on the SmolLM2 GGUF only.

  python benchmarks/decode.py --repeats 3  # no flags, --compile, llama.cpp; prompt 32, gen 128
  python benchmarks/decode.py --models llama1b --engines layercake-exact layercake-packed
  python benchmarks/decode.py --profile --engines layercake-packed layercake-packed-compiled
"""

from __future__ import annotations

import argparse
import importlib.util
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
sys.path.insert(0, str(HERE))
from generation import model_path, prompts, run_transformers  # noqa: E402

TEXT = HERE / "data/gettysburg.txt"
ENGINES = {  # name -> layercake.load options (None: another engine)
    "layercake": dict(),  # no flags: the fast default
    "layercake-compiled": dict(compile=True),
    "layercake-exact": dict(exact=True),  # fp32 weights and activations: the reference tokens
    "layercake-packed": dict(packed=True),
    "layercake-packed-compiled": dict(packed=True, compile=True),
    "transformers": None,
    "llama.cpp": None,
}
DEFAULT_ENGINES = ["layercake", "layercake-compiled", "llama.cpp"]  # issue 18's done-when


def prompt_ids(model: str, path: Path, length: int) -> torch.Tensor:
    """Real English for SmolLM2 (the tokens of the shipped text), random ids otherwise."""
    import torch

    if model == "smollm2":
        from layercake.checkpoint import open_checkpoint
        from layercake.tokenizer import Tokenizer

        tok = Tokenizer.from_gguf(open_checkpoint(path))
        ids = tok.encode(TEXT.read_text(), add_special_tokens=False)[:length]
        return torch.tensor([ids])
    from layercake.checkpoint import open_checkpoint

    return prompts(1, length, open_checkpoint(path).config_dict()["vocab_size"])


def llama_cpp_build() -> dict:
    """llama-cpp-python's version and the build its llama.cpp reports (SIMD flags, backends)."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info()
    info = info.decode() if isinstance(info, bytes) else str(info)
    return {"llama_cpp_python": llama_cpp.__version__, "llama_cpp_system_info": info.strip()}


def run_llama_cpp(path: Path, ids: torch.Tensor, gen: int, threads: int, warmup: int) -> dict:
    """llama-cpp-python's ``generate``, greedy (temp 0): the first yielded token ends the
    prompt phase, the other ``gen - 1`` are the decode steps (as layercake counts them). The
    warm-up is every engine's: the same prompt, ``warmup`` tokens, untimed."""
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=str(path), n_ctx=ids.shape[1] + gen + 8, n_threads=threads,
                n_threads_batch=threads, n_batch=512, verbose=False)  # fmt: skip
    load_s = time.perf_counter() - t0
    prompt = ids[0].tolist()

    def generate(n: int) -> tuple[list[int], list[float]]:
        llm.reset()
        toks, times = [], []
        greedy = dict(temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True)
        for t in llm.generate(prompt, **greedy):
            times.append(time.perf_counter())
            toks.append(t)
            if len(toks) == n:
                break
        return toks, times

    t0 = time.perf_counter()
    if warmup:  # generate(0) would never stop
        generate(warmup)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    toks, times = generate(gen)
    return dict(load_s=load_s, warmup_s=warmup_s, **_timing(t0, times), tokens=[toks],
                **llama_cpp_build())  # fmt: skip


def run_layercake_stream(path: Path, ids: torch.Tensor, gen: int, warmup: int, **load_kw) -> dict:
    """layercake's ``stream`` (one event per step at B=1), timed per token like llama.cpp,
    after the same warm-up as every engine's (a compiled step compiles then: ``warmup_s``)."""
    import layercake

    t0 = time.perf_counter()
    llm = layercake.load(path, **load_kw)
    load_s = time.perf_counter() - t0
    prompt = ids[0].tolist()
    t0 = time.perf_counter()
    llm.generate(prompt, max_new_tokens=warmup, ignore_eos=True)
    warmup_s = time.perf_counter() - t0
    toks, times = [], []
    t0 = time.perf_counter()
    for ev in llm.stream(prompt, max_new_tokens=gen, ignore_eos=True):
        times.append(time.perf_counter())
        toks.append(ev.token_id)
    return dict(load_s=load_s, warmup_s=warmup_s, **_timing(t0, times), tokens=[toks])


def _timing(t0: float, times: list[float]) -> dict:
    """Prompt phase = until the first token; decode = the rest. ``step_s``: the median step,
    which a burst of load from other jobs on a shared machine moves less than the mean."""
    steps = sorted(b - a for a, b in zip(times, times[1:]))
    return dict(prefill_s=times[0] - t0, decode_s=times[-1] - times[0],
                step_s=steps[len(steps) // 2])  # fmt: skip


def profile(path: Path, ids: torch.Tensor, steps: int, **load_kw) -> dict:
    """Where a packed decode step's time goes, in ms per token: the packed matmuls alone (every
    layer's and the head's, in step order, on fixed activations), the whole one-token forward,
    and a token of ``generate`` (the forward plus sampling and detokenizing)."""
    import torch

    import layercake
    from layercake.ops.linear import Linear

    llm = layercake.load(path, **load_kw)
    llm.generate(ids[0].tolist(), max_new_tokens=8, ignore_eos=True)  # warm (compiles)
    r = llm.runner
    model = r.slices[0]
    mats = [m for n, m in model.named_modules() if isinstance(m, Linear) and n != "lm_head"]
    xs = [torch.randn(1, m.weight.shape[1]) for m in mats]
    hx = torch.randn(1, model.lm_head.weight.shape[1])

    def matmuls() -> None:
        for m, x in zip(mats, xs):
            m(x)
        model.lm_head(hx)

    def timed(fn, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n * 1e3

    timed(matmuls, 3)
    mm = timed(matmuls, steps)
    head = timed(lambda: model.lm_head(hx), steps)
    P = ids.shape[1]
    with torch.inference_mode():  # the inputs generate gives (a compiled step guards on it)
        cache = r.new_cache(1, P + steps + 2)
        r.forward(ids, torch.arange(P)[None], cache, last_only=True)
        tok, pos = torch.tensor([[7]]), torch.tensor([[P]])

        def step() -> None:
            r.forward(tok, pos, cache)
            pos.add_(1)

        step()
        fwd = timed(step, steps)
    llm.generate(ids[0].tolist(), max_new_tokens=steps + 1, ignore_eos=True)
    gen = llm.last_stats.decode_s / llm.last_stats.decode_steps * 1e3
    return dict(matmul_ms=round(mm, 3), head_ms=round(head, 3), forward_ms=round(fwd, 3),
                other_ops_ms=round(fwd - mm, 3), generate_ms=round(gen, 3),
                loop_ms=round(gen - fwd, 3))  # fmt: skip


def worker(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(a.threads)
    path = model_path(a.model)
    ids = prompt_ids(a.model, path, a.prompt_len)
    kw = ENGINES[a.engine]
    if a.profile:
        rec = dict(bench="decode-profile", engine=a.engine, model=a.model, threads=a.threads)
        rec.update(profile(path, ids, a.gen_len, **kw))
        print(json.dumps(rec))
        print(json.dumps({"tokens": [[]]}))
        return
    if a.engine == "llama.cpp":
        r = run_llama_cpp(path, ids, a.gen_len, a.threads, a.warmup)
    elif kw is None:
        r = run_transformers(path, ids, a.gen_len, False, warmup=a.warmup)
    else:
        r = run_layercake_stream(path, ids, a.gen_len, a.warmup, **kw)
    rec = dict(
        bench="decode",
        engine=a.engine,
        model=a.model,
        weights="real" if a.model == "smollm2" else "random",
        batch=1,
        prompt_len=a.prompt_len,
        gen_len=a.gen_len,
        threads=a.threads,
        warmup_tokens=a.warmup,
        load_s=round(r["load_s"], 3),
        warmup_s=round(r["warmup_s"], 3),  # a compiled engine compiles here
        ttft_s=round(r["prefill_s"], 4),
        prefill_tok_s=round(a.prompt_len / r["prefill_s"], 1),
        e2e_tok_s=round(a.gen_len / (r["prefill_s"] + r["decode_s"]), 1),
        decode_tok_s=round((a.gen_len - 1) / r["decode_s"], 1),
        decode_tok_s_median_step=round(1 / r["step_s"], 1) if "step_s" in r else None,
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        **{k: v for k, v in r.items() if k.startswith("llama_cpp")},  # its build
    )
    print(json.dumps(rec))
    print(json.dumps({"tokens": r["tokens"]}))


def run_case(a: argparse.Namespace, model: str, engine: str) -> tuple[dict, list] | None:
    cmd = [sys.executable, __file__, "--worker", "--model", model, "--engine", engine,
           "--prompt-len", str(a.prompt_len), "--gen-len", str(a.gen_len),
           "--threads", str(a.threads), "--warmup", str(a.warmup)]  # fmt: skip
    cmd += ["--profile"] * a.profile
    p = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or len(lines) < 2:
        err = p.stderr.strip().splitlines()[-1:]
        print(json.dumps(dict(bench="decode", engine=engine, model=model, error=err)), flush=True)
        return None
    rec = json.loads(lines[0])
    if not a.profile:  # every run's raw line; the medians follow
        print(json.dumps({**rec, "line": "run"}), flush=True)
    return rec, json.loads(lines[1])["tokens"][0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2"])
    ap.add_argument("--engines", nargs="+", default=DEFAULT_ENGINES, choices=list(ENGINES))
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="runs per case; the median is reported")
    ap.add_argument(
        "--warmup", type=int, default=8, help="tokens each engine generates before its timed run"
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="packed engines: ms per token in matmuls, other ops of the forward, the loop",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    for m in a.models:
        if m != "smollm2":
            model_path(m)  # write the random checkpoint once, outside the timed processes
        engines = [e for e in a.engines if e != "llama.cpp" or m == "smollm2"]
        if "llama.cpp" in engines and importlib.util.find_spec("llama_cpp") is None:
            print(json.dumps(dict(bench="decode", engine="llama.cpp", model=m,
                                  skipped="llama-cpp-python is not installed")))  # fmt: skip
            engines.remove("llama.cpp")
        runs: dict[str, list[tuple[dict, list]]] = {e: [] for e in engines}
        for _ in range(a.repeats):  # engines alternate, so drift in the machine hits all
            for e in engines:
                r = run_case(a, m, e)
                if r is not None:
                    runs[e].append(r)
        if a.profile:
            for rs in runs.values():
                for rec, _ in rs:
                    print(json.dumps(rec), flush=True)
        else:
            report(runs)


def report(runs: dict[str, list[tuple[dict, list]]]) -> None:
    """One line per engine (its median end-to-end run), with the spread of its runs, ratios to
    llama.cpp (end to end and decode only; the ranges over the repeats), the compile time
    (a compiled engine's warm-up over its eager twin's) and tokens compared with --exact's."""
    best = {}
    for e, rs in runs.items():
        if rs:  # the runs in repeat order (repeat i of every engine ran back to back)
            rec, toks = sorted(rs, key=lambda r: r[0]["e2e_tok_s"])[len(rs) // 2]
            rec["e2e_runs"] = [r[0]["e2e_tok_s"] for r in rs]
            rec["decode_runs"] = [r[0]["decode_tok_s"] for r in rs]
            best[e] = (rec, toks)
    ref = best.get("llama.cpp", (None, None))[0]
    fp32 = best.get("layercake-exact", (None, None))[1]
    for e, (rec, toks) in best.items():
        twin = e.removesuffix("-compiled")  # the same engine eager: its warm-up did not compile
        eager = best.get(twin, (None,))[0] if twin != e else None
        if eager is not None:
            rec["compile_s"] = round(rec["warmup_s"] - eager["warmup_s"], 2)
        if ref is not None:
            for k in ("e2e", "decode"):  # the same repeat's runs paired: a range, not a best
                pairs = zip(rec[f"{k}_runs"], ref[f"{k}_runs"])
                r = sorted(round(x / y, 3) for x, y in pairs)
                rec[f"{k}_vs_llama_cpp_range"] = [r[0], r[-1]] if r else None
            rec["e2e_vs_llama_cpp"] = round(rec["e2e_tok_s"] / ref["e2e_tok_s"], 3)
            rec["decode_vs_llama_cpp"] = round(rec["decode_tok_s"] / ref["decode_tok_s"], 3)
            if rec["decode_tok_s_median_step"] and ref["decode_tok_s_median_step"]:
                rec["median_step_vs_llama_cpp"] = round(
                    rec["decode_tok_s_median_step"] / ref["decode_tok_s_median_step"], 3
                )
            rec["prefill_vs_llama_cpp"] = round(rec["prefill_tok_s"] / ref["prefill_tok_s"], 3)
        if fp32 is not None:
            same = [x == y for x, y in zip(toks, fp32)]
            rec["same_tokens"] = f"{sum(same)}/{len(fp32)}"
            rec["same_prefix"] = same.index(False) if False in same else len(same)
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
