"""Batch files with poison lines complete, with an error line for what is really invalid; a full
disk stops the job in one line with nothing cut; long lines do not size every cache row."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess

import pytest
from test_batch import _batch, _by_id, _lines, _prompts, _write

from layercake.engine import Engine, Request
from layercake.jobs import batch as batch_job
from layercake.jobs.batch import length_groups
from layercake.sampling import SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_chat_llama):
    import layercake

    return layercake.load(tiny_chat_llama)


def test_extreme_sampling_values_complete(tiny_chat_llama, llm, tmp_path, capsys):
    extremes = [
        dict(temperature=1e-300), dict(top_p=1e-300), dict(temperature=1e300, top_p=1e-300),
        dict(top_k=10**12, min_p=1.0, temperature=1.0), dict(repetition_penalty=1e-300),
        dict(repetition_penalty=1e300, temperature=1.0), dict(min_p=1e-300, temperature=5.0),
        dict(frequency_penalty=-2, presence_penalty=2, temperature=1e-45, logprobs=20),
        dict(seed=2**64 - 1, temperature=1.0, top_p=1e-9),
    ]  # fmt: skip
    lines = [{"id": i, "prompt": "w3 w4", "max_tokens": 5, **kw} for i, kw in enumerate(extremes)]
    inp, out = _write(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    assert _batch(tiny_chat_llama, inp, out) == 0
    assert "Traceback" not in capsys.readouterr().err
    got = _by_id(_lines(out))
    assert len(got) == len(lines) and not any("error" in r for r in got.values())
    greedy = llm.generate("w3 w4", max_new_tokens=5)[0].text
    assert got[0]["text"] == got[1]["text"] == got[2]["text"] == got[3]["text"] == greedy
    assert all(v > -1e4 for t in got[7]["logprobs"] for v in t["top_logprobs"].values())


def test_poison_lines_get_error_lines(tiny_chat_llama, tmp_path, capsys):
    good = _prompts(3, seed=4)
    raw = [json.dumps(g).encode() for g in good]
    raw += [
        b'{"id": "sur", "prompt": "w1 \\ud800 w2"}',  # a lone surrogate (valid JSON)
        b'{"id": "surmsg", "messages": [{"role": "user", "content": "\\udfff"}]}',
        b'{"id": "\\ud800x", "prompt": "w1"}',  # in the id itself
        b'{"id": "surkey", "prompt": "w1", "\\ud800": 1}',
        b"[" * 100_000,
        b'{"id": "deep", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"id": "latin1", "prompt": "caf\xe9"}',  # one byte that is not UTF-8
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"\xef\xbb\xbf" + b"\n".join(raw) + b"\n")  # a BOM at the start
    out = tmp_path / "out.jsonl"
    assert _batch(tiny_chat_llama, inp, out) == 0
    assert "Traceback" not in capsys.readouterr().err
    rows = _lines(out)
    assert len(rows) == len(raw)
    got = _by_id(rows)
    assert all("text" in got[g["id"]] for g in good)  # line 1 too, after the BOM
    assert "lone surrogate" in got["sur"]["error"] and "lone surrogate" in got["surmsg"]["error"]
    assert "lone surrogate" in got["surkey"]["error"]
    nulls = {r["line"]: r["error"] for r in rows if r["id"] is None}
    assert set(nulls) == {6, 8, 9, 10} and "id" in nulls[6]
    assert "nested too deeply" in nulls[8] and "nested too deeply" in nulls[9]
    assert "not UTF-8" in nulls[10] and "0xe9" in nulls[10]


def test_duplicate_ids_refused_before_the_model_loads(
    tiny_chat_llama, tmp_path, capsys, monkeypatch
):
    import layercake.cli

    monkeypatch.setattr(layercake.cli, "load_from_args", lambda *a, **k: pytest.fail("loaded"))
    inp = _write(tmp_path / "dup.jsonl", [{"id": 1, "prompt": "w1"}, {"id": 1, "prompt": "w2"}])
    out = tmp_path / "out.jsonl"
    assert _batch(tiny_chat_llama, inp, out) == 2
    err = capsys.readouterr().err
    assert "already used on line 1" in err and err.count("\n") == 1
    assert not out.exists()


def test_no_output_file_when_refused_after_loading(llm, tmp_path):
    out = tmp_path / "out.jsonl"
    with pytest.raises(Exception, match="already used"):
        batch_job.run_batch(llm, _write(tmp_path / "d.jsonl", [{"id": 1}, {"id": 1}]), out)
    assert not out.exists()


def _enospc_after(monkeypatch, n_ok: int) -> None:
    """Writes to out.jsonl succeed ``n_ok`` times, then write half their bytes and fail like a
    full disk."""
    real, calls = os.write, [0]

    def write(fd, data):
        if not os.readlink(f"/proc/self/fd/{fd}").endswith("out.jsonl"):
            return real(fd, data)
        calls[0] += 1
        if calls[0] <= n_ok:
            return real(fd, data)
        real(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", write)


def test_full_disk_one_line_and_nothing_cut(tiny_chat_llama, tmp_path, capsys, monkeypatch):
    inp = _write(tmp_path / "in.jsonl", _prompts(12, seed=5))
    ref, out = tmp_path / "ref.jsonl", tmp_path / "out.jsonl"
    assert _batch(tiny_chat_llama, inp, ref) == 0
    capsys.readouterr()
    with monkeypatch.context() as m:
        _enospc_after(m, 5)
        assert _batch(tiny_chat_llama, inp, out) == 2
    err = capsys.readouterr().err
    assert err.startswith("layercake: error: cannot write output") and err.count("\n") == 1
    assert "No space left on device" in err and "Traceback" not in err
    data = out.read_bytes()
    assert data.endswith(b"\n") and data.count(b"\n") == 5  # whole records only
    assert _batch(tiny_chat_llama, inp, out) == 0  # space again: the job goes on
    assert _by_id(_lines(out)) == _by_id(_lines(ref))


def test_full_disk_on_a_real_tmpfs(tiny_chat_llama, tmp_path, capsys):
    """The same on a real 64 KiB tmpfs, most of it taken by a filler file (root only)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                       capture_output=True)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        filler = mnt / "filler"
        filler.write_bytes(b"x" * 60 * 1024)  # leaves one 4 KiB page
        prompts = _prompts(80, seed=6)
        for p in prompts:
            p["max_tokens"] = 6
        inp, ref, out = _write(tmp_path / "in.jsonl", prompts), tmp_path / "ref.jsonl", mnt / "o"
        assert _batch(tiny_chat_llama, inp, ref, "--ignore-eos") == 0
        assert len(ref.read_bytes()) > 4096
        capsys.readouterr()
        assert _batch(tiny_chat_llama, inp, out, "--ignore-eos") == 2
        err = capsys.readouterr().err
        assert "No space left on device" in err and err.count("\n") == 1
        data = out.read_bytes()
        assert data.endswith(b"\n") and 0 < data.count(b"\n") < len(prompts)
        filler.unlink()
        assert _batch(tiny_chat_llama, inp, out, "--ignore-eos") == 0
        assert _by_id(_lines(out)) == _by_id(_lines(ref))
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def _req(prompt: int, new: int) -> Request:
    return Request([5] * prompt, SamplingParams(max_new_tokens=new))


