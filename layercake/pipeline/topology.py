"""The topology file: which node (host:port, device) holds which layers, and how the activations
travel between them. YAML or JSON; validation explains every mistake at once.

```yaml
model: ~/models/Llama-3.2-1B   # optional default; a node may name its own copy (`model:`)
timeout: 30                    # seconds a silent peer is waited for (default 30)
micro_batches: 2               # rows of a batch split so every stage works at once (default:
                               # the number of nodes; 1 when a stage is offloaded)
nodes:                         # the first node is where the job runs (rank 0)
  - name: main
    address: 127.0.0.1:29500   # rank 0's address is the rendezvous
    layers: "b 0-8"
  - name: pc2
    address: 192.168.1.12:29501
    device: cuda               # optional, default cpu
    layers: "8-16 e"
    cpu_memory: 8GiB           # optional budgets / policy: this node's stage is offloaded
```

The activation path visits the pieces of the model in order (embeddings, layer 0, ..., layer
L-1, head); consecutive pieces on one node form a segment that runs in one call. A node may hold
several ranges (``b 0-4 12-16 e``): its segments are visited in turn.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layercake.errors import LayercakeError
from layercake.models.parts import Parts, parse_parts

NODE_KEYS = {
    "name", "address", "device", "dtype", "layers", "model", "threads",
    "cpu_memory", "device_memory", "percent", "offload_dir", "batch_size", "num_batches",
    "max_context",
}  # fmt: skip
TOP_KEYS = {
    "nodes", "model", "timeout", "micro_batches", "connect_timeout", "token", "max_batch",
    "max_context", "wire_dtype", "resume_timeout", "prefill_chunks",
}  # fmt: skip
WIRE_DTYPES = ("float32", "bfloat16")
MIN_TOKEN = 16
BUDGET_KEYS = ("cpu_memory", "device_memory", "percent")
DEFAULT_TIMEOUT = 30.0


@dataclass(frozen=True)
class Node:
    name: str
    host: str
    port: int
    layers: str  # the part spec as written
    device: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)  # dtype, budgets, model, threads, ...

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def offloaded(self) -> bool:
        return any(self.options.get(k) is not None for k in BUDGET_KEYS)

    def describe(self) -> str:
        return f"{self.name} ({self.address})"


@dataclass(frozen=True)
class Segment:
    """Consecutive pieces of the model on one node, run in one call."""

    index: int  # position on the path
    rank: int
    parts: Parts


@dataclass
class Topology:
    nodes: list[Node]
    source: str  # the file, for messages
    model: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    connect_timeout: float = 60.0
    micro_batches: int | None = None
    token: str | None = None  # the shared secret of the handshake (never in the digest)
    max_batch: int = 1024  # per-job limits every frame is checked against before allocation
    max_context: int | None = None  # None: the model's
    wire_dtype: str | None = None  # hidden states between nodes (None: the compute dtype)
    prefill_chunks: int | None = None  # a prompt's tokens split this many ways (default 2 x nodes)
    resume_timeout: float = 0.0  # s a lost worker may take to come back (0: the job ends)
    path: list[Segment] = field(default_factory=list)  # set by ``check``
    num_layers: int = 0

    @property
    def chunks(self) -> int:
        """The pieces a prompt's tokens are split into (``prefill_chunks``, default 2 x nodes)."""
        return self.prefill_chunks or 2 * len(self.nodes)

    def rank(self, name: str) -> int:
        for r, n in enumerate(self.nodes):
            if n.name == name:
                return r
        names = ", ".join(n.name for n in self.nodes)
        raise LayercakeError(f"unknown node {name!r}: the topology {self.source} has {names}")

    def digest(self) -> str:
        """What every process of a job must agree on (model paths excluded: they are host-local)."""
        doc = {
            "nodes": [
                [n.name, n.host, n.port, n.layers, n.device,
                 {k: v for k, v in sorted(n.options.items()) if k != "model"}]
                for n in self.nodes
            ],
            "timeout": self.timeout,
            "micro_batches": self.micro_batches,
            "limits": [self.max_batch, self.max_context],
            "wire_dtype": self.wire_dtype,
            "prefill_chunks": self.prefill_chunks,
        }  # fmt: skip
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def check(self, num_layers: int) -> Topology:
        """Validate the layer ranges against a model of ``num_layers`` layers and build the path;
        every mistake is listed in one error."""
        errors, owner = _range_errors(self.nodes, num_layers)
        if errors:
            raise _invalid(self.source, errors)
        self.num_layers = num_layers
        self.path = _path(self.nodes, owner, num_layers)
        return self

    def segments(self, rank: int) -> list[Segment]:
        return [s for s in self.path if s.rank == rank]


