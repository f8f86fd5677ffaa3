"""A prompt's pass serves its activations from mappings of their own (``executor``): freed,
they go back to the system instead of leaving holes in glibc's heap that grow it past the plan."""

import ctypes
import sys

import pytest
import torch

from layercake.offload.executor import _mapped_allocations, glibc

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or glibc() is None, reason="glibc only"
)


class _Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
                .split()]  # fmt: skip


def _info() -> _Info:
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc without mallinfo2")
    libc.mallinfo2.restype = _Info
    return libc.mallinfo2()


def _mapped_by() -> bool:
    """Whether a tensor larger than every free chunk of the heap (which glibc would serve it
    from, whatever the threshold) and under 32 MB gets a mapping of its own."""
    info = _info()
    nbytes = max(2 << 20, info.fordblks + (1 << 20))
    if nbytes >= 30 << 20:
        pytest.skip("the heap holds too much free memory for the check")
    t = torch.empty(nbytes // 4)
    mapped = _info().hblkhd - info.hblkhd >= nbytes
    del t
    return mapped


def test_prompt_pass_maps_its_tensors_and_steps_keep_the_heap():
    with _mapped_allocations(True):
        assert _mapped_by()
    assert not _mapped_by()  # after the pass: the heap's 32 MB threshold
    with _mapped_allocations(False):  # a one-token step
        assert not _mapped_by()
