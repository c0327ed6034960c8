"""Loading a frozen base LLM and its tokenizer from a local directory, and writing tiny ones.

No model hub is contacted: every path here is a local directory. The tiny random LLaMA
that tests and the quick start use is written with `save_pretrained` and read back through
the same `load_backbone` path a real checkpoint takes.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False)


def check_base_dir(base_dir: str) -> Path:
    path = Path(base_dir)
    if not base_dir or not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model.base_dir={base_dir!r} is not a local model directory with config.json. "
            "Point it at a downloaded checkpoint, or write a tiny one with `cllm4rec make-tiny-model`.")
    return path


def choose_attention(requested: str) -> str:
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_tokenizer(base_dir: str):
    tokenizer = AutoTokenizer.from_pretrained(check_base_dir(base_dir))
    if not tokenizer.is_fast:
        raise TypeError(f"{base_dir}: the tokenizer is not a fast tokenizer (tokenizer.json is needed)")
    return tokenizer


def load_backbone(base_dir: str, attn_implementation: str = "auto", dtype=torch.float32):
    """The frozen base: any AutoModelForCausalLM in a local directory.

    Under ZeRO-3 the caller keeps an `HfDeepSpeedConfig` alive before this call, so that
    transformers builds the model inside `deepspeed.zero.Init` and every rank only ever
    holds its partition of the weights.
    """
    attention = choose_attention(attn_implementation)
    log.info("attention implementation: %s (requested %s)", attention, attn_implementation)
    model = AutoModelForCausalLM.from_pretrained(check_base_dir(base_dir), attn_implementation=attention, dtype=dtype)
    model.requires_grad_(False)
    model.config.use_cache = False
    return model, attention


def train_bpe_tokenizer(texts, vocab_size: int = 4000) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the data's own text, for when no real tokenizer is at hand."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def real_tokenizer(tokenizers_dir: Path, name: str) -> PreTrainedTokenizerFast:
    if name == "llama2":
        # tokenizer_file keeps the exact sentencepiece behaviour; AutoTokenizer on transformers 5
        # rebuilds the pre-tokenizer and drops a lone leading "▁".
        return PreTrainedTokenizerFast(tokenizer_file=str(tokenizers_dir / "llama2" / "tokenizer.json"),
                                       bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>")
    if name == "gpt2":
        from transformers import GPT2TokenizerFast

        return GPT2TokenizerFast.from_pretrained(str(tokenizers_dir / "gpt2"))
    raise ValueError(f"unknown tokenizer {name!r}: use llama2, gpt2 or train")


def write_tiny_llama(out_dir: str, tokenizer: PreTrainedTokenizerFast, seed: int = 0, **overrides) -> Path:
    """A randomly initialised LLaMA with `tokenizer`, saved as a normal checkpoint directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = {**TINY_LLAMA, **overrides}
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log.info("wrote a tiny random LLaMA (%d parameters, vocab %d) to %s",
             sum(p.numel() for p in model.parameters()), len(tokenizer), out)
    return out
