"""Fast decoding of small batches (1-8 rows) with packed low-bit weights, on the CPU.

At one token per row a decode step is memory-bound on the weights and call-bound on everything
else: the general path runs ~25 PyTorch ops per layer (three q/k/v matmuls, rotary halves and
concatenations, dtype casts), each costing microseconds of dispatch. ``DecodeRunner`` wraps a
``LocalRunner`` whose linears are ``Int4Linear`` and replaces only its one-token steps by a
lean loop over the same weights:

- q/k/v and gate/up run as one fused int4 matmul each. The fused bytes are made once at load,
  and each original module is re-pointed at its rows of them (a view), so nothing is held twice
  and the general path (prefill, scoring) keeps its modules and HF names.
- RoPE is one small batched matmul per layer with a per-step (head_dim x head_dim) rotation
  matrix (cos on the diagonal, the signed half-swap times sin), built once per step, instead of
  slicing, negating and concatenating halves in every layer.
- Keys and values are written in place into the caller's preallocated cache; attention reads
  the cache's first ``end`` slots (views): no allocation grows with the context.
- A head stored as 8-bit groups (GGUF Q8_0) becomes per-row int8 for
  ``torch.ops.aten._weight_int8pack_mm`` (``int4mm.PackedInt8``), a head of 4-bit groups stays int4.

With ``compile``, the whole one-token step (every layer, the head) is one ``torch.compile``
graph with Inductor's C++ wrapper: the Python per op disappears. Its shapes are static: the
cache capacity is rounded up to ``CAPACITY_STEP`` slots and attention runs over all of them
with a mask (its cost is tiny next to the weights at these sizes).

Everything else (prompts, more than ``max_batch`` rows, a quantized KV cache, sliding windows)
goes to the wrapped runner unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from layercake.kv_cache import KVCache
from layercake.ops import kernels
from layercake.ops.blocks import Blocks
from layercake.ops.int4pack import Int4Linear, PackedInt4, PackedInt8, pack
from layercake.progress import on_new_shape
from layercake.quant import BLOCK_ELEMENTS, QTensor, QuantLinear, QuantSpec, dequantize, quantize
from layercake.runner import LocalRunner

FAMILIES = ("llama", "mistral", "qwen2")
CAPACITY_STEP = 256  # compiled steps: cache capacities are rounded up to this (fewer shapes)
_mm4 = torch.ops.aten._weight_int4pack_mm_for_cpu
BF16 = torch.bfloat16


@dataclass
class _Layer:
    index: int
    ln1: torch.Tensor
    ln2: torch.Tensor
    qkv: PackedInt4
    qkv_bias: torch.Tensor | None
    o: PackedInt4
    o_bias: torch.Tensor | None
    gate_up: PackedInt4
    gate_up_bias: torch.Tensor | None
    down: PackedInt4
    down_bias: torch.Tensor | None


def _mm(w: PackedInt4 | Blocks, x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T``: fp32 out of the block kernel; bf16 out of PyTorch's int4 kernel."""
    if isinstance(w, Blocks):
        return kernels.block_mm(x.float(), w.data, w.bits)
    return _mm4(x.to(BF16), w.data, w.group_size, w.sz)


def fuse(linears: list[Int4Linear]) -> tuple[PackedInt4 | Blocks, torch.Tensor | None]:
    """One weight computing every linear's outputs side by side (rows concatenated), and
    their biases so (None when none has one). Each linear is re-pointed at its rows of the fused
    data (a view: the kernels' rows are contiguous bytes), so the old bytes are freed."""
    ws = [m.weight for m in linears]
    data = torch.cat([w.data for w in ws])  # (sum N, ...): rows are contiguous bytes
    fused = replace(ws[0], data=data)
    if isinstance(fused, PackedInt4):
        fused.sz = torch.cat([w.sz for w in ws], dim=1)  # (groups, sum N, 2)
    r = 0
    for m, w in zip(linears, ws):
        n = w.data.shape[0]
        m.weight = replace(w, data=data[r : r + n])
        r += n
    biases = [m.bias for m in linears]
    bias = None
    if any(b is not None for b in biases):
        parts = [
            b if b is not None else torch.zeros(m.weight.shape[0]) for b, m in zip(biases, linears)
        ]
        bias = torch.cat([p.detach().float() for p in parts])
    return fused, bias


