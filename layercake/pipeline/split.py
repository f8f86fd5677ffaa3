"""``layercake split``: each node's subset of a checkpoint, so every host receives only its layers;
and the model identity the handshake compares (the same for a model and its split parts).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from layercake.errors import LayercakeError

MARKER = "layercake-split.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "generation_config.json", "special_tokens_map.json")  # fmt: skip
SAMPLE = 64  # bytes hashed at each end of every tensor: cheap, and catches other weights


def model_id(path: str | os.PathLike) -> str:
    """A digest naming the model: config plus every tensor's name, dtype, shape and first and
    last bytes (HF directory), or the file's size and ends (GGUF). A split part carries the
    identity of the model it came from."""
    p = Path(path).expanduser()
    if (p / MARKER).is_file():
        return str(json.loads((p / MARKER).read_text())["model_id"])
    h = hashlib.sha256()
    if p.is_file():
        size = p.stat().st_size
        with open(p, "rb") as f:
            h.update(str(size).encode() + f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read())
        return h.hexdigest()
    from layercake.checkpoint.safetensors import SafetensorsCheckpoint

    ckpt = SafetensorsCheckpoint(p)
    h.update(json.dumps(ckpt.config_dict(), sort_keys=True).encode())
    for name in sorted(ckpt.weight_map):  # as stored (experts may be stacked)
        f = ckpt._file(name)
        e = f.entries[name]
        lo, hi = e["data_offsets"]
        h.update(f"{name}|{e['dtype']}|{e['shape']}".encode())
        with open(f.path, "rb") as fh:
            fh.seek(f.base + lo)
            h.update(fh.read(min(SAMPLE, hi - lo)))
            fh.seek(f.base + max(lo, hi - SAMPLE))
            h.update(fh.read(min(SAMPLE, hi - lo)))
    return h.hexdigest()


def node_tensors(ckpt: Any, config: Any, layers: str) -> list[str]:
    """The checkpoint tensors a node's slice reads (a tied head reads the embedding table)."""
    from layercake.models import family
    from layercake.models.parts import parse_parts

    fam = family(config.model_type)
    with torch.device("meta"):
        model = fam.Model(config, parse_parts(layers, config.num_hidden_layers))
    names = set(ckpt.tensor_names())
    out = []
    for name, _ in model.named_parameters():
        src = fam.Model.source_name(name, names)
        if src not in names:
            raise LayercakeError(f"the checkpoint has no tensor {name!r}")
        if src not in out:
            out.append(src)
    return out


def split_checkpoint(model: str | os.PathLike, topology: Any, out: str | os.PathLike
                     ) -> list[tuple[str, Path, int]]:  # fmt: skip
    """Write ``out/<node>/``: the node's tensors (one safetensors file, stored dtypes, bytes
    unchanged), config.json, the split marker, and the tokenizer for rank 0 (where the job runs).
    Returns (node, directory, bytes of tensors) per node."""
    from safetensors.torch import save_file

    from layercake.checkpoint import open_checkpoint
    from layercake.config import load_config
    from layercake.pipeline.topology import load_topology

    src = Path(model).expanduser()
    if not src.is_dir():
        raise LayercakeError(
            f"split needs a Hugging Face model directory (config.json + safetensors), not {src}"
        )
    ckpt = open_checkpoint(src)
    config = load_config(ckpt.config_dict())
    topo = load_topology(topology, config.num_hidden_layers)
    ident = model_id(src)
    dest = Path(out).expanduser()
    written = []
    for rank, node in enumerate(topo.nodes):
        d = dest / node.name
        d.mkdir(parents=True, exist_ok=True)
        names = node_tensors(ckpt, config, node.layers)
        tensors = {n: ckpt.load(n, ckpt.stored_dtype(n)).contiguous() for n in names}
        tmp = d / "model.safetensors.tmp"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, d / "model.safetensors")
        for stale in d.glob("model-*.safetensors"):
            stale.unlink()
        (d / "model.safetensors.index.json").unlink(missing_ok=True)
        shutil.copyfile(src / "config.json", d / "config.json")
        if rank == 0:
            for f in TOKENIZER_FILES:
                if (src / f).is_file():
                    shutil.copyfile(src / f, d / f)
        marker = {"model_id": ident, "node": node.name, "layers": node.layers,
                  "source": str(src)}  # fmt: skip
        (d / MARKER).write_text(json.dumps(marker, indent=1))
        written.append((node.name, d, sum(t.numel() * t.element_size() for t in tensors.values())))
        del tensors
    return written
