"""GGUF checkpoints: an HF-style config, HF-named tensors dequantized on demand, and the tokenizer.

A GGUF file (llama.cpp's format) holds everything a model needs: the config and the tokenizer as
metadata under llama.cpp's key names, and the weights under llama.cpp's tensor names, often in
block-quantized types. `GGUFCheckpoint` translates all three into what an HF checkpoint would hold,
so the model code never learns that the weights came from a GGUF:

    ckpt = GGUFCheckpoint("SmolLM2-135M-Instruct.Q4_1.gguf")
    ckpt.config_dict()["num_key_value_heads"]                  # 3
    ckpt.load("model.layers.0.self_attn.q_proj.weight")        # (576, 576) float32

The header is parsed by `gguf_format`. The tensor data stays in the memory-mapped file; `load`
reads only the bytes of the tensor asked for, and dequantizes with `gguf.quants`.
"""

import math
import mmap
import os
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType

from layercake.checkpoint.experts import Part, expert_parts, model_names
from layercake.checkpoint.gguf_format import TensorInfo, open_gguf
from layercake.checkpoint.gguf_names import (
    ARCHITECTURES,
    CONFIG_KEYS,
    NOT_PARAMETERS,
    hf_name,
    moe_fields,
)
from layercake.checkpoint.safetensors import release_pages
from layercake.config import check_config
from layercake.errors import LayercakeError

# Stored as plain values: their bytes are reinterpreted, never dequantized.
_PLAIN = {QType.F32: torch.float32, QType.F16: torch.float16, QType.BF16: torch.bfloat16}
# Quant types that `gguf.quants.dequantize` implements in numpy and that real checkpoints use.
_BLOCKS = (
    QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0,
    QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K,
)  # fmt: skip
SUPPORTED_TYPES = tuple(t.name for t in (*_PLAIN, *_BLOCKS))


