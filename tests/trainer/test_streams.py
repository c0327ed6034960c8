"""The three document streams without waste: packed batches give every document the loss it has
alone, the chunked vocabulary cross-entropy equals the naive one and keeps nothing
vocabulary-wide for backward, and blocked item scoring equals full ranking."""
import json
import random

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from tests.helpers import NUM_ITEMS, NUM_USERS, tiny_model
from trainer.batching import Collator, pack_rows
from trainer.ranking import rank_block
from trainer.metrics import csr_rows, topk_excluding


def _collator(tok, **kw):
    return Collator(tok, seed=0, max_text_tokens=64, max_items=50, **kw)


WORDS = "great shampoo smells nice and lathers well body wash for men three pack would buy again".split()


def _content_docs(n=7, seed=3):
    rng = random.Random(seed)
    docs = []
    for pos in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 14)))
        if pos % 3 == 2:
            docs.append({"kind": "title", "user": None, "item": pos % NUM_ITEMS, "text": text, "pos": pos})
        else:
            docs.append({"kind": "review", "user": pos % NUM_USERS, "item": (3 * pos) % NUM_ITEMS, "text": text,
                         "pos": pos})
    return docs


def _collab_docs(n=7, seed=4):
    rng = random.Random(seed)
    return [{"user": pos % NUM_USERS, "items": rng.sample(range(NUM_ITEMS), rng.randint(1, 10)), "pos": pos}
            for pos in range(n)]


def _nonzero_lora_b(model):
    """PEFT starts lora_B at zero, which leaves lora_A without gradient; give it values (seeded)."""
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def _trainable_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


# ----- packing -----------------------------------------------------------------------------------
def test_pack_rows_places_every_document_once_and_wastes_little():
    rng = random.Random(0)
    for trial in range(200):
        lengths = [rng.randint(1, 120) for _ in range(rng.randint(1, 40))]
        cap = rng.choice([16, 64, 256, 1024])
        rows = pack_rows(lengths, cap)
        assert sorted(d for row in rows for d in row) == list(range(len(lengths)))
        width = max(sum(lengths[d] for d in row) for row in rows)
        assert width <= max(cap, max(lengths))
        assert rows == pack_rows(lengths, cap), "packing must be deterministic"
        if cap >= 256 and sum(lengths) >= 4 * max(lengths):
            # many documents, short against the row: the padding is only the row ends
            assert 1 - sum(lengths) / (len(rows) * width) < 0.10, (lengths, cap, rows)
    # a batch that fits one row is one row, without padding
    assert pack_rows([5, 9, 3], 1024) == [[1, 0, 2]]


def test_packed_layout_keeps_each_document_whole_with_its_own_positions():
    model, tok = tiny_model()
    docs = _content_docs()
    packed = _collator(tok, pack_tokens=200).content(docs, 0)
    padded = _collator(tok, pack=False).content(docs, 0)
    assert "attention_mask" not in packed and "attention_mask" in padded
    assert packed["input_ids"].shape[0] < len(docs) == padded["input_ids"].shape[0]
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    for d in range(len(docs)):
        mine, theirs = packed["doc_index"] == d, padded["doc_index"] == d
        assert mine.any(dim=1).sum() == 1, "a document is split across rows"
        assert torch.equal(packed["input_ids"][mine], padded["input_ids"][theirs])
        assert torch.equal(packed["targets"][mine], padded["targets"][theirs])
        assert packed["position_ids"][mine].tolist() == list(range(int(mine.sum())))
    assert torch.all(packed["targets"][packed["doc_index"] < 0] == -1)


