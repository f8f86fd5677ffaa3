"""Progress of long waits: plain lines on a non-terminal stderr, a tqdm bar on a terminal,
nothing when quiet; and the call sites that use it."""

from __future__ import annotations

import io
import re

import pytest

from layercake import progress


@pytest.fixture(autouse=True)
def loud(monkeypatch):
    monkeypatch.delenv("LAYERCAKE_QUIET", raising=False)
    progress.set_quiet(None)
    yield
    progress.set_quiet(None)


def test_track_lines(capsys):
    sizes = [3e8, 5e8, 2e8]
    assert list(progress.track(sizes, "writing", size=lambda s: s, unit="B", every=0)) == sizes
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "layercake: writing: 0/1.00 GB"
    assert lines[1:3] == [
        "layercake: writing: 0.30 GB/1.00 GB (30 %)",
        "layercake: writing: 0.80 GB/1.00 GB (80 %)",
    ]
    assert re.fullmatch(r"layercake: writing: done, 1.00 GB in \d+\.\d s", lines[3])
    assert len(lines) == 4


def test_track_lines_are_rate_limited(capsys):
    list(progress.track(range(50), "timing", unit="sizes"))  # default: a line per 5 s at most
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "layercake: timing: 0/50 sizes"
    assert re.fullmatch(r"layercake: timing: done, 50 sizes in \d+\.\d s", lines[1])
    assert len(lines) == 2


def test_waiting_lines(capsys):
    with progress.waiting("building"):
        pass
    with pytest.raises(ValueError), progress.waiting("failing"):
        raise ValueError
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "layercake: building ..."
    assert re.fullmatch(r"layercake: building: done in \d+\.\d s", lines[1])
    assert lines[2] == "layercake: failing ..."
    assert re.fullmatch(r"layercake: failing: failed after \d+\.\d s", lines[3])


def test_quiet(capsys, monkeypatch):
    monkeypatch.setenv("LAYERCAKE_QUIET", "1")
    list(progress.track([1, 2], "x"))
    with progress.waiting("y"):
        pass
    monkeypatch.delenv("LAYERCAKE_QUIET")
    progress.set_quiet(True)
    with progress.waiting("z"):
        pass
    assert capsys.readouterr().err == ""


def test_on_new_shape_announces_each_key_once(capsys):
    calls = []
    fn = progress.on_new_shape(lambda x, y: calls.append(x) or x * y, lambda a: a[0], "rows {key}")
    assert [fn(2, 3), fn(2, 4), fn(5, 1)] == [6, 8, 5] and calls == [2, 2, 5]
    err = capsys.readouterr().err
    assert err.count("layercake: rows 2 ...") == 1 and err.count("layercake: rows 5 ...") == 1
    assert err.count("done in") == 2


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_on_a_terminal(monkeypatch):
    term = Terminal()
    monkeypatch.setattr("sys.stderr", term)
    list(progress.track([1e6, 1e6], "writing", size=lambda s: s, unit="B"))
    with progress.waiting("compiling"):
        pass
    out = term.getvalue()
    assert "\r" in out and "layercake: writing: 100%" in out and "2.00M/2.00M" in out
    assert re.search(r"layercake: compiling: done in 00:0\d", out)
    assert "..." not in out  # no plain lines on a terminal


def test_offload_layout_reports_progress(tiny_llama, tmp_path, capsys):
    import layercake

    layercake.load(tiny_llama, percent=(0, 0, 100, 0, 100, 0), offload_dir=tmp_path)
    err = capsys.readouterr().err
    assert "layercake: writing the offload layout" in err and " MB in " in err
    layercake.load(tiny_llama, percent=(0, 0, 100, 0, 100, 0), offload_dir=tmp_path)
    assert "offload layout" not in capsys.readouterr().err  # written once: nothing to wait for
