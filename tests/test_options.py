"""The options object: one for the CLI and for ``load(**kw)``, checked once."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch

import layercake
from layercake.cli import build_parser
from layercake.errors import LayercakeError
from layercake.options import Options
from layercake.quant import compression


def _engine_flags(command: str) -> set[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    parser = sub.choices[command]
    groups = [g for g in parser._action_groups if g.title in ("engine", "offloading",
              "pipeline", "compression")]  # fmt: skip
    return {a.dest for g in groups for a in g._group_actions} - {"model"}


@pytest.mark.parametrize("command", ["generate", "batch", "serve"])
def test_every_engine_flag_is_an_option(command):
    names = {f.name for f in fields(Options)}
    assert _engine_flags(command) <= names
    required = {"generate": ["--prompt", "x"], "batch": ["--input", "i", "--output", "o"]}
    flags = ["--device", "cpu", "--cpu-memory", "1GB", "--batch-size", "4", "--compress-cache",
             "--pass-tokens", "16"]  # fmt: skip
    a = build_parser().parse_args([command, *required.get(command, []), *flags])
    o = Options.from_args(a, max_sequences=3)
    assert (o.cpu_memory, o.batch_size, o.max_sequences, o.offloaded) == ("1GB", 4, 3, True)
    assert o.pass_tokens == 16
    assert o.compression == compression(False, True)


def test_unknown_and_conflicting_options(tiny_llama):
    with pytest.raises(LayercakeError, match="unknown option 'cpu_mem'; options are: parts"):
        layercake.load(tiny_llama, cpu_mem="1GB")
    with pytest.raises(LayercakeError, match="an Options or its keywords, not both"):
        layercake.load(tiny_llama, Options(), device="cpu")
    with pytest.raises(LayercakeError, match="--packed is for in-memory models"):
        Options(packed=True, percent=(0, 100, 100, 0, 100, 0))
    with pytest.raises(LayercakeError, match="not with --topology|do not combine with --topology"):
        Options(compress_cache=True, topology="t.json")
    with pytest.raises(LayercakeError, match="need --compress-weight"):
        Options(compress_bits=8)


def test_derived_values_and_compression_round_trip():
    o = Options(dtype="bf16", packed=True)
    assert (o.torch_device, o.torch_dtype) == (torch.device("cpu"), torch.bfloat16)
    assert o.compression == compression(True)  # packed holds weights compressed
    for c in (None, compression(True), compression(True, True, 8, 64), compression(False, True)):
        assert Options(percent=(0, 100, 100, 0, 100, 0)).with_compression(c).compression == c


def test_load_takes_an_options_object(tiny_llama):
    a = layercake.load(tiny_llama, Options(compress_weight=True, group_size=16))
    b = layercake.load(tiny_llama, compress_weight=True, group_size=16)
    ids = [[1, 5, 9, 3]]
    assert torch.equal(a.logits(ids), b.logits(ids))
    assert not torch.equal(a.logits(ids), layercake.load(tiny_llama).logits(ids))
