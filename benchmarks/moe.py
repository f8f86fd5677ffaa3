"""Mixture of experts larger than memory: layercake vs transformers + Accelerate and llama.cpp.

The model is a random OLMoE-shaped checkpoint (``moe_checkpoint.py``: 64 experts of FFN 1024,
top-8, hidden 2048, ``--layers`` layers, bf16, a skewed router), written once to the cache. Each
case runs in its own process (``moe_worker.py``); capped cases under ``shared/tools/memlimit
--drop-caches CAP`` (page cache counted, cold). This parent never imports torch. Cases:

- ``transformers``: in memory, no cap, at every batch: the oracle of greedy tokens, logits and
  routing (the router's choices per layer and step);
- ``layercake``: under the cap at every batch;
- ``accelerate``: transformers with Accelerate's disk offload under the cap, ``max_memory`` each
  of ``--accelerate-fractions`` of the cap (the best counts), at ``--accelerate-batches``;
- ``llama.cpp``: the same weights as a bf16 GGUF under the cap, batch 1.

One JSON line per case: throughput (FlexGen's: generated tokens / (prefill + decode)), prefill and
decode times, the cgroup's peak, bytes read from storage per generated token, distinct experts
per layer and step (the oracle's routing at that batch, and the engine's own reads where it
reports them), greedy tokens and logits against the in-memory run, and the fraction of the bound.

The bound is computed from an independent probe (its own process: direct reads of every expert
file, cold, by the best of two readers, file by file and the engine's own expert loader, best of
``--probe-passes`` each; matmul peak per row count) and the oracle's routing at the same batch: per
step, max(bytes / disk rate, FLOPs / peak), where bytes are the distinct experts the step routed
to that are not among the hottest ones (by the oracle's decode counts) that fit in RAM (the cap
less the non-expert weights and what every engine holds besides weights, ``engine_needs``: the
process's own pages as the probe measured them, the batch's KV cache and activations, one read
buffer; the first bound, still reported as ``*_first``, kept only ``PROCESS_BYTES`` free), and
FLOPs are 2 per weight per row (experts:
per selected expert; the head: each row's last prompt token, then every row), the expert part
at the peak of its rows per expert.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from agreement import tokens_agreement  # noqa: E402
from moe_checkpoint import config, expert_bytes, olmoe, olmoe_gguf  # noqa: E402
from offload import cap_bytes, spawn  # noqa: E402

WORKER = HERE / "moe_worker.py"
DEFAULT_OFFLOAD = Path(os.environ.get("LAYERCAKE_OFFLOAD_DIR", "/var/tmp/layercake-offload"))
PROCESS_BYTES = 300 * 2**20  # a Python process with torch imported, before any weight


def worker_cmd(a: argparse.Namespace, engine: str, batch: int, *extra: str) -> list[str]:
    cmd = [sys.executable, str(WORKER), "--engine", engine, "--batch", str(batch)]
    cmd += ["--layers", str(a.layers), "--skew", str(a.skew), "--threads", str(a.threads)]
    cmd += ["--prompt-len", str(a.prompt_len), "--gen-len", str(a.gen_len)]
    cmd += ["--offload-dir", str(a.offload_dir), "--hf-dtype", a.hf_dtype, *extra]
    if engine == "layercake":  # the job's prompt length: the plan's activations for that pass
        cmd += ["--pass-tokens", str(a.prompt_len if a.pass_tokens is None else a.pass_tokens)]
    return cmd


def probe(a: argparse.Namespace) -> dict:
    """The bound's rates (kept in ``--reference-dir`` when given: one probe for the holds a
    long benchmark is split into)."""
    cached = a.reference_dir / f"probe-{a.layers}l.json" if a.reference_dir else None
    if cached and cached.is_file():
        return json.loads(cached.read_text())
    cmd = [sys.executable, str(WORKER), "--probe", "--passes", str(a.probe_passes),
           "--offload-dir", str(a.offload_dir)]  # fmt: skip
    r = spawn(cmd + ["--layers", str(a.layers), "--skew", str(a.skew)], None, None)
    if "error" in r:
        raise SystemExit(f"the probe failed: {r}")
    if cached:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(r))
    return r


def model_shape(layers: int) -> dict:
    """Sizes the bound needs, from the config (bf16 weights)."""
    c = config(layers)
    H, V, E = c["hidden_size"], c["vocab_size"], c["num_experts"]
    layer_dense = 4 * H * H + E * H  # attention and router: every token
    return dict(layers=layers, experts=E, top_k=c["num_experts_per_tok"],
                expert_bytes=expert_bytes(c), expert_params=expert_bytes(c) // 2,
                layer_dense_params=layer_dense, head_params=V * H,
                non_expert_bytes=2 * (layers * layer_dense + V * H))  # fmt: skip


def resident_masks(counts: list[list[int]], per_layer: int) -> list[int]:
    """Each layer's ``per_layer`` most selected experts, as a bit mask."""
    out = []
    for c in counts:
        hot = sorted(range(len(c)), key=lambda e: (-c[e], e))[:per_layer]
        out.append(sum(1 << e for e in hot))
    return out