@pytest.mark.parametrize("attention", ["sdpa_varlen", "sdpa"])
@pytest.mark.parametrize("task", ["collab", "content", "rec"])
def test_packed_batch_gives_every_document_its_unpacked_loss_and_the_same_gradients(task, attention):
    docs = _content_docs() if task == "content" else _collab_docs()
    results = {}
    for name, kw in (("packed", {"pack_tokens": 200}), ("padded", {"pack": False})):
        model, tok = tiny_model(seed=2, attention=attention)
        _nonzero_lora_b(model).train()
        col = _collator(tok, **kw)
        batch = getattr(col, task)(docs, 0)
        if name == "packed":
            # several documents share a row: attention must stay inside each of them
            assert (batch["doc_index"].unsqueeze(-1) == torch.arange(len(docs))).any(1).sum(-1).max() > 1
        out = model(task, batch)
        out["loss"].backward()
        results[name] = (out["doc_nll"], _trainable_grads(model))
        # each document alone, a batch of one
        alone = torch.stack([model(task, getattr(col, task)([d], 0))["doc_nll"][0] for d in docs])
        torch.testing.assert_close(out["doc_nll"], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results["packed"][0], results["padded"][0], rtol=1e-5, atol=1e-5)
    grads_packed, grads_padded = results["packed"][1], results["padded"][1]
    assert grads_packed.keys() == grads_padded.keys() and grads_packed
    for name in grads_packed:
        torch.testing.assert_close(grads_packed[name], grads_padded[name], rtol=1e-5, atol=1e-5, msg=name)


def test_packed_documents_do_not_see_their_row_neighbours():
    model, tok = tiny_model(seed=5)
    model.eval()
    docs = _content_docs()
    col = _collator(tok, pack_tokens=1024)  # one row
    before = model("content", col.content(docs, 0))["doc_nll"]
    changed = [dict(d) for d in docs]
    changed[1]["text"] = "mineral foundation with spf 15 " * 3
    after = model("content", col.content(changed, 0))["doc_nll"]
    assert col.content(changed, 0)["input_ids"].shape[0] == 1
    others = [d for d in range(len(docs)) if d != 1]
    torch.testing.assert_close(before[others], after[others], rtol=1e-6, atol=1e-6)
    assert not torch.isclose(before[1], after[1])


