"""One host against several, each host simulated with ``shared/tools/hostsim``: its own network
namespace on a shaped 1 Gbit/s link, its own CPU core, its own memory cap (page cache counted) and
its own disk read rate.

The random Llama-3.2-1B-shaped bf16 checkpoint (2.5 GB, ``benchmarks/checkpoints.py``); a batch of
``--batch`` prompts of ``--prompt-len`` tokens, ``--gen-len`` greedy tokens each. Cases:
``one``: the model in one process on host 0, offloading what its cap does not hold; ``two`` /
``four``: a pipeline over hosts 0..N-1 with contiguous layer ranges; ``ranges``: two hosts holding
alternating ranges (``h0: b 0-4 8-12``, ``h1: 4-8 12-16 e``), each streaming the range it runs next
while the other computes; ``ranges-10``: the same with ten layers on h0 (``b 0-5 8-13``,
``5-8 13-16 e``). Each repeat of the cases holds ``flock /tmp/layercake-bench.lock``;
``--repeat`` alternates the cases. Prints one JSON line per run: throughput (generated tokens /
(prefill + decode) s), and per host where a step's time went (compute, waiting for weights,
waiting for the peer: network + idle), peak memory, bytes on the wire per token, and whether the
greedy tokens equal the first ``one`` run's.

    python benchmarks/pipeline.py --cases one two --repeat 3 > benchmarks/results/x.jsonl
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from generation import model_path, prompts  # noqa: E402
from offload import raised  # noqa: E402

ROOT = HERE.parent
LOCK = "/tmp/layercake-bench.lock"
LAYOUTS = {
    "two": ["b 0-8", "8-16 e"],
    "four": ["b 0-4", "4-8", "8-12", "12-16 e"],
    "ranges": ["b 0-4 8-12", "4-8 12-16 e"],
    # the head's node holds two layers fewer: each node's weights exceed its pool by a like amount
    "ranges-10": ["b 0-5 8-13", "5-8 13-16 e"],
}


def hostsim() -> str:
    for c in (os.environ.get("LAYERCAKE_HOSTSIM"), ROOT.parent / "shared/tools/hostsim",
              ROOT.parent.parent / "shared/tools/hostsim"):  # fmt: skip
        if c and Path(c).is_file():
            return str(c)
    raise SystemExit("benchmarks/pipeline.py: needs shared/tools/hostsim (set LAYERCAKE_HOSTSIM)")


def role_main(a: argparse.Namespace) -> None:
    """Inside host 0: the single process (no topology) or rank 0 of the pipeline."""
    import torch

    import layercake

    torch.set_num_threads(1)
    trace = None
    if a.mem_trace:
        from memtrace import MemTrace

        trace = MemTrace()
    path = model_path("llama1b")
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    ids = prompts(a.batch, a.prompt_len, vocab)[: a.batch].tolist()
    t0 = time.perf_counter()
    if a.topology:
        kw = dict(topology=a.topology)
    else:
        kw = dict(cpu_memory=a.budget, offload_dir=a.offload_dir, batch_size=a.batch,
                  num_batches=1, max_context=a.prompt_len + a.gen_len)  # fmt: skip
    llm = layercake.load(path, **kw)
    load_s = time.perf_counter() - t0
    marks = None if a.topology else mark_passes(llm.runner)
    if trace is not None:
        trace.mark("loaded")
        llm.runner.forward = trace.after(llm.runner.forward, "pass")
    out = llm.generate(ids, max_new_tokens=a.gen_len, ignore_eos=True, temperature=0)
    s = llm.last_stats
    r = dict(load_s=load_s, prefill_s=s.prefill_s, decode_s=s.decode_s,
             generated=s.generated_tokens, throughput=s.throughput, decode_steps=s.decode_steps,
             ms_per_decode_step=1e3 * s.decode_s / max(1, s.decode_steps),
             tokens=[o.token_ids for o in out])  # fmt: skip
    from layercake.ops.linear import bf16_kernel

    r["bf16_kernel"] = bf16_kernel()  # AMX tiles or not (LAYERCAKE_NO_AMX), as ``-v`` says
    if a.topology:  # the job's own traffic and times, before the logits check below
        r.update(llm.runner.stats, host0=llm.runner.stage.report())
    else:
        mem = {k: round(v / 1e6, 1) for k, v in (getattr(llm.runner, "memory", None) or {}).items()}
        mem["streamed"] = round(getattr(llm.runner, "disk_bytes", 0) / 1e6, 1)
        r.update(forwards=len(marks), host0=dict(single_report(llm.runner), memory={"0": mem},
                                                 marks=list(marks)))  # fmt: skip
    if trace is not None:
        trace.mark("generated")
    r["logits_file"] = str(save_logits(llm.runner, ids[:4], a))
    if trace is not None:
        r["mem_trace"] = trace.result()
    if a.topology:
        llm.close()
    print(json.dumps(r), flush=True)


def mark_passes(runner: object) -> list[list[float]]:
    """The one-host runner's running totals after each pass, as a pipeline stage notes them
    (``Stage.end_step``): compute (its forward, weight waits included), weight and cache waits,
    zeros for what only a pipeline has (peer waits, sends, bytes in and out), weight bytes read
    from disk and the seconds spent reading them."""
    marks: list[list[float]] = []
    inner = runner.forward

    def forward(*args: object, **kw: object) -> object:
        out = inner(*args, **kw)
        t = runner.times
        waits = t["weights_wait_s"] + t["kv_wait_s"]
        disk = [getattr(runner, "bytes_read", 0), getattr(runner, "read_s", 0.0)]
        marks.append([t["forward_s"], waits, 0.0, 0.0, 0, 0, *disk])
        return out

    runner.forward = forward
    return marks


def breakdown(r: dict, host: dict) -> dict:
    """Where one host's time went, from its running totals after each pass (``marks``): the
    prefill (s) and a decode step (ms), each split into compute (weight waits excluded), weight
    waits (the disk), network (payload bytes in over the link: an upper bound on the wait it
    caused), sends, and idle (the rest of rank 0's wall: waiting for a peer's compute, or for
    rank 0's loop between passes); and the weights read from disk in that time (MB, seconds
    spent reading: overlapped with the rest)."""
    marks, n, steps = host.pop("marks", None) or [], r["forwards"], r["decode_steps"]
    k = n - steps  # prefill passes
    if len(marks) < n or k < 1 or steps < 1:
        return {}

    def cut(a: list[float], b: list[float], wall: float, steps: int = 0) -> dict:
        """Seconds over the phase (steps 0), else ms and MB a step."""
        d = [x - y for x, y in zip(a, b)]
        out = dict(compute=d[0] - d[1], weights_wait=d[1], network=d[4] / LINK, send=d[3])
        out["idle"] = wall - sum(out.values())
        out.update(disk_read=d[7], disk_mb=d[6] / 1e6)
        scale = 1e3 / steps if steps else 1.0
        return {key: round(v * (scale if key != "disk_mb" else scale / 1e3 if steps else 1), 3)
                for key, v in out.items()}  # fmt: skip

    pre = cut(marks[k - 1], [0.0] * len(marks[0]), r["prefill_s"])
    dec = cut(marks[n - 1], marks[k - 1], r["decode_s"], steps)
    return {"prefill_s": pre, "decode_ms_per_step": dec}


def save_logits(runner: object, ids: list[list[int]], a: argparse.Namespace) -> Path:
    """The last position's logits of a few prompts (full fp32 logits: no sampler is handed
    over), for comparing the cases' numerics."""
    import torch

    tokens = torch.tensor(ids)
    positions = torch.arange(tokens.shape[1]).expand(tokens.shape)
    cache = runner.new_cache(len(ids), tokens.shape[1])
    logits = runner.forward(tokens, positions, cache, last_only=True)[:, -1]
    path = a.offload_dir / f"logits-{'pipeline' if a.topology else 'one'}.pt"
    torch.save(logits.clone(), path)
    return path


