import pytest

from model.tokenizer import IDTokenizer
from trainer.backbone import real_tokenizer, train_bpe_tokenizer

TEXTS = [
    "user_3 has interacted with item_0 item_7 item_19",
    "user_3 has interacted with item_4 item_5, user_3 will interact with",
    "user_0 wrote the following review for item_2: Great shampoo, smells nice!\nWould buy again.",
    "The title of item_11 is: Dove Men+Care Body Wash (3 pack)",
    "item_1",
]


@pytest.fixture(scope="module")
def trained():
    corpus = ["great shampoo smells nice", "body wash for men", "would buy again, 3 pack"] * 30
    return IDTokenizer(train_bpe_tokenizer(corpus, vocab_size=300), num_users=5, num_items=20)


def test_round_trip_trained_tokenizer(trained):
    for text in TEXTS:
        assert trained.decode(trained.encode(text, with_bos=False)) == text


def test_round_trip_gpt2(tokenizers_dir):
    tok = IDTokenizer(real_tokenizer(tokenizers_dir, "gpt2"), num_users=5, num_items=20)
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_id_tokens_are_atomic_and_after_the_vocabulary(trained):
    n = trained.vocab_size
    ids = trained.encode("item_0 item_7 item_19", with_bos=False)
    assert ids == [n + 5 + 0, n + 5 + 7, n + 5 + 19]
    assert trained.encode("user_4", with_bos=False) == [n + 4]
    prompt = trained.encode("user_3 has interacted with", with_bos=False)
    assert prompt[0] == n + 3 and all(t < n for t in prompt[1:])
    assert trained.total_size == n + 25


def test_out_of_range_id_is_an_error(trained):
    with pytest.raises(ValueError, match="item_20 is out of range"):
        trained.encode("item_20")


def test_bos(trained):
    tok = IDTokenizer(trained.base, 5, 20, add_bos=True)
    encoded = tok.encode_many(["item_1", "user_0 has interacted with item_2"])
    assert [ids[0] for ids in encoded] == [tok.base.bos_token_id] * 2
    assert tok.decode(encoded[1]) == "user_0 has interacted with item_2"


def test_padded_vocabulary_moves_the_id_range(trained):
    tok = IDTokenizer(trained.base, 5, 20, vocab_size=len(trained.base) + 12)
    assert tok.encode("user_0", with_bos=False) == [len(trained.base) + 12]


def test_tiny_model_without_shared_tokenizers_trains_one_on_the_data(tmp_path):
    """The quick start's path on a machine without the shared folder."""
    from data_shards.synthetic import write_synthetic_cllm4rec
    from trainer.backbone import load_backbone, load_tokenizer
    from trainer.cli import main

    data = write_synthetic_cllm4rec(tmp_path / "data", num_users=30, num_items=20)
    main(["make-tiny-model", "--output", str(tmp_path / "tiny"), "--data", str(data),
          "--tokenizers-dir", str(tmp_path / "absent"), "--vocab-size", "500"])
    tok = load_tokenizer(str(tmp_path / "tiny"))
    model, attention = load_backbone(str(tmp_path / "tiny"))
    assert len(tok) <= 500 and model.config.vocab_size == len(tok)
    assert attention == "sdpa_varlen"
    assert not any(p.requires_grad for p in model.parameters())