def test_sdpa_varlen_equals_the_block_diagonal_mask_in_outputs_and_gradients():
    """Attention one document at a time (right-padded blocks of similar lengths, model/attention.py)
    against transformers' sdpa and eager on the whole row with its mask; grouped-query heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from model.attention import document_layout, register_sdpa_varlen
    from trainer.backbone import TINY_LLAMA

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=50, **TINY_LLAMA)).eval()
    assert hf.config.num_key_value_heads < hf.config.num_attention_heads
    lengths, width = [[7, 3, 1, 12, 2], [20, 5], [1]], 26  # the rest of each row is its padding tail
    positions = torch.zeros(len(lengths), width, dtype=torch.long)
    for r, row in enumerate(lengths):
        col = 0
        for n in row + [width - sum(row)]:
            positions[r, col:col + n] = torch.arange(n)
            col += n
    layout = document_layout(positions)
    assert len(layout.blocks) > 2 and sum(count for count, _ in layout.blocks) == 8 + 3  # 3 tails
    embeds = torch.randn(len(lengths), width, hf.config.hidden_size, requires_grad=True)
    weights = torch.randn(hf.config.hidden_size)
    results = {}
    register_sdpa_varlen()
    for attention in ("sdpa", "eager", "sdpa_varlen"):
        hf.set_attn_implementation(attention)
        extra = {"documents": layout} if attention == "sdpa_varlen" else {}
        hidden = hf.model(inputs_embeds=embeds, position_ids=positions, use_cache=False, **extra).last_hidden_state
        results[attention] = (hidden, *torch.autograd.grad((hidden * weights).sum(), embeds))
    for attention in ("eager", "sdpa_varlen"):
        for mine, theirs in zip(results[attention], results["sdpa"]):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5, msg=attention)
    # each document alone gives the same states
    hf.set_attn_implementation("sdpa")
    alone = hf.model(inputs_embeds=embeds[1:2, 20:25], use_cache=False).last_hidden_state[0]
    torch.testing.assert_close(results["sdpa_varlen"][0][1, 20:25], alone, rtol=1e-5, atol=1e-5)


def test_packed_score_prompts_give_the_same_item_scores():
    model, tok = tiny_model(seed=6)
    model.eval()
    users = list(range(NUM_USERS))
    histories = [d["items"] for d in _collab_docs(NUM_USERS)]
    packed = model("score", _collator(tok, pack_tokens=100).score(users, histories))["scores"]
    padded = model("score", _collator(tok, pack=False).score(users, histories))["scores"]
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)


# ----- vocabulary cross-entropy ------------------------------------------------------------------
@pytest.mark.parametrize("lora", [True, False])
def test_chunked_vocabulary_loss_equals_naive_full_logits_in_loss_and_gradients(lora):
    docs = _content_docs(9)
    results = {}
    for chunk in (5, 0):  # 0: the naive full-vocabulary logits of the whole padded batch
        model, tok = tiny_model(lora=lora, seed=7, lambda_c=0.5)
        _nonzero_lora_b(model)
        model.loss_cfg.vocab_chunk = chunk
        batch = _collator(tok, pack=chunk > 0, pack_tokens=200).content(docs, 0)
        out = model("content", batch)
        out["loss"].backward()
        results[chunk] = (out["loss"].detach(), out["doc_nll"], _trainable_grads(model))
    torch.testing.assert_close(results[5][0], results[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[5][1], results[0][1], rtol=1e-5, atol=1e-5)
    chunked, naive = results[5][2], results[0][2]
    assert chunked.keys() == naive.keys()
    assert {n for n in chunked if n.startswith("tables.content")} == {"tables.content_user.weight",
                                                                       "tables.content_item.weight"}
    if lora:
        assert any("lora_A" in n for n in chunked) and any("lora_B" in n for n in chunked)
    for name in naive:
        assert naive[name].abs().sum() > 0 or "collab" in name
        torch.testing.assert_close(chunked[name], naive[name], rtol=1e-5, atol=1e-5, msg=name)


def test_chunked_vocabulary_loss_keeps_nothing_vocabulary_wide_for_backward():
    def saved_shapes(chunk):
        model, tok = tiny_model(seed=8)
        model.loss_cfg.vocab_chunk = chunk
        batch = _collator(tok).content(_content_docs(9), 0)
        hidden = model.hidden_states(batch, "content").detach().requires_grad_()
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            nll = model.content_nll(hidden, batch, len(batch["last_index"])).sum()
        nll.backward()
        head = model._hf().get_output_embeddings().weight
        assert head.grad is None, "the frozen vocabulary head accumulated a gradient"
        return shapes, head.shape[0], int((batch["targets"] >= 0).sum())

    shapes, vocab, positions = saved_shapes(4)
    assert positions > 4 and shapes, "the test needs several chunks"
    assert all(vocab not in s for s in shapes), f"a vocabulary-wide tensor was kept for backward: {shapes}"
    naive, vocab, _ = saved_shapes(0)
    assert any(vocab in s for s in naive), "the naive path should keep full-vocabulary logits (test sanity)"


def test_vocab_cross_entropy_refuses_a_trainable_head():
    from model.cllm4rec import chunked_vocab_cross_entropy

    weight = torch.randn(11, 4, requires_grad=True)
    with pytest.raises(ValueError, match="frozen output layer"):
        chunked_vocab_cross_entropy(torch.randn(3, 4), weight, None, torch.tensor([1, 2, 3]), 2)


# ----- blocked item scoring ----------------------------------------------------------------------
def test_blocked_topk_equals_full_ranking_including_ties_and_exclusions():
    from model.cllm4rec import blocked_topk

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randint(-2, 3, (9, 3), generator=gen).float()
    weight = torch.randint(-2, 3, (37, 3), generator=gen).float()  # integer scores: many exact ties
    history = [np.sort(np.random.default_rng(u).choice(37, size=u * 3, replace=False)) for u in range(9)]
    rows = torch.from_numpy(np.repeat(np.arange(9), [len(h) for h in history]))
    cols = torch.from_numpy(np.concatenate(history).astype(np.int64))
    full = hidden @ weight.t()
    for k in (1, 5, 30, 40):
        want = topk_excluding(full, history, k)
        for block in (1, 4, 7, 37, 100, 0):
            got = blocked_topk(hidden, weight, k, rows, cols, block)
            assert torch.equal(got, want), (k, block)


def test_blocked_evaluation_equals_unblocked_evaluation():
    model, tok = tiny_model(seed=9)
    model.eval()
    rng = np.random.default_rng(1)
    train = sp.csr_matrix((rng.random((NUM_USERS, NUM_ITEMS)) < 0.3).astype(np.float32))
    col = _collator(tok, pack_tokens=100)
    users = np.arange(NUM_USERS)
    with torch.no_grad():
        scores = model("score", col.score(users.tolist(), [h.tolist() for h in csr_rows(train, users)]))["scores"]
    want = topk_excluding(scores, csr_rows(train, users), 8).numpy()
    for block in (0, 1, 5, NUM_ITEMS):
        assert np.array_equal(rank_block(model, col, train, users, k=8, item_block=block), want), block
    unpacked = rank_block(model, _collator(tok, pack=False), train, users, k=8, item_block=5)
    assert np.array_equal(unpacked, want)


# ----- under a ZeRO-3 engine, with the step log ----------------------------------------------------
def test_zero3_engine_chunked_loss_and_padded_fraction_in_the_log(tmp_path):
    import deepspeed

    from tests.helpers import write_tiny_checkpoint
    from trainer.config import load_config
    from trainer.distributed import init_distributed
    from trainer.engine import build_engine, build_model, load_ds_config
    from trainer.loop import Epoch, TrainLog, train_epoch
    from trainer.optim import AlternatingAdamW, param_groups

    base = write_tiny_checkpoint(tmp_path / "tiny")
    overrides = [f"model.base_dir={base}", "loss.vocab_chunk=3", "data.pack_tokens=32", "lora.dropout=0"]
    cfg = load_config("configs/quickstart.yaml", overrides)
    init_distributed()
    ds_config = load_ds_config(cfg.run.deepspeed, 8)
    model, tok = build_model(cfg, ds_config, NUM_USERS, NUM_ITEMS)
    optimizer = AlternatingAdamW(param_groups(model, 0.0), lr=0.01)
    engine = build_engine(model, ds_config, optimizer)
    plain, _ = build_model(load_config("configs/quickstart.yaml", overrides + ["loss.vocab_chunk=0"]), {},
                           NUM_USERS, NUM_ITEMS)
    named = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(named.values()), modifier_rank=None):
        loaded = plain.load_state_dict({n: p.detach().clone() for n, p in named.items()}, strict=False)
    assert not loaded.unexpected_keys and not set(loaded.missing_keys) & set(named)
    docs = _content_docs(9)
    batch = Collator.from_config(tok, cfg).content(docs, 0)
    engine.eval()
    with torch.no_grad():
        got = engine("content", batch)["doc_nll"]
    want = plain.eval()("content", _collator(tok, pack=False).content(docs, 0))["doc_nll"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    class OneBatch:
        steps_per_epoch = 1

        def loader(self, epoch, start, stop, transform, workers):
            yield 0, docs, transform(docs, epoch)

    log = TrainLog(tmp_path, rank=0, log_every=1)
    train_epoch(engine, optimizer, Epoch(OneBatch(), Collator.from_config(tok, cfg).content, "content", "content",
                                         label="content"), log)
    record = json.loads((tmp_path / "train_log.jsonl").read_text().splitlines()[-1])
    real = int((batch["doc_index"] >= 0).sum())
    assert record["tokens"] == real
    assert record["pad_frac"] == round(1 - real / batch["input_ids"].numel(), 4)
    padded = _collator(tok, pack=False).content(docs, 0)
    assert record["pad_frac"] < 1 - real / padded["input_ids"].numel()
