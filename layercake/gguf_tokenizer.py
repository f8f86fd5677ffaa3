"""A `tokenizers` backend rebuilt from the `tokenizer.*` metadata of a GGUF file, the way
transformers does when it loads a GGUF, so ids agree with it. Every metadata value is checked
first: a wrong one is one error naming the file and the key."""

from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from layercake.errors import LayercakeError

# llama.cpp token types (tokenizer.ggml.token_type)
_CONTROL, _USER_DEFINED = 3, 4

# Pre-tokenizer regexes for the `tokenizer.ggml.pre` names of byte-level vocabularies; any other
# name gets GPT-2's regex (ByteLevel's own), as in transformers.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {name: _LLAMA3_SPLIT for name in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx")}
# Merges rebuilt from scores try every split of every token: bound the work (real
# vocabularies need a few million steps).
MAX_SPLIT_WORK = 2**27


def gguf_backend(spec: dict, path: Path) -> tuple[Backend, dict[str, str | None]]:
    """The backend and the special token strings (bos/eos/unk/pad) the GGUF describes.

    Supports llama.cpp's "gpt2" (byte-level BPE: SmolLM2, Llama 3, ...) and "llama"
    (sentencepiece BPE with byte fallback: Llama 2, Mistral, ...) tokenizers.
    """
    _check_gguf_spec(spec, path)
    tokens, kind = spec["tokens"], spec["model"]
    if kind not in ("gpt2", "llama"):
        raise LayercakeError(
            f"{path}: tokenizer kind {kind!r} is not supported (supported: gpt2, llama)."
        )
    try:
        backend = (_byte_level_bpe if kind == "gpt2" else _sentencepiece_bpe)(spec)
    except Exception as e:  # the tokenizers library's own errors: bad merges and the like
        raise LayercakeError(f"{path}: its tokenizer cannot be built ({e}).") from None

    def token(key: str) -> str | None:
        token_id = spec[f"{key}_token_id"]
        return tokens[token_id] if token_id is not None and token_id < len(tokens) else None

    special = {
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
    }
    _add_special_tokens(backend, spec, special)
    # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise.
    add_bos = spec["add_bos_token"] if spec["add_bos_token"] is not None else kind == "llama"
    _set_post_processor(backend, special, add_bos, bool(spec["add_eos_token"]))
    return backend, special


def _check_gguf_spec(spec: dict, path: Path) -> None:
    """Every `tokenizer.*` value of the right type and size, so the tokenizer built from them
    either works or fails with one error naming the key."""

    def bad(key: str, why: str) -> LayercakeError:
        return LayercakeError(f"{path}: tokenizer.ggml.{key} {why}.")

    tokens = spec["tokens"]
    if not isinstance(tokens, list) or not all(type(t) is str for t in tokens):
        raise bad("tokens", "must be an array of strings")
    n = len(tokens)
    for key, kinds in (("token_types", (int,)), ("scores", (int, float))):
        values = spec[key]
        if values is None:
            continue
        if not isinstance(values, list) or not all(type(v) in kinds for v in values):
            raise bad(key.replace("token_types", "token_type"), "must be an array of numbers")
        if len(values) != n:
            raise bad(
                key.replace("token_types", "token_type"), f"has {len(values)}, not {n}, values"
            )
    merges = spec["merges"]
    if merges is not None and (
        not isinstance(merges, list)
        or not all(type(m) is str and m.count(" ") == 1 for m in merges)
    ):
        raise bad("merges", 'must be an array of strings "left right"')
    for key in ("model", "pre"):
        if spec[key] is not None and type(spec[key]) is not str:
            raise bad(key, "must be a string")
    for key in ("add_bos_token", "add_eos_token", "add_space_prefix"):
        if spec[key] is not None and type(spec[key]) is not bool:
            raise bad(key, "must be true or false")
    for key in ("bos", "eos", "unknown", "padding", "eot", "eom"):
        token_id = spec[f"{key}_token_id"]
        if token_id is not None and (type(token_id) is not int or not 0 <= token_id < n):
            raise bad(f"{key}_token_id", f"= {token_id!r} is not a token id (0 to {n - 1})")
    if spec["chat_template"] is not None and type(spec["chat_template"]) is not str:
        raise LayercakeError(f"{path}: tokenizer.chat_template must be a string.")
    if (
        spec["model"] == "llama"
        and not merges
        and sum(len(t) ** 2 for t in tokens) > MAX_SPLIT_WORK
    ):
        raise bad("tokens", "are too long to rebuild merges from scores")


