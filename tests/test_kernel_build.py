"""Whether layercake's CPU kernels build where they should, and what happens where they do not.

Not skipped with the kernels (unlike ``test_kernels.py``): on x86-64 Linux with AVX2/FMA/F16C
and a C++ compiler, a build that fails is a failure of the suite, not a silent skip."""

import os
import subprocess
import sys

import pytest

from layercake.ops import kernels


def test_the_kernels_build_where_supported():
    why = kernels.unsupported()
    if why is not None:
        pytest.skip(f"the kernels are not built here: {why}")
    assert kernels.available(), (
        f"this machine can build the CPU kernels but the build failed: "
        f"{kernels.unavailable_reason()}"
    )


def test_every_op_is_looked_up_when_the_kernels_load():
    """``kernels._OPS`` is filled when the kernels load, not while a graph compiles: a compiled
    step guards on it, and a dict that changed under the first compile made it compile twice
    (serve's warm-up then needed a second step per graph). Every op the C++ defines is in
    ``OPS``."""
    if not kernels.available():
        pytest.skip(f"no CPU kernels here: {kernels.unavailable_reason()}")
    import re

    code = "".join(s.read_text() for s in kernels.SOURCES)
    registered = set(re.findall(r'm\.def\("(\w+)\(', code))
    assert registered == set(kernels.OPS)
    assert set(kernels._OPS) == registered


def test_unsupported_says_why(monkeypatch):
    monkeypatch.setenv("LAYERCAKE_NO_KERNELS", "1")
    assert kernels.unsupported() == "LAYERCAKE_NO_KERNELS is set"
    monkeypatch.delenv("LAYERCAKE_NO_KERNELS")
    monkeypatch.setattr(kernels.platform, "system", lambda: "Linux")
    monkeypatch.setattr(kernels.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: {"avx2", "fma", "f16c"})
    monkeypatch.setattr(kernels, "_compiler", lambda: "/usr/bin/c++")
    assert kernels.unsupported() is None
    monkeypatch.setattr(kernels, "_compiler", lambda: None)
    assert "no C++ compiler" in kernels.unsupported()
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: {"avx2"})
    assert kernels.unsupported() == "the CPU lacks fma, f16c"
    monkeypatch.setattr(kernels.platform, "machine", lambda: "aarch64")
    assert "x86-64 Linux" in kernels.unsupported()


