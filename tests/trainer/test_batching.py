"""Document construction: prompts, homogeneous main texts, loss positions, hold-out masking."""
import torch

from model.tokenizer import IDTokenizer
from tests.helpers import docs_collab, docs_content, tiny_tokenizer
from trainer.batching import Collator


def _setup(**kw):
    tok = IDTokenizer(tiny_tokenizer(), num_users=6, num_items=12)
    return tok, Collator(tok, seed=7, max_text_tokens=kw.pop("max_text_tokens", 64), max_items=50, **kw)


def _row(batch, r):
    """Document r's tokens and targets, whatever the layout (packed or padded)."""
    mine = batch["doc_index"] == r
    return batch["input_ids"][mine].tolist(), batch["targets"][mine].tolist()


def test_collab_document_prompt_items_and_targets():
    tok, col = _setup()
    docs = docs_collab()
    batch = col.collab(docs, epoch=0)
    for r, doc in enumerate(docs):
        ids, targets = _row(batch, r)
        prompt = tok.encode(f"user_{doc['user']} has interacted with")
        assert ids[: len(prompt)] == prompt
        main = ids[len(prompt):]
        assert sorted(t - tok.item_offset for t in main) == sorted(doc["items"])  # only item tokens
        # the prompt's last position predicts the first item; the last token predicts nothing
        assert targets[: len(prompt) - 1] == [-1] * (len(prompt) - 1)
        assert targets[len(prompt) - 1: -1] == [t - tok.item_offset for t in main]
        assert targets[-1] == -1
        assert batch["reg_users"][r] == doc["user"]
        assert [i for i in batch["reg_items"][r].tolist() if i >= 0] == sorted(doc["items"])
    assert torch.all(batch["targets"][batch["doc_index"] < 0] == -1)


def test_item_order_is_reshuffled_each_epoch_but_seeded():
    tok, col = _setup()
    doc = [docs_collab()[1]]
    orders = [tuple(col.collab(doc, epoch=e)["input_ids"][0].tolist()) for e in range(6)]
    assert len(set(orders)) > 1
    assert orders[0] == tuple(col.collab(doc, epoch=0)["input_ids"][0].tolist())


def test_content_document_targets_are_the_text_tokens_and_truncate():
    tok, col = _setup(max_text_tokens=3)
    docs = docs_content()
    batch = col.content(docs, epoch=0)
    for r, doc in enumerate(docs):
        ids, targets = _row(batch, r)
        main = tok.encode(" " + doc["text"], with_bos=False)[:3]
        assert ids[-3:] == main
        assert [t for t in targets if t >= 0] == main
    assert batch["reg_users"].tolist() == [1, -1]
    assert batch["reg_items"][:, 0].tolist() == [2, 5]


def test_rec_prompt_masks_a_fifth_of_the_items_and_targets_them():
    tok, col = _setup()
    docs = [{"user": 3, "items": list(range(10)), "pos": 0}, {"user": 2, "items": [4], "pos": 1}]
    batch = col.rec(docs, epoch=0)
    for r, doc in enumerate(docs):
        ids = batch["input_ids"][batch["doc_index"] == r].tolist()
        history = {t - tok.item_offset for t in ids if t >= tok.item_offset}
        heldout = set(batch["target_items"][batch["target_docs"] == r].tolist())
        assert len(heldout) == max(1, len(doc["items"]) // 5)
        assert not history & heldout and history | heldout == set(doc["items"])
        last = int(batch["last_index"][r])
        assert batch["doc_index"].flatten()[last] == r and batch["input_ids"].flatten()[last] == ids[-1]
        assert tok.decode(ids).endswith(f", user_{doc['user']} will interact with")
    assert batch["target_items"].max() < 12 and batch["target_docs"].tolist() == sorted(batch["target_docs"].tolist())
    other_epoch = col.rec(docs, epoch=1)
    assert set(other_epoch["target_items"][other_epoch["target_docs"] == 0].tolist()) != \
        set(batch["target_items"][batch["target_docs"] == 0].tolist())


def test_rec_target_all_train_as_in_the_reference_code():
    tok, col = _setup(rec_target="all_train")
    batch = col.rec([{"user": 3, "items": [1, 4, 8], "pos": 0}], epoch=0)
    assert sorted(batch["target_items"].tolist()) == [1, 4, 8] and batch["target_docs"].tolist() == [0, 0, 0]


def test_score_prompt_lists_all_train_items_in_a_fixed_order():
    tok, col = _setup()
    a = col.score([3], [[1, 4, 8, 9]])
    b = col.score([3], [[1, 4, 8, 9]])
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert {t - tok.item_offset for t in a["input_ids"][0].tolist() if t >= tok.item_offset} == {1, 4, 8, 9}