def logits_diff(ref: str, other: str) -> float:
    import torch

    return float((torch.load(ref) - torch.load(other)).abs().max())


def wire_check(a: argparse.Namespace) -> None:
    """What bf16 hidden states on the wire cost in accuracy, without a network: the two halves
    of the split in one process, the boundary's activations rounded to bf16 or not."""
    import torch

    from layercake.checkpoint import open_checkpoint
    from layercake.config import load_config
    from layercake.models.build import build_slice
    from layercake.runner import LocalRunner

    path = model_path("llama1b")
    ckpt = open_checkpoint(path)
    cfg = load_config(ckpt.config_dict())
    k = a.split[0]
    halves = [LocalRunner([build_slice(ckpt, spec, config=cfg)], cfg)
              for spec in (f"b 0-{k}", f"{k}-16 e")]  # fmt: skip
    ids = prompts(a.batch, a.prompt_len, cfg.vocab_size)
    positions = torch.arange(ids.shape[1]).expand(ids.shape)
    out = {}
    for wire in (torch.float32, torch.bfloat16):
        caches = [h.new_cache(len(ids), ids.shape[1]) for h in halves]
        with torch.inference_mode():
            hidden = halves[0].forward(ids, positions, caches[0]).to(wire).float()
            out[wire] = halves[1].forward(hidden, positions, caches[1], last_only=True)[:, -1]
    diff = (out[torch.bfloat16] - out[torch.float32]).abs()
    same = (out[torch.bfloat16].argmax(-1) == out[torch.float32].argmax(-1)).float().mean()
    print(json.dumps({"case": "wire-bf16", "split": k, "rows": len(ids),
                      "max_logit_diff": float(diff.max()), "mean_logit_diff": float(diff.mean()),
                      "logit_scale": float(out[torch.float32].abs().max()),
                      "same_argmax": float(same)}), flush=True)  # fmt: skip


