"""A tied head keeps its argmax tokens' embedding rows (``models.tied``): a greedy step's lookup
reads no row of the (memory-mapped, maybe cold) table, on one host and across a pipeline, where
the head's node sends the rows with the ids; the tokens stay the table's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_pipeline import job, topology, workers
from tests_helpers import bf16_llama

import layercake
from layercake.models.tied import ArgmaxRows, weight_rows
from layercake.ops import linear as ops

PROMPTS = [[1, 5, 9, 3, 11, 40], [4, 2], [7, 7, 7, 8], [3], [50, 60, 70]]
VOCAB = 512


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    path = bf16_llama(tmp_path_factory.mktemp("tied"), hidden=128, inter=256, vocab=VOCAB)
    ref = layercake.load(path).generate(PROMPTS, max_new_tokens=6, ignore_eos=True)
    return path, [o.token_ids for o in ref]


def table_lookups(monkeypatch) -> list[int]:
    """Rows looked up in a full embedding table by this process, per call."""
    calls: list[int] = []
    inner = F.embedding

    def embedding(ids, weight, *a, **kw):
        if weight.shape[0] == VOCAB:
            calls.append(ids.numel())
        return inner(ids, weight, *a, **kw)

    monkeypatch.setattr(F, "embedding", embedding)
    return calls


def test_offloaded_tied_head_serves_the_next_lookup(tmp_path, tied, monkeypatch):
    path, want = tied
    llm = layercake.load(path, percent=(0, 0, 100, 0, 100, 0), offload_dir=tmp_path,
                         batch_size=8, max_context=16)  # fmt: skip
    calls = table_lookups(monkeypatch)
    out = llm.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)
    assert [o.token_ids for o in out] == want
    assert sum(calls) == sum(len(p) for p in PROMPTS)  # the prompts' tokens, nothing after
    assert llm.runner.head_rows and llm.runner.times["embed_s"] > 0


def test_pipeline_head_node_sends_the_rows(tmp_path, tied, monkeypatch):
    """The head offloaded on pc2, the embeddings on main: 5 rows x 128 bf16 values come back
    with the ids each step, and main's decode steps look nothing up in its table."""
    path, want = tied
    off = {"percent": [0, 0, 100, 0, 100, 0], "offload_dir": str(tmp_path / "off")}
    topo = topology(tmp_path, ["b 0-2", "2-3 e"], options={"pc2": off})
    with workers(topo, path, ["pc2"], "--once"), job(path, topo) as llm:
        calls = table_lookups(monkeypatch)
        returned = []
        inner = llm.runner.forward
        monkeypatch.setattr(llm.runner, "forward", lambda *a, **kw: returned.append(
            inner(*a, **kw)) or returned[-1])  # fmt: skip
        out = llm.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)
        assert [o.token_ids for o in out] == want
        # the ids come back as finite logits (the sampler's fast path), the id's the largest
        assert len(returned) == 6 and all(bool(x.sum().isfinite()) for x in returned)
        assert returned[1][:, -1].argmax(-1).tolist() == [t[1] for t in want]
        assert sum(calls) == len(PROMPTS) * max(map(len, PROMPTS))  # the padded prompt alone
        # ids (8 bytes) and bf16 rows (256 bytes) for every row and step
        assert llm.runner.stats["bytes_received"] == (8 + 2 * 128) * len(PROMPTS) * 6


def test_argmax_rows_are_the_weight_rows_of_the_argmax():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 8, generator=g).bfloat16()
    x = torch.randn(3, 8, generator=g)
    logits = x @ w.float().T
    rows = ArgmaxRows()
    for col, n, form in ((0, 15, "dense"), (15, 25, "blocks")):  # slabs in two forms
        part = w[col : col + n]
        held = part if form == "dense" else ops.BF16([part[:10], part[10:]])
        rows.update(0, logits[:, col : col + n], col, held)
    best = logits.argmax(-1).tolist()
    got = rows.rows()
    assert sorted(got) == sorted(set(best))
    assert all(torch.equal(got[i], w[i]) for i in best)
    assert weight_rows(object(), torch.tensor([0])) is None  # a quantized form: no rows


def test_only_a_plain_float_tied_table_is_taken_from_the_head(tied):
    from layercake.checkpoint import open_checkpoint
    from layercake.config import load_config
    from layercake.models import family
    from layercake.models.parts import Parts
    from layercake.models.tied import head_is_tied

    ckpt = open_checkpoint(tied[0])
    config = load_config(ckpt.config_dict())
    with torch.device("meta"):
        model = family(config.model_type).Model(config, Parts.full(config.num_hidden_layers))
    assert head_is_tied(model, ckpt)

    class Quantized:  # the same tensors, the table block-quantized (a GGUF's Q4_K, say)
        tensor_names = ckpt.tensor_names

        def stored_dtype(self, name):
            return None

    assert not head_is_tied(model, Quantized())
