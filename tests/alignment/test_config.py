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


def test_shipped_configs_validate() -> None:
    """Every YAML in configs/ that names an SFT run must load without error."""
    configs = Path(__file__).parents[2] / "configs"
    for path in configs.glob("sft*.yaml"):
        load_config(SFTRunConfig, path)
