"""Pipelines across hosts: topology validation, and real multi-process jobs on localhost (gloo):
the pipeline's greedy tokens equal the single process's; failures and mismatches give named
errors in bounded time."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import LLAMA_TINY, make_hf_checkpoint

import layercake
from layercake.errors import LayercakeError
from layercake.pipeline.rendezvous import free_ports
from layercake.pipeline.stage import split_rows
from layercake.pipeline.topology import parse_topology

TOKEN = "test-token-0123456789abcdef"
PROMPTS = [[1, 5, 9, 3, 11, 40], [4, 2], [7, 7, 7, 8], [3], [50, 60, 70]]


@pytest.fixture(scope="module")
def llama5(tmp_path_factory) -> Path:
    """Five layers: room for a node with two non-contiguous ranges between two others."""
    cfg = dict(LLAMA_TINY, num_hidden_layers=5)
    return make_hf_checkpoint(tmp_path_factory.mktemp("llama5"), "llama", seed=3, **cfg)


@pytest.fixture(scope="module")
def reference(llama5) -> list[list[int]]:
    out = layercake.load(llama5).generate(PROMPTS, max_new_tokens=6, ignore_eos=True)
    return [o.token_ids for o in out]


def topology(tmp: Path, layers: list[str], name: str = "topo.json", options=None, **top) -> Path:
    """A JSON topology on free localhost ports: main, pc2, pc3, ... holding ``layers``;
    ``options`` adds keys to a node by name."""
    names = ["main"] + [f"pc{i + 2}" for i in range(len(layers) - 1)]
    ports = free_ports(len(layers))
    nodes = [
        {"name": n, "address": f"127.0.0.1:{p}", "layers": spec, **(options or {}).get(n, {})}
        for n, p, spec in zip(names, ports, layers)
    ]
    path = tmp / name
    doc = {"nodes": nodes, "connect_timeout": 60, "token": TOKEN, **top}
    path.write_text(json.dumps(doc))
    return path


@contextlib.contextmanager
def workers(topo: Path, model: Path, names: list[str], *extra: str):
    procs = []
    try:
        for n in names:
            log = open(topo.parent / f"{n}.log", "w+")
            cmd = [sys.executable, "-m", "layercake.cli", "worker", "--topology", str(topo),
                   "--name", n, "--model", str(model), "--threads", "1", *extra]  # fmt: skip
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            p.log = log
            procs.append(p)
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
            p.log.close()


def log_of(p: subprocess.Popen) -> str:
    p.log.flush()
    p.log.seek(0)
    return p.log.read()


@contextlib.contextmanager
def job(model: Path, topo: Path, **kw):
    llm = layercake.load(model, topology=topo, **kw)
    try:
        yield llm
    finally:
        llm.runner.close()


# ---- the topology file ------------------------------------------------------------------------
def parse(nodes: list[dict], layers: int = 16, **top):
    return parse_topology({"nodes": nodes, **top}, "t.json", layers)


def test_topology_path_visits_layers_in_order():
    t = parse([{"name": "main", "address": "h:1", "layers": "b 0-4 12-16 e"},
               {"name": "pc2", "address": "h:2", "layers": "4-8"},
               {"name": "pc3", "address": "h:3", "layers": "8-12", "device": "cuda"}])  # fmt: skip
    assert [(s.rank, str(s.parts)) for s in t.path] == [
        (0, "b 0-4"),
        (1, "4-8"),
        (2, "8-12"),
        (0, "12-16 e"),
    ]
    assert [s.index for s in t.segments(0)] == [0, 3]
    other = parse([{"name": "main", "address": "h:1", "layers": "b 0-4 12-16 e"},
                   {"name": "pc2", "address": "h:2", "layers": "4-8"},
                   {"name": "pc3", "address": "h:3", "layers": "8-12"}])  # fmt: skip
    assert t.digest() != other.digest()


def test_topology_explains_every_mistake():
    with pytest.raises(LayercakeError) as e:
        parse([{"name": "main", "address": "h:1", "layers": "b 0-9"},
               {"name": "pc2", "address": "h:1", "layers": "8-12", "cpu_memry": "1GB"},
               {"name": "pc2", "address": "nowhere", "layers": "14-15"}])  # fmt: skip
    msg = str(e.value)
    assert "layer 8 is held by more than one node: main, pc2" in msg
    assert "layers 12-14 (half-open) of the model's 16 held by no node" in msg
    assert "layer 15 of the model's 16 held by no node" in msg
    assert "the head ('e') held by no node" in msg
    assert "address h:1 is also node 'main'" in msg
    assert "unknown key 'cpu_memry'" in msg
    assert "the name is used twice" in msg
    assert "'nowhere' is not host:port" in msg
    with pytest.raises(LayercakeError, match="outside the model's layers 0-16"):
        parse([{"name": "main", "address": "h:1", "layers": "b 0-17 e"}])
    with pytest.raises(LayercakeError, match="(?s)needs an 'address'.*needs 'layers'"):
        parse([{"name": "main", "layers": ""}])
    with pytest.raises(LayercakeError, match="(?s)device 'tpu'.*cpu_memory: cannot read 'lots'"):
        parse([{"name": "m", "address": "h:1", "layers": "f", "device": "tpu",
                "cpu_memory": "lots"}])  # fmt: skip
    t = parse([{"name": "main", "address": "h:1", "layers": "f"}])
    with pytest.raises(LayercakeError, match="unknown node 'pc9': the topology t.json has main"):
        t.rank("pc9")


def test_topology_yaml(tmp_path):
    pytest.importorskip("yaml")
    from layercake.pipeline.topology import load_topology

    p = tmp_path / "t.yaml"
    p.write_text("nodes:\n  - name: main\n    address: 127.0.0.1:29500\n    layers: b 0-8\n"
                 "  - name: pc2\n    address: '[::1]:29501'\n    device: cuda\n"
                 "    layers: 8-16 e\n    cpu_memory: 8GiB\n")  # fmt: skip
    t = load_topology(p).check(16)
    assert t.nodes[1].host == "::1" and t.nodes[1].offloaded and t.nodes[1].device == "cuda"


def test_split_rows_keeps_micro_batches_in_step():
    sizes, picks = split_rows([3, 2, 2], torch.tensor([0, 2, 5, 6]))
    assert sizes == [2, 2]
    assert picks[0].tolist() == [0, 2] and picks[1] is None and picks[2].tolist() == [0, 1]


# ---- jobs on localhost ------------------------------------------------------------------------
def test_two_processes_equal_single_process(tmp_path, llama5, reference):
    """The head on the worker; micro-batches of 3 and 2 rows; rows finish at different steps."""
    from layercake.generate import generate
    from layercake.sampling import SamplingParams

    topo = topology(tmp_path, ["b 0-3", "3-5 e"], micro_batches=2)
    with workers(topo, llama5, ["pc2"], "--once") as procs:
        with job(llama5, topo) as llm:
            out = llm.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)
            assert [o.token_ids for o in out] == reference
            assert llm.runner.stats["forwards"] == 6 and llm.runner.stage.sizes == [3, 2]
            m = torch.tensor(llm.runner.stage.report()["marks"])  # running totals, every pass
            assert len(m) == 6 and (m.diff(dim=0) >= 0).all() and m[-1, 4] == 8 * 5 * 6
            # greedy: the head's node sent one id per row and step (the prompt's earlier chunks
            # send nothing), not the logits
            assert llm.runner.stats["bytes_received"] == 8 * len(PROMPTS) * 6
            # sampled rows (and logprobs) need the logits: they come back whole, same tokens
            kw = dict(max_new_tokens=4, temperature=0.9, seed=3, logprobs=2, ignore_eos=True)
            single = layercake.load(llama5).generate(PROMPTS, **kw)
            sampled = llm.generate(PROMPTS, **kw)
            assert [o.token_ids for o in sampled] == [o.token_ids for o in single]
            assert llm.runner.stats["bytes_received"] > 4 * len(PROMPTS) * 97 * 4
            # rows that stop early are dropped from the caches on every node (select)
            stops = [3, 6, 1, 6, 4]
            params = [SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)
                      for n in stops]  # fmt: skip
            res = generate(llm.runner, PROMPTS, params, [], lambda ids: "")
            assert [r.token_ids for r in res] == [ref[:n] for ref, n in zip(reference, stops)]
        assert procs[0].wait(20) == 0, log_of(procs[0])  # --once: the job's end ends it


def test_three_processes_with_two_ranges_on_main(tmp_path, llama5, reference):
    """main -> pc2 -> pc3 -> main: main holds two non-contiguous ranges (and both ends); main's
    and pc3's stages are offloaded with their own policies (part of the weights read from disk
    every step; main reads its next range while the others compute)."""
    off = {"percent": [0, 50, 100, 0, 100, 0], "offload_dir": str(tmp_path / "off")}
    main_off = dict(off, percent=[0, 30, 100, 0, 100, 0])
    topo = topology(tmp_path, ["b 0-1 4-5 e", "1-3", "3-4"],
                    options={"pc3": off, "main": main_off}, micro_batches=3)  # fmt: skip
    with workers(topo, llama5, ["pc2", "pc3"]), job(llama5, topo) as llm:
        assert [(s.rank, str(s.parts)) for s in llm.runner.topology.path] == [
            (0, "b 0-1"),
            (1, "1-3"),
            (2, "3-4"),
            (0, "4-5 e"),
        ]
        out = llm.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)
        assert [o.token_ids for o in out] == reference
        assert llm.runner.stage.sizes == [2, 2, 1]
    for layer in (0, 3, 4):  # main's two ranges and pc3's layer streamed from disk
        assert list((tmp_path / "off").rglob(f"layer.{layer}.bin"))


def test_wire_dtype_and_prompt_chunks(tmp_path, llama5):
    """fp32 on the wire, the prompt in one piece: the logits are the single process's, bit for
    bit. In chunks (every node busy during a prompt): fp32 rounding apart. Hidden states in
    bf16 (half the bytes): bf16's rounding of the activations at one boundary, no more."""
    tokens = torch.tensor([PROMPTS[0]])
    positions = torch.arange(tokens.shape[1])[None]
    single = layercake.load(llama5).runner
    want = single.forward(tokens, positions, single.new_cache(1, 8))
    sent = {}
    for wire, chunks in (("float32", 1), ("float32", 4), ("bfloat16", 1)):
        topo = topology(tmp_path, ["b 0-3", "3-5 e"], name=f"{wire}{chunks}.json",
                        wire_dtype=wire, prefill_chunks=chunks)  # fmt: skip
        with workers(topo, llama5, ["pc2"], "--once"), job(llama5, topo) as llm:
            r = llm.runner
            got = r.forward(tokens, positions, r.new_cache(1, 8))
            diff = (got - want).abs().max().item()
            sent[wire, chunks] = r.stats["bytes_sent"]
        scale = want.abs().max().item()
        if (wire, chunks) == ("float32", 1):
            assert diff == 0.0
        elif wire == "float32":
            assert diff < 1e-5 * scale
        else:
            assert 0 < diff < 0.02 * scale
    assert sent["bfloat16", 1] < 0.75 * sent["float32", 1]


