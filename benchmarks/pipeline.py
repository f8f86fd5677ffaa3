"""Two-stage pipeline vs one offloading process, every process under the same memory cap.

The random Llama-3.2-1B-shaped bf16 checkpoint (2.5 GB); the cap defaults to 60 % of its size,
enforced with ``shared/tools/memlimit`` (page cache included; caches dropped before each case).
Cases: one process offloading under the cap; a pipeline ``main: b 0-8`` + ``pc2: 8-16 e`` (two
processes on this machine, each capped, each offloading what does not fit) with micro-batches 1
(no overlap: the other stage idles) and 2+. Prints one JSON line per case: throughput (generated
tokens / (prefill + decode) s, FlexGen's), load time, peak memory per process, activation bytes
and frames through rank 0 per generated token, and whether the greedy tokens equal the single
process's. Both stages share this machine's cores and disk; on two hosts each has its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from generation import model_path, prompts  # noqa: E402

MEMLIMIT = HERE.parent.parent / "shared/tools/memlimit"


def _peak(stderr: str) -> int | None:
    for line in stderr.splitlines():
        if line.startswith("memlimit: peak_bytes="):
            return int(line.split("=")[1].split()[0])
    return None


def role_main(a: argparse.Namespace) -> None:
    """One process: the single offloaded run (no topology) or rank 0 of the pipeline."""
    import torch

    import layercake

    torch.set_num_threads(a.threads)
    path = model_path("llama1b")
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    ids = prompts(a.batch, a.prompt_len, vocab)[: a.batch].tolist()
    t0 = time.perf_counter()
    kw = dict(cpu_memory=a.cap, offload_dir=a.offload_dir, batch_size=a.batch, num_batches=1,
              max_context=a.prompt_len + a.gen_len)  # fmt: skip
    if a.topology:
        kw = dict(topology=a.topology, micro_batches=a.micro_batches)
    llm = layercake.load(path, **kw)
    load_s = time.perf_counter() - t0
    out = llm.generate(ids, max_new_tokens=a.gen_len, ignore_eos=True)
    s = llm.last_stats
    r = dict(load_s=load_s, prefill_s=s.prefill_s, decode_s=s.decode_s,
             generated=s.generated_tokens, throughput=s.throughput,
             tokens=[o.token_ids for o in out])  # fmt: skip
    if a.topology:
        st = llm.runner.stats
        r.update(st, micro_batches=len(llm.runner.stage.sizes))
        r["policy_main"] = [str(getattr(x, "policy", "resident")) for x in
                            llm.runner.stage.runners.values()]  # fmt: skip
        llm.close()
    else:
        r["policy"] = str(getattr(llm.runner, "policy", "resident"))
    print(json.dumps(r))


def _cmd(a: argparse.Namespace, *extra: str) -> list[str]:
    cmd = [sys.executable, __file__, "--role", "main", "--batch", str(a.batch)]
    cmd += ["--prompt-len", str(a.prompt_len), "--gen-len", str(a.gen_len), "--cap", a.cap]
    return cmd + ["--offload-dir", str(a.offload_dir), *extra]


def case_single(a: argparse.Namespace) -> dict:
    cmd = [str(MEMLIMIT), "--drop-caches", a.cap, *_cmd(a, "--threads", str(a.threads))]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.case_timeout)
    if p.returncode != 0:
        return {"case": "single", "error": p.stderr.strip().splitlines()[-3:]}
    r = json.loads(p.stdout.strip().splitlines()[-1])
    return dict(r, case="single", wall_s=time.perf_counter() - t0, peak_bytes=_peak(p.stderr))


def case_pipeline(a: argparse.Namespace, micro: int, tmp: Path) -> dict:
    from layercake.pipeline.rendezvous import free_ports

    ports = free_ports(2)
    stage = dict(cpu_memory=a.cap, offload_dir=str(a.offload_dir), batch_size=a.batch,
                 num_batches=1, max_context=a.prompt_len + a.gen_len)  # fmt: skip
    topo = {
        "timeout": 600, "connect_timeout": 900,
        "nodes": [
            dict(name="main", address=f"127.0.0.1:{ports[0]}", layers="b 0-8", **stage),
            dict(name="pc2", address=f"127.0.0.1:{ports[1]}", layers="8-16 e", **stage),
        ],
    }  # fmt: skip
    tfile = tmp / f"topology-{micro}.json"
    tfile.write_text(json.dumps(topo))
    path = model_path("llama1b")
    worker = [str(MEMLIMIT), "--drop-caches", a.cap, sys.executable, "-m", "layercake.cli",
              "worker", "--topology", str(tfile), "--name", "pc2", "--model", str(path),
              "--once", "--threads", str(a.stage_threads)]  # fmt: skip
    w = subprocess.Popen(worker, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2)  # caches dropped before rank 0 starts reading
        main = [str(MEMLIMIT), a.cap, *_cmd(a, "--threads", str(a.stage_threads), "--topology",
                                            str(tfile), "--micro-batches", str(micro))]  # fmt: skip
        t0 = time.perf_counter()
        p = subprocess.run(main, capture_output=True, text=True, timeout=a.case_timeout)
        wall = time.perf_counter() - t0
        _, werr = w.communicate(timeout=60)
    finally:
        if w.poll() is None:
            w.kill()
    if p.returncode != 0:
        return {"case": f"pipeline-{micro}", "error": p.stderr.strip().splitlines()[-3:],
                "worker": werr.strip().splitlines()[-3:]}  # fmt: skip
    r = json.loads(p.stdout.strip().splitlines()[-1])
    n = max(1, r["generated"])
    r.update(case=f"pipeline-{micro}", wall_s=wall, peak_bytes=_peak(p.stderr),
             peak_bytes_pc2=_peak(werr),
             payload_bytes_per_token=(r["bytes_sent"] + r["bytes_received"]) / n,
             frames_per_token=(r["frames_sent"] + r["frames_received"]) / n,
             pipeline_passes_per_step=r["forwards"] / (1 + a.gen_len - 1))  # fmt: skip
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--role", help=argparse.SUPPRESS)
    ap.add_argument("--topology", help=argparse.SUPPRESS)
    ap.add_argument("--micro-batches", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cap", help="memory cap per process (default 60%% of the model's size)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2, help="threads of the single process")
    ap.add_argument("--stage-threads", type=int, default=1, help="threads per pipeline stage")
    ap.add_argument("--micro", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--cases", nargs="+", default=["single", "pipeline"])
    ap.add_argument("--offload-dir", type=Path, default=Path("/var/tmp/layercake-pipeline"))
    ap.add_argument("--case-timeout", type=float, default=1800)
    a = ap.parse_args()
    if a.role == "main":
        return role_main(a)
    path = model_path("llama1b")
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    a.cap = a.cap or f"{int(0.6 * size / 2**20)}M"
    tmp = a.offload_dir / "topologies"
    tmp.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"model_bytes": size, "cap": a.cap, "batch": a.batch,
                      "prompt_len": a.prompt_len, "gen_len": a.gen_len}), flush=True)  # fmt: skip
    results = []
    if "single" in a.cases:
        results.append(case_single(a))
    if "pipeline" in a.cases:
        results += [case_pipeline(a, m, tmp) for m in a.micro]
    ref = next((r.get("tokens") for r in results if r.get("case") == "single"), None)
    for r in results:
        toks = r.pop("tokens", None)
        r["same_tokens_as_single"] = None if ref is None or toks is None else toks == ref
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
