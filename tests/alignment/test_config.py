from pathlib import Path

import pytest

from alignment.config import ConfigError, load_config, parse_override
from alignment.sft import SFTRunConfig


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_yaml_and_overrides_merge_in_order(tmp_path: Path) -> None:
    cfg_file = write(
        tmp_path / "sft.yaml", "model: tiny-random\ntraining:\n  epochs: 3\n  learning_rate: 1.0e-4\n"
    )
    cfg = load_config(SFTRunConfig, cfg_file, ["training.epochs=2", "lora.target_modules=[q_proj,v_proj]"])
    assert cfg.model == "tiny-random"
    assert cfg.training.epochs == 2
    assert cfg.training.learning_rate == 1e-4
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "bad.yaml", "training:\n  epochz: 3\n")
    with pytest.raises(ConfigError) as exc:
        load_config(SFTRunConfig, cfg_file)
    assert str(cfg_file) in str(exc.value)
    assert "training.epochz: unknown key" in str(exc.value)


def test_wrong_type_names_key_and_value(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "bad.yaml", "training:\n  batch_size: many\n")
    with pytest.raises(ConfigError) as exc:
        load_config(SFTRunConfig, cfg_file)
    assert "training.batch_size" in str(exc.value) and "'many'" in str(exc.value)


def test_override_errors_name_the_override() -> None:
    with pytest.raises(ConfigError, match=r"(?s)--set lora\.r=0.*lora\.r: Input should be greater than 0"):
        load_config(SFTRunConfig, None, ["lora.r=0"])
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("training.epochs")


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "broken.yaml", "model: x\ntraining: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml:\d+: invalid YAML"):
        load_config(SFTRunConfig, cfg_file)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(SFTRunConfig, "/nonexistent/sft.yaml")


CONFIGS = Path(__file__).parents[2] / "configs"

# Each shipped YAML and the model it must validate as ("module:Class"; fnmatch patterns).
SHIPPED_CONFIG_MODELS = {
    "sft*.yaml": "alignment.sft:SFTRunConfig",
    "dpo*.yaml": "alignment.dpo:DPORunConfig",
    "kto*.yaml": "alignment.kto:KTORunConfig",
    "ppo*.yaml": "alignment.rl.config:PPORunConfig",
    "grpo*.yaml": "alignment.rl.config:GRPORunConfig",
    "reward*.yaml": "reward.trainer:RewardRunConfig",
    "eval*.yaml": "reward.evaluate:EvalConfig",
    "curate*.yaml": "reward.curation:CurateConfig",
    "annotation*.yaml": "annotation.config:AnnotationConfig",
    "serve*.yaml": "serving.config:ServeConfig",
    "loop*.yaml": "serving.config:LoopConfig",
    "quickstart*.yaml": "serving.quickstart.config:QuickstartConfig",
    "rubric*.yaml": "serving.quickstart.rubric:Rubric",
}


def _model_for(path: Path) -> type:
    import importlib
    from fnmatch import fnmatch

    matches = [target for pattern, target in SHIPPED_CONFIG_MODELS.items() if fnmatch(path.name, pattern)]
    assert len(matches) == 1, f"{path.name}: map it to its config model in SHIPPED_CONFIG_MODELS"
    module, name = matches[0].split(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    """Every YAML in configs/ loads as the model its command reads it with (unknown keys fail)."""
    model = _model_for(path)
    cfg = load_config(model, path)
    assert isinstance(cfg, model)
    assert set(cfg.model_fields_set) >= _top_level_keys(path)  # every key in the file was applied


def _top_level_keys(path: Path) -> set[str]:
    import yaml

    return set(yaml.safe_load(path.read_text()) or {})


def test_shipped_configs_are_all_checked() -> None:
    """The glob above finds every config (a new one needs a mapping), and all eleven originals."""
    names = {p.name for p in CONFIGS.glob("*.yaml")}
    original = {
        "annotation",
        "dpo",
        "eval",
        "grpo",
        "kto",
        "loop",
        "ppo",
        "reward",
        "serve",
        "sft",
        "sft_ray",
    }
    assert {f"{n}.yaml" for n in original} <= names
    for path in CONFIGS.glob("*.yaml"):
        _model_for(path)