def _range_errors(nodes: list[Node], num_layers: int) -> tuple[list[str], dict[Any, list[str]]]:
    errors: list[str] = []
    owner: dict[Any, list[str]] = {}  # piece ("b", layer index, "e") -> node names
    for n in nodes:
        if not n.layers:
            continue  # reported already
        try:
            p = parse_parts(n.layers, num_layers)
        except LayercakeError as e:
            errors.append(f"node {n.name!r}: {e}")
            continue
        for piece in (["b"] if p.embed else []) + list(p.layers) + (["e"] if p.head else []):
            owner.setdefault(piece, []).append(n.name)
    for piece, names in owner.items():
        if len(names) > 1:
            errors.append(f"{_piece_name(piece)} is held by more than one node: {', '.join(names)}")
    missing = [i for i in range(num_layers) if i not in owner]
    for a, b in Parts(False, tuple(missing), False).ranges():
        span = f"layer {a}" if b == a + 1 else f"layers {a}-{b} (half-open)"
        errors.append(f"{span} of the model's {num_layers} held by no node")
    for piece in ("b", "e"):
        if piece not in owner:
            errors.append(f"{_piece_name(piece)} held by no node (add '{piece}' to one)")
    return errors, owner


def _piece_name(piece: Any) -> str:
    return {"b": "the embeddings ('b')", "e": "the head ('e')"}.get(piece, f"layer {piece}")


def _path(nodes: list[Node], owner: dict[Any, list[str]], num_layers: int) -> list[Segment]:
    rank = {n.name: r for r, n in enumerate(nodes)}
    pieces = ["b", *range(num_layers), "e"]
    path: list[Segment] = []
    run: list[Any] = []
    for i, piece in enumerate(pieces):
        run.append(piece)
        nxt = pieces[i + 1] if i + 1 < len(pieces) else None
        if nxt is None or owner[nxt][0] != owner[piece][0]:
            parts = Parts("b" in run, tuple(x for x in run if isinstance(x, int)), "e" in run)
            path.append(Segment(len(path), rank[owner[piece][0]], parts))
            run = []
    return path


def _invalid(source: str, errors: list[str]) -> LayercakeError:
    lines = "\n  - ".join(errors)
    return LayercakeError(f"invalid topology {source}:\n  - {lines}")


