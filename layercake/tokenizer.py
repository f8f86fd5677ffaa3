"""Text <-> token ids, and chat templates, from an HF tokenizer folder or a GGUF file.

Both sources end in a `tokenizers.Tokenizer` (the Rust library transformers' fast tokenizers wrap),
so encoding and decoding match transformers exactly:

    tok = Tokenizer.from_gguf(GGUFCheckpoint("model.gguf"))    # or Tokenizer.from_dir("model/")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    ids = tok.encode(prompt)

A GGUF has no `tokenizer.json`; `from_gguf` rebuilds one from the vocabulary, merges and token
types in its metadata the way transformers does when it loads a GGUF, so ids agree with it.
"""

import bisect
import json
import os
import re
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer as Backend

from layercake import chat_template as templates
from layercake.checkpoint.files import open_regular, read_json_object
from layercake.errors import LayercakeError
from layercake.gguf_tokenizer import gguf_backend

if TYPE_CHECKING:
    from layercake.checkpoint.gguf import GGUFCheckpoint


class Tokenizer:
    """Encode, decode and render chat templates; built by `from_dir` or `from_gguf`."""

    def __init__(
        self,
        backend: Backend,
        *,
        special_tokens: dict[str, str | None],
        eos_token_ids: list[int],
        chat_template: str | None,
        template_source: str = "the chat template",
    ):
        self.backend = backend
        # bos_token / eos_token / unk_token / pad_token: strings, which chat templates read
        self.special_tokens = special_tokens
        bos = special_tokens.get("bos_token")
        self.bos_token_id: int | None = backend.token_to_id(bos) if bos else None
        self.eos_token_ids: list[int] = eos_token_ids
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.chat_template = chat_template
        self.template_source = template_source  # names the template in errors
        self._plain: dict[bool, Backend] = {}  # encoders that read special tokens as text

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load an HF tokenizer folder: `tokenizer.json`, plus `tokenizer_config.json`,
        `chat_template.jinja` and `generation_config.json` where present."""
        path = Path(path)
        if not os.path.lexists(path / "tokenizer.json"):
            raise LayercakeError(
                f"{path}: no tokenizer.json (only fast-tokenizer folders are supported)."
            )
        open_regular(path / "tokenizer.json").close()  # a FIFO or directory: refused, not read
        try:
            backend = Backend.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # the tokenizers library's own error type
            raise LayercakeError(f"{path / 'tokenizer.json'} could not be read ({e}).") from None
        # special_tokens_map.json is where older folders name their special tokens
        config = {
            **_read_json(path / "special_tokens_map.json"),
            **_read_json(path / "tokenizer_config.json"),
        }
        special = {
            key: _content(config.get(key), path / "tokenizer_config.json", key)
            for key in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        # tokenizer.json's post-processor alone decides BOS/EOS: transformers v5 drops the config's
        # add_bos_token / add_eos_token whenever a tokenizer.json exists, and so do we.
        template, source = _dir_template(path, config.get("chat_template"))
        eos_ids = []
        if special["eos_token"] is not None:
            eos_ids.append(backend.token_to_id(special["eos_token"]))
        generation_eos = _read_json(path / "generation_config.json").get("eos_token_id")
        generation_eos = generation_eos if isinstance(generation_eos, list) else [generation_eos]
        if not all(i is None or (type(i) is int and i >= 0) for i in generation_eos):
            raise LayercakeError(
                f"{path / 'generation_config.json'}: eos_token_id must be token ids."
            )
        eos_ids = list(dict.fromkeys(i for i in eos_ids + generation_eos if i is not None))
        return cls(
            backend,
            special_tokens=special,
            eos_token_ids=eos_ids,
            chat_template=template,
            template_source=source,
        )

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
        backend, special = gguf_backend(spec, ckpt.path)
        eos_ids = [spec[k] for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
        return cls(
            backend,
            special_tokens=special,
            eos_token_ids=list(dict.fromkeys(i for i in eos_ids if i is not None)),
            chat_template=spec["chat_template"],
            template_source=f"{ckpt.path}: tokenizer.chat_template",
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds BOS/EOS where the tokenizer wants them."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids`, leaving out special tokens unless asked to keep them."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render `messages` ([{"role": ..., "content": ...}]) with the model's chat template,
        exactly as transformers' `apply_chat_template(..., tokenize=False)` does, within the
        time and size limits of `layercake.chat_template`."""
        if not self.chat_template:
            raise LayercakeError(
                "this tokenizer has no chat template; pass plain text instead of chat messages."
            )
        return templates.render(
            self.chat_template,
            self.template_source,
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **{k: v for k, v in self.special_tokens.items() if v is not None},
        )

    def encode_chat(
        self, messages: list[dict], add_generation_prompt: bool = True, allow_special: bool = False
    ) -> list[int]:
        """Token ids of `messages` rendered by the chat template (which writes any BOS itself).

        Special-token text inside the messages (`<|im_end|>` typed by a user) is encoded as the
        plain text it is, never as the control token, so a message cannot close its turn or
        open another role's; the template's own special tokens are kept. `allow_special=True`
        encodes the messages' special-token text as control tokens (trusted input only).
        """
        if allow_special or self._special_regex() is None:
            text = self.apply_chat_template(messages, add_generation_prompt)
            return self.encode(text, add_special_tokens=False)
        held: list[str] = []  # special-token texts taken out of the messages, in order
        mark = f"\ue000{secrets.token_hex(8)}"  # a placeholder prefix no input can guess

        def hide(m: re.Match) -> str:
            held.append(m.group(0))
            return f"{mark}{len(held) - 1}\ue001"

        hidden = _map_strings(messages, lambda t: self._special_regex().sub(hide, t))
        text = self.apply_chat_template(hidden, add_generation_prompt)
        if not held:
            return self.encode(text, add_special_tokens=False)
        pieces = re.split(f"{mark}(\\d+)\ue001", text)
        spans, pos = [], 0  # where the held texts are back in the prompt
        for i, piece in enumerate(pieces):
            if i % 2:
                pieces[i] = piece = held[int(piece)]
                spans.append((pos, pos + len(piece)))
            pos += len(piece)
        return self._encode_with_plain_spans("".join(pieces), spans)

    def _encode_with_plain_spans(self, text: str, spans: list[tuple[int, int]]) -> list[int]:
        """`text` encoded as usual, except that between the special tokens outside `spans`, any
        stretch holding a span is encoded with special tokens read as plain text. The stretches
        are what the tokenizer encodes separately anyway (it splits at special tokens)."""
        enc = self.backend.encode(text, add_special_tokens=False)
        ids, offsets = enc.ids, enc.offsets  # each attribute read builds a new list
        special = self._special_ids()
        ends = [hi for _, hi in spans]  # spans are sorted and disjoint

        def in_span(a: int, b: int) -> bool:
            k = bisect.bisect_right(ends, a)  # the first span ending after a
            return k < len(spans) and spans[k][0] < b

        cuts = [i for i, t in enumerate(ids) if t in special and not in_span(*offsets[i])]
        out: list[int] = []
        tok0 = char0 = 0
        for cut in [*cuts, len(ids)]:
            char1 = offsets[cut][0] if cut < len(ids) else len(text)
            if in_span(char0, char1):
                out += self._plain_encoder(char0 == 0).encode(text[char0:char1]).ids
            else:
                out += ids[tok0:cut]
            if cut < len(ids):
                out.append(ids[cut])
                tok0, char0 = cut + 1, offsets[cut][1]
        return out

    def _special_ids(self) -> set[int]:
        return {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}

    def _special_regex(self) -> re.Pattern | None:
        """The special tokens' texts, longest first (None when there are none)."""
        if not hasattr(self, "_special_re"):
            texts = [t.content for t in self.backend.get_added_tokens_decoder().values()]
            texts = sorted({t for t in texts if t}, key=len, reverse=True)
            specials = [t for t in texts if self.backend.token_to_id(t) in self._special_ids()]
            self._special_re = re.compile("|".join(map(re.escape, specials))) if specials else None
        return self._special_re

    def _plain_encoder(self, at_start: bool) -> Backend:
        """A copy of the tokenizer that reads special tokens as text and adds nothing; for a
        stretch not at the start, a sentencepiece "prepend on first" setting becomes "never",
        as it is for every stretch after the first when the whole text is encoded."""
        if at_start not in self._plain:
            spec = json.loads(self.backend.to_str())
            spec["post_processor"] = None
            if not at_start:
                spec["pre_tokenizer"] = _never_prepend(spec.get("pre_tokenizer"))
            plain = Backend.from_str(json.dumps(spec))
            plain.encode_special_tokens = True
            self._plain[at_start] = plain
        return self._plain[at_start]


