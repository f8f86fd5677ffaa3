"""One engine configuration in this process (the code under test comes from PYTHONPATH): load,
warm up (which compiles, with ``compile``), then 3 timed generations of 128 tokens after a
32-token prompt, B=1. Prints one JSON line: decode and end-to-end tok/s per run, load and
warm-up seconds, the first greedy tokens (equal across trees where the numerics are)."""

from __future__ import annotations

import json
import sys
import time

import torch

import layercake

TEXT = (
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, "
    "conceived in Liberty, and dedicated to the proposition that all men are created equal."
)


def main() -> None:
    torch.set_num_threads(2)
    kw = json.loads(sys.argv[1])
    t0 = time.perf_counter()
    llm = layercake.load(**kw)
    load_s = time.perf_counter() - t0
    ids = llm.tokenizer.encode(TEXT)[:32]
    t0 = time.perf_counter()
    llm.generate(ids, max_new_tokens=16, ignore_eos=True)  # warm-up (compiles)
    warm_s = time.perf_counter() - t0
    dec, e2e, toks = [], [], []
    for _ in range(3):
        t0 = time.perf_counter()
        out = llm.generate(ids, max_new_tokens=128, ignore_eos=True)[0]
        wall = time.perf_counter() - t0
        s = llm.last_stats
        dec.append(s.decode_steps / s.decode_s)
        e2e.append(len(out.token_ids) / wall)
        toks = out.token_ids
    tree = str(layercake.__file__).split("/layercake/")[0]
    rec = {"kw": kw, "tree": tree, "load_s": round(load_s, 1), "warm_s": round(warm_s, 1)}
    rec["decode_tok_s"] = [round(x, 1) for x in dec]
    rec["e2e_tok_s"] = [round(x, 1) for x in e2e]
    print(json.dumps({**rec, "first_tokens": toks[:8]}))


if __name__ == "__main__":
    main()
