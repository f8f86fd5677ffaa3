"""How far the bf16 form's AMX path (fp32 products on bf16 tiles, ``ops/csrc/amx.cpp``) moves the
logits of the Llama-3.2-1B-shaped bf16 checkpoint, against the same engine without AMX
(``bf16_mm`` / bf16 widened to fp32 for MKL: fp32 products) and transformers in fp32: the same
B=32 prompts as ``generation.py``, at a prefill's row count (32 x 32 = 1024 rows a matmul) and a
decode step's (32 rows: each prompt's first token). One JSON line per (rows, pair): the largest
absolute logit difference, the reference's spread and the share of equal argmaxes.

  nice -n 19 python benchmarks/amx_logits.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    a = ap.parse_args()
    import numpy as np
    import torch
    import transformers
    from agreement import logits_agreement
    from generation import model_path, prompts

    import layercake
    from layercake.ops import kernels

    path = model_path("llama1b")
    llm = layercake.load(path)
    vocab = llm.runner.config.vocab_size
    ids = prompts(a.batch, a.prompt_len, vocab)
    cases = {"prefill": ids.tolist(), "decode_rows": ids[:, :1].tolist()}
    got: dict[str, dict[str, np.ndarray]] = {k: {} for k in cases}
    assert kernels.amx(), "this machine has no AMX: nothing to compare"
    for amx in (True, False):
        kernels._AMX[0] = amx  # the choice bf16_linear reads on each call
        for k, rows in cases.items():
            got[k]["amx" if amx else "no_amx"] = llm.logits(rows).numpy()
    del llm
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        for k, rows in cases.items():
            got[k]["transformers"] = model(torch.tensor(rows)).logits.float().numpy()
    for k, out in got.items():
        for ref, other in (("no_amx", "amx"), ("transformers", "amx"), ("transformers", "no_amx")):
            diff = float(np.abs(out[ref] - out[other]).max())  # unrounded
            line = dict(bench="amx_logits", rows=k, ref=ref, engine=other, max_abs_diff=diff)
            print(json.dumps({**line, **logits_agreement(out[ref], out[other])}), flush=True)


if __name__ == "__main__":
    main()