def unsupported(runner: Any) -> str | None:
    """Why ``runner`` cannot take the fast decode path (None when it can)."""
    if not isinstance(runner, LocalRunner) or len(runner.slices) != 1:
        return "not a single in-memory model"
    model, c = runner.slices[0], runner.config
    if c.model_type not in FAMILIES:
        return f"model type {c.model_type!r} (fast decoding covers {', '.join(FAMILIES)})"
    if runner.device.type != "cpu" or runner.dtype != torch.float32:
        return "not fp32 on the CPU"
    if (
        not (model.parts.embed and model.parts.head)
        or len(model.parts.layers) != c.num_hidden_layers
    ):
        return "not the whole model"
    if runner.cache_quant is not None:
        return "a quantized KV cache"
    for name, block in model.blocks().items():
        a, m = block.self_attn, block.mlp
        for group in ((a.q_proj, a.k_proj, a.v_proj), (a.o_proj,), (m.gate_proj, m.up_proj),
                      (m.down_proj,)):  # fmt: skip
            kinds = {
                type(lin.weight) if isinstance(lin, Int4Linear) else type(lin) for lin in group
            }
            if len(kinds) > 1 or not kinds <= {PackedInt4, Blocks}:
                names = ", ".join(sorted(k.__name__ for k in kinds))
                return f"layer {name} has {names} weights, not one packed kind"
    if not isinstance(model.lm_head, Int4Linear | QuantLinear):
        return f"the head is a {type(model.lm_head).__name__}, not packed"
    if isinstance(model.lm_head, QuantLinear) and model.lm_head.spec.bits != 8:
        return "the head is a 4-bit layer the int4 kernel does not take"
    return None