def parse_address(text: Any) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``."""
    if not isinstance(text, str):
        raise ValueError(f"address {text!r} is not a string like 192.168.1.12:29501")
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address {text!r} is not host:port (e.g. 192.168.1.12:29501)")
    return host, int(port)


def read_document(path: Path) -> dict[str, Any]:
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise LayercakeError(
                f"{path}: YAML topology files need PyYAML (pip install pyyaml); or write it as JSON"
            ) from None
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise LayercakeError(f"{path}: not valid YAML ({e})") from None
    else:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise LayercakeError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise LayercakeError(f"{path}: the topology must be a mapping with a 'nodes' list")
    return doc


def load_topology(path: str | os.PathLike | Topology, num_layers: int | None = None) -> Topology:
    """Parse a topology file (JSON, or YAML by its .yaml/.yml suffix); with ``num_layers`` the
    ranges are validated too (else ``check`` does it once the model is known)."""
    if isinstance(path, Topology):
        return path if num_layers is None else path.check(num_layers)
    p = Path(path).expanduser()
    if not p.is_file():
        raise LayercakeError(f"topology file not found: {p}")
    return parse_topology(read_document(p), str(p), num_layers)


def parse_topology(doc: dict[str, Any], source: str = "<topology>",
                   num_layers: int | None = None) -> Topology:  # fmt: skip
    errors: list[str] = []
    for k in sorted(set(doc) - TOP_KEYS):
        errors.append(f"unknown key {k!r} (known: {', '.join(sorted(TOP_KEYS))})")
    raw = doc.get("nodes")
    if not isinstance(raw, list) or not raw:
        raise _invalid(source, errors + ["'nodes' must be a non-empty list of nodes"])
    names: dict[str, int] = {}
    addresses: dict[tuple[str, int], str] = {}
    nodes = [n for i, item in enumerate(raw) if (n := _node(i, item, names, addresses, errors))]
    top = _top_options(doc, errors)
    if num_layers is not None:  # every mistake at once: the file's and the ranges'
        errors += _range_errors(nodes, num_layers)[0]
    if errors:
        raise _invalid(source, errors)
    topo = Topology(nodes, source, doc.get("model"), **top)
    return topo if num_layers is None else topo.check(num_layers)


def _node(i: int, item: object, names: dict[str, int], addresses: dict[tuple[str, int], str],
          errors: list[str]) -> Node | None:  # fmt: skip
    """Node ``i`` of the file, its mistakes appended to ``errors`` (names and addresses seen so
    far, to find those used twice)."""
    where = f"node {i + 1}"
    if not isinstance(item, dict):
        errors.append(f"{where}: must be a mapping with name, address and layers")
        return None
    name = item.get("name")
    if not isinstance(name, str) or not name.strip():
        errors.append(f"{where}: needs a 'name'")
        name = f"#{i + 1}"
    else:
        where = f"node {name!r}"
        if name in names:
            errors.append(f"{where}: the name is used twice (nodes {names[name]} and {i + 1})")
        names[name] = i + 1
    for k in sorted(set(item) - NODE_KEYS):
        errors.append(f"{where}: unknown key {k!r} (known: {', '.join(sorted(NODE_KEYS))})")
    host, port = "", 0
    if "address" not in item:
        errors.append(f"{where}: needs an 'address' (host:port)")
    else:
        try:
            host, port = parse_address(item["address"])
        except ValueError as e:
            errors.append(f"{where}: {e}")
        else:
            if (host, port) in addresses:
                errors.append(
                    f"{where}: address {item['address']} is also node "
                    f"{addresses[host, port]!r}'s: each node needs its own host:port"
                )
            addresses[host, port] = name
    layers = item.get("layers")
    if isinstance(layers, list):
        layers = " ".join(map(str, layers))
    if not isinstance(layers, str) or not layers.strip():
        errors.append(f"{where}: needs 'layers', a part spec like 'b 0-8' or '8-16 e'")
        layers = ""
    device = item.get("device", "cpu")
    if not isinstance(device, str) or device.split(":")[0] not in ("cpu", "cuda", "mps"):
        errors.append(f"{where}: device {device!r} is not cpu, cuda, cuda:N or mps")
    options = {k: v for k, v in item.items() if k not in ("name", "address", "layers", "device")}
    errors += [f"{where}: {e}" for e in _check_options(options)]
    return Node(name, host, port, layers, str(device), options)


def _top_options(doc: dict[str, Any], errors: list[str]) -> dict[str, Any]:
    """The file's job-wide settings, checked (mistakes appended to ``errors``)."""
    top: dict[str, Any] = {}
    numbers = [("timeout", float), ("connect_timeout", float), ("micro_batches", int),
               ("max_batch", int), ("max_context", int), ("resume_timeout", float),
               ("prefill_chunks", int)]  # fmt: skip
    for key, kind in numbers:
        if key in doc:
            v = doc[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                errors.append(f"{key} must be a positive number, not {v!r}")
            elif kind is int and v != int(v):
                errors.append(f"{key} must be a whole number, not {v!r}")
            else:
                top[key] = kind(v)
    if "wire_dtype" in doc:
        if doc["wire_dtype"] not in WIRE_DTYPES:
            errors.append(f"wire_dtype must be one of {', '.join(WIRE_DTYPES)}, not "
                          f"{doc['wire_dtype']!r}")  # fmt: skip
        else:
            top["wire_dtype"] = doc["wire_dtype"]
    if "token" in doc:
        tok = doc["token"]
        if not isinstance(tok, str) or len(tok) < MIN_TOKEN:
            errors.append(f"token must be a string of at least {MIN_TOKEN} characters")
        else:
            top["token"] = tok
    if "model" in doc and not isinstance(doc["model"], str):
        errors.append(f"model must be a path, not {doc['model']!r}")
    return top


def _check_options(o: dict[str, Any]) -> list[str]:
    from layercake.offload.policy import parse_bytes

    errors = []
    for k in ("cpu_memory", "device_memory"):
        if o.get(k) is not None:
            try:
                parse_bytes(o[k])
            except LayercakeError as e:
                errors.append(f"{k}: {e}")
    if o.get("percent") is not None:
        pc = o["percent"]
        if (
            not isinstance(pc, list)
            or len(pc) != 6
            or not all(isinstance(x, (int, float)) and 0 <= x <= 100 for x in pc)
        ):
            errors.append("percent must be six numbers 0-100 (W_DEV W_CPU KV_DEV KV_CPU ACT_DEV "
                          f"ACT_CPU), not {pc!r}")  # fmt: skip
    for k in ("threads", "batch_size", "num_batches", "max_context"):
        v = o.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            errors.append(f"{k} must be a positive whole number, not {v!r}")
    for k in ("dtype", "model", "offload_dir"):
        if o.get(k) is not None and not isinstance(o[k], str):
            errors.append(f"{k} must be a string, not {o[k]!r}")
    return errors
