"""benchmarks/offload_cuda.py runs its cases in fresh processes and compares each with the
reference run; on the CPU (``--device cpu``) the same cases run here, so CI keeps the GPU
benchmark working. Its figures come from a GPU (README, Offloading, "On a GPU")."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[1] / "benchmarks" / "offload_cuda.py"


def test_cases_run_and_agree_with_the_reference(tiny_llama, tmp_path):
    out = tmp_path / "runs.jsonl"
    cmd = [sys.executable, str(BENCH), "--device", "cpu", "--model", str(tiny_llama), "--cases",
           "lc-gpu", "lc-disk", "--batch", "2", "--gen-len", "3", "--repeats", "1",
           "--offload-dir", str(tmp_path / "off"), "--out", str(out)]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    runs = {r["case"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(runs) == ["lc-disk", "lc-gpu"], runs
    for r in runs.values():
        assert "error" not in r, r
        assert r["logits_max_abs_diff"] == 0.0 and r["tokens_equal"] == r["tokens_total"] == 6
        assert r["tok_s"] > 0 and r["prefill_s"] > 0
    assert runs["lc-disk"]["bytes_read"] > 0  # really streamed from the offload dir
    assert runs["lc-disk"]["h2d_bytes_per_step"] > 0 and runs["lc-gpu"]["h2d_bytes_per_step"] == 0
