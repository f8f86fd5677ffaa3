"""``serve``'s default thread count leaves a core to the server's event loop."""

from __future__ import annotations

import argparse

import pytest
import torch

from layercake.cli import serve_threads


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def ns(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"threads": None, "device": "cpu", "verbose": False, **kw})


def test_serve_leaves_a_core_to_the_server(two_threads) -> None:
    a = ns()
    serve_threads(a)
    assert a.threads == 1


def test_serve_threads_keeps_what_the_user_chose(two_threads) -> None:
    a = ns(threads=2)
    serve_threads(a)
    assert a.threads == 2
    b = ns(device="cuda")
    serve_threads(b)
    assert b.threads is None


def test_serve_threads_never_below_one() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = ns()
        serve_threads(a)
        assert a.threads is None  # torch's own choice, one thread
    finally:
        torch.set_num_threads(before)
