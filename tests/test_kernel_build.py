"""Whether layercake's CPU kernels build where they should, and what happens where they do not.

Not skipped with the kernels (unlike ``test_kernels.py``): on x86-64 Linux with AVX2/FMA/F16C
and a C++ compiler, a build that fails is a failure of the suite, not a silent skip."""

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
        "from layercake.ops.blocks import Blocks\n"
        "assert not kernels.available(); print(kernels.unavailable_reason())\n"
        "llm = layercake.load(packed=True); r = llm.runner\n"
        "assert not r.own_kernels and not isinstance(r.layers[0].qkv, Blocks)\n"
        "print(llm.generate(['Hi'], max_new_tokens=3, ignore_eos=True)[0].completion_tokens)\n"
    )
    env = {"LAYERCAKE_NO_KERNELS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["LAYERCAKE_NO_KERNELS", "is", "set", "3"]