def single_report(runner: object) -> dict:
    times = getattr(runner, "times", None) or {}
    return {k: round(v, 3) for k, v in times.items()}


LINK = 125e6  # bytes/s: hostsim's link (1 Gbit/s unless `hostsim up --rate` says otherwise)


def _peak(stderr: str) -> int | None:
    for line in stderr.splitlines():
        if line.startswith("memlimit: peak_bytes="):
            return int(line.split("=")[1].split()[0])
    return None


def _host(a: argparse.Namespace, i: int, cmd: list[str]) -> list[str]:
    """Host ``i``'s command, in a session of its own (start_new_session) with its autogroup
    raised (``offload.raised``: other sessions' niced work would take half of a host's core)."""
    return [hostsim(), "run", str(i), "--mem", a.mem, "--disk-rate", a.disk_rate,
            "--drop-caches", "--", *raised(cmd)]  # fmt: skip


def _main_cmd(a: argparse.Namespace, *extra: str) -> list[str]:
    cmd = [sys.executable, __file__, "--role", "main", "--batch", str(a.batch)]
    cmd += ["--prompt-len", str(a.prompt_len), "--gen-len", str(a.gen_len)]
    cmd += ["--mem-trace"] if a.mem_trace else []
    return cmd + ["--budget", a.budget, "--offload-dir", str(a.offload_dir / "h0"), *extra]


def binary(size: str) -> str:
    """hostsim's sizes are binary (``1414M`` = 1414 MiB) and layercake's decimal unless ``i``:
    the budgets a process plans with are the cap it runs under."""
    return size + "iB" if re.fullmatch(r"[0-9.]+[KMGkmg]", size) else size


def layout(case: str) -> list[str]:
    if case.startswith("two-s"):  # two hosts, h0 up to layer SPLIT
        k = int(case[5:])
        return [f"b 0-{k}", f"{k}-16 e"]
    return LAYOUTS[case]


