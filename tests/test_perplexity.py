"""lite.perplexity: llama-perplexity's chunking, checked by exact math and against transformers' logits."""

from __future__ import annotations

import math

import pytest
import torch
from cli_models import tiny_chat_model

from lite.errors import LiteError
from lite.perplexity import perplexity


class TableModel:
    """Logits depend only on the previous token: row `table[prev]` (so the expected NLL is easy to compute)."""

    def __init__(self, table: torch.Tensor):
        self.table = table
        self.resets = 0

    def session(self, ctx):
        model = self

        class S:
            tokens: list[int] = []

            def reset(self):
                model.resets += 1
                self.tokens = []

            def feed(self, ids, all_logits=False):
                assert len(self.tokens) + len(ids) <= ctx
                self.tokens = self.tokens + list(ids)
                rows = model.table[torch.tensor(ids)]
                return rows if all_logits else rows[-1]

        return S()


def test_exact_chunking_and_scoring():
    g = torch.Generator().manual_seed(0)
    vocab, ctx = 7, 10
    table = torch.randn(vocab, vocab, generator=g)
    tokens = torch.randint(1, vocab, (35,), generator=g).tolist()
    model = TableModel(table)
    res = perplexity(model, tokens, ctx, bos_id=0)
    assert res.chunks == 3 and model.resets == 3  # 35 // 10 chunks, each from an empty cache
    logp = torch.log_softmax(table.double(), dim=-1)
    nll = []
    for c in range(3):
        chunk = [0] + tokens[c * ctx + 1 : (c + 1) * ctx]  # first token replaced by BOS
        for j in range(ctx // 2, ctx - 1):  # the second half: logits at j predict token j + 1
            nll.append(-float(logp[chunk[j], chunk[j + 1]]))
    assert res.tokens_scored == len(nll) == 3 * 4
    assert res.ppl == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-12)
    assert res.chunk_ppl[-1] == pytest.approx(res.ppl) and len(res.chunk_ppl) == 3
    assert perplexity(model, tokens, ctx, chunks=2).chunks == 2


def test_uniform_model_has_vocab_perplexity():
    model = TableModel(torch.zeros(50, 50))
    res = perplexity(model, list(range(40)), ctx=20)
    assert res.ppl == pytest.approx(50.0, rel=1e-12) and res.ppl_error < 1e-5


def test_too_little_text():
    with pytest.raises(LiteError, match="fewer than one chunk of 8; use smaller chunks"):
        perplexity(TableModel(torch.zeros(5, 5)), [1, 2, 3], ctx=8)


def test_agrees_with_transformers(tmp_path_factory):
    from tiny_tokenizer import TRAINING_TEXT
    from transformers import DeepseekV2ForCausalLM

    import lite

    path, hf = tiny_chat_model(tmp_path_factory.mktemp("ppl_models"))
    model = lite.load(str(path), device="cpu")
    tok = model.tokenizer
    tokens = tok.encode(TRAINING_TEXT, add_bos=True)
    ctx, chunks = 96, 3
    res = perplexity(model, tokens, ctx, chunks, bos_id=tok.bos_id)

    ref = DeepseekV2ForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    nll = []
    for c in range(chunks):
        chunk = [tok.bos_id] + tokens[c * ctx + 1 : (c + 1) * ctx]
        with torch.no_grad():
            logits = ref(torch.tensor([chunk])).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        first = ctx // 2
        targets = torch.tensor(chunk[first + 1 :])
        nll.append(-logp[first : ctx - 1].gather(1, targets[:, None])[:, 0])
    expected = math.exp(float(torch.cat(nll).mean()))
    assert res.tokens_scored == chunks * (ctx - 1 - ctx // 2)
    assert abs(res.ppl / expected - 1) < 1e-3, (res.ppl, expected)


def test_chunks_must_be_positive():
    model = TableModel(torch.zeros(5, 5))
    for bad in (0, -1):
        with pytest.raises(LiteError, match=rf"^chunks must be at least 1 \(None scores every chunk\), got {bad}$"):
            perplexity(model, list(range(40)), ctx=10, chunks=bad)