def _byte_level_bpe(spec: dict) -> Backend:
    """GPT-2 style BPE over bytes spelled as printable characters."""
    spelling = byte_alphabet()
    alphabet = set(spelling.values())
    # Tokens written in plain text (llama.cpp sometimes does) are respelled in the byte alphabet.
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(spec["tokens"])
    }
    merges = [tuple(m.split(" ")) for m in spec["merges"] or ()]
    backend = Backend(
        models.BPE(
            vocab,
            merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    split = _SPLITS.get(spec["pre"])
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(spec: dict) -> Backend:
    """Sentencepiece BPE ("▁" for spaces, <0xNN> byte fallback), as transformers' LlamaTokenizer."""
    tokens = spec["tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if spec["merges"]:
        merges = [tuple(m.split(" ")) for m in spec["merges"]]
    else:  # most sentencepiece files store scores, not merges: rebuild them best-first
        merges = _merges_from_scores(
            vocab, dict(zip(tokens, spec["scores"] or [0.0] * len(tokens)))
        )
    backend = Backend(models.BPE(vocab, merges, fuse_unk=True, byte_fallback=True, dropout=None))
    # transformers ignores add_space_prefix and always prepends; llama.cpp honours it, so do we.
    prefix = spec["add_space_prefix"] is not False
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return backend


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, highest-scoring token first (transformers' order)."""
    merges = []
    for token, score in scores.items():
        pairs = [(token[:i], token[i:]) for i in range(1, len(token))]
        pairs = sorted(
            (p for p in pairs if p[0] in vocab and p[1] in vocab),
            key=lambda p: (vocab[p[0]], vocab[p[1]]),
        )
        merges += [(left, right, score) for left, right in pairs]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _add_special_tokens(backend: Backend, spec: dict, special: dict[str, str | None]) -> None:
    """Keep control tokens (and bos/eos/unk/pad) whole and special; user-defined ones whole only.

    In a byte-level vocabulary a "control" token spelled outside the byte alphabet is a llama.cpp
    mislabel; adding it would grow the vocabulary past the model's, so it is skipped.
    """
    types = spec["token_types"] or [1] * len(spec["tokens"])
    alphabet = set(byte_alphabet().values()) if spec["model"] == "gpt2" else None
    control = [
        t
        for t, kind in zip(spec["tokens"], types)
        if kind == _CONTROL and (alphabet is None or set(t) <= alphabet)
    ]
    named = [t for t in special.values() if t is not None and t not in control]
    backend.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t in control + named]
    )
    vocab = backend.get_vocab()
    user = [t for t, kind in zip(spec["tokens"], types) if kind == _USER_DEFINED and t in vocab]
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])


def _set_post_processor(backend: Backend, special: dict, add_bos: bool, add_eos: bool) -> None:
    """BOS/EOS around each sequence, transformers' `update_post_processor`."""
    bos, eos = special.get("bos_token"), special.get("eos_token")
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = (
        f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    )
    ids = [(bos, backend.token_to_id(bos))] if add_bos else []
    ids += [(eos, backend.token_to_id(eos))] if add_eos else []
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=ids
    )


@lru_cache
def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable bytes map to themselves."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return {
        **{b: chr(b) for b in printable},
        **{b: chr(256 + n) for n, b in enumerate(others)},
    }
