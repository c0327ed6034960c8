"""Loading a frozen base LLM and its tokenizer from a local directory, and writing tiny ones.

No model hub is contacted: every path here is a local directory. The tiny random LLaMA
that tests and the quick start use is written with `save_pretrained` and read back through
the same `load_backbone` path a real checkpoint takes.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from model.attention import SDPA_VARLEN, register_sdpa_varlen
from trainer import compat

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


def choose_attention(requested: str, dtype=torch.float32) -> str:
    """auto: flash-attn 2 where it can run (CUDA, the package importable, bf16/fp16), else SDPA
    one document at a time (model/attention.py)."""
    if requested != "auto":
        return requested
    if (torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
            and dtype in (torch.bfloat16, torch.float16)):
        return "flash_attention_2"
    return SDPA_VARLEN


def load_tokenizer(base_dir: str):
    tokenizer = AutoTokenizer.from_pretrained(check_base_dir(base_dir))
    if not tokenizer.is_fast:
        raise TypeError(f"{base_dir}: the tokenizer is not a fast tokenizer (tokenizer.json is needed)")
    return tokenizer


def load_backbone(base_dir: str, attn_implementation: str = "auto", dtype=torch.float32,
                  zero3_config: dict | None = None, quantization: str = "none"):
    """The frozen base: any AutoModelForCausalLM in a local directory.

    zero3_config: the DeepSpeed config of a ZeRO-3 run. The model is then built inside
    `deepspeed.zero.Init` and every rank reads only its own partition of each weight from the
    safetensors files (see load_partitioned), so no rank ever holds the whole base.
    quantization="nf4": the base's linear layers are loaded in 4-bit with bitsandbytes (QLoRA);
    every rank holds the whole 4-bit base, which ZeRO does not partition.
    """
    attention = choose_attention(attn_implementation, dtype)
    if attention == SDPA_VARLEN:
        register_sdpa_varlen()
    log.info("attention implementation: %s (requested %s; flash-attn is used when importable on a GPU in "
             "bf16/fp16, else SDPA one document at a time: sdpa_varlen)", attention, attn_implementation)
    path = check_base_dir(base_dir)
    if quantization == "nf4":
        from transformers import BitsAndBytesConfig

        four_bit = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                      bnb_4bit_quant_storage=dtype)
        model = _from_pretrained(path, attn_implementation=attention, dtype=dtype, quantization_config=four_bit)
        log.info("base loaded in 4-bit nf4 (bitsandbytes), compute dtype %s", dtype)
    elif zero3_config is not None and (weight_map := _safetensors_weight_map(path)) is not None:
        model = load_partitioned(path, weight_map, attention, dtype, zero3_config)
    else:
        if zero3_config is not None:
            log.warning("%s has no safetensors weights: transformers loads the checkpoint whole on rank 0 and "
                        "scatters it (convert it with save_pretrained to load partitioned)", path)
        with compat.deepspeed_config_for_transformers(zero3_config) if zero3_config else contextlib.nullcontext():
            model = _from_pretrained(path, attn_implementation=attention, dtype=dtype)
    _log_head(model, path)
    model.requires_grad_(False)
    model.config.use_cache = False
    return model, attention


def _from_pretrained(path: Path, **kwargs):
    """transformers' loading, except that a weight missing from the checkpoint is an error: it would
    otherwise be initialised at random with only a log line (an untied model without its head)."""
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    if info["missing_keys"]:
        raise _missing_weights(path, sorted(info["missing_keys"]))
    return model


def _missing_weights(path: Path, missing: list[str]) -> KeyError:
    hint = ("; config.json says tie_word_embeddings: false, so the model needs its own output head. If the head is "
            "the input embedding, the config must say tie_word_embeddings: true"
            if any("lm_head" in name for name in missing) else "; re-save the base with save_pretrained")
    return KeyError(f"{path}: the checkpoint lacks {len(missing)} weight(s) of the model, e.g. {missing[:3]}{hint}")


def _log_head(model, path: Path) -> None:
    """Tied bases (LLaMA-3.2, Qwen2.5, Gemma, SmolLM) store no lm_head: their vocabulary head is
    the input embedding, which every loading path must keep."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if tied and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise RuntimeError(f"{path}: config.json ties the embeddings, but the loaded head is a separate weight")
    log.info("vocabulary head: %s", "the input embedding (tied embeddings)" if tied else "its own weight (untied)")