def engine_needs(a: argparse.Namespace, B: int, machine: dict) -> dict[str, int]:
    """Bytes every engine holds at batch ``B`` besides the weights (the bound's RAM is the cap
    less these and the non-expert weights): the process's own pages (the probe's: torch
    imported, its matmul libraries paged in; else ``PROCESS_BYTES``), the KV cache in the
    stored dtype (bf16: the least without compressing it), a prompt pass's hidden states in and
    out (bf16) and the step's logits (fp32), and one expert's read buffer."""
    c, s = config(a.layers), model_shape(a.layers)
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads", c["num_attention_heads"])
    context = a.prompt_len + a.gen_len
    return dict(process=machine.get("process_bytes", PROCESS_BYTES),
                kv_cache=2 * 2 * s["layers"] * B * context * kv_heads * head_dim,
                activations=2 * 2 * B * a.prompt_len * c["hidden_size"] + 4 * B * c["vocab_size"],
                read_buffer=s["expert_bytes"])  # fmt: skip


def bound(a: argparse.Namespace, B: int, ref: dict, machine: dict, cap: str | None,
          needs: dict[str, int] | None = None) -> dict:  # fmt: skip
    """The least time this machine needs for the case (see the module doc), from the oracle's
    routing at batch ``B``: the experts held are the hottest that fit the cap less the
    non-expert weights and ``needs`` (default: only ``PROCESS_BYTES``, the first bound's)."""
    s = model_shape(a.layers)
    masks, counts = ref["routing_masks"], ref["routing_decode_counts"]
    needed = sum((needs or {"process": PROCESS_BYTES}).values())
    budget = cap_bytes(cap) - s["non_expert_bytes"] - needed if cap else 1 << 62
    per_layer = max(0, min(s["experts"], budget // (s["layers"] * s["expert_bytes"])))
    held = resident_masks(counts, per_layer)
    peaks = {int(k): v for k, v in machine["matmul_gflops"].items()}

    def peak(rows: float) -> float:
        return max([v for k, v in peaks.items() if k <= rows] or [peaks[min(peaks)]]) * 1e9

    total, cold_total = 0.0, 0
    for call in range(len(masks[0])):
        rows = B * a.prompt_len if call == 0 else B
        cold = sum((m[call] & ~h).bit_count() for m, h in zip(masks, held))
        disk = cold * s["expert_bytes"] / (machine["disk_gbps"] * 1e9)
        per_expert = rows * s["top_k"] / s["experts"]
        flops = (2 * rows * s["layers"] * s["layer_dense_params"] / peak(rows)
                 + 2 * rows * s["layers"] * s["top_k"] * s["expert_params"] / peak(per_expert)
                 + 2 * B * s["head_params"] / peak(B))  # fmt: skip
        total += max(disk, flops)
        cold_total += cold if call else 0
    steps = len(masks[0]) - 1
    return dict(bound_s=round(total, 2), bound_resident_experts_per_layer=per_layer,
                bound_cold_experts_per_step=round(cold_total / max(1, steps), 1),
                bound_cold_gb_per_token=round(cold_total * s["expert_bytes"]
                                              / max(1, steps * B) / 1e9, 4))  # fmt: skip


def report(a, engine, B, cap, r, machine, ref) -> dict:
    rec = dict(bench="moe", engine=engine, model=f"olmoe-{a.layers}l-skew{a.skew:g}-random-bf16",
               batch=B, prompt_len=a.prompt_len, gen_len=a.gen_len, cap=cap,
               threads=a.threads)  # fmt: skip
    if "error" in r:
        return {**rec, **r}
    total = r["prefill_s"] + r["decode_s"]
    rec.update(
        policy=r.get("policy"),
        load_s=round(r["load_s"], 2),
        prefill_s=round(r["prefill_s"], 2),
        decode_s=round(r["decode_s"], 2),
        decode_tok_s=round(B * (a.gen_len - 1) / r["decode_s"], 2) if r["decode_s"] else None,
        throughput_tok_s=round(B * a.gen_len / total, 3),
        peak_mb=round(r["peak_bytes"] / 2**20, 1) if r.get("peak_bytes") else None,
        peak_rss_mb=round(r["rss_hwm_bytes"] / 2**20, 1),
        wall_s=round(r["wall_s"], 1),
        process_gb_read=round(r.get("process_disk_read_bytes", 0) / 1e9, 2),
    )
    if r.get("read_s"):  # the rate the loader got in this run (the bound uses the probe's)
        rec["loader_gbps"] = round(r["bytes_read"] / r["read_s"] / 1e9, 3)
    if r.get("gen_read_bytes") is not None:
        rec["gen_gb_read_per_token"] = round(r["gen_read_bytes"] / (B * a.gen_len) / 1e9, 4)
    for k in ("accelerate_fraction", "routing_decode_distinct_per_layer_mean", "expert_stats",
              "logits_max_abs_diff", "logits_ref_std", "same_argmax", "logits_agree", "times",
              "llama_cpp_python", "passes", "memory_plan", "major_faults",
              "pass_process_read_bytes"):  # fmt: skip
        if k in r:
            rec[k] = r[k]
    if ref and "tokens" in ref and engine != "transformers":
        same = tokens_agreement(ref["tokens"][:B], r["tokens"])
        rec["same_greedy_tokens_as_transformers"] = same["tokens_agree"]
        rec["same_tokens_share_vs_transformers"] = same["same_tokens"]
    if ref and machine and "routing_masks" in ref:
        first = bound(a, B, ref, machine, cap)  # the first bound: only PROCESS_BYTES kept free
        rec.update({f"{k}_first": v for k, v in first.items()})
        rec["fraction_of_bound_first"] = round(first["bound_s"] / total, 3)
        needs = engine_needs(a, B, machine) if cap else None
        rec.update(bound(a, B, ref, machine, cap, needs), bound_needs=needs)
        rec["fraction_of_bound"] = round(rec["bound_s"] / total, 3)
        if rec["fraction_of_bound"] > 1:
            rec["probe_problem"] = "faster than the bound: the probe's rates are too low"
    return rec


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engines", nargs="+", default=["transformers", "layercake", "accelerate",
                                                     "llama.cpp"])  # fmt: skip
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64, 256])
    ap.add_argument("--accelerate-batches", nargs="+", type=int, default=[64])
    ap.add_argument("--accelerate-fractions", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    ap.add_argument("--accelerate-timeout", type=float, default=600)
    ap.add_argument("--cap", default="2500M", help="memory cap (memlimit's units, page cache in)")
    ap.add_argument(
        "--layercake-budget",
        default="",
        help="layercake's --cpu-memory under the cap (default: the cap itself)",
    )
    ap.add_argument(
        "--pass-tokens",
        type=int,
        help="layercake's pass_tokens: the tokens per sequence its plan's activations are for "
        "(default: --prompt-len, the job's prompt in one pass; 0: the whole context, as before "
        "moe8)",
    )
    ap.add_argument("--layers", type=int, default=6, help="6: 5.45 GB, over 2x the cap")
    ap.add_argument("--skew", type=float, default=1.0, help="router skew (0: uniform)")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--gen-len", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hf-dtype", default="bfloat16", help="transformers' dtype (as stored)")
    ap.add_argument("--offload-dir", type=Path, default=DEFAULT_OFFLOAD)
    ap.add_argument("--probe-passes", type=int, default=3)
    ap.add_argument("--reference-dir", type=Path, help="keep the oracle's records here (reuse)")
    return ap.parse_args()


