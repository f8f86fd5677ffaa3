"""The rendezvous and the frames as a hostile peer meets them: the store listens on rank 0's
address only; a hello needs the job's token (read hellos cannot be replayed); a peer that knows
the token but sends frames beyond the job's limits is refused with a log line, and the worker
lives on to serve the next job."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time

import pytest
import torch
import torch.distributed as dist
from conftest import LLAMA_TINY, make_hf_checkpoint
from test_pipeline import log_of, topology, workers

import layercake
from layercake.errors import LayercakeError
from layercake.pipeline.rendezvous import _store, hold_address, host_job, leave_job
from layercake.pipeline.topology import load_topology
from layercake.pipeline.transport import HEADER, MAGIC, Kind


@pytest.fixture(scope="module")
def llama5(tmp_path_factory):
    cfg = dict(LLAMA_TINY, num_hidden_layers=5)
    return make_hf_checkpoint(tmp_path_factory.mktemp("llama5"), "llama", seed=3, **cfg)


def test_store_listens_on_rank_0s_address_only(tmp_path):
    topo = load_topology(topology(tmp_path, ["b 0-2 e", "2-5"]))
    main = topo.nodes[0]
    store = _store(main.host, main.port, True, 5.0, hold_address(main))
    socket.create_connection(("127.0.0.1", main.port), timeout=2).close()
    with pytest.raises(ConnectionRefusedError):  # another address of this machine: nobody there
        socket.create_connection(("127.0.0.2", main.port), timeout=2).close()
    del store


def test_hellos_need_the_token(tmp_path, llama5, capfd):
    """Someone who can reach the store reads rank 0's hello and posts it as pc2's (and renamed):
    both are dropped, and the real pc2, holding the token, joins after them."""
    topo = topology(tmp_path, ["b 0-2 e", "2-5"], connect_timeout=30)
    port = load_topology(topo).nodes[0].port
    loaded: list = []
    rank0 = threading.Thread(target=lambda: loaded.append(layercake.load(llama5, topology=topo)))
    rank0.start()
    try:
        client = None
        while client is None:
            try:
                client = dist.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False)
            except RuntimeError:
                time.sleep(0.1)
        client.wait(["1/hello/main"])
        theirs = client.get("1/hello/main")
        client.set("1/hello/pc2", theirs)
        _until_dropped(client, "1/hello/pc2")
        doc = json.loads(theirs)
        client.set("1/hello/pc2", json.dumps({"hello": doc["hello"].replace("main", "pc2"),
                                               "mac": doc["mac"]}))  # fmt: skip
        _until_dropped(client, "1/hello/pc2")
        with workers(topo, llama5, ["pc2"], "--once"):
            rank0.join(60)
            llm = loaded[0]
            assert len(llm.generate([[1, 2, 3]], max_new_tokens=2)[0].token_ids) == 2
            llm.close()
    finally:
        rank0.join(60)
    assert "rejected a hello for pc2 without this job's token" in capfd.readouterr().err


def _until_dropped(client: dist.TCPStore, key: str) -> None:
    deadline = time.monotonic() + 20
    while client.check([key]):
        assert time.monotonic() < deadline, f"rank 0 accepted the forged {key}"
        time.sleep(0.05)


def test_workers_without_the_token_are_told_why(tmp_path, llama5):
    from layercake.cli import main

    topo = topology(tmp_path, ["b 0-2 e", "2-5"], connect_timeout=15)
    doc = json.loads(topo.read_text())
    bare, other = tmp_path / "bare.json", tmp_path / "other.json"
    bare.write_text(json.dumps({k: v for k, v in doc.items() if k != "token"}))
    other.write_text(json.dumps(dict(doc, token="another-token-0123456789")))
    args = ["worker", "--topology", str(bare), "--name", "pc2", "--model", str(llama5)]
    assert main(args) == 2  # no token anywhere: says where to put one
    with workers(other, llama5, ["pc2"], "--once") as procs:  # the same job, another token
        with pytest.raises(LayercakeError, match="did not join within 15 s"):
            layercake.load(llama5, topology=topo)
        assert procs[0].wait(20) == 2
        assert "main at 127.0.0.1" in log_of(procs[0])
        assert "does not hold this job's token" in log_of(procs[0])


def _raw_header(kind: Kind, args: tuple[int, ...], shapes: list[tuple[int, ...]]) -> torch.Tensor:
    h = torch.zeros(HEADER, dtype=torch.int64)
    h[0], h[1], h[8] = MAGIC, int(kind), len(shapes)
    h[2 : 2 + len(args)] = torch.tensor(args)
    for i, shape in enumerate(shapes):
        f = 9 + 5 * i
        h[f], h[f + 1] = 2, len(shape)  # bf16
        h[f + 2 : f + 2 + len(shape)] = torch.tensor(shape)
    return h


def test_frames_beyond_the_jobs_limits_are_refused(tmp_path, llama5):
    """A rank 0 that knows the token but sends a 60 GiB header, then a NEW_CACHE of 10^6 rows x
    10^7 slots: the worker refuses each (one log line), stays up and joins the next job."""
    from layercake.pipeline.split import model_id

    topo = load_topology(topology(tmp_path, ["b 0-2 e", "2-5"]), 5)
    ident = (model_id(llama5), str(llama5))
    with workers(tmp_path / "topo.json", llama5, ["pc2"]) as procs:
        t, store = host_job(topo, *ident)
        dist.isend(_raw_header(Kind.DATA, (1, 0), [(1 << 15, 1 << 10, 960)]), 1).wait()
        _wait_for(procs[0], "frame refused", 1)
        leave_job()
        t, store = host_job(topo, *ident, store=store)  # it came back for the next job
        t.send(1, Kind.NEW_CACHE, (1, 10**7), [torch.tensor([10**6])])
        t.flush()
        _wait_for(procs[0], "cache request refused", 1)
        leave_job()
        t, store = host_job(topo, *ident, store=store)
        t.send(1, Kind.SHUTDOWN)
        t.flush()
        leave_job()
        _wait_for(procs[0], "job done", 1)
        assert procs[0].poll() is None, log_of(procs[0])
        log = log_of(procs[0])
        assert "Traceback" not in log
        assert "more than this job allows there" in log
        assert "outside 1..max_batch 1024" in log


def _wait_for(p: subprocess.Popen, text: str, count: int, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while log_of(p).count(text) < count:
        assert p.poll() is None, log_of(p)
        assert time.monotonic() < deadline, log_of(p)
        time.sleep(0.1)


def test_a_peer_on_another_version_is_rejected():
    from layercake.pipeline.rendezvous import mismatch

    mine = {"name": "main", "version": "0.3.0", "topology": "a" * 64, "model": "m"}
    theirs = dict(mine, name="pc2", version="0.2.9")
    assert "layercake versions differ: main runs 0.3.0, pc2 runs 0.2.9" in mismatch(mine, theirs)
    assert mismatch(mine, dict(mine, name="pc2")) is None