def test_length_groups_give_long_lines_fewer_rows():
    reqs = [_req(10, 6) for _ in range(40)] + [_req(7900, 100)]
    groups = length_groups(reqs, 32)
    assert [(len(g.requests), g.slots) for g in groups] == [(1, 1), (40, 32)]
    assert groups[1].capacity == 24 and groups[0].capacity >= 8000
    spread = [_req(n, 1) for n in range(10, 21)] * 20  # lengths within 2x: one full group
    assert [(len(g.requests), g.slots) for g in length_groups(spread, 16)] == [(220, 16)]
    same = [_req(50, 10) for _ in range(100)]
    assert [(len(g.requests), g.slots) for g in length_groups(same, 32)] == [(100, 32)]
    mixed = [_req(3000, 16) for _ in range(42)] + [_req(100, 50) for _ in range(1958)]
    groups = length_groups(mixed, 32)
    cells = [g.slots * g.capacity for g in groups]
    assert max(cells) <= 32 * 450 and sum(len(g.requests) for g in groups) == 2000
    assert [(len(g.requests), g.slots) for g in groups] == [(42, 3), (1958, 32)]
    assert length_groups(mixed, 32, fixed=True)[0].slots == 32


def test_a_long_line_does_not_size_every_row(tiny_chat_llama, llm, tmp_path, monkeypatch):
    """40 short lines and one that fills the context: no cache holds more than the short lines'
    full batch or one row of the long one; results equal solo runs."""
    sizes = []
    real = Engine.__init__

    def spy(self, runner, *a, **k):
        real(self, runner, *a, **k)
        sizes.append(self.slots * self.cache.capacity)

    monkeypatch.setattr(Engine, "__init__", spy)
    lines = _prompts(40, seed=7) + [{"id": "long", "prompt": "w5 " * 100, "max_tokens": 20}]
    inp, out = _write(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    assert _batch(tiny_chat_llama, inp, out, "--batch-size", "16") == 0
    assert len(sizes) == 2 and max(sizes) <= 16 * 30, sizes
    got = _by_id(_lines(out))
    for p in lines:
        solo = llm.generate(p["prompt"], max_new_tokens=p["max_tokens"])[0]
        assert got[p["id"]]["text"] == solo.text
