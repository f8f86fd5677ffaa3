"""A prompt's pass serves its activations from mappings of their own (``executor``): freed,
they go back to the system instead of leaving holes in glibc's heap that grow it past the plan."""

import ctypes
import sys

import pytest
import torch

from layercake.offload.executor import _libc, _mapped_allocations

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or _libc() is None, reason="glibc only"
)


class _Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
                .split()]  # fmt: skip


def _mapped_bytes() -> int:
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc without mallinfo2")
    libc.mallinfo2.restype = _Info
    return libc.mallinfo2().hblkhd


def _mapped_by(nbytes: int) -> int:
    before = _mapped_bytes()
    t = torch.empty(nbytes // 4)
    grew = _mapped_bytes() - before
    del t
    return grew


def test_prompt_pass_maps_its_tensors_and_steps_keep_the_heap():
    with _mapped_allocations(True):
        assert _mapped_by(4 << 20) >= 4 << 20
    assert _mapped_by(4 << 20) < 4 << 20  # after the pass: the heap's 32 MB threshold
    with _mapped_allocations(False):  # a one-token step
        assert _mapped_by(4 << 20) < 4 << 20
