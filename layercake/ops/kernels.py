"""layercake's own CPU kernels (``csrc/kernels.cpp``): built on first use, registered as
``torch.ops.layercake.*`` so that ``torch.compile`` graphs call them directly.

- ``block_mm``: matmul on int4/int8 weights held as blocks (see ``blocks``).
- ``decode_attention``: one query per row against a KV cache, skipping masked slots: at decode
  sizes PyTorch's SDPA costs about as much per call as a layer's matmuls (README, "Fast CPU
  decoding").
- ``decode_step``: a one-token step's RoPE, cache write and attention from fused q/k/v.
- ``silu_mul``: SwiGLU's ``silu(gate) * up`` from the fused gate|up output in one op.
- ``rms_norm``: RMSNorm in one op (two a layer in a one-token step).
- ``qk_norm_rope``: a prompt's q/k norms and RoPE in place in the fused q/k/v projections.
- ``bf16_mm``: fp32 activations times bf16 weights, widened in registers: an offloaded bf16
  layer needs no fp32 copy, and it outruns converting to fp32 and then MKL's GEMM (README,
  "Offloading").

Each op checks its arguments and raises a ``RuntimeError`` naming the op and the problem (wrong
dtype or device, mismatched shapes, no KV heads, a layout it cannot read) before it reads any
memory. Weights may start at any byte address (views into mapped files or staging buffers).

The C++ is compiled with the system compiler against the installed PyTorch (tens of seconds,
once: cached under ``$LAYERCAKE_CACHE`` or ``~/.cache/layercake``, in ``kernels/``, keyed by
the source and the PyTorch version). Where it cannot be (``unsupported()``: not x86-64 Linux, no
AVX2/FMA/F16C, no compiler, ``LAYERCAKE_NO_KERNELS`` set), ``available()`` is False,
``unavailable_reason()`` says why, and callers keep PyTorch's kernels. Where it can be, a failed
build is reported the same way (and fails the test suite: ``tests/test_kernel_build.py``).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from layercake.progress import waiting

SOURCE = Path(__file__).parent / "csrc" / "kernels.cpp"
SOURCES = (SOURCE, SOURCE.with_name("amx.cpp"))  # amx.cpp: AMX code under its own target only
CPU_FLAGS = ("avx2", "fma", "f16c")


def cache_dir() -> Path:
    root = os.environ.get("LAYERCAKE_CACHE") or Path.home() / ".cache" / "layercake"
    return Path(root) / "kernels"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


# -ffp-contract=off: no compiler fuses a multiply and an add the source keeps apart (GCC's ISO
# mode does not, clang's default does), so every row count and instruction set sums in the order
# the source gives, bit for bit, whichever compiler builds the kernels
FLAGS = ("-O3", "-std=c++17", "-ffp-contract=off", "-shared", "-fPIC", "-fopenmp", "-mavx2",
         "-mfma", "-mf16c")  # fmt: skip


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def unsupported() -> str | None:
    """Why the kernels cannot be built on this machine (None: they should build). A build that
    fails where this is None is a bug, not a missing feature."""
    if os.environ.get("LAYERCAKE_NO_KERNELS"):
        return "LAYERCAKE_NO_KERNELS is set"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"{platform.system()} {platform.machine()} (the kernels are for x86-64 Linux)"
    missing = [f for f in CPU_FLAGS if f not in _cpu_flags()]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    if _compiler() is None:
        return "no C++ compiler (c++ / g++ on PATH, or $CXX)"
    return None


@functools.cache  # read once: what a process has mapped stays mapped
def _cxx_runtime() -> tuple[str, ...]:
    """The C++ runtime this process already runs (PyTorch loaded it), to link by its path. A
    toolchain whose g++ finds only ``libstdc++.a`` (seen on a GPU machine) otherwise links a
    private copy into the kernels, and a ``TORCH_CHECK`` then throws across two runtimes: its
    message came back empty here and the process segfaulted there."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and "/libstdc++.so" in fields[5]:
                    return (fields[5].strip(),)
    except OSError:
        pass
    return ()


