"""A pipeline across two simulated hosts (``shared/tools/hostsim``: separate network namespaces
on a bridge, so neither node can reach the other through loopback): nothing set by hand, each
node binds gloo to the interface of its topology address, and the greedy tokens equal one
process's. Skipped where hostsim cannot run (not root, no ``ip netns``, no hostsim)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LLAMA_TINY, make_hf_checkpoint

import layercake

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [[1, 5, 9, 3, 11, 40], [4, 2], [7, 7, 7, 8]]


def hostsim() -> str | None:
    places = [os.environ.get("LAYERCAKE_HOSTSIM"), shutil.which("hostsim")]
    places += [ROOT.parent / "shared/tools/hostsim", ROOT.parent.parent / "shared/tools/hostsim"]
    for c in places:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return str(c)
    return None


def usable() -> str | None:
    tool = hostsim()
    if tool is None or os.geteuid() != 0 or shutil.which("ip") is None:
        return None
    ok = subprocess.run(["ip", "netns", "list"], capture_output=True).returncode == 0
    return tool if ok else None


@pytest.fixture(scope="module")
def hosts():
    """Two hosts up for the module; taken down after unless they were up already. The module
    holds the benchmarks' lock (``benchmarks/pipeline.py``'s ``LOCK``) meanwhile: hostsim's
    hosts are one set per machine, and a timed run must not see this test bring them up or down."""
    tool = usable()
    if tool is None:
        pytest.skip("needs root, `ip netns` and shared/tools/hostsim")
    with open("/tmp/layercake-bench.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield from _up(tool)


def _up(tool: str):
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    were_up = {"lc-h0", "lc-h1"} <= {line.split()[0] for line in listed.splitlines() if line}
    up = subprocess.run([tool, "up", "2"], capture_output=True, text=True)
    if up.returncode != 0:
        pytest.skip(f"hostsim up failed: {up.stderr.strip()[-200:]}")
    try:
        yield tool
    finally:
        if not were_up:
            subprocess.run([tool, "down"], capture_output=True)


def write_topology(tmp: Path, tool: str, **top) -> Path:
    addr = [subprocess.run([tool, "addr", str(i)], capture_output=True, text=True).stdout.strip()
            for i in (0, 1)]  # fmt: skip
    nodes = [{"name": "h0", "address": f"{addr[0]}:29611", "layers": "b 0-2"},
             {"name": "h1", "address": f"{addr[1]}:29612", "layers": "2-4 e"}]  # fmt: skip
    topo = tmp / "topo.json"
    topo.write_text(
        json.dumps({"connect_timeout": 60, "timeout": 30, "token": "t" * 32, "nodes": nodes, **top})
    )
    return topo


def as_host(tool: str, i: int, *cmd: str) -> list[str]:
    return [tool, "run", str(i), "--", sys.executable, *cmd]


def test_two_hosts_without_environment_tricks(tmp_path, hosts):
    cfg = dict(LLAMA_TINY, num_hidden_layers=4)
    model = make_hf_checkpoint(tmp_path / "m", "llama", seed=5, **cfg)
    want = [o.token_ids for o in layercake.load(model).generate(PROMPTS, max_new_tokens=5)]
    topo = write_topology(tmp_path, hosts)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLOO_")}
    env["PYTHONPATH"] = str(ROOT)
    worker = as_host(hosts, 1, "-m", "layercake.cli", "worker", "--topology", str(topo),
                     "--name", "h1", "--model", str(model), "--once", "--threads", "1")  # fmt: skip
    script = ("import json, layercake\n"
              f"llm = layercake.load({str(model)!r}, topology={str(topo)!r})"
              f"\nout = llm.generate({PROMPTS!r}, max_new_tokens=5)\n"
              "print(json.dumps([o.token_ids for o in out])); llm.close()")  # fmt: skip
    w = subprocess.Popen(worker, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)  # fmt: skip
    m = subprocess.Popen(as_host(hosts, 0, "-c", script), env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        out, err = m.communicate(timeout=120)
        wlog = w.communicate(timeout=30)[0]
    finally:
        for p in (m, w):  # the whole group: hostsim's wrapper and the python under it
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
    r = subprocess.CompletedProcess(m.args, m.returncode, out, err)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == want
    addr = json.loads(topo.read_text())["nodes"]
    assert f"gloo bound to interface lc-h0n ({addr[0]['address'][:-6]})" in r.stderr
    assert f"gloo bound to interface lc-h1n ({addr[1]['address'][:-6]})" in wlog, wlog
    assert w.returncode == 0, wlog


def test_worker_killed_and_restarted_across_hosts(tmp_path, hosts):
    """h1's worker killed mid-generation: h0 names it at once; started again, it rejoins and the
    same stream finishes with the same tokens (resume_timeout)."""
    model = make_hf_checkpoint(
        tmp_path / "m", "llama", seed=6, **dict(LLAMA_TINY, num_hidden_layers=4)
    )
    want = [o.token_ids for o in layercake.load(model).generate(PROMPTS, max_new_tokens=8)]
    topo = write_topology(tmp_path, hosts, resume_timeout=60)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLOO_")}
    env["PYTHONPATH"] = str(ROOT)
    go = tmp_path / "go"
    worker = as_host(hosts, 1, "-m", "layercake.cli", "worker", "--topology", str(topo),
                     "--name", "h1", "--model", str(model), "--threads", "1")  # fmt: skip
    script = ("import json, os, time, layercake\n"
              f"llm = layercake.load({str(model)!r}, topology={str(topo)!r})\n"
              f"s = llm.stream({PROMPTS!r}, max_new_tokens=8)\n"
              f"got = {{i: [] for i in range({len(PROMPTS)})}}\n"
              f"for _ in range({2 * len(PROMPTS)}):\n"
              "    e = next(s); got[e.index].append(e.token_id)\n"
              "print('READY', flush=True)\n"
              f"while not os.path.exists({str(go)!r}): time.sleep(0.1)\n"
              "for e in s: got[e.index].append(e.token_id)\n"
              "print(json.dumps([got[i] for i in sorted(got)])); llm.close()")  # fmt: skip
    kw = dict(env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
              start_new_session=True)  # fmt: skip
    procs = [
        subprocess.Popen(worker, **kw),
        subprocess.Popen(as_host(hosts, 0, "-c", script), **kw),
    ]
    try:
        main = procs[1]
        assert main.stdout.readline().strip() == "READY", main.stderr.read()[-2000:]
        os.killpg(procs[0].pid, signal.SIGKILL)
        procs[0].wait(10)
        procs.append(subprocess.Popen(worker, **kw))  # restarted
        go.touch()
        out, err = main.communicate(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
    assert main.returncode == 0, err[-2000:]
    assert json.loads(out.strip().splitlines()[-1]) == want
    assert "lost the connection to node h1 (10.231.0.2:29612)" in err, err[-2000:]
    assert "rejoined; " in err
