"""Joining a job: the handshake over rank 0's TCP store, then the gloo (and NCCL) process group.

Rank 0's address is the rendezvous: it hosts a ``TCPStore`` there, bound to that address only.
Every process writes a hello (name, layercake version, topology digest, model identity; JSON,
never pickle) under its own key, signed with the job's shared token (HMAC-SHA256 over the hello,
the generation and a nonce rank 0 draws for it: a hello read from the store cannot be replayed,
and one written without the token is dropped). Rank 0 compares each worker's hello with its own
and answers ``ok`` or the reason, and each worker checks rank 0's signature and hello itself, so
a mismatch is reported on both sides before any process group exists. Each node's address names
the interface its gloo device binds to (``netif``), and a worker holds its port for the life of
the process, so two workers given one address collide clearly. Gloo picks its own ports for the
data connections.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import hmac
import json
import os
import secrets
import socket
import sys
import time
from typing import Any

import torch.distributed as dist

from layercake.errors import LayercakeError
from layercake.pipeline.netif import gloo_interface, interface_of
from layercake.pipeline.topology import MIN_TOKEN, Node, Topology
from layercake.pipeline.transport import FOREVER, Transport

POLL = 0.1
TOKEN_ENV = "LAYERCAKE_PIPELINE_TOKEN"


def hold_address(node: Node) -> socket.socket:
    """Bind the node's own host:port (clear errors: port in use, not this machine's address)."""
    family = socket.AF_INET6 if ":" in node.host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a listener conflicts, TIME_WAIT not
    try:
        s.bind((node.host, node.port))
        s.listen(1)
    except OSError as e:
        s.close()
        if e.errno == errno.EADDRINUSE:
            raise LayercakeError(
                f"node {node.name}: port {node.port} on {node.host} is in use (another job or "
                "worker?): stop it, or give this node another port in the topology"
            ) from None
        if e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            raise LayercakeError(
                f"node {node.name}: {node.host} is not an address of this machine: run "
                f"'{node.name}' on the host the topology names, or correct its address"
            ) from None
        if isinstance(e, socket.gaierror):
            raise LayercakeError(f"node {node.name}: cannot resolve host {node.host!r}") from None
        raise LayercakeError(f"node {node.name}: cannot bind {node.address}: {e}") from None
    return s


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` ports free on ``host`` now (for topologies of processes on one machine)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind((host, 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def hello(topology: Topology, rank: int, model_id: str, model_path: str) -> dict[str, Any]:
    from layercake import __version__

    return {
        "name": topology.nodes[rank].name,
        "version": __version__,
        "topology": topology.digest(),
        "topology_file": topology.source,
        "model": model_id,
        "model_path": model_path,
    }


def mismatch(mine: dict[str, Any], theirs: dict[str, Any]) -> str | None:
    """Why two processes cannot run one job together (None when they can)."""
    a, b = mine.get("name"), theirs.get("name")
    if theirs.get("version") != mine.get("version"):
        return (f"layercake versions differ: {a} runs {mine.get('version')}, {b} runs "
                f"{theirs.get('version')}: install the same version on every node")  # fmt: skip
    if theirs.get("topology") != mine.get("topology"):
        return (f"topologies differ: {a} uses {mine.get('topology_file')} (digest "
                f"{str(mine.get('topology'))[:12]}), {b} uses {theirs.get('topology_file')} "
                f"(digest {str(theirs.get('topology'))[:12]}): give every node the same "
                "topology file")  # fmt: skip
    if theirs.get("model") != mine.get("model"):
        return (f"models differ: {a} loaded {mine.get('model_path')} (id "
                f"{str(mine.get('model'))[:12]}), {b} loaded {theirs.get('model_path')} (id "
                f"{str(theirs.get('model'))[:12]}): every node needs the same model (or its "
                "part written by `layercake split`)")  # fmt: skip
    return None


def job_token(topology: Topology, rank: int) -> str:
    """The job's shared secret: ``LAYERCAKE_PIPELINE_TOKEN``, else the topology's ``token``;
    rank 0 without either makes one and says how to hand it to the workers."""
    tok = os.environ.get(TOKEN_ENV) or topology.token
    if tok:
        if len(tok) < MIN_TOKEN:
            raise LayercakeError(f"{TOKEN_ENV} must be at least {MIN_TOKEN} characters")
        return tok
    name = topology.nodes[rank].name
    if rank > 0:
        raise LayercakeError(
            f"node {name}: no pipeline token: set {TOKEN_ENV} to the token the job's first node "
            f"printed (or put `token:` in {topology.source} on every node)"
        )
    tok = secrets.token_hex(16)
    print(f"layercake {name}: this job's token is {tok}: start the workers with "
          f"{TOKEN_ENV}={tok} (or put `token: {tok}` in the topology)", file=sys.stderr,
          flush=True)  # fmt: skip
    return tok


def _sign(token: str, *parts: str) -> str:
    return hmac.new(token.encode(), "\x00".join(parts).encode(), hashlib.sha256).hexdigest()


def _signed(doc: dict[str, Any], token: str, *context: str) -> str:
    body = json.dumps(doc, sort_keys=True)
    return json.dumps({"hello": body, "mac": _sign(token, *context, body)})


def _verify(store: dist.Store, key: str, token: str, *context: str) -> dict[str, Any] | None:
    """The hello under ``key`` if its MAC is right for ``token`` and ``context`` (None if not)."""
    doc = _read(store, key)
    body, mac = doc.get("hello"), doc.get("mac")
    if not isinstance(body, str) or not isinstance(mac, str):
        return None
    if not hmac.compare_digest(mac, _sign(token, *context, body)):
        return None
    try:
        hello = json.loads(body)
    except json.JSONDecodeError:
        return None
    return hello if isinstance(hello, dict) else None


def _read(store: dist.Store, key: str) -> dict[str, Any]:
    raw = store.get(key)
    if len(raw) > 65536:
        raise LayercakeError(f"handshake: {key} is oversized")
    try:
        doc = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LayercakeError(f"handshake: {key} is not a layercake hello") from None
    if not isinstance(doc, dict):
        raise LayercakeError(f"handshake: {key} is not a layercake hello")
    return doc


def _store(host: str, port: int, master: bool, timeout: float,
           listen: socket.socket | None = None) -> dist.TCPStore:  # fmt: skip
    """A store client, or (``listen``: a socket bound to rank 0's address) the server on that
    address only: TCPStore alone would listen on every interface."""
    fd = listen.detach() if listen is not None else None
    return dist.TCPStore(host, port, world_size=None, is_master=master,
                         timeout=datetime.timedelta(seconds=timeout), wait_for_workers=False,
                         master_listen_fd=fd)  # fmt: skip


def _process_group(topology: Topology, rank: int, store: dist.Store, timeout: float) -> None:
    """Join the group with gloo bound to the interface that owns this node's address."""
    node = topology.nodes[rank]
    interface = interface_of(node.host)
    if interface is None:
        raise LayercakeError(
            f"node {node.name}: {node.host} is not an address of this machine: run "
            f"'{node.name}' on the host the topology names, or correct its address"
        )
    print(f"layercake {node.name}: gloo bound to interface {interface} ({node.host})",
          file=sys.stderr, flush=True)  # fmt: skip
    cuda = sum(n.device.startswith("cuda") for n in topology.nodes) >= 2
    t = datetime.timedelta(seconds=timeout)
    n = len(topology.nodes)
    backend = "gloo"
    if cuda and node.device.startswith("cuda") and dist.is_nccl_available():
        import torch

        torch.cuda.set_device(torch.device(node.device))
        backend = "cpu:gloo,cuda:nccl"
    try:
        with gloo_interface(interface):
            dist.init_process_group(backend, store=store, rank=rank, world_size=n, timeout=t)
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        others = ", ".join(m.describe() for i, m in enumerate(topology.nodes) if i != rank)
        raise LayercakeError(
            f"node {node.name}: could not connect to {others} over {interface} ({node.host}): "
            f"is every node's address reachable from the others? ({first})"
        ) from None


def host_job(topology: Topology, model_id: str, model_path: str,
             store: dist.TCPStore | None = None) -> tuple[Transport, Any]:  # fmt: skip
    """Rank 0: serve the rendezvous on its own address, accept every worker whose hello carries
    the job's token (or explain why not), build the group. Returns the transport and the store,
    which lives as long as the runner: a ``reconnect`` starts the next generation of keys on it
    instead of binding the port again."""
    main = topology.nodes[0]
    token = job_token(topology, 0)
    if store is None:
        held = hold_address(main)  # the clear errors; the store serves on this socket
        try:
            store = _store(main.host, main.port, True, topology.connect_timeout, held)
        except (RuntimeError, OSError) as e:
            raise LayercakeError(
                f"node {main.name}: cannot listen on {main.address}: {e}"
            ) from None
    number = store.add("generation", 0) + 1
    gen, nonce = f"{number}/", secrets.token_hex(16)
    mine = hello(topology, 0, model_id, model_path)
    store.set(gen + "nonce", nonce)
    store.set(gen + "hello/" + main.name, _signed(mine, token, gen, nonce, main.name))
    store.add("generation", 1)  # workers read the generation, then its hello
    _accept(topology, store, token, gen, nonce, mine)
    _process_group(topology, 0, dist.PrefixStore(gen + "pg", store), topology.connect_timeout)
    return Transport(topology.nodes, 0, topology.timeout), store


def _accept(topology: Topology, store: dist.Store, token: str, gen: str, nonce: str,
            mine: dict[str, Any]) -> None:  # fmt: skip
    """Wait for every worker's signed hello; a hello without the token is dropped (and said),
    the worker's own may still come; a mismatch ends the start with both sides told why."""
    main, workers = topology.nodes[0], topology.nodes[1:]
    deadline = time.monotonic() + topology.connect_timeout
    waiting = {w.name for w in workers}
    problems: list[tuple[str, str]] = []
    forged: set[str] = set()
    while waiting:
        for w in sorted(waiting):
            key = gen + "hello/" + w
            if not store.check([key]):
                continue
            theirs = _verify(store, key, token, gen, nonce, w)
            if theirs is None or theirs.get("name") != w:
                store.delete_key(key)  # no answer: a worker with another token finds out itself
                if w not in forged:
                    print(f"layercake {main.name}: rejected a hello for {w} without this job's "
                          "token", file=sys.stderr, flush=True)  # fmt: skip
                forged.add(w)
                continue
            waiting.discard(w)
            why = mismatch(mine, theirs)
            store.set(gen + "verdict/" + w, why or "ok")
            if why:
                problems.append((w, f"node {w} rejected: {why}"))
        if problems:  # the rejected worker reads why before this process (and its store) ends
            for w, _ in problems:
                with contextlib.suppress(RuntimeError):
                    store.wait([gen + "seen/" + w], datetime.timedelta(seconds=5))
            raise LayercakeError("; ".join(msg for _, msg in problems))
        if waiting and time.monotonic() > deadline:
            late = [w for w in workers if w.name in waiting]
            names = ", ".join(w.describe() for w in late)
            bad = " (hellos without this job's token were rejected)" if forged & waiting else ""
            raise LayercakeError(
                f"{names} did not join within {topology.connect_timeout:.0f} s{bad}: start "
                f"`layercake worker --topology {topology.source} --name {late[0].name}` there "
                f"and check that it can reach {main.name} at {main.address}"
            )
        time.sleep(POLL)


def _connect(topology: Topology, me: Node, deadline: float | None) -> dist.TCPStore:
    main = topology.nodes[0]
    told = False
    while True:
        try:  # a plain connect first: the store's own failures log C++ stack traces
            socket.create_connection((main.host, main.port), timeout=2.0).close()
            return _store(main.host, main.port, False, 5.0)
        except (RuntimeError, OSError):
            if deadline is not None and time.monotonic() > deadline:
                raise LayercakeError(
                    f"node {me.name}: could not reach {main.name} at {main.address} in time: "
                    "is the job started there, and the address right?"
                ) from None
            if not told:
                print(f"layercake worker {me.name}: waiting for {main.name} at {main.address}",
                      file=sys.stderr, flush=True)  # fmt: skip
                told = True
            time.sleep(1.0)


def join_job(topology: Topology, rank: int, model_id: str, model_path: str,
             connect_timeout: float | None = None) -> tuple[Transport, Any]:  # fmt: skip
    """A worker: reach rank 0 (retrying until ``connect_timeout``, None = as long as it takes),
    exchange hellos for rank 0's current generation, and join the process group. Rank 0 gone
    or moved on to a newer generation meanwhile: start again."""
    me = topology.nodes[rank]
    deadline = None if connect_timeout is None else time.monotonic() + connect_timeout
    mine = hello(topology, rank, model_id, model_path)
    token = job_token(topology, rank)
    while True:
        store = _connect(topology, me, deadline)
        try:
            return _handshake(topology, rank, store, mine, token)
        except (RuntimeError, _Newer):  # the store went away or a new generation began
            time.sleep(POLL)


class _Newer(Exception):
    pass


def _handshake(topology: Topology, rank: int, store: dist.TCPStore, mine: dict[str, Any],
               token: str) -> tuple[Transport, Any]:  # fmt: skip
    main, me = topology.nodes[0], topology.nodes[rank]
    while store.add("generation", 0) == 0:  # rank 0 is between jobs
        time.sleep(POLL)
    number = store.add("generation", 0)
    gen = f"{number}/"
    nonce = store.get(gen + "nonce").decode(errors="replace")
    theirs = _verify(store, gen + "hello/" + main.name, token, gen, nonce, main.name)
    if theirs is None:
        raise LayercakeError(
            f"{main.name} at {main.address} does not hold this job's token: give every node "
            f"the same {TOKEN_ENV} (or `token:` in the topology)"
        )
    store.set(gen + "hello/" + me.name, _signed(mine, token, gen, nonce, me.name))
    why = mismatch(mine, theirs)
    while not store.check([gen + "verdict/" + me.name]):
        if store.add("generation", 0) != number:
            raise _Newer
        time.sleep(POLL)
    verdict = store.get(gen + "verdict/" + me.name).decode(errors="replace")
    store.delete_key(gen + "verdict/" + me.name)  # a rejoin waits for the next generation
    store.set(gen + "seen/" + me.name, "1")
    if why:
        raise LayercakeError(f"{main.name} rejected {me.name}: {why}")
    if verdict != "ok":
        raise LayercakeError(f"{main.name} rejected {me.name}: {verdict}")
    _process_group(topology, rank, dist.PrefixStore(gen + "pg", store), topology.connect_timeout)
    return Transport(topology.nodes, rank, topology.timeout), store


def leave_job() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # the peers may be gone already: nothing left to tidy
            pass


__all__ = ["FOREVER", "free_ports", "hold_address", "host_job", "join_job", "leave_job"]