def _build(target: Path, extra_flags: tuple[str, ...] = ()) -> None:
    """Compile ``SOURCE`` into ``target`` (``extra_flags``: e.g. a sanitizer, for tests)."""
    from torch.utils import cpp_extension

    cxx = _compiler()
    assert cxx is not None  # unsupported() said so before
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [cxx, *FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *extra_flags, *map(str, SOURCES)]
    cmd += _cxx_runtime()
    cmd += [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = cpp_extension.library_paths()
    cmd += [f"-L{p}" for p in libs] + [f"-Wl,-rpath,{p}" for p in libs]
    cmd += ["-lc10", "-ltorch_cpu"]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        with waiting(f"compiling the CPU kernels (once; cached in {target.parent})"):
            r = subprocess.run([*cmd, "-o", str(out)], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"compiling {SOURCE.name} failed:\n{r.stderr[-2000:]}")
        os.replace(out, target)  # atomic: concurrent builders each publish a whole file
    for old in target.parent.glob("kernels-*.so"):  # builds of other sources / PyTorch versions
        if old != target:
            old.unlink(missing_ok=True)


def _fake_block_mm(x: torch.Tensor, w: torch.Tensor, bits: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


def _fake_attention(q, k, v, mask, scale: float) -> torch.Tensor:
    return torch.empty_like(q)


def _fake_bf16_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


def _fake_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.empty_like(x)


def _fake_decode_step(qkv, cos, sin, cache_k, cache_v, slot: int, mask, scale: float, H: int):
    return qkv.new_empty(qkv.shape[0], H * cache_k.shape[-1])


def _fake_silu_mul(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


def _fake_bf16_mm_out(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> None:
    return None


def _fake_qk_norm_rope(qkv, qw, kw, eps: float, cos, sin, H: int, KV: int) -> None:
    return None


_STATE: list[str | None] = []  # _load's answer once it has run


def _load() -> str | None:
    """Build (once) and register the kernels; None when they work, else why not. The answer is
    kept in a plain list, which a compiled graph reads as a constant (torch.compile would trace
    into a functools.cache'd builder and fail on its file reads)."""
    if not _STATE:
        _STATE.append(_build_and_register())
    return _STATE[0]


def _build_and_register() -> str | None:
    why = unsupported()
    if why is not None:
        return why
    code = b"".join(s.read_bytes() for s in SOURCES)
    build = " ".join([torch.__version__, str(_compiler()), *FLAGS, *_cxx_runtime()]).encode()
    key = hashlib.sha256(code + build).hexdigest()[:16]
    target = cache_dir() / f"kernels-{key}.so"
    try:
        if not target.is_file():
            _build(target)
        torch.ops.load_library(str(target))
    except (RuntimeError, OSError) as e:
        first = str(e).splitlines()[0]
        print(f"layercake: CPU kernels unavailable ({first}); using PyTorch's", file=sys.stderr)
        return str(e)
    torch.library.register_fake("layercake::block_mm")(_fake_block_mm)
    torch.library.register_fake("layercake::decode_attention")(_fake_attention)
    torch.library.register_fake("layercake::bf16_mm")(_fake_bf16_mm)
    torch.library.register_fake("layercake::bf16_mm_out")(_fake_bf16_mm_out)
    torch.library.register_fake("layercake::rms_norm")(_fake_rms_norm)
    torch.library.register_fake("layercake::silu_mul")(_fake_silu_mul)
    torch.library.register_fake("layercake::decode_step")(_fake_decode_step)
    torch.library.register_fake("layercake::amx_bf16x3_mm")(_fake_bf16_mm)
    torch.library.register_fake("layercake::amx_bf16x3_mm_out")(_fake_bf16_mm_out)
    torch.library.register_fake("layercake::qk_norm_rope")(_fake_qk_norm_rope)
    for name in OPS:  # every op looked up now: a compiled graph never sees _OPS change
        _OPS[name] = getattr(torch.ops.layercake, name).default
    return None


def unavailable_reason() -> str | None:
    return _load()


def available() -> bool:
    return _load() is None


def eager_cpu_fp32(x: torch.Tensor) -> bool:
    """Whether an elementwise op on ``x`` runs on our kernels: fp32 on the CPU, kernels built,
    not inside a compiled graph (Inductor fuses such ops itself)."""
    return (
        x.dtype == torch.float32 and x.is_cpu and available() and not torch.compiler.is_compiling()
    )


def require() -> None:
    why = _load()
    if why is not None:
        raise RuntimeError(f"layercake's CPU kernels are not available: {why}")


OPS = ("block_mm", "decode_attention", "bf16_mm", "bf16_mm_out", "rms_norm", "silu_mul",
       "decode_step", "qk_norm_rope", "amx_available", "amx_bf16x3_mm",
       "amx_bf16x3_mm_out")  # fmt: skip
_OPS: dict = {}  # name -> torch.ops.layercake.<name>.default, filled when the kernels load


def _op(name: str):
    """The registered op ``torch.ops.layercake.<name>.default`` (built and loaded first if need
    be); looked up once: a one-token step calls these hundreds of times. All are looked up when
    the kernels load, so a graph compiled after that reads a dict that never changes (filling it
    while the first graph compiled changed its guards: it compiled again on its second call)."""
    op = _OPS.get(name)
    if op is None:
        require()
        op = _OPS[name]
    return op


def block_mm(x: torch.Tensor, w: torch.Tensor, bits: int) -> torch.Tensor:
    """``x (M, K) fp32 @ W.T`` for W held as blocks ``w`` (N, K / 32 * block bytes) uint8."""
    return _op("block_mm")(x, w, bits)


def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """q (B, H, D) against keys/values (B, KV, S, D) where ``mask`` (B, S) is True -> (B, H, D).

    H must be a multiple of KV (GQA; KV >= 1); keys and values need unit stride in D (views of a
    longer cache are fine); any D. A row with every slot masked gets zeros, as SDPA gives for a
    bool mask (not the NaN of a softmax over nothing): a padding or free row stays finite."""
    return _op("decode_attention")(q, keys, values, mask, scale)


def bf16_mm(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x (M, K) fp32 @ W.T`` for W (N, K) bf16, in fp32; into ``out`` (M, N) when given, which
    may be a range of columns of a wider tensor (unit column stride)."""
    if out is None:
        return _op("bf16_mm")(x, w)
    _op("bf16_mm_out")(x, w, out)
    return out


def decode_step(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    slot: int,
    mask: torch.Tensor,
    scale: float,
    heads: int,
) -> torch.Tensor:
    """A one-token step's attention from fused projections ``qkv`` (B, (H + 2 KV) D): q and k
    rotated by rotate-half RoPE (``cos``/``sin``: B * D values), k and v written into slot
    ``slot`` of the caches (B, KV, capacity, D), q attending over slots [0, slot] where ``mask``
    (B * (slot + 1) values) allows, as ``decode_attention``. Returns (B, H * D)."""
    return _op("decode_step")(qkv, cos, sin, cache_k, cache_v, slot, mask, scale, heads)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU's product for fp32 ``x`` (.., 2 I) holding gate | up: ``silu(gate) * up`` (.., I)."""
    return _op("silu_mul")(x)


def qk_norm_rope(
    qkv: torch.Tensor,
    qw: torch.Tensor,
    kw: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    kv_heads: int,
) -> None:
    """In place on contiguous fp32 ``qkv`` (.., (H + 2 KV) D) (q, k, v of each row): q and k
    through their RMS norms (weights ``qw``, ``kw`` of the projection's or one head's length;
    empty: no norm), then rotate-half RoPE (``cos``/``sin``: one D row per qkv row), with the
    values of ``rms_norm`` and PyTorch's ``x * cos + rotated * sin`` bit for bit, and none of
    their temporaries (a prompt's pass)."""
    _op("qk_norm_rope")(qkv, qw, kw, eps, cos, sin, heads, kv_heads)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of fp32 ``x`` (.., D) with fp32 weight ``w`` (D,), as one op (PyTorch's CPU
    ``rms_norm`` is a composite of five ops and their temporaries)."""
    return _op("rms_norm")(x, w, eps)


def amx() -> bool:
    """Whether ``bf16x3_mm`` runs here: the kernels built, a CPU with AMX-BF16 whose OS lets
    this process use the tiles, and ``LAYERCAKE_NO_AMX`` unset."""
    if not _AMX:
        ok = available() and not os.environ.get("LAYERCAKE_NO_AMX")
        _AMX.append(bool(ok and _op("amx_available")()))
    return _AMX[0]


_AMX: list[bool] = []  # amx()'s answer once asked (a plain list: see _STATE)
# rows of activations from which ``bf16_linear`` multiplies on AMX tiles (below, one pass of
# ``bf16_mm`` over the weights is as fast: the tiles take 16 rows at a time; README)
AMX_ROWS = 2


def bf16x3_mm(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x (M, K) fp32 @ W.T`` for W (N, K) bf16 on AMX tiles (``amx()`` must be True): x split
    exactly into three bf16 parts, so the products are an fp32 GEMM's (``csrc/amx.cpp``)."""
    if out is None:
        return _op("amx_bf16x3_mm")(x, w)
    _op("amx_bf16x3_mm_out")(x, w, out)
    return out


def bf16_linear(
    x: torch.Tensor,
    weight: torch.Tensor | list[torch.Tensor],
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T + b`` in fp32 for W (N, K) bf16, or W given as a list of row blocks in order
    (each multiplied into its columns of the output); into ``out`` (.., N) when given. From
    ``AMX_ROWS`` rows on where ``amx()``, on AMX tiles (``bf16x3_mm``), else ``bf16_mm``."""
    parts = weight if isinstance(weight, list) else [weight]
    x2 = x.reshape(-1, x.shape[-1]).float()
    mm = bf16x3_mm if x2.shape[0] >= AMX_ROWS and amx() else bf16_mm
    if out is None and len(parts) == 1:
        y = mm(x2, parts[0])
    else:
        n = sum(w.shape[0] for w in parts)
        y = x2.new_empty(x2.shape[0], n) if out is None else out.view(-1, n)
        col = 0
        for w in parts:
            mm(x2, w, out=y[:, col : col + w.shape[0]])
            col += w.shape[0]
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], y.shape[-1])
