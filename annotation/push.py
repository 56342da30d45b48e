"""`prefloop annotate push`: candidate pairs -> Argilla records, most informative first.

Pairs come from sampling a policy (k responses per prompt, all distinct pairs among them) or from
a preference file (e.g. exported serving feedback). A reward model, when given, scores both
responses: its preference becomes an Argilla suggestion (AI feedback the annotator can accept),
and records are ordered by |reward difference| ascending, so annotators first see the pairs the
reward model is least sure about (uncertainty sampling for active learning).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import argilla as rg
from rich.progress import Progress

from alignment.data_files import DataError
from alignment.messages import Message
from alignment.preference_data import load_preference_rows
from annotation.config import DatasetSettings, PushSettings
from annotation.preference_dataset import CandidatePair, build_settings, record_id, to_record

# (prompts as message lists, responses) -> one reward per response
Scorer = Callable[[list[list[Message]], list[str]], list[float]]


# --- inputs --------------------------------------------------------------------------------------


def load_pairs(path: str | Path, source: str = "file") -> list[CandidatePair]:
    """Existing preference rows (any format `alignment.preference_data` reads) as candidate pairs."""
    return [
        CandidatePair(
            prompt=row["prompt"],
            first=row["chosen"][-1]["content"],
            second=row["rejected"][-1]["content"],
            source=row.get("source") or source,
        )
        for row in load_preference_rows(path)
    ]


# --- sampling ------------------------------------------------------------------------------------


def distance(x: str, y: str) -> float:
    """1 - Jaccard similarity of the word sets: 0 for identical wording."""
    a, b = set(re.findall(r"\w+", x.lower())), set(re.findall(r"\w+", y.lower()))
    return 1.0 - (len(a & b) / len(a | b) if a | b else 1.0)


def sample_responses(
    model: Any, tokenizer: Any, prompts: list[list[Message]], settings: PushSettings
) -> list[list[str]]:
    """k sampled completions per prompt with the tokenizer's chat template. All prompts x k run
    through the generation engine together (continuous batching), not one prompt at a time."""
    import torch

    from alignment.generation import SamplingParams, policy_engine

    torch.manual_seed(settings.seed)
    engine = policy_engine(model, tokenizer)
    params = SamplingParams(settings.temperature, settings.top_p, settings.max_new_tokens)
    rows = []
    for messages in prompts:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        rows.append([engine.add(ids, params, engine.merged) for _ in range(settings.num_samples)])
    with Progress() as progress:
        task = progress.add_task("sampling responses", total=len(prompts))
        while engine.has_work():
            engine.step()
            progress.update(task, completed=sum(all(s.done for s in row) for row in rows))
    return [[s.text.strip() for s in row] for row in rows]


def build_pairs(
    prompts: list[list[Message]],
    responses: list[list[str]],
    settings: PushSettings,
    scorer: Scorer | None = None,
    source: str = "generated",
) -> tuple[list[CandidatePair], int]:
    """Distinct pairs per prompt (near-identical ones dropped), scored when a scorer is given."""
    rewards: list[list[float | None]] = [[None] * len(r) for r in responses]
    if scorer is not None:
        flat_prompts = [p for p, rs in zip(prompts, responses, strict=True) for _ in rs]
        flat = list(scorer(flat_prompts, [r for rs in responses for r in rs]))
        it = iter(flat)
        rewards = [[float(next(it)) for _ in rs] for rs in responses]
    pairs, dropped = [], 0
    for messages, texts, scores in zip(prompts, responses, rewards, strict=True):
        candidates = []
        for i, j in itertools.combinations(range(len(texts)), 2):
            if distance(texts[i], texts[j]) < settings.min_distance:
                dropped += 1
                continue
            candidates.append(
                CandidatePair(
                    messages, texts[i], texts[j], source, first_reward=scores[i], second_reward=scores[j]
                )
            )
        # the most uncertain pairs of this prompt when there are more than we keep
        candidates.sort(key=_uncertainty_key)
        pairs += candidates[: settings.max_pairs_per_prompt]
    return pairs, dropped


def score_pairs(pairs: Sequence[CandidatePair], scorer: Scorer) -> list[CandidatePair]:
    """Attach reward scores to pairs that came without (e.g. from a file)."""
    prompts = [p.prompt for p in pairs for _ in (0, 1)]
    rewards = list(scorer(prompts, [r for p in pairs for r in (p.first, p.second)]))
    return [
        CandidatePair(
            p.prompt, p.first, p.second, p.source, float(rewards[2 * i]), float(rewards[2 * i + 1]), p.extra
        )
        for i, p in enumerate(pairs)
    ]


def _uncertainty_key(pair: CandidatePair) -> tuple[int, float]:
    margin = pair.reward_margin
    return (0, margin) if margin is not None else (1, 0.0)


# --- Argilla -------------------------------------------------------------------------------------


def ensure_dataset(client: rg.Argilla, settings: DatasetSettings) -> rg.Dataset:
    """The workspace and dataset, created from the declared settings when missing."""
    workspace = client.workspaces(settings.workspace)
    if workspace is None:
        workspace = rg.Workspace(name=settings.workspace, client=client).create()
    dataset = client.datasets(settings.name, workspace=workspace)
    if dataset is None:
        dataset = rg.Dataset(
            name=settings.name, workspace=workspace, settings=build_settings(settings), client=client
        ).create()
    return dataset


def get_dataset(client: rg.Argilla, settings: DatasetSettings) -> rg.Dataset:
    dataset = client.datasets(settings.name, workspace=settings.workspace)
    if dataset is None:
        raise DataError(f"dataset {settings.workspace}/{settings.name} not found on {client.api_url}")
    return dataset


def push_pairs(client: rg.Argilla, settings: DatasetSettings, pairs: Sequence[CandidatePair]) -> int:
    """Upsert pairs as records, uncertainty-first; ids are content hashes, so re-pushing never duplicates."""
    unique = {record_id(p): p for p in pairs}
    ordered = sorted(unique.values(), key=_uncertainty_key)
    dataset = ensure_dataset(client, settings)
    if ordered:
        dataset.records.log([to_record(p, rank) for rank, p in enumerate(ordered)])
    return len(ordered)


def sampling_policy(settings: PushSettings) -> tuple[Any, Any]:
    """The sampling policy: base model (+ frozen PEFT adapter) and its tokenizer (`alignment.policy`)."""
    from alignment.devices import plan_device
    from alignment.policy import load_policy, load_policy_tokenizer

    trust = settings.trust_remote_code
    model, _ = load_policy(
        settings.model, settings.adapter, plan_device(settings.dtype), trust_remote_code=trust
    )
    model.eval()
    return model, load_policy_tokenizer(settings.model, settings.adapter, trust)


def generated_pairs(
    prompts: list[list[Message]], settings: PushSettings, scorer: Scorer | None = None
) -> tuple[list[CandidatePair], int]:
    """Sample k responses per prompt from the configured policy and pair them up."""
    model, tokenizer = sampling_policy(settings)
    return build_pairs(prompts, sample_responses(model, tokenizer, prompts, settings), settings, scorer)
