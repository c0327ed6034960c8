"""Every private DeepSpeed and transformers internal the project touches, in one place.

They are the first thing to break on an upgrade. Each entry says why it is needed; all were
checked with torch 2.13.0, deepspeed 0.19.8, transformers 5.25.0 and peft 0.21.2 (PEFT is used
through public calls only). tests/trainer/test_compat.py fails loudly when one changes shape.
"""
from __future__ import annotations

import contextlib

import torch

CHECKED_WITH = {"torch": "2.13.0", "deepspeed": "0.19.8", "transformers": "5.25.0", "peft": "0.21.2"}


# ----------------------------------------------------------------------------- DeepSpeed


def disable_shm_comm() -> None:
    """On CPU, DeepSpeed's shared-memory comm op JIT-compiles for over a minute on first use;
    gloo's collectives give identical results. The switch is read when the process group starts."""
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def is_partitioned(param) -> bool:
    """Whether ZeRO-3 partitioned this parameter (it then carries ds_id, ds_shape, ds_numel;
    model/cllm4rec.py makes the same check, since model/ does not import trainer/)."""
    return hasattr(param, "ds_id")


def full_shape(param) -> tuple[int, ...]:
    """The parameter's whole shape, also when ZeRO-3 left only a partition in `param.data`."""
    return tuple(param.ds_shape) if is_partitioned(param) else tuple(param.shape)


def full_numel(param) -> int:
    return param.ds_numel if is_partitioned(param) else param.numel()


def partition_of(param) -> tuple[torch.Tensor, int, int]:
    """(this rank's flat partition, its first and its end element in the full flat weight) of a
    ZeRO-3 parameter: rank r holds elements [r*p, (r+1)*p) of the flat weight, p =
    ds_tensor.ds_numel. Loading writes each rank's slice of a checkpoint into it directly, so no
    rank ever holds the whole base."""
    part = param.ds_tensor.ds_numel
    start = part * torch.distributed.get_rank(group=param.ds_process_group)
    return param.ds_tensor, start, min(start + part, param.ds_numel)


def inner_optimizer(engine):
    """The client optimizer inside ZeRO's wrapper (which keeps it as `.optimizer`)."""
    optimizer = engine.optimizer
    return getattr(optimizer, "optimizer", optimizer)


def fp32_partitions(engine) -> list[tuple[int, torch.Tensor]]:
    """(param group index, fp32 tensor that Adam keeps state for) of this rank. ZeRO hands the
    client optimizer its flat fp32 partitions only for the duration of a step, so checkpoints
    take them from the ZeRO optimizer."""
    zero = engine.optimizer
    if hasattr(zero, "fp32_partitioned_groups_flat"):  # stage 3: sub-groups of param groups
        return [(zero.sub_group_to_group_id[i], flat) for i, flat in enumerate(zero.fp32_partitioned_groups_flat)]
    if hasattr(zero, "single_partition_of_fp32_groups"):  # stages 1 and 2
        return list(enumerate(zero.single_partition_of_fp32_groups))
    return [(i, p) for i, group in enumerate(inner_optimizer(engine).param_groups) for p in group["params"]]


def relink_optimizer_state(engine) -> None:
    """Point each weight's optimizer-state view at Adam's current state.

    ZeRO-1/2 (and the bf16 optimizer) link these views once, right after the first param
    group's first step. The two models step on alternate steps, so at that moment the other
    group has no state yet and its views would stay empty for good; relinking before every read
    or write keeps them current.
    """
    zero = engine.optimizer
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


# ----------------------------------------------------------------------------- transformers


def zero3_build_context(zero3_config: dict):
    """What from_pretrained does around building a model under ZeRO-3, for building one from its
    config and filling the partitions ourselves: no random init of weights that are read anyway,
    rotary `arange`s kept in their dtype, and transformers told that ZeRO-3 is on."""
    import deepspeed
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import prevent_arange_dtype_change
    from transformers.modeling_utils import set_zero3_state

    stack = contextlib.ExitStack()
    stack.enter_context(deepspeed_config_for_transformers(zero3_config))
    for context in (no_init_weights(), prevent_arange_dtype_change(),
                    deepspeed.zero.Init(config_dict_or_path=zero3_config), set_zero3_state()):
        stack.enter_context(context)
    return stack


@contextlib.contextmanager
def deepspeed_config_for_transformers(zero3_config: dict):
    """transformers learns of a ZeRO-3 run from a live HfDeepSpeedConfig object (a weak global
    reference): it must stay alive while the model is built or loaded."""
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(zero3_config)
    yield keep_alive


def attention_of(config) -> str:
    """The attention implementation a model was built with (a private config field)."""
    return getattr(config, "_attn_implementation", "") or ""


def gguf_architectures() -> list[str]:
    """The model types transformers can read from GGUF (a private list of its GGUF loader)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return list(GGUF_SUPPORTED_ARCHITECTURES)


def detach_gguf_quantizer(model) -> None:
    """A model read from GGUF keeps its quantizer, and save_pretrained then refuses it as
    "quantized with gguf", although every weight is already a plain float tensor."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
