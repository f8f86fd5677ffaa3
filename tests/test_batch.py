"""The batch job end to end on a tiny model: results equal solo greedy runs, bad lines become
error lines, and a crash (a cut line, or kill -9) loses and repeats nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from layercake.cli import main

CONTEXT = 128  # LLAMA_TINY's max_position_embeddings


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _by_id(rows: list[dict]) -> dict:
    ids = [r["id"] for r in rows if r["id"] is not None]
    assert len(ids) == len(set(ids)), "an id written twice"
    return {r["id"]: r for r in rows if r["id"] is not None}


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _prompts(n: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    return [
        {
            "id": f"p{i}",
            "prompt": " ".join(f"w{rng.randrange(90)}" for _ in range(rng.randrange(1, 12))),
            "max_tokens": rng.randrange(1, 10),
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def llm(tiny_chat_llama):
    import layercake

    return layercake.load(tiny_chat_llama)


def _batch(model, inp, out, *extra) -> int:
    return main(
        [
            "batch",
            "--model",
            str(model),
            "--input",
            str(inp),
            "--output",
            str(out),
            "--batch-size",
            "3",
            *extra,
        ]
    )


def test_batch_mixed_lines(tiny_chat_llama, llm, tmp_path, capsys):
    good = _prompts(7)
    good[2]["logprobs"] = 2
    good[3].update(temperature=0.8, top_p=0.9, top_k=5, seed=3, stop=["w1"])
    lines = good + [
        {"id": "chat", "messages": [{"role": "user", "content": "w4 w5"}], "max_tokens": 4},
        {"id": "mc", "prompt": "w9 w8", "choices": ["w1", "w2 w3", "w7"]},
        "not json {",
        {"id": "noprompt", "max_tokens": 3},
        {"prompt": "w1 w2"},
        {"id": "badtemp", "prompt": "w1", "temperature": -1},
        {"id": "toolong", "prompt": "w1 " * 200},
        {"id": "nofit", "prompt": "w1 w2", "max_tokens": CONTEXT},
        {"id": "typo", "prompt": "w1", "max_token": 3},
        {"id": "badmsg", "messages": [{"content": "w1"}]},
    ]
    inp, out = _write(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    assert _batch(tiny_chat_llama, inp, out) == 0
    stdout = capsys.readouterr().out
    summary = json.loads(stdout.strip().splitlines()[-1])
    rows = _lines(out)
    assert len(rows) == len(lines) and summary["written"] == len(lines)
    got = _by_id(rows)
    for g in good:
        kw = {k: g[k] for k in ("temperature", "top_p", "top_k", "seed", "stop") if k in g}
        solo = llm.generate(
            g["prompt"], max_new_tokens=g["max_tokens"], logprobs=g.get("logprobs"), **kw
        )[0]
        r = got[g["id"]]
        assert (r["text"], r["finish_reason"]) == (solo.text, solo.finish_reason), g
        assert r["completion_tokens"] == len(solo.token_ids)
        assert r["prompt_tokens"] == solo.prompt_tokens
        assert ("logprobs" in r) == ("logprobs" in g)
    lp = got["p2"]["logprobs"]
    assert len(lp) == got["p2"]["completion_tokens"] and len(lp[0]["top_logprobs"]) <= 2
    chat = llm.generate(llm.chat_prompt([{"role": "user", "content": "w4 w5"}]), max_new_tokens=4)
    assert got["chat"]["text"] == chat[0].text
    scores = llm.score("w9 w8", ["w1", "w2 w3", "w7"])
    best = max(range(3), key=lambda j: scores[j].logprob_sum)
    assert got["mc"]["best"] == best and got["mc"]["text"] == ["w1", "w2 w3", "w7"][best]
    assert got["mc"]["choices"][1]["logprob"] == pytest.approx(scores[1].logprob_sum, abs=1e-4)
    errors = {r["id"]: r["error"] for r in rows if "error" in r}
    assert set(errors) == {None, "noprompt", "badtemp", "toolong", "nofit", "typo", "badmsg"}
    assert "missing prompt" in errors["noprompt"] and "temperature" in errors["badtemp"]
    assert "context" in errors["toolong"] and "max_new_tokens" in errors["nofit"]
    assert "max_token" in errors["typo"] and "role" in errors["badmsg"]
    nulls = [r for r in rows if r["id"] is None]
    assert sorted(r["line"] for r in nulls) == [10, 12]
    assert "not JSON" in nulls[0]["error"] and "missing id" in nulls[1]["error"]
    # run again: everything is done, nothing is written twice
    assert _batch(tiny_chat_llama, inp, out) == 0
    assert _lines(out) == rows
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["skipped_done"] == len(
        lines
    )


def test_resume_after_a_cut_line(tiny_chat_llama, tmp_path, capsys):
    inp = _write(tmp_path / "in.jsonl", _prompts(20, seed=1))
    full = tmp_path / "full.jsonl"
    assert _batch(tiny_chat_llama, inp, full) == 0
    data = full.read_bytes()
    cut = tmp_path / "cut.jsonl"
    nl = [i for i, c in enumerate(data) if c == ord("\n")]
    cut.write_bytes(data[: nl[6] + 12])  # 7 whole lines and a piece of the 8th
    assert _batch(tiny_chat_llama, inp, cut) == 0
    rows = _lines(cut)
    assert len(rows) == 20 and _by_id(rows) == _by_id(_lines(full))
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["skipped_done"] == 7


def test_kill_9_then_resume(tiny_chat_llama, tmp_path, capsys):
    n = 60
    prompts = _prompts(n, seed=2)
    for p in prompts:
        p["max_tokens"] = 16
    inp = _write(tmp_path / "in.jsonl", prompts)
    ref, out = tmp_path / "ref.jsonl", tmp_path / "out.jsonl"
    assert _batch(tiny_chat_llama, inp, ref, "--ignore-eos") == 0
    cmd = [
        sys.executable,
        "-m",
        "layercake.cli",
        "batch",
        "--model",
        str(tiny_chat_llama),
        "--input",
        str(inp),
        "--output",
        str(out),
        "--batch-size",
        "2",
        "--ignore-eos",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 10:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the job ended before it could be killed"
    assert 10 <= out.read_bytes().count(b"\n") < n
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = _lines(out)
    assert len(rows) == n and _by_id(rows) == _by_id(_lines(ref))


def test_file_level_errors(tiny_chat_llama, tmp_path, capsys):
    inp = _write(tmp_path / "in.jsonl", _prompts(2))
    cases = [
        (tmp_path / "missing.jsonl", tmp_path / "o1.jsonl", "cannot read input"),
        (inp, tmp_path / "nodir" / "o.jsonl", "output directory"),
        (
            _write(tmp_path / "dup.jsonl", [{"id": 1, "prompt": "w1"}, {"id": 1, "prompt": "w2"}]),
            tmp_path / "o2.jsonl",
            "already used on line 1",
        ),
        (inp, _write(tmp_path / "o3.jsonl", ["garbage", '{"id": "x"}']), "not a result line"),
        (tmp_path, tmp_path / "o4.jsonl", "cannot read input"),
    ]
    for i, o, msg in cases:
        assert _batch(tiny_chat_llama, i, o) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err and "Traceback" not in err, err
    assert _batch(tiny_chat_llama, inp, tmp_path / "o5.jsonl", "--temperature", "-2") == 2
    assert "temperature" in capsys.readouterr().err
    topo = _write(tmp_path / "topology.json", [])  # refused before the file is read
    assert _batch(tiny_chat_llama, inp, tmp_path / "o6.jsonl", "--topology", str(topo)) == 2
    assert "does not run over a --topology" in capsys.readouterr().err


def test_batch_on_the_offload_runner(tiny_chat_llama, llm, tmp_path, capsys):
    """Weights half on disk, KV cache on disk (file-backed, shifted in place): blocks of
    batch_size x num_batches slots, same results."""
    prompts = _prompts(9, seed=3)
    inp, out = _write(tmp_path / "in.jsonl", prompts), tmp_path / "out.jsonl"
    assert (
        _batch(
            tiny_chat_llama,
            inp,
            out,
            "--percent",
            "50",
            "0",
            "0",
            "0",
            "100",
            "0",
            "--offload-dir",
            str(tmp_path / "off"),
            "--batch-size",
            "2",
            "--num-batches",
            "2",
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["batch_size"] == 4
    got = _by_id(_lines(out))
    for p in prompts:
        solo = llm.generate(p["prompt"], max_new_tokens=p["max_tokens"])[0]
        assert got[p["id"]]["text"] == solo.text