def _requantize_int4(q: QTensor, group: int) -> PackedInt4:
    """A quantized 2-D weight re-quantized to int4 groups and packed for the kernel, in row
    blocks (the fp32 transient stays small)."""
    N, K = q.shape
    spec = QuantSpec(4, group)
    rows = torch.empty(N, spec.row_bytes(K), dtype=torch.uint8)
    step = max(64, BLOCK_ELEMENTS // 16 // K)
    for r in range(0, N, step):
        n = min(step, N - r)
        quantize(dequantize(q.row_range(r, r + n)), 4, group).to_rows(rows[r : r + n])
    return PackedInt4.from_parts(*pack(QTensor.from_rows(rows, (N, K), spec)), spec)


def _rotation(head_dim: int) -> torch.Tensor:
    """R with ``x @ R = cat(-x[half:], x[:half])`` (rotate-half)."""
    h = head_dim // 2
    R = torch.zeros(head_dim, head_dim)
    idx = torch.arange(h)
    R[idx + h, idx] = -1.0
    R[idx, idx + h] = 1.0
    return R


class DecodeRunner:
    """A ``LocalRunner`` with packed weights whose one-token steps of 1..``max_batch`` rows run
    the lean path; every other call goes to the wrapped runner."""

    def __init__(
        self, runner: LocalRunner, compile: bool = False, max_batch: int = 8, head: str = "int8"
    ) -> None:
        """``head``: the form an 8-bit head (GGUF Q8_0) takes: "int8" per row or "int4" (groups
        of 32, re-quantized: 2x fewer bytes, more error)."""
        why = unsupported(runner)
        if why is not None:
            from layercake.errors import LayercakeError

            raise LayercakeError(f"packed fast decoding is not available here: {why}")
        self.base, self.max_batch, self.compiled = runner, max_batch, compile
        self.vocab_size, self.max_context, self.device = (
            runner.vocab_size, runner.max_context, runner.device,
        )  # fmt: skip
        model, c = runner.slices[0], runner.config
        self.n_heads, self.n_kv, self.head_dim = (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
        )
        self.hidden, self.eps = c.hidden_size, c.rms_norm_eps
        self.window = c.sliding_window
        if isinstance(model.lm_head, QuantLinear):  # GGUF Q8_0: into a form a kernel takes
            h = model.lm_head
            q = QTensor.from_rows(h.rows, (h.out_features, h.in_features), h.spec)
            if head == "int4":
                model.lm_head = Int4Linear(_requantize_int4(q, 32), h.bias)
            else:
                model.lm_head = Int4Linear(PackedInt8.from_quantized(q), h.bias)
        self.embed, self.head = model.model.embed_tokens, model.lm_head
        self.norm = model.model.norm.weight
        self.inv_freq = model.rotary.inv_freq
        self.rot = _rotation(self.head_dim)
        self.layers = []
        for name, block in model.blocks().items():
            a, m = block.self_attn, block.mlp
            qkv, qkv_b = fuse([a.q_proj, a.k_proj, a.v_proj])
            gu, gu_b = fuse([m.gate_proj, m.up_proj])
            ln1, ln2 = block.input_layernorm.weight, block.post_attention_layernorm.weight
            self.layers.append(
                _Layer(int(name), ln1, ln2, qkv, qkv_b, a.o_proj.weight, a.o_proj.bias,
                       gu, gu_b, m.down_proj.weight, m.down_proj.bias)
            )  # fmt: skip
        self.own_kernels = kernels.available()
        self._static = None
        if compile:
            self._static = torch.compile(
                self._forward, fullgraph=True, dynamic=False, options={"cpp_wrapper": True}
            )
            what = "compiling the decode step for {key[0]} rows (torch.compile, once per shape)"
            self._static = on_new_shape(self._static, lambda a: (len(a[0]), a[2].capacity), what)
        self._slot = torch.zeros(1, dtype=torch.long)

    def __getattr__(self, name: str) -> Any:  # slices, config, ...: the wrapped runner's
        return getattr(self.base, name)

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        if self._static is not None and batch <= self.max_batch:
            capacity = -(-capacity // CAPACITY_STEP) * CAPACITY_STEP
        return self.base.new_cache(batch, capacity)

    def forward(
        self,
        tokens: torch.Tensor,  # (B, T)
        positions: torch.Tensor,  # (B, T)
        cache: KVCache,
        token_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        B, T = tokens.shape
        if T != 1 or B > self.max_batch or not isinstance(cache.keys.get(0), torch.Tensor):
            return self.base.forward(tokens, positions, cache, token_mask, last_only)
        with torch.inference_mode():
            if self._static is not None and self.window is None:
                s = cache.length
                if s + 1 > cache.capacity:
                    raise ValueError(f"KV cache full: {s + 1} tokens > capacity {cache.capacity}")
                cache.valid[:, s] = True if token_mask is None else token_mask[:, 0]
                self._slot.fill_(s)
                out = self._static(tokens, positions, cache, self._slot, None)
                cache.length = s + 1
                return out
            if token_mask is None:
                token_mask = torch.ones(B, 1, dtype=torch.bool)
            step = cache.begin(token_mask)
            out = self._forward(tokens, positions, cache, step.start, step.mask)
            cache.advance(step)
            return out

    def _forward(
        self,
        tokens: torch.Tensor,  # (B, 1)
        positions: torch.Tensor,  # (B, 1)
        cache: KVCache,
        slot: int | torch.Tensor,  # the cache slot written: an int (eager) or a (1,) tensor
        mask: torch.Tensor | None,  # (B, 1, 1, slot + 1) bool (eager); None: built here
    ) -> torch.Tensor:
        B = tokens.shape[0]
        H, KV, hd, D = self.n_heads, self.n_kv, self.head_dim, self.hidden
        nq, nk = H * hd, KV * hd
        h = self.embed(tokens.view(B))  # (B, D)
        freqs = positions.view(B, 1).float() * self.inv_freq  # (B, hd/2)
        ang = torch.cat((freqs, freqs), dim=-1)  # (B, hd)
        compiled = mask is None
        if compiled:  # elementwise RoPE: the compiler fuses it into its neighbours
            cos, sin = ang.cos()[:, None], ang.sin()[:, None]  # (B, 1, hd)
        else:  # one op per layer instead of six
            rope = torch.diag_embed(ang.cos()) + self.rot * ang.sin()[:, None, :]  # (B, hd, hd)
        if compiled:  # static shapes: every slot, the unwritten ones masked off
            cap = cache.capacity
            idx = torch.arange(cap)
            mask = (cache.valid & (idx <= slot)) | (idx == slot)  # (B, cap)
            mask = mask.view(B, 1, 1, cap)
        for L in self.layers:
            kc, vc = cache.keys[L.index], cache.values[L.index]  # (B, KV, cap, hd)
            x = F.rms_norm(h, (D,), L.ln1, self.eps)
            qkv = _mm(L.qkv, x).float()  # (B, nq + 2 nk)
            if L.qkv_bias is not None:
                qkv = qkv + L.qkv_bias
            qk = qkv[:, : nq + nk].view(B, H + KV, hd)
            if compiled:
                half = hd // 2
                qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), -1) * sin
            else:
                qk = torch.bmm(qk, rope)  # (B, H + KV, hd)
            v = qkv[:, nq + nk :].view(B, KV, 1, hd)
            k = qk[:, H:].view(B, KV, 1, hd)
            if isinstance(slot, int):
                kc[:, :, slot : slot + 1].copy_(k)
                vc[:, :, slot : slot + 1].copy_(v)
                keys, values = kc[:, :, : slot + 1], vc[:, :, : slot + 1]
            else:
                kc.index_copy_(2, slot, k)
                vc.index_copy_(2, slot, v)
                keys, values = kc, vc
            if self.own_kernels:  # PyTorch's SDPA: ~60 us a call here, as much as the matmuls
                a = kernels.decode_attention(qk[:, :H], keys, values, mask, hd**-0.5)
            else:
                q = qk[:, :H].view(B, H, 1, hd)
                a = F.scaled_dot_product_attention(
                    q, keys, values, attn_mask=mask, enable_gqa=H != KV
                )
            y = _mm(L.o, a.reshape(B, nq))  # (B, D) bf16 or fp32
            h = h + y if L.o_bias is None else h + (y.float() + L.o_bias)
            x = F.rms_norm(h, (D,), L.ln2, self.eps)
            gu = _mm(L.gate_up, x)  # (B, 2 I) bf16 or fp32
            if L.gate_up_bias is not None:
                gu = (gu.float() + L.gate_up_bias).to(gu.dtype)
            n = gu.shape[1] // 2
            act = F.silu(gu[:, :n]) * gu[:, n:]
            y = _mm(L.down, act)  # (B, D) bf16 or fp32
            h = h + y if L.down_bias is None else h + (y.float() + L.down_bias)
        logits = self.head(F.rms_norm(h, (D,), self.norm, self.eps))  # (B, V)
        return logits.view(B, 1, -1)
