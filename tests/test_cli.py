"""The CLI: streaming generate, and one clear line (no traceback, exit 2) for user mistakes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from layercake.cli import main


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_streams_and_matches_api(tiny_chat_llama, capsys):
    import layercake

    code, out, err = run_cli(
        capsys,
        "generate",
        "--model",
        str(tiny_chat_llama),
        "--prompt",
        "w1 w2 w3",
        "--max-new-tokens",
        "6",
        "--ignore-eos",
        "-v",
    )
    assert code == 0, err
    llm = layercake.load(tiny_chat_llama)
    expected = llm.generate("w1 w2 w3", max_new_tokens=6, ignore_eos=True)[0]
    assert out.strip() == expected.text.strip() and len(expected.token_ids) == 6
    assert "decode" in err and "tok/s" in err


def test_generate_chat(tiny_chat_llama, capsys):
    import layercake

    code, out, _ = run_cli(
        capsys,
        "generate",
        "--model",
        str(tiny_chat_llama),
        "--chat",
        "--system",
        "w5",
        "--prompt",
        "w7",
        "--max-new-tokens",
        "4",
    )
    assert code == 0
    llm = layercake.load(tiny_chat_llama)
    msgs = [{"role": "system", "content": "w5"}, {"role": "user", "content": "w7"}]
    assert (
        llm.tokenizer.apply_chat_template(msgs) == "<s>system: w5</s><s>user: w7</s><s>assistant:"
    )
    assert out.strip() == llm.generate(llm.chat_prompt(msgs), max_new_tokens=4)[0].text.strip()


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--temperature", "-1", "temperature"),
        ("--top-p", "0", "top_p"),
        ("--top-k", "-3", "top_k"),
        ("--min-p", "2", "min_p"),
        ("--max-new-tokens", "0", "max_new_tokens"),
        ("--parts", "0-99", "part spec"),
        ("--device", "tpu9", "device"),
        ("--dtype", "float7", "dtype"),
    ],
)
def test_invalid_options(tiny_chat_llama, capsys, flag, value, message):
    code, out, err = run_cli(
        capsys, "generate", "--model", str(tiny_chat_llama), "--prompt", "w1", flag, value
    )
    assert code == 2
    assert err.startswith("layercake: error:") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_prompt_longer_than_context(tiny_chat_llama, capsys):
    long_prompt = " ".join(["w4"] * 200)  # the tiny model's context is 128
    code, _, err = run_cli(
        capsys, "generate", "--model", str(tiny_chat_llama), "--prompt", long_prompt
    )
    assert code == 2 and "200 tokens" in err and "context of 128" in err


def test_model_path_errors(tiny_llama, tmp_path, capsys):
    cases = [(tmp_path / "missing", "not found")]
    nothing = tmp_path / "noweights"
    nothing.mkdir()
    (nothing / "config.json").write_text(json.dumps({"model_type": "llama"}))
    cases.append((nothing, "no weights"))
    other = tmp_path / "gpt2"
    shutil.copytree(tiny_llama, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    cases.append((other, "supported: falcon, llama, mistral, mixtral, olmoe"))
    trunc = tmp_path / "trunc"
    shutil.copytree(tiny_llama, trunc)
    w = trunc / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    cases.append((trunc, "truncated"))
    notgguf = tmp_path / "model.gguf"
    notgguf.write_bytes(b"definitely not a gguf file" * 10)
    cases.append((notgguf, "GGUF"))
    for path, message in cases:
        code, _, err = run_cli(capsys, "generate", "--model", str(path), "--prompt", "hi")
        assert code == 2, path
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_console_script_exit_code(tmp_path):
    """The installed entry point: message on stderr, exit code 2, no traceback."""
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "layercake.cli",
            "generate",
            "--model",
            str(tmp_path / "nope"),
            "--prompt",
            "x",
        ],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr and "not found" in p.stderr