def test_a_failed_build_says_why_and_falls_back(tmp_path):
    why = kernels.unsupported()
    if why is not None and "compiler" not in why:  # (the test brings its own "compiler")
        pytest.skip(f"no build is tried here: {why}")
    code = "from layercake.ops import kernels as k; print(k.available(), k.unavailable_reason())"
    env = {"CXX": "/nonexistent/c++", "LAYERCAKE_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("False") and "/nonexistent/c++" in r.stdout
    assert "CPU kernels unavailable" in r.stderr and "using PyTorch's" in r.stderr


def test_unavailable_kernels_fall_back(tmp_path):
    """With the kernels switched off, --packed runs on PyTorch's int4 kernel and SDPA."""
    code = (
        "from layercake.ops import kernels; import layercake, sys\n"
        "from layercake.ops.linear import forms\n"
        "assert not kernels.available(); print(kernels.unavailable_reason())\n"
        "llm = layercake.load(packed=True); f = forms(llm.runner.slices[0])\n"
        "assert 'blocks' not in f and f['int4pack'] > 0, f\n"
        "print(llm.generate(['Hi'], max_new_tokens=3, ignore_eos=True)[0].completion_tokens)\n"
    )
    env = {"LAYERCAKE_NO_KERNELS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["LAYERCAKE_NO_KERNELS", "is", "set", "3"]


UBSAN_CASES = """
import sys, torch
torch.ops.load_library(sys.argv[1])
from layercake.ops.blocks import to_blocks
from layercake.quant import quantize
L = torch.ops.layercake
for bits, K in ((4, 576), (4, 96), (8, 320)):
    blocks = to_blocks(quantize(torch.randn(8, K), bits, 32))
    odd = torch.empty(blocks.numel() + 1, dtype=torch.uint8)[1:].view(blocks.shape)
    odd.copy_(blocks)
    x = torch.randn(5, K)
    assert torch.equal(L.block_mm(x, odd, bits), L.block_mm(x, blocks, bits))
w = torch.randn(8, 1030).bfloat16()
w1 = torch.frombuffer(bytearray(w.numel() * 2 + 1), dtype=torch.bfloat16, offset=1,
                      count=w.numel()).view_as(w)
w1.copy_(w)
x = torch.randn(5, 1030)
assert torch.equal(L.bf16_mm(x, w1), L.bf16_mm(x, w))
q, k, mask = torch.randn(2, 4, 12), torch.randn(2, 2, 9, 12), torch.rand(2, 9) < 0.5
L.decode_attention(q, k, k, mask, 0.3)
print("clean")
"""


@pytest.mark.slow
def test_weights_at_odd_addresses_are_clean_under_ubsan(tmp_path):
    """Built with UBSan, the kernels run weights at odd byte addresses without a report: on x86
    a misaligned ``uint16_t`` load works anyway, so only the sanitizer can see one."""
    why = kernels.unsupported()
    if why is not None:
        pytest.skip(f"the kernels are not built here: {why}")
    cxx = kernels._compiler()
    runtime = subprocess.run([cxx, "-print-file-name=libubsan.so"], capture_output=True, text=True)
    lib = os.path.realpath(runtime.stdout.strip())
    if not os.path.isfile(lib):
        pytest.skip(f"{cxx} has no UBSan runtime")
    target = tmp_path / "kernels-ubsan.so"
    kernels._build(target, ("-fsanitize=alignment,undefined", "-fno-sanitize-recover=all"))
    env = {**os.environ, "LD_PRELOAD": lib}
    r = subprocess.run([sys.executable, "-c", UBSAN_CASES, str(target)], env=env,
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip() == "clean", r.stderr[-3000:]


def _needed(path) -> list[str]:
    """The shared libraries an ELF file names (``readelf -d``); skips where binutils is absent."""
    try:
        r = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no readelf here")
    return [line.split("[")[1].rstrip("]") for line in r.stdout.splitlines() if "(NEEDED)" in line]


def test_the_kernels_share_the_processes_cxx_runtime():
    """The built kernels name the shared ``libstdc++.so.6`` PyTorch runs on, never a private
    static copy: on a GPU machine whose g++ found only ``libstdc++.a``, every ``TORCH_CHECK``
    from the kernels segfaulted the process (or lost its message)."""
    if not kernels.available():
        pytest.skip(f"no CPU kernels here: {kernels.unavailable_reason()}")
    assert kernels._cxx_runtime(), "this process has no libstdc++ mapped"
    built = sorted(kernels.cache_dir().glob("kernels-*.so"))
    assert built and any(n.startswith("libstdc++.so") for n in _needed(built[-1]))


BAD_SHAPES = """
import sys, torch
torch.ops.load_library(sys.argv[1])
try:
    torch.ops.layercake.bf16_mm(torch.zeros(1, 8), torch.zeros(4, 9, dtype=torch.bfloat16))
except RuntimeError as e:
    print(str(e).splitlines()[0])
"""


@pytest.mark.slow
def test_a_static_libstdcxx_toolchain_still_links_the_shared_runtime(tmp_path):
    """``-static-libstdc++`` stands in for a toolchain that has only ``libstdc++.a``: the build
    still links the process's shared runtime, and an error raised in the kernels reaches Python
    whole (with a static copy its message came back as ``bf16_mm: `` here)."""
    why = kernels.unsupported()
    if why is not None:
        pytest.skip(f"the kernels are not built here: {why}")
    target = tmp_path / "kernels-static.so"
    kernels._build(target, ("-static-libstdc++",))
    assert any(n.startswith("libstdc++.so") for n in _needed(target))
    r = subprocess.run([sys.executable, "-c", BAD_SHAPES, str(target)], capture_output=True,
                       text=True)  # fmt: skip
    assert (
        r.returncode == 0 and r.stdout.strip() == "bf16_mm: shapes do not match: x [1, 8], w [4, 9]"
    ), r.stderr[-2000:]