def _safetensors_weight_map(path: Path) -> dict[str, Path] | None:
    """Parameter name -> safetensors file, for a single-file or sharded (index.json) checkpoint."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    return None


def load_partitioned(path: Path, weight_map: dict[str, Path], attention: str, dtype, zero3_config: dict):
    """Build the model under `deepspeed.zero.Init`, then fill each rank's partitions from disk.

    transformers' own ZeRO-3 loading has rank 0 map every checkpoint file and scatter each layer,
    so rank 0 touches the whole base. Here each rank reads, per weight, only the rows that
    cover its own slice of the flattened tensor, which is how ZeRO-3 lays partitions out
    (compat.partition_of).
    """
    from safetensors import safe_open
    from transformers import AutoConfig

    with compat.zero3_build_context(zero3_config):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), attn_implementation=attention,
                                                 dtype=dtype)
    # transformers ties the head to the input embedding while it loads a checkpoint, not when it
    # builds a model from its config: tie here, so both names share one partitioned parameter.
    model.tie_weights()
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    params = dict(model.named_parameters())  # a tied weight once, under its first name
    prefix = f"{model.base_model_prefix}."
    stored_name, missing = {}, []
    for name, param in params.items():
        candidates = [c for alias in names_of[id(param)] for c in (alias, alias.removeprefix(prefix))]
        found = [c for c in candidates if c in weight_map]
        if found:
            stored_name[name] = found[0]
        else:
            missing.append(name)
    if missing:
        raise _missing_weights(path, missing)
    by_file: dict[Path, list[str]] = {}
    for name, stored in stored_name.items():
        by_file.setdefault(weight_map[stored], []).append(name)
    for file, names in sorted(by_file.items()):
        with safe_open(file, framework="pt") as f:
            for name in names:
                _fill_partition(params[name], f.get_slice(stored_name[name]), f"{file.name}:{stored_name[name]}")
    log.info("base loaded partitioned (ZeRO-3) from %d safetensors file(s), %s", len(by_file), dtype)
    return model


def _fill_partition(param, stored, where: str) -> None:
    shape = tuple(stored.get_shape())
    if shape != compat.full_shape(param):
        raise ValueError(f"{where}: shape {shape} in the checkpoint, {compat.full_shape(param)} in the model config")
    partition, start, end = compat.partition_of(param)
    numel = compat.full_numel(param)
    if start >= end:
        return
    row = max(1, numel // shape[0]) if shape else 1
    first, last = start // row, -(-end // row)
    rows = stored[first:last] if shape else stored[:]
    flat = rows.reshape(-1)[start - first * row: end - first * row]
    with torch.no_grad():
        partition[: end - start].copy_(flat)


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


def write_tiny_llama(out_dir: str, tokenizer: PreTrainedTokenizerFast, seed: int = 0, max_shard_size: str = "5GB",
                     **overrides) -> Path:
    """A randomly initialised LLaMA with `tokenizer`, saved as a normal checkpoint directory
    (safetensors files of at most `max_shard_size`, with an index when there are several)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = {**TINY_LLAMA, **overrides}
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    log.info("wrote a tiny random LLaMA (%d parameters, vocab %d) to %s",
             sum(p.numel() for p in model.parameters()), len(tokenizer), out)
    return out


def write_random_like(source_dir: str, out_dir: str, seed: int = 0) -> Path:
    """A base with the architecture and tokenizer of `source_dir` and fresh random weights
    (transformers' own initialisation): what a pretrained base is worth is measured against it."""
    from transformers import AutoConfig

    source, out = check_base_dir(source_dir), Path(out_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=torch.float32)
    model.save_pretrained(out)
    load_tokenizer(source_dir).save_pretrained(out)
    log.info("wrote %s with the architecture and tokenizer of %s and random weights (seed %d)", out, source, seed)
    return out