def reference(a: argparse.Namespace, B: int, logits: Path, engine: str = "transformers") -> dict:
    """An uncapped run at batch B whose tokens and logits the others are compared with (cached
    in ``--reference-dir``: they do not change between runs of the same checkpoint and prompts):
    ``transformers`` in memory (also the routing the bound uses), or ``layercake-ram`` (every
    weight in RAM, no disk: the capped layercake run's oracle, the same bf16-as-stored fp32
    math; transformers computes in bf16)."""
    prefix = "ref" if engine == "transformers" else "lcref"
    key = f"{prefix}-{a.layers}l-{a.skew:g}-b{B}-p{a.prompt_len}-g{a.gen_len}"
    cached = a.reference_dir / f"{key}.json" if a.reference_dir else None
    if cached and cached.is_file() and engine not in a.engines:
        logits.write_bytes((a.reference_dir / f"{key}.npy").read_bytes())
        return json.loads(cached.read_text())
    r = spawn(worker_cmd(a, engine, B, "--logits-out", str(logits)), None, None)
    if cached and "error" not in r:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(r))
        (a.reference_dir / f"{key}.npy").write_bytes(logits.read_bytes())
    return r


def versus_layercake_ram(rec: dict, lcref: dict) -> dict:
    """The capped run's greedy tokens and logits against layercake's all-in-RAM run."""
    if "tokens" not in lcref or "error" in rec:
        return rec
    same = tokens_agreement(lcref["tokens"], rec.pop("_tokens", []))
    rec["same_greedy_tokens_as_layercake_in_ram"] = same["tokens_agree"]
    rec["same_tokens_share_vs_layercake_in_ram"] = same["same_tokens"]
    rec["logits_vs"] = "layercake, every weight in RAM (same math, no cap)"
    return rec


