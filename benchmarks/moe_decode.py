"""In-memory decode speed of a mixture of experts: one stream of B rows, greedy one-token
steps, on a random OLMoE-shaped GGUF (Q4_0 experts and attention, the block kernels), against
llama.cpp (llama-cpp-python, if importable) on the same file at B=1. Prints one JSON line.

    python benchmarks/moe_decode.py --out /tmp/moe-bench --batch 1 8 [--llama-cpp]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import gguf
import numpy as np
import torch

from layercake.checkpoint.gguf import GGUFCheckpoint
from layercake.embedded import embedded_model_path


def write_model(path: Path, a: argparse.Namespace) -> Path:
    """A random OLMoE-shaped GGUF (weights at realistic scale; SmolLM2's tokenizer, so that
    llama.cpp opens it)."""
    rng = np.random.default_rng(0)
    H, F, E, L = a.hidden, a.ffn, a.experts, a.layers
    tok = GGUFCheckpoint(embedded_model_path()).tokenizer_spec()
    V = len(tok["tokens"])
    w = gguf.GGUFWriter(str(path), "olmoe")
    for key, value in dict(block_count=L, context_length=4096, embedding_length=H,
                           feed_forward_length=F, head_count=H // 64, head_count_kv=H // 64,
                           layer_norm_rms_eps=1e-5, rope_freq_base=10000.0, expert_count=E,
                           expert_used_count=a.top_k, vocab_size=V).items():  # fmt: skip
        getattr(w, f"add_{key}")(value)
    w.add_tokenizer_model(tok["model"])
    w.add_tokenizer_pre(tok["pre"] or "default")
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["token_types"])
    w.add_token_merges(tok["merges"])
    w.add_bos_token_id(tok["bos_token_id"] or 0)
    w.add_eos_token_id(tok["eos_token_id"] or 0)

    def mat(*shape: int, q: bool = True) -> tuple:
        x = (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[-1])).astype(np.float32)
        return (gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q4_0),) if q else (x,)

    def add(name: str, t: tuple) -> None:
        if len(t) == 1 and t[0].dtype == np.uint8:
            w.add_tensor(name, t[0], raw_dtype=gguf.GGMLQuantizationType.Q4_0)
        else:
            w.add_tensor(name, t[0])

    add("token_embd.weight", mat(V, H, q=False))
    add("output_norm.weight", (np.ones(H, np.float32),))
    add("output.weight", mat(V, H))
    for i in range(L):
        p = f"blk.{i}."
        for n in ("attn_norm", "ffn_norm"):
            add(p + n + ".weight", (np.ones(H, np.float32),))
        add(p + "attn_q_norm.weight", (np.ones(H, np.float32),))
        add(p + "attn_k_norm.weight", (np.ones(H, np.float32),))
        for n in ("attn_q", "attn_k", "attn_v", "attn_output"):
            add(p + n + ".weight", mat(H, H))
        add(p + "ffn_gate_inp.weight", mat(E, H, q=False))
        add(p + "ffn_gate_exps.weight", mat(E, F, H))
        add(p + "ffn_up_exps.weight", mat(E, F, H))
        add(p + "ffn_down_exps.weight", mat(E, H, F))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def ours(path: Path, batch: int, steps: int, reps: int) -> dict:
    import layercake

    llm = layercake.load(path)
    runner = llm.runner
    prompt = torch.randint(0, 1000, (batch, 16), generator=torch.Generator().manual_seed(1))
    rates = []
    for _ in range(reps):
        cache = runner.new_cache(batch, 16 + steps + 1)
        pos = torch.arange(16).expand(batch, 16)
        tok = runner.forward(prompt, pos, cache, last_only=True)[:, -1].argmax(-1)
        t0 = time.perf_counter()
        for s in range(steps):
            p = torch.full((batch, 1), 16 + s)
            tok = runner.forward(tok[:, None], p, cache)[:, -1].argmax(-1)
        rates.append(batch * steps / (time.perf_counter() - t0))
    return {"tok_s": statistics.median(rates), "runs": [round(r, 1) for r in rates],
            "describe": runner.describe()}  # fmt: skip


def llama_cpp(path: Path, steps: int, reps: int, threads: int) -> dict:
    from llama_cpp import Llama

    m = Llama(str(path), n_ctx=256, n_threads=threads, n_batch=64, verbose=False)
    prompt = list(range(100, 116))
    rates = []
    for _ in range(reps):
        m.reset()
        m.eval(prompt)
        tok = int(np.argmax(m.scores[m.n_tokens - 1]))
        t0 = time.perf_counter()
        for _ in range(steps):
            m.eval([tok])
            tok = int(np.argmax(m.scores[m.n_tokens - 1]))
        rates.append(steps / (time.perf_counter() - t0))
    return {"tok_s": statistics.median(rates), "runs": [round(r, 1) for r in rates]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/moe-bench"))
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--llama-cpp", action="store_true")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"olmoe-{a.hidden}-{a.experts}x{a.ffn}-top{a.top_k}-{a.layers}L.Q4_0.gguf"
    if not path.exists():
        write_model(path, a)
    res = {"model": path.name, "threads": torch.get_num_threads()}
    for b in a.batch:
        res[f"ours_B{b}"] = ours(path, b, a.steps, a.reps)
    if a.llama_cpp:
        res["llama_cpp_B1"] = llama_cpp(path, a.steps, a.reps, torch.get_num_threads())
    print(json.dumps(res))


if __name__ == "__main__":
    main()
