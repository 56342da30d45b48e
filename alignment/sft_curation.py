"""SFT data curation: rule filters, dedup, decontamination and quality scoring -> a versioned dataset.

    result = curate_rows(read_rows(path), CurationSettings(), scorers={"reward": reward_scorer})
    version = write_curated(result, Path("data/sft-curated"))   # vNNNN/ with train.jsonl + report

Steps, in order; each removed row is counted under its reason, with the row and why:
  malformed_roles  unknown roles, system not first, turns that do not alternate user/assistant
  empty            a turn with no text
  too_short        a user or assistant turn shorter than `min_chars`
  too_long         a turn longer than `max_chars`
  repeated_ngrams  an assistant turn whose word n-grams repeat too much (degenerate loops)
  language         detected language (py3langid, offline) not in `languages`
  boilerplate      an assistant turn matching a refusal/boilerplate pattern
  exact_duplicate, near_duplicate, contaminated   (alignment.dedup, shared with preference data)
  low_score        below `score.min_score`, or outside `score.keep_top_fraction`
The rule filters live in `alignment.sft_filters`; this module runs them in order, then dedup and
scoring. Scorers are callables (prompts, responses) -> scores, so this module needs nothing from `reward/`;
`reward.curation` builds them from a reward model and the LLM judge.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from alignment import dedup
from alignment.config import StrictModel
from alignment.data_files import DataError, write_jsonl
from alignment.messages import Message
from alignment.sft_filters import (
    DEFAULT_BOILERPLATE,
    boilerplate_problem,
    conversation_id,
    language_problem,
    length_problem,
    repetition_problem,
    structure,
)

Scorer = Callable[[list[list[Message]], list[str]], list[float]]


FILTERS = (
    "malformed_roles",
    "empty",
    "too_short",
    "too_long",
    "repeated_ngrams",
    "language",
    "boilerplate",
    "exact_duplicate",
    "near_duplicate",
    "contaminated",
    "low_score",
)
MANIFEST = "manifest.json"


class ScoreSettings(StrictModel):
    reward_model: Path | None = Field(None, description="Reward model directory; scores the last reply.")
    judge: dict[str, Any] | None = Field(
        None, description="LLM judge settings (reward.judge.JudgeSettings); rates each reply 1-10."
    )
    select_by: Literal["reward", "judge"] = Field("reward", description="Which score the selection uses.")
    keep_top_fraction: float | None = Field(None, gt=0, le=1, description="Keep this best share of rows.")
    min_score: float | None = Field(None, description="Keep rows scoring at least this.")


class CurationSettings(StrictModel):
    min_chars: int = Field(2, ge=0, description="Shortest user or assistant turn, in characters.")
    max_chars: int = Field(8000, ge=1, description="Longest turn, in characters.")
    languages: list[str] | None = Field(
        ["en"], description="ISO 639-1 codes to keep (py3langid); null = any language."
    )
    language_min_chars: int = Field(
        20, ge=1, description="Shorter conversations are not language-checked (detection is unreliable)."
    )
    ngram_size: int = Field(3, ge=1, description="Word n-gram size for the repetition filter.")
    max_repeated_ngram_fraction: float | None = Field(
        0.3, gt=0, le=1, description="Share of an assistant turn's n-grams that repeat an earlier one."
    )
    boilerplate_patterns: list[str] = Field(
        default_factory=lambda: list(DEFAULT_BOILERPLATE),
        description="Regexes (case-insensitive) that remove an assistant turn matching them.",
    )
    dedup: bool = Field(True, description="Remove exact duplicate conversations (case/space-normalised).")
    near_dup_threshold: float | None = Field(
        0.9, gt=0, le=1, description="MinHash Jaccard above which a conversation is a near-duplicate."
    )
    decontaminate_against: dict[str, Path] = Field(
        default_factory=dict, description="Named eval sets whose prompts must not appear (name: path)."
    )
    decontamination_threshold: float = Field(0.8, gt=0, le=1)
    score: ScoreSettings = Field(default_factory=ScoreSettings)
    examples_per_filter: int = Field(3, ge=0, description="Removed rows shown per filter in the report.")
    output_dir: Path = Field(Path("data/sft-curated"), description="Versions go to <output_dir>/vNNNN/.")

    @field_validator("decontaminate_against", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        # A bare path or a list of paths is named by the path itself.
        if isinstance(value, str | Path):
            return {str(value): value}
        if isinstance(value, list):
            return {str(v): v for v in value}
        return value

    @field_validator("boilerplate_patterns")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regex {pattern!r}: {exc}") from None
        return patterns


@dataclass
class CurationResult:
    kept: list[dict[str, Any]]  # {"messages": [...], "id": ...}
    removed: dict[str, list[dict[str, Any]]]  # reason -> [{"id", "where", "detail", "messages"}]
    scores: dict[str, list[float]] = field(default_factory=dict)  # scorer -> scores of the rows it saw
    rows_read: int = 0
    threshold: float | None = None  # the score a kept row needed

    def report(self, examples: int = 3) -> dict[str, Any]:
        return {
            "rows_read": self.rows_read,
            "rows_kept": len(self.kept),
            "removed": {reason: len(self.removed.get(reason, [])) for reason in FILTERS},
            "examples": {r: rows[:examples] for r, rows in self.removed.items() if rows and examples},
            "scores": {
                name: {"n": len(s), "mean": sum(s) / len(s), "min": min(s), "max": max(s)}
                for name, s in self.scores.items()
                if s
            },
            "score_threshold": self.threshold,
        }


# --- the pipeline --------------------------------------------------------------------------------


def split_for_scoring(messages: list[Message]) -> tuple[list[Message], str]:
    """(prompt = every turn before the last reply, the last reply): what a reward model judges."""
    return messages[:-1], messages[-1]["content"]


def prompt_text(messages: list[Message]) -> str:
    return "\n".join(m["content"] for m in messages[:-1])


def curate_rows(
    rows: Iterable[tuple[str, dict[str, Any]]],
    settings: CurationSettings,
    scorers: Mapping[str, Scorer] | None = None,
) -> CurationResult:
    """Rule filters, dedup, decontamination, then scoring and selection; see the module docstring."""
    patterns = [re.compile(p, re.IGNORECASE | re.MULTILINE) for p in settings.boilerplate_patterns]
    removed: dict[str, list[dict[str, Any]]] = defaultdict(list)
    kept: list[tuple[str, dict[str, Any]]] = []
    n_read = 0

    def drop(reason: str, where: str, row_id: str, detail: str, messages: Any) -> None:
        removed[reason].append({"id": row_id, "where": where, "detail": detail, "messages": messages})

    for where, row in rows:
        n_read += 1
        messages, reason, detail = structure(row, where)
        row_id = str(row["id"]) if row.get("id") is not None else None
        if messages is None:
            drop(reason, where, row_id or "", detail, row.get("messages", row))
            continue
        row_id = row_id or conversation_id(messages)
        if found := length_problem(messages, settings.min_chars, settings.max_chars):
            drop(found[0], where, row_id, found[1], messages)
            continue
        # Repetition first: a degenerate loop also confuses the language detector.
        checks = (
            (
                "repeated_ngrams",
                lambda m: repetition_problem(m, settings.ngram_size, settings.max_repeated_ngram_fraction),
            ),
            ("language", lambda m: language_problem(m, settings.languages, settings.language_min_chars)),
            ("boilerplate", lambda m: boilerplate_problem(m, patterns)),
        )
        for reason, check in checks:
            if (detail := check(messages)) is not None:
                drop(reason, where, row_id, detail, messages)
                break
        else:
            kept.append((where, {"messages": messages, "id": row_id}))

    def text(row: dict[str, Any]) -> str:
        return "\n".join(f"{m['role']}: {m['content']}" for m in row["messages"])

    def remove(found: Mapping[int, str], reason: str, label: str) -> None:
        nonlocal kept
        for i in sorted(found):
            where, row = kept[i]
            drop(reason, where, row["id"], f"{label} {found[i]}", row["messages"])
        kept = [item for i, item in enumerate(kept) if i not in found]

    if settings.dedup:
        exact = dedup.exact_duplicates([dedup.content_hash(text(row)) for _, row in kept])
        remove({i: kept[j][1]["id"] for i, j in exact.items()}, "exact_duplicate", "same as")
    if settings.near_dup_threshold is not None and len(kept) > 1:
        items = [(row["id"], text(row)) for _, row in kept]
        remove(dedup.near_duplicates(items, settings.near_dup_threshold), "near_duplicate", "near")
    if settings.decontaminate_against:
        from alignment.preference_data import eval_prompt_texts  # imports `datasets`: only when needed

        eval_sets = {name: eval_prompt_texts(path) for name, path in settings.decontaminate_against.items()}
        index = dedup.EvalIndex(eval_sets, settings.decontamination_threshold)
        remove(index.contaminated(prompt_text(row["messages"]) for _, row in kept), "contaminated", "in")

    result = CurationResult([row for _, row in kept], removed, rows_read=n_read)
    if scorers:
        _score_and_select(result, [w for w, _ in kept], settings.score, scorers)
    return result


def _score_and_select(
    result: CurationResult, wheres: list[str], settings: ScoreSettings, scorers: Mapping[str, Scorer]
) -> None:
    rows = result.kept
    prompts, responses = (
        zip(*(split_for_scoring(r["messages"]) for r in rows), strict=True) if rows else ((), ())
    )
    for name, scorer in scorers.items():
        scores = [float(s) for s in scorer(list(prompts), list(responses))] if rows else []
        result.scores[name] = scores
        for row, score in zip(rows, scores, strict=True):
            row.setdefault("scores", {})[name] = score
    key = settings.select_by if settings.select_by in scorers else next(iter(scorers))
    if settings.keep_top_fraction is None and settings.min_score is None:
        return
    chosen = set(range(len(rows)))
    if settings.keep_top_fraction is not None:
        # Exactly the best share (ties at the cut broken by input order), not "scores >= the cut".
        ranked = sorted(range(len(rows)), key=lambda i: -rows[i]["scores"][key])
        chosen = set(ranked[: max(1, round(settings.keep_top_fraction * len(rows)))])
    if settings.min_score is not None:
        chosen = {i for i in chosen if rows[i]["scores"][key] >= settings.min_score}
    result.threshold = min((rows[i]["scores"][key] for i in chosen), default=settings.min_score)
    kept = []
    for i, (where, row) in enumerate(zip(wheres, rows, strict=True)):
        if i in chosen:
            kept.append(row)
            continue
        why = f"below min_score {settings.min_score:.4g}" if settings.min_score is not None else ""
        if settings.keep_top_fraction is not None and not why:
            why = f"outside the top {settings.keep_top_fraction:.0%}"
        detail = f"{key} score {row['scores'][key]:.4g}, {why or 'not selected'}"
        result.removed["low_score"].append(
            {"id": row["id"], "where": where, "detail": detail, "messages": row["messages"]}
        )
    result.kept = kept


# --- output: a versioned dataset and its report --------------------------------------------------


@dataclass(frozen=True)
class CuratedVersion:
    version: str
    path: Path
    rows: int
    unchanged: bool = False

    @property
    def train_file(self) -> Path:
        return self.path / "train.jsonl"


def _content_hash(rows: list[dict[str, Any]]) -> str:
    return hashlib.sha256("\n".join(conversation_id(r["messages"]) for r in rows).encode()).hexdigest()[:16]


def _versions(output_dir: Path) -> list[Path]:
    return sorted(p for p in output_dir.glob("v[0-9][0-9][0-9][0-9]") if (p / MANIFEST).is_file())


def write_curated(result: CurationResult, output_dir: Path, examples: int = 3) -> CuratedVersion:
    """The kept rows as the next `vNNNN/` (built in a staging dir, then renamed: never half-written),
    unless a version with the same content exists: then that version is returned unchanged."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for leftover in output_dir.glob(".v*-*"):  # staging dirs of a killed run
        shutil.rmtree(leftover, ignore_errors=True)
    digest = _content_hash(result.kept)
    versions = _versions(output_dir)
    for path in versions:
        manifest = json.loads((path / MANIFEST).read_text())
        if manifest.get("content_hash") == digest:
            return CuratedVersion(path.name, path, manifest["rows"], unchanged=True)
    version = f"v{len(versions) + 1:04d}"
    report = result.report(examples)
    staging = Path(tempfile.mkdtemp(dir=output_dir, prefix=f".{version}-"))
    try:
        write_jsonl(staging / "train.jsonl", result.kept)
        write_jsonl(
            staging / "removed.jsonl",
            [{"reason": reason, **row} for reason in FILTERS for row in result.removed.get(reason, [])],
        )
        (staging / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
        if result.scores:
            plot_scores(result, staging / "scores.png")
        (staging / "report.md").write_text(report_markdown(report, has_plot=bool(result.scores)))
        manifest = {
            "version": version,
            "created_at": datetime.now(UTC).isoformat(),
            "rows": len(result.kept),
            "rows_read": result.rows_read,
            "content_hash": digest,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        staging.rename(output_dir / version)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return CuratedVersion(version, output_dir / version, len(result.kept))


def _short(messages: Any, limit: int = 160) -> str:
    if isinstance(messages, list):
        text = " | ".join(
            f"{m.get('role')}: {m.get('content')}" if isinstance(m, dict) else str(m) for m in messages
        )
    else:
        text = json.dumps(messages, ensure_ascii=False)
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def report_markdown(report: dict[str, Any], has_plot: bool = False) -> str:
    """The curation report a person reads: counts per filter, score summary, removed examples."""
    lines = [
        "# SFT curation report",
        "",
        f"{report['rows_read']} rows read, {report['rows_kept']} kept.",
        "",
        "| filter | removed |",
        "| --- | ---: |",
        *(f"| {reason} | {n} |" for reason, n in report["removed"].items()),
        "",
    ]
    if report["scores"]:
        lines += ["| score | n | mean | min | max |", "| --- | ---: | ---: | ---: | ---: |"]
        for name, s in report["scores"].items():
            lines.append(f"| {name} | {s['n']} | {s['mean']:.3f} | {s['min']:.3f} | {s['max']:.3f} |")
        if report.get("score_threshold") is not None:
            lines.append(f"\nKept rows scored at least {report['score_threshold']:.4g}.")
        lines.append("")
    if has_plot:
        lines += ["![score histogram](scores.png)", ""]
    if report["examples"]:
        lines += ["## Removed examples", ""]
        for reason, rows in report["examples"].items():
            lines.append(f"### {reason}")
            for row in rows:
                lines.append(f"- `{row['where']}` ({row['detail']}): {_short(row['messages'])}")
            lines.append("")
    return "\n".join(lines)


def plot_scores(result: CurationResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(result.scores), figsize=(5 * len(result.scores), 3.5), squeeze=False)
    for ax, (name, scores) in zip(axes[0], result.scores.items(), strict=True):
        ax.hist(scores, bins=20, color="tab:blue", alpha=0.8)
        if result.threshold is not None:
            ax.axvline(result.threshold, color="tab:red", linestyle="--", label="kept from here")
            ax.legend()
        ax.set(xlabel=f"{name} score", ylabel="rows", title=f"{name} scores ({len(scores)} rows)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def removed_counts(result: CurationResult) -> dict[str, int]:
    return dict(Counter({r: len(rows) for r, rows in result.removed.items() if rows}))


def curate_for_training(
    settings: CurationSettings, train: Path, scorers: Mapping[str, Scorer] | None = None
) -> tuple[CuratedVersion, CurationResult]:
    """`train sft` with a `curate:` block: curate `train` into a version and train on that."""
    from alignment.config import ConfigError
    from alignment.data_files import read_rows

    wants = [k for k in ("reward_model", "judge") if getattr(settings.score, k) is not None]
    if wants and not scorers:
        raise ConfigError(
            f"curate.score.{wants[0]} needs scorers from the reward layer: run `prefloop train sft` "
            "(it builds them) or pass train_sft(config, scorers=...)"
        )
    result = curate_rows(read_rows(Path(train)), settings, scorers)
    if not result.kept:
        raise DataError(f"{train}: curation removed every row ({removed_counts(result)})")
    return write_curated(result, settings.output_dir, settings.examples_per_filter), result