def main() -> None:
    a = parse_args()
    olmoe(a.layers, a.skew)  # written once (child processes)
    if "llama.cpp" in a.engines:
        olmoe_gguf(a.layers, a.skew)
    machine = probe(a)
    print(json.dumps({"bench": "moe-machine", **machine, "model": model_shape(a.layers)}),
          flush=True)  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="layercake-moe-"))
    best: dict[tuple[str, int], float] = {}
    for B in a.batches:
        logits = tmp / f"ref-{B}.npy"
        ref = reference(a, B, logits)
        if "transformers" in a.engines:
            print(json.dumps(report(a, "transformers", B, None, ref, machine, ref)), flush=True)
        if "error" in ref:
            ref = None
        cases = []
        if "layercake" in a.engines:
            budget = ["--budget", a.layercake_budget] if a.layercake_budget else []
            cases.append(("layercake", budget))
        if "accelerate" in a.engines and B in a.accelerate_batches:
            cases += [("accelerate", ["--accelerate-fraction", str(f)])
                      for f in a.accelerate_fractions]  # fmt: skip
        if "llama.cpp" in a.engines and B == 1:
            cases.append(("llama.cpp", []))
        lcref, lclogits = {}, tmp / f"lcref-{B}.npy"
        if "layercake" in a.engines or "layercake-ram" in a.engines:  # the latter: only it
            lcref = reference(a, B, lclogits, "layercake-ram")
        for engine, extra in cases:
            vs = lclogits if engine == "layercake" and "tokens" in lcref else logits
            cmd = worker_cmd(a, engine, B, *extra, "--ref-logits", str(vs))
            timeout = a.accelerate_timeout if engine == "accelerate" else None
            r = spawn(cmd, a.cap, timeout)
            rec = report(a, engine, B, a.cap, r, machine, ref)
            if engine == "layercake":
                rec = versus_layercake_ram({**rec, "_tokens": r.get("tokens", [])}, lcref)
            if "throughput_tok_s" in rec:  # an engine's best run at this batch (Accelerate's sweep)
                best[engine, B] = max(best.get((engine, B), 0.0), rec["throughput_tok_s"])
            print(json.dumps(rec), flush=True)
        for peer in ("accelerate", "llama.cpp"):
            if ("layercake", B) in best and (peer, B) in best:
                ratio = best["layercake", B] / best[peer, B]
                rec = dict(bench="moe-ratio", batch=B, cap=a.cap, peer=peer,
                           layercake_over_peer_best=round(ratio, 2))  # fmt: skip
                print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