class GGUFCheckpoint:
    """A GGUF file seen as an HF checkpoint: config_dict, tensor_names, load, tokenizer_spec."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        # A read-only shared map: parsing the header and reading quantized bytes never writes, and
        # unlike a private writable map it is not charged against memory, so a file larger than
        # RAM + swap still opens.
        self._file_map, self.metadata, self._gguf = open_gguf(
            self.path
        )  # _gguf: GGUF name -> TensorInfo
        self.architecture = self.metadata.get("general.architecture")
        if not isinstance(self.architecture, str) or self.architecture not in ARCHITECTURES:
            raise LayercakeError(
                f"{self.path}: GGUF architecture {self.architecture!r} is not supported "
                f"(supported: {', '.join(ARCHITECTURES)})."
            )
        self._map: mmap.mmap | None = None  # a private (copy-on-write) map for zero-copy views
        self._hf_to_gguf = {}
        unknown = []
        for name in self._gguf:
            if name in NOT_PARAMETERS:
                continue
            if (hf := hf_name(name)) is None:
                unknown.append(name)
            else:
                self._hf_to_gguf[hf] = name
        if unknown:
            raise LayercakeError(
                f"{self.path}: tensors with no known {self.architecture} parameter name: "
                f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}"
            )
        experts = self._meta("expert_count")
        # each expert of a stacked tensor seen as its own (rows of the stacked one)
        self.parts: dict[str, Part] = expert_parts(
            {"num_experts": experts if type(experts) is int and experts > 0 else 0},
            self._hf_to_gguf,
        )

    def _meta(self, key: str, default=None):
        """An architecture-scoped metadata value, e.g. `block_count` -> `llama.block_count`."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def config_dict(self) -> dict:
        """An HF `config.json`-equivalent dict built from the GGUF metadata, every value checked
        (`check_config`) before anything is computed from it."""
        required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        names = {hf: f"{self.architecture}.{key}" for hf, key in CONFIG_KEYS.items()}
        names["rope_scaling.factor"] = f"{self.architecture}.rope.scaling.factor"
        names.update({f"{k}_token_id": f"tokenizer.ggml.{k}_token_id" for k in ("bos", "eos")})
        if missing := [names[k] for k in required if self._meta(CONFIG_KEYS[k]) is None]:
            raise LayercakeError(f"{self.path}: the GGUF metadata lacks {', '.join(missing)}.")
        raw = {hf: self._meta(key) for hf, key in CONFIG_KEYS.items()}
        raw = {k: v for k, v in raw.items() if v is not None}
        check_config(raw, str(self.path), names)
        heads, hidden = raw["num_attention_heads"], raw["hidden_size"]
        vocab = raw.get("vocab_size")
        if vocab is None and isinstance(tokens := self.metadata.get("tokenizer.ggml.tokens"), list):
            vocab = len(tokens)
        if not vocab and "token_embd.weight" in self._gguf:
            vocab = int(self._gguf["token_embd.weight"].shape[-1])  # ggml order: (hidden, vocab)
        config = {
            "architectures": [ARCHITECTURES[self.architecture][1]],
            "model_type": ARCHITECTURES[self.architecture][0],
            "hidden_act": "silu",
            **raw,
            "vocab_size": vocab or None,  # unknown: load_config says so
            "num_key_value_heads": raw.get("num_key_value_heads", heads),
            # key_length is the head width where llama.cpp states it; otherwise the rotary width,
            # which equals the head width for llama (transformers reads it the same way).
            "head_dim": raw.get("head_dim") or raw.get("rope_dim") or hidden // heads,
            "max_position_embeddings": raw.get("max_position_embeddings", 2048),  # HF's default
            "rms_norm_eps": raw.get("rms_norm_eps", 1e-5),
            "rope_theta": raw.get("rope_theta", 10000.0),
            "rope_scaling": self._rope_scaling(),
            # llama.cpp writes `output.weight` only when it is not the embedding matrix.
            "tie_word_embeddings": "output.weight" not in self._gguf,
            "attention_bias": "model.layers.0.self_attn.q_proj.bias" in self._hf_to_gguf,
            "mlp_bias": "model.layers.0.mlp.up_proj.bias" in self._hf_to_gguf,
            "torch_dtype": self._dtype_name(),
        }
        config.pop("rope_dim", None)
        config.update(moe_fields(self.architecture, raw, self._meta, self._hf_to_gguf.__contains__))
        for key, gguf_key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
            if (token_id := self.metadata.get(f"tokenizer.ggml.{gguf_key}_token_id")) is not None:
                config[f"{key}_token_id"] = token_id
        check_config(config, str(self.path), names)
        return config

    def _dtype_name(self) -> str:
        """The half type the file's matrices are stored in; float32 for quantized files."""
        types = {t.tensor_type for t in self._gguf.values() if len(t.shape) > 1}
        if types == {QType.BF16}:
            return "bfloat16"
        return "float16" if types == {QType.F16} else "float32"

    def _rope_scaling(self) -> dict | None:
        """HF `rope_scaling` from `rope.scaling.*` metadata, or llama 3's `rope_freqs` tensor."""
        kind = self._meta("rope.scaling.type")
        factor = self._meta("rope.scaling.factor")
        if kind == "linear" and factor:
            return {"rope_type": "linear", "factor": factor}
        if kind == "yarn" and factor:
            scaling = {"rope_type": "yarn", "factor": factor}
            if original := self._meta("rope.scaling.original_context_length"):
                scaling["original_max_position_embeddings"] = original
            return scaling
        if kind not in (None, "none"):
            raise LayercakeError(f"{self.path}: rope scaling type {kind!r} is not supported.")
        if "rope_freqs.weight" in self._gguf:
            return self._llama3_rope_scaling()
        return None

    def _llama3_rope_scaling(self) -> dict:
        """Recover llama 3's rope parameters from the per-frequency divisors llama.cpp stores.

        The divisors are 1 for high frequencies, `factor` for low ones, and in between
        1 / ((1 - s) / factor + s) with s = (old_ctx / wavelen - low) / (high - low). That fixes
        `factor` and two ratios of (old_ctx, low, high), not all three; every llama 3 release uses
        low_freq_factor = 1, so we assume it and then check the divisors come back exactly.
        """
        divisors = self._load(self._gguf["rope_freqs.weight"], torch.float64, "rope_freqs.weight")
        if divisors.dim() != 1 or not divisors.numel() or not (divisors >= 1).all():
            raise LayercakeError(
                f"{self.path}: tensor rope_freqs.weight is not a list of divisors >= 1."
            )
        head_dim = 2 * divisors.numel()
        theta = float(self._meta("rope.freq_base", 10000.0))
        wavelen = (
            2 * math.pi * theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        )
        factor = divisors.max().item()
        middle = (divisors > 1 + 1e-4) & (divisors < factor * (1 - 1e-4))
        low, high, old = 1.0, 4.0, 8192  # llama 3.1's values, used when too few points to fit
        if middle.sum() >= 2:
            smooth = (1 / divisors[middle] - 1 / factor) / (1 - 1 / factor)
            slope, intercept = np.polyfit((1 / wavelen[middle]).numpy(), smooth.numpy(), 1)
            if intercept < 0:  # intercept = -low / (high - low), slope = old / (high - low)
                high = round(float(low - 1 / intercept), 4)
                old = round(float(slope * (high - low)))
        scaling = {
            "rope_type": "llama3",
            "factor": round(factor, 4),
            "low_freq_factor": low,
            "high_freq_factor": high,
            "original_max_position_embeddings": old,
        }
        if not torch.allclose(llama3_rope_divisors(wavelen, scaling), divisors, rtol=1e-4):
            raise LayercakeError(
                f"{self.path}: the rope_freqs tensor does not match llama 3 rope scaling; "
                "this rope variant is not supported."
            )
        return scaling

    def tensor_names(self) -> list[str]:
        """HF parameter names of the tensors in the file, in file order (then each expert of
        the stacked expert tensors)."""
        return model_names(self._hf_to_gguf, self.parts)

    def tensor_nbytes(self, name: str) -> int:
        """Bytes the tensor occupies in the file (its quantized size)."""
        return int(self._tensor(name).n_bytes)

    def stored_dtype(self, name: str) -> torch.dtype | None:
        """The torch dtype the tensor is stored in, or None for a block-quantized one."""
        return _PLAIN.get(self._tensor(name).tensor_type)

    def release(self, name: str) -> None:
        """The caller holds its own copy of ``name``: let the mapped pages of its data go (they
        would be read back from the file if touched again)."""
        t = self._tensor(name)
        start = t.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
        for m in (self._file_map, self._map):
            if m is not None and t.n_bytes:
                release_pages(m, start, t.data_offset + t.n_bytes)

    def load(
        self, name: str, dtype: torch.dtype = torch.float32, *, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The HF-named tensor, dequantized, in HF layout and shape, as `dtype`.

        Reads only this tensor's bytes of the file. A tensor stored as `dtype` (and not reordered)
        is a zero-copy view of a private memory map, as the safetensors reader gives. With `out`
        (this shape and `dtype`, any device) the result is written into it and `out` returned:
        plain types are converted straight from the file's pages, with no intermediate copy.
        """
        return self._load(self._tensor(name), dtype, name, out)

    def _load(
        self, tensor: TensorInfo, dtype: torch.dtype, name: str, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        qtype = tensor.tensor_type
        shape = tuple(reversed(tensor.shape))  # ggml lists dims fastest first
        if out is not None and (tuple(out.shape) != shape or out.dtype != dtype):
            raise LayercakeError(
                f"load({name!r}, {dtype}, out=...): `out` is {tuple(out.shape)} {out.dtype}, "
                f"the tensor is {shape} {dtype}."
            )
        if qtype not in _PLAIN and qtype not in _BLOCKS:
            raise LayercakeError(
                f"{self.path}: tensor {name!r} ({tensor.name}) has type {qtype.name}, which "
                f"layercake cannot read (supported: {', '.join(SUPPORTED_TYPES)})."
            )
        if tensor.n_elements == 0:  # nothing to read (and frombuffer refuses an empty range)
            return torch.empty(shape, dtype=dtype) if out is None else out
        if qtype in _PLAIN:
            src = self._view(tensor).reshape(shape)
        else:
            src = self._dequantize(tensor, shape)
        leaf = tensor.name.split(".")[-2]
        if self.architecture == "llama" and leaf in ("attn_q", "attn_k"):  # a copy, reordered
            heads = self._meta("attention.head_count")
            heads = heads if leaf == "attn_q" else self._meta("attention.head_count_kv", heads)
            if type(heads) is not int or heads <= 0 or shape[0] % (2 * heads):
                raise LayercakeError(
                    f"{self.path}: tensor {name!r} has {shape[0]} rows, which {heads!r} heads "
                    "(from the metadata) cannot split into halves: the file is inconsistent."
                )
            out = torch.empty(shape, dtype=dtype) if out is None else out
            return _unpermute_rows(src, heads, out)
        if out is not None:
            return out.copy_(src)
        return src.to(dtype)  # a no-op on a view already in `dtype`: no copy

    def block_type(self, name: str) -> str:
        """The GGUF type name of a tensor (e.g. ``Q4_1``, ``F32``)."""
        return self._tensor(name).tensor_type.name

    def load_blocks(self, name: str) -> torch.Tensor:
        """A block-quantized tensor's bytes as stored, (rows, bytes per row) uint8 in HF row
        order (Q/K rows un-permuted): for keeping GGUF's quantized form instead of expanding."""
        tensor = self._tensor(name)
        raw = torch.from_numpy(np.array(self._blocks(tensor)))  # a copy: the map is read-only
        leaf = tensor.name.split(".")[-2]
        if self.architecture == "llama" and leaf in ("attn_q", "attn_k"):
            heads = self._meta("attention.head_count")
            heads = heads if leaf == "attn_q" else self._meta("attention.head_count_kv", heads)
            return _unpermute_rows(raw, heads, torch.empty_like(raw))
        return raw

    def _view(self, tensor: TensorInfo) -> torch.Tensor:
        """A plain tensor's bytes as a flat tensor, sharing memory with the file's pages."""
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        dtype = _PLAIN[tensor.tensor_type]
        return torch.frombuffer(
            self._map, dtype=dtype, count=tensor.n_elements, offset=tensor.data_offset
        )

    def _dequantize(self, tensor: TensorInfo, shape: tuple[int, ...]) -> torch.Tensor:
        """Dequantize to fp32 a few rows at a time: numpy's temporaries stay small, where a
        whole-tensor dequantize leaves twice the tensor's size of freed heap in the process."""
        rows = self._blocks(tensor)  # (R, bytes per row)
        out = torch.empty(shape, dtype=torch.float32)
        flat = out.view(rows.shape[0], -1).numpy()  # (R, values per row), shares out's memory
        step = max(1, 2**20 // flat.shape[1])  # ~4 MB of fp32 per block
        for r in range(0, rows.shape[0], step):
            flat[r : r + step] = gguf.quants.dequantize(rows[r : r + step], tensor.tensor_type)
        return out

    def _blocks(self, tensor: TensorInfo) -> np.ndarray:
        """A quantized tensor's bytes, one row per ggml row (`dequantize` works row-group-wise)."""
        block_size, type_size = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
        data = np.frombuffer(
            self._file_map, np.uint8, count=tensor.n_bytes, offset=tensor.data_offset
        )
        return data.reshape(-1, tensor.shape[0] // block_size * type_size)

    def _tensor(self, name: str) -> TensorInfo:
        """The tensor info of ``name``; for one expert of a stacked tensor, that of its rows
        (contiguous bytes of the file, so every reader above reads only them)."""
        part = self.parts.get(name)
        if part is None and name not in self._hf_to_gguf:
            raise LayercakeError(f"{self.path}: no tensor named {name!r} in this checkpoint.")
        t = self._gguf[self._hf_to_gguf[part.src if part else name]]
        if part is None or len(t.shape) != 3:
            return t
        lo, hi = part.rows(tuple(reversed(t.shape)))
        row_bytes = t.n_bytes // (t.n_elements // t.shape[0])
        return t._replace(
            shape=(t.shape[0], hi - lo),
            n_elements=(hi - lo) * t.shape[0],
            n_bytes=(hi - lo) * row_bytes,
            data_offset=t.data_offset + lo * row_bytes,
        )

    def tokenizer_spec(self) -> dict:
        """What `layercake.tokenizer.Tokenizer.from_gguf` needs, from the `tokenizer.*` metadata.

        `model` is llama.cpp's tokenizer kind ("gpt2": byte-level BPE, "llama": sentencepiece BPE),
        `pre` its pre-tokenizer name; token ids are None when the file does not state them.
        """
        meta = self.metadata
        spec = {
            "model": meta.get("tokenizer.ggml.model"),
            "pre": meta.get("tokenizer.ggml.pre"),
            "tokens": meta.get("tokenizer.ggml.tokens"),
            "token_types": meta.get("tokenizer.ggml.token_type"),
            "scores": meta.get("tokenizer.ggml.scores"),
            "merges": meta.get("tokenizer.ggml.merges"),
            "add_bos_token": meta.get("tokenizer.ggml.add_bos_token"),
            "add_eos_token": meta.get("tokenizer.ggml.add_eos_token"),
            "add_space_prefix": meta.get("tokenizer.ggml.add_space_prefix"),
            "chat_template": meta.get("tokenizer.chat_template"),
        }
        for key in ("bos", "eos", "unknown", "padding", "eot", "eom"):
            spec[f"{key}_token_id"] = meta.get(f"tokenizer.ggml.{key}_token_id")
        if not spec["tokens"]:
            raise LayercakeError(f"{self.path}: the GGUF metadata holds no tokenizer.")
        return spec


def llama3_rope_divisors(wavelen: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Per-frequency divisors of llama 3 rope scaling (what llama.cpp stores as `rope_freqs`)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    smooth = (old / wavelen - low) / (high - low)
    divisors = 1 / ((1 - smooth) / factor + smooth)
    divisors = torch.where(wavelen < old / high, torch.ones_like(wavelen), divisors)
    return torch.where(wavelen > old / low, torch.full_like(wavelen, factor), divisors)


def _unpermute_rows(w: torch.Tensor, heads: int, out: torch.Tensor) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation, writing (and converting) `w` into `out`.

    llama.cpp's converter reorders each head's rows from HF's rotate-half layout (first half, second
    half) to interleaved pairs, `w.reshape(heads, 2, d, ...).swapaxes(1, 2)`; this is its inverse.
    Splitting dim 0 is a view of any tensor, so the reorder and the dtype change are one copy.
    """
    d = w.shape[0] // heads // 2
    out.unflatten(0, (heads, 2, d)).copy_(w.unflatten(0, (heads, d, 2)).transpose(1, 2))
    return out
