"""Turn a ``--model`` argument into a path: a local file or directory, else a model in the
Hugging Face cache, found offline as transformers finds it (nothing is downloaded).

Accepted names: ``Org/Name``, ``Org/Name@revision`` (a branch, tag or commit of the cache's
``refs/``, or a snapshot's full commit hash) and, for repositories of GGUF files,
``Org/Name/file.gguf`` (``Org/Name@revision/file.gguf``). A local path always wins.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from layercake.errors import LayercakeError

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a Hub owner or repository name
_SNAPSHOT = re.compile(r"models--(.+?)--(.+)/snapshots/[^/]+")


def hub_cache() -> tuple[Path, str]:
    """The Hugging Face hub cache directory and what chose it, by huggingface_hub's rules:
    ``$HF_HUB_CACHE``, ``$HUGGINGFACE_HUB_CACHE`` (older name), ``$HF_HOME/hub``,
    ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser(), f"${var}"
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub", "$HF_HOME/hub"
    if os.environ.get("XDG_CACHE_HOME"):
        xdg = Path(os.environ["XDG_CACHE_HOME"]).expanduser()
        return xdg / "huggingface" / "hub", "$XDG_CACHE_HOME/huggingface/hub"
    return Path.home() / ".cache" / "huggingface" / "hub", "the default"


def _parse(name: str) -> tuple[str, str | None, str | None] | None:
    """``(repo id, revision, file in the repository)``, or None when ``name`` is no Hub name."""
    if name.startswith(("/", "./", "../", "~")) or "\\" in name:
        return None
    first, _, rest = name.partition("/")
    if not rest:  # "gpt2": a repository from before the Hub had owners
        owner, repo, file = "", first, ""
    else:
        owner, (repo, _, file) = first, rest.partition("/")
    repo, _, revision = repo.partition("@")
    ids = [owner, repo] if owner else [repo]
    if not all(_SEGMENT.match(s) for s in ids) or (file and not file.endswith(".gguf")):
        return None
    if not owner and repo.endswith(".gguf"):  # a local file name mistyped, not a repository
        return None
    return "/".join(ids), revision or None, file or None


def locate_model(model: str | os.PathLike) -> Path:
    """The path of ``model``: itself when it exists here, else its snapshot in the Hugging
    Face cache (a directory, or the repository's one .gguf file). One clear error otherwise."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    hub = _parse(str(model))
    if hub is None:
        raise LayercakeError(f"model path not found: {path}")
    repo_id, revision, file = hub
    cache, chosen_by = hub_cache()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    if not repo.is_dir():
        raise LayercakeError(
            f"model {model} not found: not a path here ({path.absolute()}) nor in the Hugging "
            f"Face cache {cache} ({chosen_by}; no {repo.name}); download it with "
            f"`hf download {repo_id}`, or set HF_HUB_CACHE or HF_HOME to the cache that has it"
        )
    snapshot = _snapshot(repo, revision or "main", str(model))
    if file is not None:
        target = snapshot / file
        if not target.is_file():
            have = ", ".join(_ggufs(snapshot)) or "none"
            raise LayercakeError(f"{repo_id} has no {file} in {snapshot} (its .gguf files: {have})")
        return target
    if (snapshot / "config.json").is_file():
        return snapshot
    ggufs = _ggufs(snapshot)
    if len(ggufs) == 1:
        return snapshot / ggufs[0]
    if ggufs:
        raise LayercakeError(
            f"{repo_id} holds {len(ggufs)} .gguf files: pick one as {repo_id}/<file> from "
            + ", ".join(ggufs)
        )
    raise LayercakeError(f"{repo_id} in the cache ({snapshot}) has neither config.json nor .gguf")


def _snapshot(repo: Path, revision: str, model: str) -> Path:
    """The snapshot a revision names: ``refs/<revision>`` holds a commit hash, or the revision
    is itself the hash of a snapshot directory."""
    ref = repo / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = repo / "snapshots" / commit
    if not snapshot.is_dir():
        known = sorted(p.name for p in (repo / "refs").glob("*") if p.is_file())
        raise LayercakeError(
            f"model {model}: no snapshot of revision {revision} in {repo} "
            f"(refs there: {', '.join(known) or 'none'})"
        )
    return snapshot


def _ggufs(snapshot: Path) -> list[str]:
    return sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*.gguf"))


def model_label(path: Path) -> str:
    """A short name for a model path: ``Org/Name`` for a Hugging Face cache snapshot (whose own
    directory name is a commit hash), else the file or directory name."""
    m = _SNAPSHOT.search(path.as_posix())
    if m is None:
        return path.name
    repo_id = f"{m.group(1)}/{m.group(2)}"
    return repo_id if path.suffix != ".gguf" else f"{repo_id}/{path.name}"