def topology_file(a: argparse.Namespace, case: str) -> Path:
    layers = layout(case)
    addr = [subprocess.run([hostsim(), "addr", str(i)], capture_output=True, text=True)
            .stdout.strip() for i in range(len(layers))]  # fmt: skip
    nodes = []
    for i, spec in enumerate(layers):
        node = dict(name=f"h{i}", address=f"{addr[i]}:{29700 + i}", layers=spec)
        if a.node_budget:
            node.update(cpu_memory=a.node_budget, offload_dir=str(a.offload_dir / f"h{i}"),
                        batch_size=a.batch, num_batches=1,
                        max_context=a.prompt_len + a.gen_len)  # fmt: skip
        nodes.append(node)
    doc = {"timeout": 600, "connect_timeout": 900, "token": "benchmark-token-0123456789",
           "nodes": nodes}  # fmt: skip
    if a.micro_batches:
        doc["micro_batches"] = a.micro_batches
    if a.wire_dtype:
        doc["wire_dtype"] = a.wire_dtype
    if a.prefill_chunks:
        doc["prefill_chunks"] = a.prefill_chunks
    path = a.offload_dir / f"topology-{case}.json"
    path.write_text(json.dumps(doc))
    return path


def run_case(a: argparse.Namespace, case: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if case == "one":
        p = subprocess.run(_host(a, 0, _main_cmd(a)), capture_output=True, text=True, env=env,
                           timeout=a.case_timeout, start_new_session=True)  # fmt: skip
        return _result(case, p.returncode, p.stdout, p.stderr, [])
    tfile = topology_file(a, case)
    path = model_path("llama1b")
    procs = []
    for i in range(1, len(layout(case))):
        cmd = [sys.executable, "-m", "layercake.cli", "worker", "--topology", str(tfile),
               "--name", f"h{i}", "--model", str(path), "--once", "--threads", "1"]  # fmt: skip
        procs.append(
            subprocess.Popen(
                _host(a, i, cmd),
                stdout=subprocess.PIPE,
                env=env,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        )
    try:
        time.sleep(3)  # every host's caches dropped before rank 0 starts reading
        p = subprocess.run(_host(a, 0, _main_cmd(a, "--topology", str(tfile))), env=env,
                           capture_output=True, text=True, timeout=a.case_timeout,
                           start_new_session=True)  # fmt: skip
        logs = [w.communicate(timeout=120)[1] for w in procs]
    finally:
        for w in procs:
            if w.poll() is None:
                os.killpg(w.pid, signal.SIGKILL)
                w.wait()
    return _result(case, p.returncode, p.stdout, p.stderr, logs)


def _result(case: str, rc: int, out: str, err: str, logs: list[str]) -> dict:
    if rc != 0:
        return {"case": case, "error": err.strip().splitlines()[-4:],
                "workers": [w.strip().splitlines()[-3:] for w in logs]}  # fmt: skip
    r = json.loads(out.strip().splitlines()[-1])
    r.update(case=case, peak_bytes=[_peak(err)] + [_peak(w) for w in logs])
    for i, w in enumerate(logs, 1):
        line = [x for x in w.splitlines() if x.startswith("layercake worker") and "{" in x]
        if line:
            r[f"host{i}"] = json.loads(line[-1][line[-1].index("{") :])
    r["breakdown"] = {h: breakdown(r, r[h]) for h in sorted(r) if h.startswith("host")}
    if "bytes_sent" in r:
        n = max(1, r["generated"])
        r["wire_bytes_per_token"] = (r["bytes_sent"] + r["bytes_received"]) / n
        r["frames_per_token"] = (r["frames_sent"] + r["frames_received"]) / n
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--role", help=argparse.SUPPRESS)
    ap.add_argument("--topology", help=argparse.SUPPRESS)
    ap.add_argument("--cases", nargs="+", default=["one", "two"],
                    choices=["one", *LAYOUTS])  # fmt: skip
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--mem", default="1414M", help="memory cap of every host (page cache too)")
    ap.add_argument("--disk-rate", default="500M", help="disk read rate of every host")
    ap.add_argument("--budget", default="1414M", help="cpu_memory of the single process (sizes "
                    "as hostsim reads them: 1414M is 1414 MiB, the cap)")  # fmt: skip
    ap.add_argument("--node-budget", help="cpu_memory of every pipeline node (default: --mem; "
                    "'none': the node's layers resident in fp32)")  # fmt: skip
    ap.add_argument("--micro-batches", type=int)
    ap.add_argument("--prefill-chunks", type=int, help="a prompt's pieces (default 2 x nodes)")
    ap.add_argument("--split", type=int, nargs="+", default=[8],
                    help="two: h0 holds b 0-SPLIT, h1 the rest (several: a case each)")  # fmt: skip
    ap.add_argument("--no-lock", action="store_true", help="the caller holds the bench lock")
    ap.add_argument("--keep-reference", action="store_true",
                    help="compare with the last run's one-host tokens and logits")  # fmt: skip
    ap.add_argument("--wire-dtype", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=16)
    ap.add_argument("--offload-dir", type=Path, default=Path("/var/tmp/layercake-pipeline"))
    ap.add_argument("--case-timeout", type=float, default=1800)
    ap.add_argument("--mem-trace", action="store_true", help="rank 0 (or the one host) samples "
                    "its anonymous memory and glibc heap (benchmarks/memtrace.py)")  # fmt: skip
    a = ap.parse_args()
    a.node_budget = None if a.node_budget == "none" else binary(a.node_budget or a.mem)
    a.budget = binary(a.budget)
    if a.role == "main":
        return role_main(a)
    if a.role == "wire":
        return wire_check(a)
    a.offload_dir.mkdir(parents=True, exist_ok=True)
    hosts = max(len(LAYOUTS.get(c, [0])) for c in a.cases)
    subprocess.run([hostsim(), "up", str(hosts)], check=True, capture_output=True)
    path = model_path("llama1b")
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(json.dumps({"model_bytes": size, "mem": a.mem, "disk_rate": a.disk_rate,
                      "batch": a.batch, "prompt_len": a.prompt_len, "gen_len": a.gen_len,
                      "micro_batches": a.micro_batches, "node_budget": a.node_budget,
                      "prefill_chunks": a.prefill_chunks,
                      "split": a.split,
                      "wire_dtype": a.wire_dtype, "time": time.strftime("%F %T")}),
          flush=True)  # fmt: skip
    ref_logits, ref_tokens = a.offload_dir / "logits-reference.pt", a.offload_dir / "tokens.json"
    ref = json.loads(ref_tokens.read_text()) if a.keep_reference and ref_tokens.exists() else None
    if not a.keep_reference:
        ref_logits.unlink(missing_ok=True)
    for rep in range(a.repeat):
        splits = [f"two-s{k}" for k in a.split]
        cases = [c for case in a.cases for c in (splits if case == "two" else [case])]
        with open(LOCK, "w") as lock:  # one repeat of every case at a time on the machine
            if not a.no_lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
            for case in cases:
                r = run_case(a, case)
                toks, lf = r.pop("tokens", None), r.pop("logits_file", None)
                if case == "one" and ref is None and toks is not None:
                    ref = toks
                    ref_tokens.write_text(json.dumps(toks))
                    Path(lf).replace(ref_logits)
                r["same_tokens_as_one"] = None if ref is None or toks is None else toks == ref
                if lf and case != "one" and ref_logits.exists():
                    r["max_logit_diff_vs_one"] = logits_diff(str(ref_logits), lf)
                print(json.dumps(dict(r, repeat=rep)), flush=True)


if __name__ == "__main__":
    main()
