import pytest

from tests.conftest import REPO
from trainer.config import load_config


def test_shipped_configs_load():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(str(path))


def test_overrides_are_typed_and_nested():
    cfg = load_config(str(REPO / "configs" / "quickstart.yaml"), ["lora.r=0", "pretrain.lr=0.01",
                                                                    "evaluate.splits=[test]", "pretrain.adam_eps=1e-5"])
    assert cfg.lora.r == 0 and cfg.pretrain.lr == 0.01 and cfg.evaluate.splits == ["test"]
    assert cfg.pretrain.adam_eps == 1e-5  # YAML 1.1 reads "1e-5" as text; numbers are numbers


def test_unknown_key_names_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain:\n  learning_rate: 0.1\n")
    with pytest.raises(KeyError, match=r"bad.yaml: unknown config key 'pretrain.learning_rate'"):
        load_config(str(bad))


@pytest.mark.parametrize("override,message", [
    ("lora.r=abc", "must be a number"),
    ("pretrain.rounds=1.5", "whole number"),
    ("finetune.target=everything", "finetune.target"),
    ("run", "key.sub=value"),
    ("finetune.epochs=0", "at least 1"),
    ("evaluate.splits=[train]", "unknown split"),
])
def test_bad_values_are_clear_errors(override, message):
    with pytest.raises((TypeError, ValueError), match=message):
        load_config(None, [override])


@pytest.mark.parametrize("overrides,message", [
    (["evaluate.baselines=false"], "needs evaluate.baselines=true"),
    (["evaluate.splits=[test]"], "needs evaluate.baselines=true and 'val'"),
    (["evaluate.fusion_weights=[0.5, 1.5]"], "EASE weights in \\[0, 1\\]"),
    (["evaluate.fusion_depth=20"], "at least 100"),
])
def test_bad_ease_fusion_settings_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, ["evaluate.ease_fusion=true", *overrides])


def test_configuration_doc_documents_every_config_key():
    import dataclasses

    from trainer.config import Config

    readme = (REPO / "docs" / "configuration.md").read_text()
    cfg = Config()
    for section in dataclasses.fields(cfg):
        for key in dataclasses.fields(getattr(cfg, section.name)):
            assert f"`{section.name}.{key.name}`" in readme, f"docs/configuration.md lacks {section.name}.{key.name}"


def test_every_deepspeed_config_is_valid_commented_and_documented():
    import json

    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    readme = (REPO / "docs" / "configuration.md").read_text()
    paths = sorted((REPO / "configs").glob("ds_*.json"))
    assert len(paths) >= 6
    for path in paths:
        ds = json.loads(path.read_text())
        assert ds.get("_comment"), f"{path.name} has no _comment"
        DeepSpeedZeroConfig(**ds["zero_optimization"])  # rejects unknown or misspelled keys
        assert f"`{path.name}`" in readme, f"docs/configuration.md says nothing about {path.name}"


def test_ensemble_members_are_checked_before_any_ranking(tmp_path):
    from trainer.evaluate import check_ensemble

    own, other = tmp_path / "run" / "finetune", tmp_path / "seed-1" / "finetune"
    for folder in (own, other):
        folder.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="seed-1/finetune'\\] hold no saved model state"):
        check_ensemble(own, [str(other)])
    (other / "model_state.json").write_text("{}")
    check_ensemble(own, [str(other)])
    with pytest.raises(ValueError, match="repeats a checkpoint"):
        check_ensemble(own, [str(other), str(tmp_path / "seed-1" / "." / "finetune")])
    with pytest.raises(ValueError, match="repeats a checkpoint"):
        check_ensemble(own, [str(own)])