def test_restarted_worker_resumes_the_job(tmp_path, llama5, reference, capfd):
    """With resume_timeout, a worker killed mid-generation and started again rejoins: the cache
    is rebuilt by replaying the steps and the same stream finishes with the same tokens."""
    topo = topology(tmp_path, ["b 0-2 e", "2-5"], resume_timeout=60)
    got: dict[int, list[int]] = {i: [] for i in range(len(PROMPTS))}
    with workers(topo, llama5, ["pc2"]) as procs, job(llama5, topo) as llm:
        stream = llm.stream(PROMPTS, max_new_tokens=6, ignore_eos=True)
        for _ in range(2 * len(PROMPTS)):
            e = next(stream)
            got[e.index].append(e.token_id)
        procs[0].kill()
        procs[0].wait(10)
        with workers(topo, llama5, ["pc2"]):  # restarted: it waits for main, then rejoins
            for e in stream:
                got[e.index].append(e.token_id)
    assert [got[i] for i in range(len(PROMPTS))] == reference
    err = capfd.readouterr().err
    assert "lost the connection to node pc2" in err and "waiting up to 60 s for it" in err
    assert "rejoined; 2 steps replayed" in err


@contextlib.contextmanager
def job_after_workers(topo: Path, model: Path, names: list[str]):
    with workers(topo, model, names) as procs, job(model, topo) as llm:
        yield llm, procs


