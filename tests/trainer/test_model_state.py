import json

import pytest
import torch

from tests.helpers import tiny_model
from trainer.model_state import load_model_state, save_model_state


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("lora", [True, False])
def test_save_then_load_restores_every_trainable_parameter(tmp_path, lora):
    trained, _ = tiny_model(lora=lora, seed=1)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))  # lora_B starts at zero: make every value distinctive
    save_model_state(trained, tmp_path, rank=0)
    assert (tmp_path / "adapters" / "collab").is_dir() == lora
    assert json.loads((tmp_path / "model_state.json").read_text())["lora"] == lora

    fresh, _ = tiny_model(lora=lora, seed=2)
    load_model_state(fresh, tmp_path)
    want, got = _trainable(trained), _trainable(fresh)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name


def test_loading_into_a_mismatched_model_is_a_clear_error(tmp_path):
    trained, _ = tiny_model(lora=True)
    save_model_state(trained, tmp_path, rank=0)
    paper_mode, _ = tiny_model(lora=False)
    with pytest.raises(ValueError, match="saved with LoRA on"):
        load_model_state(paper_mode, tmp_path)
    with pytest.raises(FileNotFoundError, match="no saved model state"):
        load_model_state(paper_mode, tmp_path / "nothing")
