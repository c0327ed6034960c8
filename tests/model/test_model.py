import pytest
import torch
import torch.nn.functional as F

from tests.helpers import NUM_ITEMS, docs_collab, docs_content, tiny_model
from trainer.batching import Collator
from trainer.optim import AlternatingAdamW, param_groups


def _collator(tok, **kw):
    return Collator(tok, seed=0, max_text_tokens=64, max_items=50, **kw)


def test_item_tables_are_tied_to_input_embeddings_and_heads():
    model, tok = tiny_model()
    table = model.tables["collab_item"]
    h = torch.randn(3, table.weight.shape[1])
    assert torch.allclose(table(hidden=h), h @ table.weight.t())
    # The input embedding of item_j is row j of the same table.
    ids = torch.tensor([[tok.item_token(4)]])
    assert torch.equal(model.embed(ids, "collab")[0, 0], table.weight[4])
    # The rec head's gradient reaches that table.
    batch = _collator(tok).rec(docs_collab(), epoch=0)
    model("rec", batch)["loss"].backward()
    assert table.weight.grad is not None and table.weight.grad.abs().sum() > 0


def test_vocab_head_and_base_stay_frozen():
    model, tok = tiny_model()
    batch = _collator(tok).content(docs_content(), epoch=0)
    model("content", batch)["loss"].backward()
    head = model._hf().get_output_embeddings().weight
    assert head.grad is None and not head.requires_grad
    assert model._hf().get_input_embeddings().weight.grad is None


@pytest.mark.parametrize("task,mine,other", [("collab", "collab", "content"), ("content", "content", "collab")])
def test_mutual_regularization_stops_gradient_to_the_other_model(task, mine, other):
    model, tok = tiny_model(lambda_c=3.0)
    col = _collator(tok)
    batch = col.collab(docs_collab(), 0) if task == "collab" else col.content(docs_content(), 0)
    reg = model.mutual_regularization(batch, mine)
    reg.backward()
    for kind in ("user", "item"):
        assert model.tables[f"{other}_{kind}"].weight.grad is None
    # d/dz_l [lambda/2 ||z_l - sg(z_c)||^2] = lambda (z_l - z_c), on each regularised row only.
    users = batch["reg_users"][batch["reg_users"] >= 0]
    expected = 3.0 * (model.tables[f"{mine}_user"].weight - model.tables[f"{other}_user"].weight).detach()
    grad = model.tables[f"{mine}_user"].weight.grad
    assert torch.allclose(grad[users], expected[users], atol=1e-6)
    untouched = torch.ones(grad.shape[0], dtype=torch.bool)
    untouched[users] = False
    assert torch.all(grad[untouched] == 0)


def test_prompt_kv_cache_then_main_text_equals_single_masked_pass():
    model, tok = tiny_model()
    model.eval()
    doc = docs_content()[0]
    batch = _collator(tok).content([doc], epoch=0)
    single = model("content", batch)["nll"].item()

    prompt_len = int((batch["targets"][0] >= 0).nonzero()[0]) + 1  # the prompt's last position predicts first
    ids = batch["input_ids"][batch["doc_index"] >= 0].unsqueeze(0)
    decoder, head = model._hf().get_decoder(), model._hf().get_output_embeddings()
    with torch.no_grad():
        first = decoder(inputs_embeds=model.embed(ids[:, :prompt_len], "content"), use_cache=True)
        second = decoder(inputs_embeds=model.embed(ids[:, prompt_len:], "content"),
                         cache=first.past_key_values, use_cache=True)
        hidden = torch.cat([first.last_hidden_state[:, -1:], second.last_hidden_state[:, :-1]], dim=1)
        two_pass = F.cross_entropy(head(hidden)[0], ids[0, prompt_len:], reduction="sum").item()
    assert abs(single - two_pass) <= 1e-4 * abs(two_pass)


def test_chunked_vocabulary_loss_equals_one_chunk():
    results = []
    for chunk in (3, 10_000):
        model, tok = tiny_model(seed=1)
        model.loss_cfg.vocab_chunk = chunk
        batch = _collator(tok).content(docs_content(), epoch=0)
        loss = model("content", batch)["loss"]
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad and p.grad is not None]
        results.append((loss.item(), grads))
    assert abs(results[0][0] - results[1][0]) < 1e-4
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.allclose(a, b, atol=1e-5)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(before, model, names):
    now = dict(model.named_parameters())
    return {n for n in names if not torch.equal(before[n], now[n])}


@pytest.mark.parametrize("lora", [True, False])
def test_each_step_moves_only_the_model_whose_loss_it_computed(lora):
    model, tok = tiny_model(lora=lora)
    col = _collator(tok)
    optimizer = AlternatingAdamW(param_groups(model, weight_decay=0.01), lr=0.05)
    names = {n for n, _ in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    base = names - trainable
    collab = {n for n in trainable if "collab" in n}
    content = trainable - collab
    if not lora:
        assert trainable == {f"tables.{m}_{k}.weight" for m in ("collab", "content") for k in ("user", "item")}
    start = _snapshot(model)
    plan = [("collab", "collab", col.collab, docs_collab()), ("content", "content", col.content, docs_content()),
            ("rec", "collab", col.rec, docs_collab()), ("content", "content", col.content, docs_content())]
    for task, owner, make, docs in plan:
        before = _snapshot(model)
        optimizer.zero_grad(set_to_none=False)  # zero (not missing) gradients, as under DeepSpeed
        for p in model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        optimizer.active_model = owner
        model(task, make(docs, 0))["loss"].backward()
        # The forward pass must route through the owner's adapter and tables only.
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        mine, other = (collab, content) if owner == "collab" else (content, collab)
        assert {n for n in mine if "lora_B" in n or "_item" in n} <= with_grad, f"{task}: owner got no gradient"
        assert not with_grad & other, f"{task}: gradient reached the other model: {sorted(with_grad & other)[:3]}"
        optimizer.step()
        moved = _changed(before, model, names)
        assert moved, f"{task} step moved nothing"
        assert moved <= (collab if owner == "collab" else content), f"{task} step moved {moved - collab - content}"
    assert not _changed(start, model, base), "the frozen base changed"


def test_rec_loss_is_multi_hot_cross_entropy_over_items():
    model, tok = tiny_model()
    batch = _collator(tok).rec(docs_collab(), epoch=0)
    out = model("rec", batch)
    logits = model("score", batch)["scores"]
    multi_hot = torch.zeros_like(logits)
    multi_hot[batch["target_docs"], batch["target_items"]] = 1.0
    expected = -(multi_hot * F.log_softmax(logits, -1)).sum() / len(docs_collab())
    assert logits.shape == (2, NUM_ITEMS)
    assert torch.allclose(out["nll"], expected, atol=1e-5)