def _never_prepend(node: Any) -> Any:
    """A tokenizer.json pre-tokenizer with every `prepend_scheme: first` set to `never`."""
    if isinstance(node, list):
        return [_never_prepend(x) for x in node]
    if isinstance(node, dict):
        out = {k: _never_prepend(v) for k, v in node.items()}
        if out.get("prepend_scheme") == "first":
            out["prepend_scheme"] = "never"
        return out
    return node


def _map_strings(value: Any, f: Any) -> Any:
    """`value` (messages: dicts, lists, strings) with `f` applied to every string in it."""
    if isinstance(value, str):
        return f(value)
    if isinstance(value, dict):
        return {k: _map_strings(v, f) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map_strings(v, f) for v in value]
    return value


def _read_json(path: Path) -> dict:
    return read_json_object(path) if os.path.lexists(path) else {}


def _dir_template(path: Path, template: Any) -> tuple[str | None, str]:
    """The chat template of an HF folder (its own file, or tokenizer_config.json's, perhaps
    among named ones) and where it came from."""
    file = path / "chat_template.jinja"
    if os.path.lexists(file):  # newer HF folders keep it in its own file
        with open_regular(file) as f:
            raw = f.read(4 * templates.MAX_TEMPLATE_CHARS + 1)
        try:
            return raw.decode("utf-8"), str(file)
        except UnicodeDecodeError:
            raise LayercakeError(f"{file}: not UTF-8 text") from None
    source = f"{path / 'tokenizer_config.json'}: chat_template"
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = [t for t in template if isinstance(t, dict) and t.get("name") == "default"]
        template = named[0].get("template") if named else None
    if template is not None and not isinstance(template, str):
        raise LayercakeError(f"{source} must be a string (or named templates).")
    return template, source


def _content(token: Any, path: Path, key: str) -> str | None:
    """A special token from tokenizer_config.json: a string, or an AddedToken dict."""
    token = token.get("content") if isinstance(token, dict) else token
    if token is not None and not isinstance(token, str):
        raise LayercakeError(f"{path}: {key} must be a string, not {token!r:.40}.")
    return token
