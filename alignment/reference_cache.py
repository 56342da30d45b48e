"""Reference log-probs cached on disk, so the frozen reference model runs once per (model, adapter, data).

DPO compares the policy with a frozen reference: log pi_ref(y|x) for every chosen and rejected
response. The reference never changes during a run, so its log-probs are computed once before
training and stored under a key that names everything they depend on: the base model's weights,
the reference adapter's weights, the tokenized pairs, and the settings that change the numbers.
A re-run (new output dir, another epoch count, a resumed run) finds them and skips the forwards.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file

from alignment.fingerprints import sha256_files
from alignment.models import MANIFEST
from alignment.paths import prefloop_home

COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def default_cache_dir() -> Path:
    return prefloop_home() / "cache" / "reference-logps"


@lru_cache(maxsize=16)
def weights_fingerprint(path: str) -> str:
    """Content hash of a model or adapter directory (its prefloop manifest when it has one: already sha256s)."""
    directory = Path(path)
    if not directory.is_dir():
        return f"hub:{path}"  # a hub id: the name is all we know without downloading
    if (directory / MANIFEST).is_file():
        return sha256_files([directory / MANIFEST], with_names=True)
    files = sorted(
        p for p in directory.iterdir() if p.suffix in {".safetensors", ".bin", ".json"} and p.is_file()
    )
    return sha256_files(files, with_names=True)


def pairs_fingerprint(dataset: Dataset) -> str:
    """Hash of the tokenized pairs, in order (row i of the cache belongs to row i of the dataset)."""
    digest = hashlib.sha256()
    for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
        for ids in dataset[column]:
            digest.update(np.asarray(ids, dtype=np.int64).tobytes())
            digest.update(b"|")
    return digest.hexdigest()


def cache_key(model: str, adapter: str | None, dataset: Dataset, settings: dict[str, Any]) -> str:
    parts = {
        "model": weights_fingerprint(model),
        "adapter": weights_fingerprint(adapter) if adapter else None,
        "data": pairs_fingerprint(dataset),
        "settings": settings,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class ReferenceCache:
    """`<dir>/<key>.safetensors` holding one float32 value per pair for each of COLUMNS."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or default_cache_dir()

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def load(self, key: str, rows: int) -> dict[str, torch.Tensor] | None:
        path = self.path(key)
        if not path.is_file():
            return None
        tensors = load_file(str(path))
        # A truncated or foreign file is treated as a miss, never as reference values.
        if set(tensors) != set(COLUMNS) or any(t.shape != (rows,) for t in tensors.values()):
            return None
        return tensors

    def save(self, key: str, tensors: dict[str, torch.Tensor]) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        tmp = path.with_suffix(".tmp")
        save_file({k: tensors[k].float().contiguous() for k in COLUMNS}, str(tmp))
        tmp.replace(path)  # atomic: a concurrent reader sees the old state or the whole file
        return path


def attach(dataset: Dataset, tensors: dict[str, torch.Tensor]) -> Dataset:
    for column in COLUMNS:
        if column in dataset.column_names:
            dataset = dataset.remove_columns(column)
        dataset = dataset.add_column(column, tensors[column].tolist())
    return dataset
