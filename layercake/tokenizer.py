"""Text <-> token ids, and chat templates, from an HF tokenizer folder or a GGUF file.

Both sources end in a `tokenizers.Tokenizer` (the Rust library transformers' fast tokenizers wrap),
so encoding and decoding match transformers exactly:

    tok = Tokenizer.from_gguf(GGUFCheckpoint("model.gguf"))    # or Tokenizer.from_dir("model/")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    ids = tok.encode(prompt)

A GGUF has no `tokenizer.json`; `from_gguf` rebuilds one from the vocabulary, merges and token
types in its metadata the way transformers does when it loads a GGUF, so ids agree with it.
"""

import json
import os
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from layercake.errors import LayercakeError

if TYPE_CHECKING:
    from layercake.checkpoint.gguf import GGUFCheckpoint

# llama.cpp token types (tokenizer.ggml.token_type)
_CONTROL, _USER_DEFINED = 3, 4

# Pre-tokenizer regexes for the `tokenizer.ggml.pre` names of byte-level vocabularies; any other
# name gets GPT-2's regex (ByteLevel's own), as in transformers.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {name: _LLAMA3_SPLIT for name in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx")}


class Tokenizer:
    """Encode, decode and render chat templates; built by `from_dir` or `from_gguf`."""

    def __init__(
        self,
        backend: Backend,
        *,
        special_tokens: dict[str, str | None],
        eos_token_ids: list[int],
        chat_template: str | None,
    ):
        self.backend = backend
        # bos_token / eos_token / unk_token / pad_token: strings, which chat templates read
        self.special_tokens = special_tokens
        bos = special_tokens.get("bos_token")
        self.bos_token_id: int | None = backend.token_to_id(bos) if bos else None
        self.eos_token_ids: list[int] = eos_token_ids
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.chat_template = chat_template

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load an HF tokenizer folder: `tokenizer.json`, plus `tokenizer_config.json`,
        `chat_template.jinja` and `generation_config.json` where present."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise LayercakeError(
                f"{path}: no tokenizer.json (only fast-tokenizer folders are supported)."
            )
        try:
            backend = Backend.from_file(str(path / "tokenizer.json"))
        except Exception as e:
            raise LayercakeError(f"{path / 'tokenizer.json'} could not be read ({e}).") from e
        # special_tokens_map.json is where older folders name their special tokens
        config = {
            **_read_json(path / "special_tokens_map.json"),
            **_read_json(path / "tokenizer_config.json"),
        }
        special = {
            key: _content(config.get(key))
            for key in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        # tokenizer.json's post-processor alone decides BOS/EOS: transformers v5 drops the config's
        # add_bos_token / add_eos_token whenever a tokenizer.json exists, and so do we.

        template = config.get("chat_template")
        if (path / "chat_template.jinja").is_file():  # newer HF folders keep it in its own file
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        elif isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            template = {t["name"]: t["template"] for t in template}.get("default")

        eos_ids = []
        if special["eos_token"] is not None:
            eos_ids.append(backend.token_to_id(special["eos_token"]))
        generation_eos = _read_json(path / "generation_config.json").get("eos_token_id")
        eos_ids += generation_eos if isinstance(generation_eos, list) else [generation_eos]
        eos_ids = list(dict.fromkeys(i for i in eos_ids if i is not None))
        return cls(backend, special_tokens=special, eos_token_ids=eos_ids, chat_template=template)

    def save(self, path: str | os.PathLike) -> None:
        """Write an HF tokenizer folder (tokenizer.json + tokenizer_config.json) that
        `from_dir` reads back, e.g. to give a GGUF's tokenizer to a converted checkpoint."""
        path = Path(path)
        self.backend.save(str(path / "tokenizer.json"))
        config = {k: v for k, v in self.special_tokens.items() if v is not None}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
        if len(self.eos_token_ids) > 1:  # beyond eos_token: from_dir reads the rest from here
            (path / "generation_config.json").write_text(
                json.dumps({"eos_token_id": self.eos_token_ids})
            )

    @classmethod
    def from_gguf(cls, ckpt: "GGUFCheckpoint") -> "Tokenizer":
        """Build the tokenizer a GGUF file describes in its `tokenizer.*` metadata.

        Supports llama.cpp's "gpt2" (byte-level BPE: SmolLM2, Llama 3, ...) and "llama"
        (sentencepiece BPE with byte fallback: Llama 2, Mistral, ...) tokenizers.
        """
        spec = ckpt.tokenizer_spec()
        tokens, kind = spec["tokens"], spec["model"]
        if kind == "gpt2":
            backend = _byte_level_bpe(spec)
        elif kind == "llama":
            backend = _sentencepiece_bpe(spec)
        else:
            raise LayercakeError(
                f"{ckpt.path}: tokenizer kind {kind!r} is not supported (supported: gpt2, llama)."
            )

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
        eos_ids = [spec[k] for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
        return cls(
            backend,
            special_tokens=special,
            eos_token_ids=list(dict.fromkeys(i for i in eos_ids if i is not None)),
            chat_template=spec["chat_template"],
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds BOS/EOS where the tokenizer wants them."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids`, leaving out special tokens unless asked to keep them."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render `messages` ([{"role": ..., "content": ...}]) with the model's chat template,
        exactly as transformers' `apply_chat_template(..., tokenize=False)` does."""
        if not self.chat_template:
            raise LayercakeError(
                "this tokenizer has no chat template; pass plain text instead of chat messages."
            )
        try:
            return _compile(self.chat_template).render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **{k: v for k, v in self.special_tokens.items() if v is not None},
            )
        except jinja2.TemplateError as e:
            raise LayercakeError(f"the chat template failed to render: {e}") from e


def _byte_level_bpe(spec: dict) -> Backend:
    """GPT-2 style BPE over bytes spelled as printable characters."""
    spelling = _bytes_to_unicode()
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
    alphabet = set(_bytes_to_unicode().values()) if spec["model"] == "gpt2" else None
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
def _bytes_to_unicode() -> dict[int, str]:
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


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (used to mark assistant tokens): render the body."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja's own tojson escapes HTML characters, which templates do not expect
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@lru_cache
def _compile(template: str) -> jinja2.Template:
    """The template in the environment transformers renders chat templates in."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise LayercakeError(f"the chat template is not valid jinja: {e}") from e


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LayercakeError(f"{path} could not be read as JSON ({e}).") from e


def _content(token) -> str | None:
    """A special token from tokenizer_config.json: a string, or an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token
