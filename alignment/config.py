"""Run configuration: pydantic models loaded from YAML, with `--set key=value` overrides.

Every stage's config is a `RunConfig` subclass. `load_config` merges, in order, the model's
defaults, a YAML file, and dotted overrides, and turns pydantic's errors into one message
that names the file and the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    """A config file or override that does not validate; the message names file and key."""


class StrictModel(BaseModel):
    """Base for every config block: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class LoraSettings(StrictModel):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: int = Field(32, gt=0, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear'."
    )
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none", description="'4bit' = QLoRA (bitsandbytes NF4 base weights)."
    )


class DistributedSettings(StrictModel):
    backend: Literal["local", "ray"] = "local"
    num_workers: int = Field(1, ge=1)
    use_gpu: Literal["auto", True, False] = "auto"
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    address: str | None = Field(
        None, description="Ray cluster address; a local cluster is started when unset."
    )
    storage_path: str | None = Field(
        None, description="Where Ray keeps checkpoints (default: <output_dir>/ray)."
    )
    max_failures: int = Field(0, ge=-1, description="Worker failures Ray retries from the latest checkpoint.")


class TrackingSettings(StrictModel):
    report_to: Literal["wandb", "tensorboard", "none"] = "wandb"
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "prefloop"
    run_name: str | None = None


T = TypeVar("T", bound=BaseModel)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=3` -> (['a', 'b'], 3). The value is parsed as YAML, so `true`, `1e-4`, `[q,v]` work."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError):  # ValueError: a YAML date that is no date ("2001-02-30")
        value = raw
    return key.split("."), value


def _set_dotted(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part!r} is not a mapping")
        node = child
    node[path[-1]] = value


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {exc}") from exc
    except ValueError as exc:  # a value YAML's constructors reject, e.g. the date 2001-02-30
        raise ConfigError(f"{path}: invalid YAML value: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build `cls` from defaults <- YAML file <- dotted `key=value` overrides."""
    data: dict[str, Any] = _read_yaml(Path(path)) if path else {}
    for item in overrides or []:
        keys, value = parse_override(item)
        _set_dotted(data, keys, value)
    source = str(path) if path else "<defaults>"
    if overrides:
        source += f" + --set {' '.join(overrides)}"
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def dump_config(config: BaseModel, path: Path) -> None:
    """Write the resolved config next to a run's outputs, so the run can be reproduced."""
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
