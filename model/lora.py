"""Two LoRA adapters (collaborative and content) on one frozen base, via PEFT."""
from __future__ import annotations

from peft import LoraConfig, PeftModel, get_peft_model

MODELS = ("collab", "content")  # the two LLMs: the shared frozen base + each its own adapter and ID tables


def add_adapters(hf_model, r: int, alpha: float, dropout: float, target_modules: list[str]) -> PeftModel:
    """Wrap `hf_model` with one adapter per model; the base stays frozen."""
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(hf_model, config, adapter_name=MODELS[0])
    for name in MODELS[1:]:
        peft_model.add_adapter(name, config)
    for name, param in peft_model.named_parameters():
        param.requires_grad = "lora_" in name
    return peft_model


def activate_adapter(peft_model: PeftModel, name: str) -> None:
    """Route the forward pass through adapter `name` only.

    PEFT's set_adapter also switches requires_grad off on the other adapter. DeepSpeed
    builds its optimizer and gradient hooks once, from the parameters that require grad at
    initialize, so both adapters must stay trainable; an inactive adapter simply takes no
    part in the graph (and the optimizer skips it, see trainer.optim).
    """
    if peft_model.active_adapter == name:
        return
    peft_model.set_adapter(name)
    peft_model.set_requires_grad(list(MODELS), requires_grad=True)