def test_silent_worker_times_out_with_its_name(tmp_path, llama5):
    topo = topology(tmp_path, ["b 0-2 e", "2-5"], timeout=3)
    with workers(topo, llama5, ["pc2"]) as procs, job(llama5, topo) as llm:
        llm.generate(PROMPTS[:2], max_new_tokens=2)
        os.kill(procs[0].pid, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            with pytest.raises(LayercakeError, match=r"pc2 .* did not answer within 3 s"):
                llm.generate(PROMPTS[:2], max_new_tokens=2)
            assert time.monotonic() - t0 < 10
        finally:
            os.kill(procs[0].pid, signal.SIGCONT)


def test_mismatched_worker_is_rejected_on_both_sides(tmp_path, llama5, tiny_llama):
    topo = topology(tmp_path, ["b 0-2 e", "2-5"], connect_timeout=20)
    other = tmp_path / "other.json"  # the same nodes, another timeout
    other.write_text(json.dumps(dict(json.loads(topo.read_text()), timeout=5)))
    # a different topology: the worker says so and exits 2, rank 0 says so too
    with workers(other, llama5, ["pc2"]) as procs:
        with pytest.raises(LayercakeError, match="node pc2 rejected: topologies differ"):
            layercake.load(llama5, topology=topo)
        assert procs[0].wait(20) == 2
        assert "topologies differ" in log_of(procs[0])
    # a different model (same shape of topology, 3 layers instead of 5)
    small = topology(tmp_path, ["b 0-2 e", "2-3"], name="small.json")
    with workers(small, tiny_llama, ["pc2"]) as procs:
        with pytest.raises(LayercakeError, match="models differ"):
            layercake.load(_copy_with_other_weights(tmp_path, tiny_llama), topology=small)
        assert procs[0].wait(20) == 2
        assert "models differ" in log_of(procs[0])


def _copy_with_other_weights(tmp: Path, model: Path) -> Path:
    return make_hf_checkpoint(tmp / "other-weights", "llama", seed=7, **LLAMA_TINY)


def test_port_in_use_and_absent_workers(tmp_path, llama5):
    topo = topology(tmp_path, ["b 0-2 e", "2-5"], connect_timeout=2)
    port = json.loads(topo.read_text())["nodes"][0]["address"].split(":")[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", int(port)))
        s.listen(1)
        with pytest.raises(LayercakeError, match=f"port {port} on 127.0.0.1 is in use"):
            layercake.load(llama5, topology=topo)
    with pytest.raises(LayercakeError, match=r"pc2 \(127.0.0.1:\d+\) did not join within 2 s"):
        layercake.load(llama5, topology=topo)
    elsewhere = tmp_path / "elsewhere.json"  # rank 0 started on a host the file does not name
    elsewhere.write_text(topo.read_text().replace('"127.0.0.1:' + port, '"192.0.2.7:' + port))
    with pytest.raises(LayercakeError, match="192.0.2.7 is not an address of this machine"):
        layercake.load(llama5, topology=elsewhere)
    from layercake.cli import main

    assert main(["worker", "--topology", str(topo), "--name", "pc2", "--model", str(llama5),
                 "--connect-timeout", "1"]) == 2  # fmt: skip


def test_split_writes_only_each_nodes_tensors(tmp_path, llama5):
    from layercake.checkpoint import open_checkpoint
    from layercake.cli import main
    from layercake.models.build import build_slice
    from layercake.pipeline.split import model_id
    from layercake.runner import LocalRunner

    topo = topology(tmp_path, ["b 0-1 4-5 e", "1-4"])
    assert main(["split", "--model", str(llama5), "--topology", str(topo),
                 "--out", str(tmp_path / "parts")]) == 0  # fmt: skip
    a, b = open_checkpoint(tmp_path / "parts/main"), open_checkpoint(tmp_path / "parts/pc2")
    assert not any(".layers.1." in n or ".layers.3." in n for n in a.tensor_names())
    assert all(".layers." in n for n in b.tensor_names())
    assert {".layers.1.", ".layers.2.", ".layers.3."} == {
        n[n.index(".layers.") : n.index(".layers.") + 10] for n in b.tensor_names()
    }
    assert model_id(tmp_path / "parts/pc2") == model_id(llama5) == model_id(tmp_path / "parts/main")
    cfg = layercake.load(llama5).config
    slices = [
        build_slice(a, "b 0-1 4-5 e", config=cfg),
        build_slice(b, "1-4", config=cfg),
    ]  # as load() builds them
    full = layercake.load(llama5)
    tokens = torch.tensor([PROMPTS[0]])
    positions = torch.arange(tokens.shape[1])[None]
    runner = LocalRunner(slices, cfg)
    want = full.runner.forward(tokens, positions, full.runner.new_cache(1, 8))
    assert torch.equal(runner.forward(tokens, positions, runner.new_cache(1, 8)), want)


def test_cli_errors_are_one_line(tmp_path, llama5, capsys):
    from layercake.cli import main

    topo = topology(tmp_path, ["b 0-2 e", "2-5"])
    assert main(["worker", "--topology", str(topo), "--name", "pc9", "--model", str(llama5)]) == 2
    assert "unknown node 'pc9'" in capsys.readouterr().err
    assert main(["worker", "--topology", str(topo), "--name", "main", "--model", str(llama5)]) == 2
    assert "main is rank 0, where the job runs" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"nodes": [{"name": "main", "address": "127.0.0.1:1",
                                          "layers": "b 0-3 e"}]}))  # fmt: skip
    args = ["generate", "--model", str(llama5), "--topology", str(bad), "--prompt", "x"]
    assert main(args) == 2
    assert "layers 3-5 (half-open) of the model's 5 held by no node" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_runs_the_job_on_rank_0(tmp_path, tiny_chat_llama):
    topo = topology(tmp_path, ["b 0-1 e", "1-3"])
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
           "layercake.cli", "generate", "--model", str(tiny_chat_llama), "--topology", str(topo),
           "--prompt", "w1 w2 w3", "--max-new-tokens", "6"]  # fmt: skip
    one = [sys.executable, "-m", "layercake.cli", "generate", "--model", str(tiny_chat_llama),
           "--prompt", "w1 w2 w3", "--max-new-tokens", "6"]  # fmt: skip
    r = subprocess.run(run, capture_output=True, text=True, timeout=300)
    want = subprocess.run(one, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert want.stdout.strip() and want.stdout.strip() in r.stdout
