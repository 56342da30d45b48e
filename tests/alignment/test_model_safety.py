"""Issue 12, models: no remote code unless a config enables it, safetensors only, no path escapes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from alignment.devices import plan_device
from alignment.kto import KTORunConfig
from alignment.models import (
    ModelError,
    check_adapter,
    load_causal_lm,
    load_with_adapter,
    model_dir,
    pull_model,
    resolve_model,
)
from alignment.paths import PathEscapeError, contained
from alignment.policy import load_run_policy
from alignment.sft import SFTRunConfig
from annotation.config import PushSettings


class RunsCodeWhenUnpickled:
    """A pickle payload: unpickling it writes the marker file (what a malicious .bin could do instead)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def copy_config(tiny_model: Path, target: Path) -> Path:
    target.mkdir()
    for f in tiny_model.iterdir():
        if f.suffix == ".json" and f.name != "prefloop-manifest.json":
            shutil.copy(f, target / f.name)
    return target


# --- trust_remote_code ---------------------------------------------------------------------------------


def test_trust_remote_code_is_off_by_default_in_every_config() -> None:
    assert SFTRunConfig().trust_remote_code is False
    assert KTORunConfig().trust_remote_code is False
    assert PushSettings().trust_remote_code is False


@pytest.fixture
def model_with_code(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """tiny-random plus an `auto_map` pointing at code of its own, which leaves a marker when it runs."""
    import transformers.dynamic_module_utils as dynamic
    from transformers import LlamaConfig

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "hf-modules"))  # not the user's cache
    # Trusted code registers its config class for AutoConfig; here that class is LlamaConfig itself,
    # so undo it after the test (else every later save_pretrained of a Llama looks for custom code).
    monkeypatch.setattr(LlamaConfig, "_auto_class", None)
    marker = tmp_path / "remote-code-ran"
    model = tmp_path / "model-with-code"
    model.mkdir()
    for f in tiny_model.iterdir():
        if f.name != "prefloop-manifest.json":
            (model / f.name).symlink_to(f)
    config = json.loads((tiny_model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig"}
    (model / "config.json").unlink()
    (model / "config.json").write_text(json.dumps(config))
    (model / "configuration_custom.py").write_text(
        "from transformers import LlamaConfig\n"
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "CustomConfig = LlamaConfig\n"
    )
    return model, marker


def test_a_models_own_code_runs_only_when_the_config_enables_it(model_with_code: tuple[Path, Path]) -> None:
    model, marker = model_with_code
    load_causal_lm(model, plan_device("fp32"))  # transformers' own Llama code: loads, custom code ignored
    assert not marker.exists()
    config = KTORunConfig(model=str(model), trust_remote_code=False)
    load_run_policy(config, plan_device("fp32"))
    assert not marker.exists()
    config = KTORunConfig(model=str(model), trust_remote_code=True)  # the wiring: config -> from_pretrained
    load_run_policy(config, plan_device("fp32"))
    assert marker.read_text() == "ran"


# --- safetensors only ----------------------------------------------------------------------------------


def test_pickled_model_weights_are_refused_unopened(tiny_model: Path, tmp_path: Path) -> None:
    model = copy_config(tiny_model, tmp_path / "pickled")
    marker = tmp_path / "unpickled"
    torch.save({"payload": RunsCodeWhenUnpickled(marker)}, model / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"pickles \(pytorch_model\.bin\).*safetensors only"):
        load_causal_lm(model, plan_device("fp32"))
    assert not marker.exists()


def test_safetensors_win_when_a_pickle_sits_beside_them(tiny_model: Path, tmp_path: Path) -> None:
    model = copy_config(tiny_model, tmp_path / "both")
    shutil.copy(tiny_model / "model.safetensors", model / "model.safetensors")
    marker = tmp_path / "unpickled"
    torch.save({"payload": RunsCodeWhenUnpickled(marker)}, model / "pytorch_model.bin")
    loaded = load_causal_lm(model, plan_device("fp32"))
    assert loaded.config.num_hidden_layers == 2
    assert not marker.exists()


@pytest.fixture(scope="module")
def adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from peft import LoraConfig, get_peft_model

    out = tmp_path_factory.mktemp("adapter")
    base = load_causal_lm(tiny_model, plan_device("fp32"))
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(out)
    return out


def test_pickled_adapter_weights_are_refused_unopened(
    tiny_model: Path, adapter: Path, tmp_path: Path
) -> None:
    pickled = tmp_path / "pickled-adapter"
    pickled.mkdir()
    shutil.copy(adapter / "adapter_config.json", pickled / "adapter_config.json")
    marker = tmp_path / "unpickled"
    torch.save({"payload": RunsCodeWhenUnpickled(marker)}, pickled / "adapter_model.bin")
    assert check_adapter(adapter) == str(adapter)
    with pytest.raises(ModelError, match=r"adapter_model\.bin.*safetensors only"):
        load_with_adapter(str(tiny_model), pickled, plan_device("fp32"))
    config = KTORunConfig(model=str(tiny_model), init_adapter=pickled)
    with pytest.raises(ModelError, match="safetensors only"):
        load_run_policy(config, plan_device("fp32"))
    assert not marker.exists()
    (pickled / "adapter_model.bin").unlink()
    with pytest.raises(ModelError, match=r"no adapter_model\.safetensors"):
        check_adapter(pickled)


# --- paths ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../etc", "..", ".", "/etc", "a/../../b", "models/../../x", ""])
def test_model_names_cannot_leave_the_model_cache(name: str, isolated_home: Path) -> None:
    with pytest.raises(ModelError):
        model_dir(name)
    with pytest.raises(ModelError):
        pull_model(name)
    assert not (isolated_home / "etc").exists()


def test_cache_lookup_refuses_path_like_names_that_are_not_directories(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not a valid Hugging Face model id"):
        resolve_model("../../no-such-dir/../etc")
    for name in ("org/../../name", "./no-such-dir", "a/b/c", ".hidden"):
        with pytest.raises(ModelError, match="not a valid Hugging Face model id"):
            resolve_model(name)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert model_dir("tiny-random").name == "tiny-random"


def test_contained_refuses_symlinks_out_of_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "inside").mkdir(parents=True)
    (root / "out").symlink_to(tmp_path)
    assert contained(root, "inside") == root / "inside"
    assert contained(root, "inside/new-file") == root / "inside" / "new-file"
    for name in ("out", "out/x", "../root2", "inside/../../x"):
        with pytest.raises(PathEscapeError):
            contained(root, name)


def test_prefloop_models_pull_refuses_an_escaping_name_with_exit_2(isolated_home: Path) -> None:
    from serving.cli import app

    result = CliRunner().invoke(app, ["models", "pull", "../../etc"])
    assert result.exit_code == 2, result.output
    assert "outside" in result.output and "Traceback" not in result.output
