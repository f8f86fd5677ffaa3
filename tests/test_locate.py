"""Model names from the Hugging Face cache (offline): a fake cache laid out as huggingface_hub
writes it (blobs, snapshot symlinks, refs) around the tiny test checkpoint."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from layercake.checkpoint.locate import hub_cache, locate_model, model_label
from layercake.cli import main
from layercake.errors import LayercakeError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD = "fedcba9876543210fedcba9876543210fedcba98"


def cache_repo(cache: Path, repo_id: str, files: dict[str, Path | bytes], commit: str = COMMIT,
               ref: str = "main") -> Path:  # fmt: skip
    """Put ``files`` (name -> source file or bytes) in ``cache`` as the snapshot ``commit`` of
    ``repo_id``, each a symlink to its blob, and point ``refs/<ref>`` at it."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    for name, src in files.items():
        data = src if isinstance(src, bytes) else src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (name.count("/") + 2)) / "blobs" / blob.name)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    c = tmp_path / "hub"
    c.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(c))
    monkeypatch.chdir(tmp_path)  # no stray local "Org/Name" directory
    return c


def test_load_by_name_matches_load_by_path(cache, tiny_chat_llama):
    import layercake

    files = {p.name: p for p in tiny_chat_llama.iterdir() if p.is_file()}
    snap = cache_repo(cache, "Org/Tiny-Chat", files)
    assert locate_model("Org/Tiny-Chat") == snap
    by_name = layercake.load("Org/Tiny-Chat")
    by_path = layercake.load(tiny_chat_llama)
    kw = dict(max_new_tokens=5, ignore_eos=True)
    assert (
        by_name.generate("w1 w2", **kw)[0].token_ids == by_path.generate("w1 w2", **kw)[0].token_ids
    )
    assert model_label(by_name.path) == "Org/Tiny-Chat"


def test_cache_location_follows_huggingface_hub(tmp_path, monkeypatch):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub_cache()[0] == tmp_path / "home" / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub_cache()[0] == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub_cache() == (tmp_path / "hf" / "hub", "$HF_HOME/hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hc"))
    assert hub_cache() == (tmp_path / "hc", "$HF_HUB_CACHE")


def test_revisions(cache):
    new = cache_repo(cache, "Org/M", {"config.json": b"{}"})
    old = cache_repo(cache, "Org/M", {"config.json": b"{ }"}, commit=OLD, ref="v1")
    assert locate_model("Org/M") == new
    assert locate_model("Org/M@v1") == old
    assert locate_model(f"Org/M@{OLD}") == old
    with pytest.raises(LayercakeError, match=r"no snapshot of revision v2 .*refs there: main, v1"):
        locate_model("Org/M@v2")


def test_gguf_repositories(cache):
    one = cache_repo(cache, "Org/One-GGUF", {"one.Q4_0.gguf": b"a", "README.md": b"b"})
    assert locate_model("Org/One-GGUF") == one / "one.Q4_0.gguf"
    assert model_label(one / "one.Q4_0.gguf") == "Org/One-GGUF/one.Q4_0.gguf"
    many = cache_repo(cache, "Org/Many-GGUF", {"m.Q4_0.gguf": b"1", "q8/m.Q8_0.gguf": b"2"})
    with pytest.raises(LayercakeError) as e:
        locate_model("Org/Many-GGUF")
    assert "2 .gguf files" in str(e.value) and "m.Q4_0.gguf, q8/m.Q8_0.gguf" in str(e.value)
    assert locate_model("Org/Many-GGUF/q8/m.Q8_0.gguf") == many / "q8" / "m.Q8_0.gguf"
    assert locate_model("Org/Many-GGUF@main/m.Q4_0.gguf") == many / "m.Q4_0.gguf"
    with pytest.raises(LayercakeError, match=r"has no x.gguf .*m.Q4_0.gguf, q8/m.Q8_0.gguf"):
        locate_model("Org/Many-GGUF/x.gguf")
    cache_repo(cache, "Org/Empty", {"README.md": b"c"})
    with pytest.raises(LayercakeError, match="neither config.json nor .gguf"):
        locate_model("Org/Empty")


def test_local_path_wins(cache, tmp_path):
    cache_repo(cache, "Org/M", {"config.json": b"{}"})
    (tmp_path / "Org" / "M").mkdir(parents=True)
    assert locate_model("Org/M") == Path("Org/M")
    assert locate_model(tmp_path / "Org" / "M") == tmp_path / "Org" / "M"


def test_absent_names_every_place_looked(cache, tmp_path, capsys):
    with pytest.raises(LayercakeError) as e:
        locate_model("Org/Missing")
    msg = str(e.value)
    assert str(tmp_path / "Org" / "Missing") in msg and str(cache) in msg
    assert "$HF_HUB_CACHE" in msg and "models--Org--Missing" in msg
    code = main(["generate", "--model", "Org/Missing", "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("layercake: error: model Org/")
    for not_a_name in ("./nothing", "/no/such/dir", "a/b/c", "model.gguf"):
        with pytest.raises(LayercakeError, match="model path not found"):
            locate_model(not_a_name)
