"""Perplexity of SmolLM2 (the embedded default model) with compressed weights and KV cache.

Configurations: none, int8 and int4 for weights, cache and both. "Same weights": the reference is
the uncompressed model (the GGUF's Q4_1 values expanded to fp32); compressed weights are
re-quantized from those values (``gguf_native=False``) so the figures measure this quantizer,
plus one line with the GGUF blocks kept as stored (identical values by construction). The text is
``/usr/share/common-licenses/GPL-3`` when present, else the public-domain text shipped in
``benchmarks/data``. One JSON line per configuration, with the change against ``none``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import layercake
from layercake.eval import perplexity

TEXTS = [Path("/usr/share/common-licenses/GPL-3"), Path(__file__).parent / "data/gettysburg.txt"]
CONFIGS = {
    "none": {},
    "weight-int8": dict(compress_weight=True, compress_bits=8),
    "weight-int4": dict(compress_weight=True, compress_bits=4),
    "weight-int4-g64": dict(compress_weight=True, compress_bits=4, group_size=64),
    "cache-int8": dict(compress_cache=True, compress_bits=8),
    "cache-int4": dict(compress_cache=True, compress_bits=4),
    "cache-int4-g64": dict(compress_cache=True, compress_bits=4, group_size=64),
    "both-int8": dict(compress_weight=True, compress_cache=True, compress_bits=8),
    "both-int4": dict(compress_weight=True, compress_cache=True, compress_bits=4),
    "both-int4-g64": dict(
        compress_weight=True, compress_cache=True, compress_bits=4, group_size=64
    ),
    "weight-gguf-native": dict(compress_weight=True, gguf_native=True),
    # the fast decode path's weights: GGUF Q4_1 kept, the Q8_0 head per-row int8 (or int4 g32)
    "packed": dict(packed=True, gguf_native=True),
}
LIMITS = {"8": 0.01, "4": 0.10}  # the bounds: +1 % for int8, +10 % for int4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--text", type=Path, help="a text file (default: GPL-3 or the shipped one)")
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=512, help="tokens per forward (cache in between)")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    path = a.text or next(p for p in TEXTS if p.is_file())
    base = None
    for name in a.configs:
        kw = dict(CONFIGS[name])
        kw.setdefault("gguf_native", False)
        llm = layercake.load(**kw)
        ids = llm.tokenizer.encode(path.read_text())[: a.max_tokens]
        t0 = time.perf_counter()
        r = perplexity(llm.runner, ids, window=a.window, stride=a.stride, chunk=a.chunk)
        group = 32 if kw["gguf_native"] else kw.get("group_size", 32)
        rec = {"bench": "quality", "model": "SmolLM2-135M-Instruct Q4_1", "config": name,
               "group_size": group, "text": path.name, "tokens": r.tokens,
               "window": a.window, "stride": a.stride,
               "ppl": round(r.ppl, 4), "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
        if name == "none":
            base = r.ppl
        elif base is not None:
            rec["change"] = round(r.ppl / base - 1, 4)
            bits = "8" if name.startswith("packed") else name.rsplit("int", 1)[-1][:1]
            if bits in LIMITS:  # packed: the fast path's bound is +1 %
                rec["within_limit"] = rec["change"] <= LIMITS[bits]
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
