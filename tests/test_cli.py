"""The `prefloop` command as a user runs it: exit codes and messages."""

from pathlib import Path

import pytest
import typer
from typer.core import TyperGroup
from typer.testing import CliRunner

from serving.cli import app

runner = CliRunner()


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.startswith("prefloop ")


STAGE_COMMANDS = {
    "models": "alignment",
    "chat": "alignment",
    "reward": "reward",
    "eval": "reward",
    "data": "reward",
    "annotate": "annotation",
    "serve": "serving",
    "feedback": "serving",
    "loop": "serving",
    "registry": "serving",
    "quickstart": "serving",
    "train": "serving",
}
TRAIN_FLAGS = {"--config", "--set", "--resume", "--ray", "--workers"}


def _commands(group: object) -> dict:
    assert isinstance(group, TyperGroup)
    return dict(group.commands)


def test_every_stage_registers_its_commands() -> None:
    root = typer.main.get_command(app)
    assert set(_commands(root)) == set(STAGE_COMMANDS)  # a missing stage loses its commands: fails here
    train = _commands(root)["train"]
    assert set(_commands(train)) == {"sft", "dpo", "kto", "reward", "ppo", "grpo"}
    for name, command in _commands(train).items():
        flags = {opt for param in command.params for opt in param.opts}
        assert flags >= TRAIN_FLAGS, f"train {name} lacks {sorted(TRAIN_FLAGS - flags)}"
    for name in ("ppo", "grpo"):
        assert "--reward-model" in {o for p in _commands(train)[name].params for o in p.opts}
    help_text = runner.invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    assert all(command in help_text for command in STAGE_COMMANDS)


def test_a_stage_that_fails_to_import_is_an_error_not_a_missing_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The root imports each stage's CLI module by name: a broken stage breaks `prefloop` loudly."""
    import importlib
    import sys

    import reward

    monkeypatch.setitem(sys.modules, "reward.cli", None)  # importing it now raises ModuleNotFoundError
    monkeypatch.delattr(reward, "cli")
    monkeypatch.delitem(sys.modules, "serving.cli")  # restored (the real module) after the test
    with pytest.raises(ImportError, match=r"reward\.cli"):
        importlib.import_module("serving.cli")


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


def _lora_adapter(base: Path, out: Path, chat_template: str | None = None) -> Path:
    """A LoRA adapter dir; with `chat_template`, the run also saved its own tokenizer."""
    from peft import LoraConfig, get_peft_model

    from alignment.models import load_causal_lm, load_tokenizer

    get_peft_model(load_causal_lm(base), LoraConfig(r=2, target_modules="all-linear")).save_pretrained(out)
    if chat_template is not None:
        tokenizer = load_tokenizer(base)
        tokenizer.chat_template = chat_template
        tokenizer.save_pretrained(out)
    return out


def test_chat_takes_the_tokenizer_by_the_policy_rule(tiny_model: Path, tmp_path: Path) -> None:
    # No tokenizer saved with the adapter: the base's is used (before, chat read the adapter dir).
    bare = _lora_adapter(tiny_model, tmp_path / "bare")
    ok = runner.invoke(
        app, ["chat", "hi", "--model", str(tiny_model), "--adapter", str(bare), "--max-new-tokens", "2"]
    )
    assert ok.exit_code == 0, ok.output
    # The adapter's own tokenizer wins when its run saved one: its template is the one rendered.
    own = _lora_adapter(tiny_model, tmp_path / "own", "{{ raise_exception('the adapter template') }}")
    result = runner.invoke(app, ["chat", "hi", "--model", str(tiny_model), "--adapter", str(own)])
    assert "the adapter template" in str(result.exception) + result.output
