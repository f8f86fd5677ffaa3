"""Corrupt and malicious model files through `layercake generate`: tracebacks, hangs, clean errors.

Builds a corpus of broken models (config values of the wrong type, sign or size; safetensors
headers of every wrong shape; FIFOs, directories and devices where files belong; truncated files;
GGUF metadata of the wrong types; chat templates that divide by zero, loop for hours or fill
memory), runs `layercake generate` on each in a subprocess with a timeout, and prints one JSON line:
how many ended in one clean `layercake: error:` line naming the file and the field, how many in a
traceback, a hang, or were accepted. `tests/test_model_files.py` loads the same corpus in-process.

    python benchmarks/model_files_probe.py [--timeout 60] [--only NAME_SUBSTRING]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGUFValueType as V

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from checkpoints import write_random_llama  # noqa: E402

TINY = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu", vocab_size=32,
    hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-5,
    rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
TEMPLATE += "{% if add_generation_prompt %}<s>assistant:{% endif %}"


@dataclass
class Case:
    """One broken model: where it is, and what its one-line error must match."""

    name: str
    path: Path
    expect: str  # a regex over the error message: names the file and the field
    chat: bool = False


def hf_model(d: Path, **overrides: Any) -> Path:
    """The tiny valid HF model (random bf16 weights, a word-level tokenizer and a chat
    template), with ``overrides`` on config.json (None deletes a key)."""
    cfg = {k: v for k, v in {**TINY, **overrides}.items() if v is not None}
    write_random_llama(d, {**TINY, "num_hidden_layers": 2, "vocab_size": 32})
    (d / "config.json").write_text(json.dumps(cfg))
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(29))])}
    added = [dict(id=i, content=w, special=True, single_word=False, lstrip=False, rstrip=False,
                  normalized=False) for w, i in list(vocab.items())[:3]]  # fmt: skip
    word_level = {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    (d / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None, "decoder": None, "model": word_level,
    }))  # fmt: skip
    tc = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=TEMPLATE)
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    return d


def safetensors_bytes(header: Any, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file: the header (any JSON value, or raw bytes) and the data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def single_file_model(d: Path, content: bytes | None) -> Path:
    """The tiny model with its weights replaced by one model.safetensors of ``content`` (None:
    leave the place empty for the caller to fill with a FIFO, directory or link)."""
    hf_model(d)
    for p in d.glob("model*.safetensors*"):
        p.unlink()
    if content is not None:
        (d / "model.safetensors").write_bytes(content)
    return d


def _bytes_level_vocab() -> list[str]:
    from layercake.gguf_tokenizer import byte_alphabet

    return ["<|im_start|>", "<|im_end|>", *byte_alphabet().values()]


def gguf_model(path: Path, meta: dict[str, Any] | None = None, cut: int | None = None) -> Path:
    """A tiny valid GGUF llama (random f32 weights, a byte-level tokenizer with a chat template);
    ``meta`` overrides metadata ({key: (value, type[, element type])} or None to drop it);
    ``cut`` truncates the file to that many bytes."""
    vocab = _bytes_level_vocab()
    rng = np.random.default_rng(0)
    kv: dict[str, Any] = {
        "llama.embedding_length": (16, V.UINT32), "llama.feed_forward_length": (32, V.UINT32),
        "llama.block_count": (1, V.UINT32), "llama.attention.head_count": (2, V.UINT32),
        "llama.attention.head_count_kv": (1, V.UINT32), "llama.context_length": (64, V.UINT32),
        "llama.attention.layer_norm_rms_epsilon": (1e-5, V.FLOAT32),
        "llama.rope.freq_base": (10000.0, V.FLOAT32), "tokenizer.ggml.model": ("gpt2", V.STRING),
        "tokenizer.ggml.tokens": (vocab, V.ARRAY, V.STRING),
        "tokenizer.ggml.token_type": ([3, 3] + [1] * (len(vocab) - 2), V.ARRAY, V.INT32),
        "tokenizer.ggml.eos_token_id": (1, V.UINT32),
        "tokenizer.chat_template": (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            V.STRING,
        ),
    }  # fmt: skip
    for key, value in (meta or {}).items():
        kv.pop(key, None) if value is None else kv.__setitem__(key, value)
    w = gguf.GGUFWriter(str(path), "llama")
    for key, (value, *types) in kv.items():
        w.add_key_value(key, value, *types)
    shapes = {"token_embd": (len(vocab), 16), "output_norm": (16,)}
    shapes.update({f"blk.0.{name}": shape for name, shape in {
        "attn_norm": (16,), "ffn_norm": (16,), "attn_q": (16, 16), "attn_k": (8, 16),
        "attn_v": (8, 16), "attn_output": (16, 16), "ffn_gate": (32, 16), "ffn_up": (32, 16),
        "ffn_down": (16, 32)}.items()})  # fmt: skip
    for name, shape in shapes.items():
        w.add_tensor(f"{name}.weight", rng.normal(0, 0.2, shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if cut is not None:
        os.truncate(path, cut)
    return path


def _config_cases(root: Path) -> list[Case]:
    bad = {
        "layers_negative": ("num_hidden_layers", -3), "layers_huge": ("num_hidden_layers", 10**9),
        "layers_string": ("num_hidden_layers", "2"), "layers_bool": ("num_hidden_layers", True),
        "hidden_float": ("hidden_size", 16.5), "hidden_huge": ("hidden_size", 2**40),
        "heads_zero": ("num_attention_heads", 0),
        "kv_heads_not_dividing": ("num_key_value_heads", 3), "vocab_negative": ("vocab_size", -1),
        "vocab_missing": ("vocab_size", None), "context_zero": ("max_position_embeddings", 0),
        "context_negative": ("max_position_embeddings", -1),
        "eps_negative": ("rms_norm_eps", -1e-5), "eps_string": ("rms_norm_eps", "1e-5"),
        "rope_theta_zero": ("rope_theta", 0), "rope_theta_nan": ("rope_theta", float("nan")),
        "rope_scaling_string": ("rope_scaling", "linear"),
        "rope_llama3_partial": ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}),
        "rope_factor_negative": ("rope_scaling", {"rope_type": "linear", "factor": -2}),
        "head_dim_odd": ("head_dim", 7), "head_dim_zero": ("head_dim", 0),
        "intermediate_negative": ("intermediate_size", -5),
        "tie_string": ("tie_word_embeddings", "yes"), "eos_string": ("eos_token_id", "2"),
        "eos_negative_in_list": ("eos_token_id", [2, -1]), "bos_negative": ("bos_token_id", -1),
        "model_type_number": ("model_type", 5), "model_type_unknown": ("model_type", "gpt9"),
    }  # fmt: skip
    cases = []
    for name, (key, value) in bad.items():
        d = hf_model(root / f"config_{name}", **{key: value})
        cases.append(Case(f"config_{name}", d, rf"config\.json.*{key}|{key}.*config\.json"))
    d = hf_model(root / "config_shape_mismatch", hidden_size=32, head_dim=16)
    cases.append(Case("config_shape_mismatch", d, r"shape"))
    for name, content in {
        "list": b"[1, 2]",
        "not_json": b"{nope",
        "deep_nesting": b"[" * 200_000 + b"]" * 200_000,
        "not_utf8": b'{"a": "\xff\xfe"}',
    }.items():
        d = hf_model(root / f"config_file_{name}")
        (d / "config.json").write_bytes(content)
        cases.append(Case(f"config_file_{name}", d, r"config\.json"))
    d = hf_model(root / "config_file_fifo")
    (d / "config.json").unlink()
    os.mkfifo(d / "config.json")
    cases.append(Case("config_file_fifo", d, r"config\.json.*FIFO"))
    d = hf_model(root / "config_file_directory")
    (d / "config.json").unlink()
    (d / "config.json").mkdir()
    cases.append(Case("config_file_directory", d, r"config\.json.*directory"))
    return cases


def _safetensors_cases(root: Path) -> list[Case]:
    f32 = lambda shape, offsets: {"dtype": "F32", "shape": shape, "data_offsets": offsets}  # noqa: E731
    headers = {
        "header_list": ([], b""),
        "header_number": (5, b""),
        "header_string": ("tensors", b""),
        "header_not_json": (b"\x00\x01garbage", b""),
        "entry_number": ({"w": 5}, b""),
        "dtype_unknown": ({"w": {"dtype": "F8", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 2),
        "dtype_missing": ({"w": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
        "shape_negative": ({"w": f32([-1, 64], [0, 256])}, b"\0" * 256),
        "shape_huge": ({"w": f32([2**31, 2**31], [0, 16])}, b"\0" * 16),
        "shape_string": ({"w": f32("16", [0, 64])}, b"\0" * 64),
        "shape_float": ({"w": f32([2.0], [0, 8])}, b"\0" * 8),
        "offsets_odd": ({"w": f32([2], [0, 7])}, b"\0" * 8),
        "offsets_past_end": ({"w": f32([2], [0, 8])}, b"\0" * 4),
        "offsets_reversed": ({"w": f32([2], [8, 0])}, b"\0" * 8),
        "offsets_float": ({"w": f32([2], [0.5, 8])}, b"\0" * 8),
        "offsets_short": ({"w": f32([2], [0])}, b"\0" * 8),
        "metadata_list": ({"__metadata__": [1], "w": f32([2], [0, 8])}, b"\0" * 8),
    }
    cases = []
    for name, (header, data) in headers.items():
        d = single_file_model(root / f"st_{name}", safetensors_bytes(header, data))
        cases.append(Case(f"st_{name}", d, r"model\.safetensors.*(header|tensor)"))
    for name, content in {
        "empty": b"",
        "three_bytes": b"abc",
        "header_length_huge": safetensors_bytes({}, length=10**12),
        "header_length_over_100mb": safetensors_bytes({}, b"\0" * 16, length=2**27),
    }.items():
        d = single_file_model(root / f"st_{name}", content)
        cases.append(Case(f"st_{name}", d, r"model\.safetensors.*(truncated|header)"))
    d = hf_model(root / "st_truncated_data")
    shard = next(d.glob("model-*.safetensors"))
    os.truncate(shard, shard.stat().st_size - 64)
    cases.append(Case("st_truncated_data", d, r"model-00001-of-00001\.safetensors.*truncated"))
    d = single_file_model(root / "st_fifo", None)
    os.mkfifo(d / "model.safetensors")
    cases.append(Case("st_fifo", d, r"model\.safetensors.*FIFO"))
    d = single_file_model(root / "st_directory", None)
    (d / "model.safetensors").mkdir()
    cases.append(Case("st_directory", d, r"model\.safetensors.*directory"))
    d = single_file_model(root / "st_device", None)
    (d / "model.safetensors").symlink_to("/dev/zero")
    cases.append(Case("st_device", d, r"model\.safetensors.*device"))
    for name, index in {
        "weight_map_list": {"weight_map": ["x"]},
        "weight_map_escape": {"weight_map": {"model.norm.weight": "../../../etc/passwd"}},
        "index_names_missing_file": {"weight_map": {"model.norm.weight": "gone.safetensors"}},
        "index_not_object": [1],
    }.items():
        d = hf_model(root / f"st_{name}")
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
        cases.append(Case(f"st_{name}", d, r"(index\.json|tiny|st_\w+).*(weight_map|not|missing)"))
    return cases


def _gguf_cases(root: Path) -> list[Case]:
    n_vocab = len(_bytes_level_vocab())
    meta = {
        "tokens_ints": ("tokenizer.ggml.tokens", (list(range(n_vocab)), V.ARRAY, V.INT32)),
        "token_type_short": ("tokenizer.ggml.token_type", ([1, 1], V.ARRAY, V.INT32)),
        "merges_ints": ("tokenizer.ggml.merges", ([1, 2], V.ARRAY, V.INT32)),
        "merges_unknown_tokens": ("tokenizer.ggml.merges", (["zz qq"], V.ARRAY, V.STRING)),
        "eos_out_of_range": ("tokenizer.ggml.eos_token_id", (10**6, V.UINT32)),
        "tokenizer_model_number": ("tokenizer.ggml.model", (7, V.UINT32)),
        "template_number": ("tokenizer.chat_template", (7, V.UINT32)),
        "block_count_negative": ("llama.block_count", (-3, V.INT32)),
        "block_count_huge": ("llama.block_count", (10**9, V.UINT32)),
        "block_count_string": ("llama.block_count", ("1", V.STRING)),
        "context_zero": ("llama.context_length", (0, V.UINT32)),
        "heads_zero": ("llama.attention.head_count", (0, V.UINT32)),
        "heads_array": ("llama.attention.head_count", ([2], V.ARRAY, V.UINT32)),
        "width_float": ("llama.embedding_length", (16.0, V.FLOAT32)),
        "eps_negative": ("llama.attention.layer_norm_rms_epsilon", (-1.0, V.FLOAT32)),
        "rope_base_zero": ("llama.rope.freq_base", (0.0, V.FLOAT32)),
        "rope_factor_negative": ("llama.rope.scaling.factor", (-4.0, V.FLOAT32)),
    }
    fields = {"tokens_ints": "tokens", "token_type_short": "token_type"}
    cases = []
    for name, (key, value) in meta.items():
        p = gguf_model(root / f"gguf_{name}.gguf", {key: value})
        field = fields.get(name, key.split(".")[-1])
        if name == "rope_factor_negative":
            p = gguf_model(root / f"gguf_{name}.gguf", {key: value, "llama.rope.scaling.type":
                           ("linear", V.STRING)})  # fmt: skip
        cases.append(Case(f"gguf_{name}", p, rf"gguf_{name}\.gguf.*({field}|tokenizer)"))
    full = gguf_model(root / "gguf_full.gguf").stat().st_size
    for name, cut in {
        "cut_in_header": 40,
        "cut_in_metadata": 600,
        "cut_in_data": full - 100,
    }.items():
        p = gguf_model(root / f"gguf_{name}.gguf", cut=cut)
        cases.append(Case(f"gguf_{name}", p, rf"gguf_{name}\.gguf.*truncated"))
    (root / "gguf_not_gguf.gguf").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    cases.append(Case("gguf_not_gguf", root / "gguf_not_gguf.gguf", r"not a GGUF"))
    os.mkfifo(root / "gguf_fifo.gguf")
    cases.append(Case("gguf_fifo", root / "gguf_fifo.gguf", r"gguf_fifo\.gguf.*FIFO"))
    return cases


TEMPLATES = {
    "divide_by_zero": "{{ 1/0 }}",
    "huge_string": "{{ 'a' * 10**12 }}",
    "nested_range": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
    "{% endfor %}",
    "nested_list_loops": "{% set l = range(100000)|list %}{% for a in l %}{% for b in l %}"
    "{% endfor %}{% endfor %}",
    "doubling": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
    "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "power": "{{ 10 ** (10 ** 9) }}",
    "center": "{{ 'a'.center(10**9) }}",
    "format_width": "{{ '%999999999d' % 1 }}",
    "replace_bomb": "{{ ('a' * 100000).replace('a', 'b' * 100000) }}",
    "join_bomb": "{{ range(100000)|join('x' * 100000) }}",
    "repeat_references": "{% set s = 'a' * 1000000 %}{{ [s] * 100000 }}",
    "output_flood": "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
    "recursion": "{% macro m(n) %}{{ m(n + 1) }}{% endmacro %}{{ m(0) }}",
    "syntax_error": "{% for %}",
    "undefined_call": "{{ nothing() }}",
    "sandbox_escape": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "raise_exception": "{{ raise_exception('roles must alternate') }}",
    "deep_parse": "{{ " + "(" * 50000 + "1" + ")" * 50000 + " }}",
}


def _template_cases(root: Path) -> list[Case]:
    cases = []
    for name, template in TEMPLATES.items():
        key = {"tokenizer.chat_template": (template, V.STRING)}
        p = gguf_model(root / f"template_{name}.gguf", key)
        cases.append(Case(f"template_{name}", p, rf"template_{name}\.gguf.*chat_template", True))
    d = hf_model(root / "template_fifo_file")
    os.mkfifo(d / "chat_template.jinja")
    cases.append(Case("template_fifo_file", d, r"chat_template\.jinja.*FIFO", True))
    d = hf_model(root / "template_dir_divide")
    (d / "chat_template.jinja").write_text("{{ 1 // 0 }}")
    cases.append(Case("template_dir_divide", d, r"chat_template\.jinja.*ZeroDivision", True))
    return cases


def build_corpus(root: Path) -> list[Case]:
    """Every broken model, written under ``root``."""
    return [c for make in (_config_cases, _safetensors_cases, _gguf_cases, _template_cases)
            for c in make(root)]  # fmt: skip


def run_case(case: Case, timeout: float) -> dict[str, Any]:
    """`layercake generate` on the case: outcome, seconds, peak RSS and the last stderr line."""
    cmd = [sys.executable, "-m", "layercake.cli", "generate", "--model", str(case.path)]
    cmd += ["--prompt", "w1 w2", "--max-new-tokens", "2"] + (["--chat"] if case.chat else [])
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    rusage = None
    while time.monotonic() - t0 < timeout:
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            break
        time.sleep(0.02)
    else:
        proc.kill()
        proc.wait()
    err = proc.stderr.read().decode(errors="replace")
    last = (err.strip().splitlines() or [""])[-1]
    if rusage is None:
        outcome = "hang"
    elif "Traceback" in err:
        outcome = "traceback"
    elif proc.returncode == 0:
        outcome = "accepted"
    elif proc.returncode == 2 and err.strip() == last and last.startswith("layercake: error:"):
        outcome = "clean"
    else:
        outcome = f"exit {proc.returncode}"
    return {
        "name": case.name, "outcome": outcome, "named": bool(re.search(case.expect, last)),
        "seconds": round(time.monotonic() - t0, 2),
        "max_rss_mb": round(rusage.ru_maxrss / 1024) if rusage else None, "error": last[:300],
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per case")
    ap.add_argument("--only", default="", help="run the cases whose name contains this")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per case to stderr")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="layercake-probe-"))
    try:
        results = [run_case(c, a.timeout) for c in build_corpus(root) if a.only in c.name]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if a.verbose:
        for r in results:
            print(json.dumps(r), file=sys.stderr)
    n = Counter(r["outcome"] for r in results)
    print(json.dumps({
        "cases": len(results), **{k: n[k] for k in ("clean", "traceback", "hang", "accepted")},
        "other": len(results) - n["clean"] - n["traceback"] - n["hang"] - n["accepted"],
        "clean_naming_file_and_field": sum(r["outcome"] == "clean" and r["named"] for r in results),
        "not_clean": [r["name"] for r in results if r["outcome"] != "clean"],
        "not_named": [r["name"] for r in results if r["outcome"] == "clean" and not r["named"]],
        "slowest_s": max((r["seconds"] for r in results), default=0),
        "max_rss_mb": max((r["max_rss_mb"] or 0 for r in results), default=0),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
