"""The `prefloop` command as a user runs it: exit codes and messages."""

from pathlib import Path

from typer.testing import CliRunner

from serving.cli import app

runner = CliRunner()


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.startswith("prefloop ")


def test_every_stage_registers_its_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("models", "chat", "train"):
        assert command in result.output
    train_help = runner.invoke(app, ["train", "--help"]).output
    assert "sft" in train_help


def test_bad_config_exits_2_naming_file_and_key(tmp_path: Path) -> None:
    cfg = tmp_path / "sft.yaml"
    cfg.write_text("training:\n  learning_rat: 0.1\n")
    result = runner.invoke(app, ["train", "sft", "--config", str(cfg)])
    assert result.exit_code == 2
    assert str(cfg) in result.output and "training.learning_rat: unknown key" in result.output


def test_bad_override_exits_2() -> None:
    result = runner.invoke(app, ["train", "sft", "--set", "training.batch_size=-1"])
    assert result.exit_code == 2
    assert "training.batch_size" in result.output


def test_bad_data_exits_2_naming_line(tmp_path: Path, tiny_model: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n'
    )
    result = runner.invoke(
        app,
        [
            "train",
            "sft",
            "--set",
            f"model={tiny_model}",
            "--set",
            f"data.train={data}",
            "--set",
            f"output_dir={tmp_path / 'out'}",
            "--set",
            "tracking.report_to=none",
        ],
    )
    assert result.exit_code == 2
    assert f"{data}:2: malformed JSON" in result.output
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_unknown_model_exits_2() -> None:
    result = runner.invoke(app, ["models", "pull", "gpt-17"])
    assert result.exit_code == 2
    assert "unknown embedded model 'gpt-17'" in result.output


def test_models_list_shows_embedded_models() -> None:
    result = runner.invoke(app, ["models", "list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "smollm2-135m-instruct" in result.output and "tiny-random" in result.output
