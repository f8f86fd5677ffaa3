"""The command line's shared options: the engine's (which model, where, placed and compressed
how), a pipeline's, and sampling's; ``cli`` builds its commands from them."""

from __future__ import annotations

import argparse


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """Options that pick and place the model; shared by every engine command."""
    g = p.add_argument_group("engine")
    g.add_argument(
        "--model", help="HF model directory or .gguf file (default: embedded SmolLM2-135M-Instruct)"
    )
    g.add_argument(
        "--parts", default="f", help="part spec, e.g. 'f', 'b 0-16', '16-32 e' (default f)"
    )
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")
    g.add_argument("--dtype", help="compute dtype: float32 (CPU default), bfloat16, float16")
    g.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch (default: torch's choice; serve: one fewer)",
    )
    g.add_argument("--compile", action="store_true", help="wrap the layers with torch.compile")
    o = p.add_argument_group(
        "offloading",
        "place weights, KV cache and activations over device, host RAM and disk; any of "
        "--percent, --device-memory, --cpu-memory turns it on",
    )
    o.add_argument(
        "--percent",
        nargs=6,
        type=float,
        metavar=("W_DEV", "W_CPU", "KV_DEV", "KV_CPU", "ACT_DEV", "ACT_CPU"),
        help="FlexGen's placement: percent of weights, KV cache and activations on the device "
        "and in host RAM; disk holds the rest",
    )
    o.add_argument("--device-memory", help="device memory budget, e.g. 6GB (CUDA)")
    o.add_argument(
        "--cpu-memory",
        help="host RAM budget for the whole process, e.g. 1.6GB; what does not fit streams "
        "from --offload-dir",
    )
    o.add_argument("--offload-dir", help="directory for the disk tier (a prepared copy per model)")
    o.add_argument(
        "--policy",
        choices=("auto", "budget"),
        help="with budgets and no --percent: 'auto' plans batch, micro-batches and placement "
        "from this machine's measured rates (see `layercake plan`); 'budget' (default) fills "
        "the budgets at the given batch",
    )
    o.add_argument(
        "--allow-compression",
        action="store_true",
        help="--policy auto may hold weights as int4 when that is predicted faster (lossy)",
    )
    o.add_argument("--batch-size", type=int, help="sequences per micro-batch (default 32)")
    o.add_argument(
        "--num-batches", type=int, help="micro-batches each loaded layer serves (default 1)"
    )
    o.add_argument(
        "--cpu-cache-compute",
        action="store_true",
        help="CUDA: attention of layers whose KV cache is in host RAM or on disk runs on the CPU",
    )
    o.add_argument(
        "--max-context",
        type=int,
        help="prompt + generated tokens the memory budget plans the KV cache for (default 256)",
    )
    o.add_argument(
        "--pass-tokens",
        type=int,
        help="the most prompt tokens per sequence one pass brings, which the memory budget "
        "plans the activations for (default: --max-context; a longer prompt runs in passes "
        "of this many): the job's longest prompt leaves the rest of the budget to weights",
    )
    add_pipeline_options(p)


def add_pipeline_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "pipeline", "run the model's layers on several hosts (see `layercake worker`)"
    )
    g.add_argument("--topology", help="topology file (YAML or JSON): this process is its rank 0")
    g.add_argument(
        "--micro-batches", type=int, help="split a batch's rows so every stage works at once"
    )

    c = p.add_argument_group(
        "compression",
        "hold weights and/or the KV cache as group-wise int4/int8 (asymmetric: a scale and a "
        "zero per group). On the CPU int4 weights multiply packed on PyTorch's int4 kernel (no "
        "dequantize step; bf16 activations), the output head is held int8 per row (int8 "
        "kernel); elsewhere weights are dequantized just before use. Combines with every part "
        "spec, offloading placement (weights stay compressed on disk and in RAM) and device; "
        "not with --compile (--packed is) or --topology. --compress-bits and --group-size apply "
        "to both and "
        "need one of the two",
    )
    c.add_argument(
        "--compress-weight",
        action="store_true",
        help="hold linear weights compressed; GGUF Q4_0/Q4_1/Q8_0 tensors keep their own form",
    )
    c.add_argument(
        "--compress-cache", action="store_true", help="hold the KV cache compressed (any tier)"
    )
    c.add_argument("--compress-bits", type=int, help="4 (default) or 8")
    c.add_argument(
        "--group-size",
        type=int,
        help="values per scale/zero, a multiple of 4 dividing every compressed width (default "
        "32: 64 costs +57 %% perplexity on SmolLM2, see README; the cache uses head_dim when "
        "that is narrower)",
    )
    c.add_argument(
        "--packed",
        action="store_true",
        help="also float models on the block kernels: linear weights as --compress-weight "
        "(int4 groups of 32, lossy) held as blocks; in-memory models on the CPU",
    )
    c.add_argument(
        "--exact",
        action="store_true",
        help="turn the fast default off: GGUF Q4_0/Q4_1/Q8_0 weights dequantized to fp32 and "
        "multiplied in fp32 (no int8 rounding of activations), bf16 weights converted to fp32",
    )


def add_sampling_options(p: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def sampling_kwargs(a: argparse.Namespace) -> dict:
    return dict(
        max_new_tokens=a.max_new_tokens,
        temperature=a.temperature,
        top_p=a.top_p,
        top_k=a.top_k,
        min_p=a.min_p,
        repetition_penalty=a.repetition_penalty,
        frequency_penalty=a.frequency_penalty,
        presence_penalty=a.presence_penalty,
        seed=a.seed,
        stop=a.stop,
        ignore_eos=a.ignore_eos,
    )
