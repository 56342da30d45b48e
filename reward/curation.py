"""`prefloop data curate`: SFT curation (alignment.sft_curation) with model-based quality scores.

The curation core takes scoring callables; this module, one layer up, builds them from the config:
a reward model (`score.reward_model`, reward.scorer) and the LLM judge (`score.judge`, reward.judge).

    config = load_config(CurateConfig, "configs/curate.yaml", ["input=data/sft.jsonl"])
    result, version = curate_file(config)     # version.path / "train.jsonl", "report.md", ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import Field, ValidationError

from alignment.cli_common import ConfigOption, SetOption, cli_errors, option_overrides
from alignment.config import ConfigError, format_validation_error, load_config
from alignment.data_files import read_rows
from alignment.sft_curation import (
    CuratedVersion,
    CurationResult,
    CurationSettings,
    Scorer,
    ScoreSettings,
    curate_rows,
    write_curated,
)

# The bundled SFT set (alignment.sft.EXAMPLE_DATA; not imported, so `prefloop --help` stays fast).
SFT_EXAMPLE = Path(__file__).parents[1] / "alignment" / "data" / "sft_house_style.jsonl"


class CurateConfig(CurationSettings):
    """`configs/curate.yaml`: the input file plus the same keys as an SFT config's `curate:` block."""

    input: Path = Field(SFT_EXAMPLE, description="SFT rows (messages or Alpaca JSONL, or a datasets dir).")


def build_scorers(score: ScoreSettings, batch_size: int = 16) -> dict[str, Scorer]:
    """The scoring callables `score` asks for: "reward" (reward model) and/or "judge" (LLM rating 1-10)."""
    scorers: dict[str, Scorer] = {}
    if score.reward_model is not None:
        from reward.scorer import RewardScorer

        scorers["reward"] = RewardScorer.from_pretrained(score.reward_model, batch_size=batch_size)
    if score.judge is not None:
        from reward.judge import JudgeSettings, LLMJudge

        try:
            settings = JudgeSettings.model_validate(score.judge)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, "score.judge")) from None
        scorers["judge"] = LLMJudge(settings).scorer
    if (score.keep_top_fraction is not None or score.min_score is not None) and not scorers:
        raise ConfigError("score.keep_top_fraction/min_score need score.reward_model or score.judge")
    return scorers


def with_progress(name: str, scorer: Scorer, chunk: int = 32) -> Scorer:
    """`scorer` in chunks under a rich progress bar (scoring is the slow step of curation)."""
    from rich.progress import Progress

    def score(prompts: list[Any], responses: list[str]) -> list[float]:
        out: list[float] = []
        with Progress(transient=True) as progress:
            task = progress.add_task(f"scoring by {name}", total=len(prompts))
            for start in range(0, len(prompts), chunk):
                out += scorer(prompts[start : start + chunk], responses[start : start + chunk])
                progress.advance(task, len(prompts[start : start + chunk]))
        return out

    return score


def curate_file(
    config: CurateConfig, scorers: dict[str, Scorer] | None = None
) -> tuple[CurationResult, CuratedVersion]:
    """Curate `config.input` into the next version under `config.output_dir` (or the same version)."""
    if scorers is None:
        scorers = {name: with_progress(name, s) for name, s in build_scorers(config.score).items()}
    result = curate_rows(read_rows(config.input), config, scorers)
    return result, write_curated(result, config.output_dir, config.examples_per_filter)


def print_report(result: CurationResult, version: CuratedVersion) -> None:
    from rich.console import Console
    from rich.table import Table

    report = result.report()
    table = Table(title=f"curation: {report['rows_read']} read, {report['rows_kept']} kept -> {version.path}")
    table.add_column("filter")
    table.add_column("removed", justify="right")
    table.add_column("example", overflow="fold", max_width=80)
    for reason, n in report["removed"].items():
        example = result.removed.get(reason, [{}])[0] if n else {}
        table.add_row(reason, str(n), f"{example.get('where', '')} {example.get('detail', '')}".strip())
    Console().print(table)
    for name, s in report["scores"].items():
        print(f"{name} score: mean {s['mean']:.3f}, min {s['min']:.3f}, max {s['max']:.3f} ({s['n']} rows)")
    state = "unchanged, same content as" if version.unchanged else "wrote"
    print(f"{state} {version.version}: {version.train_file} (report: report.md, report.json)")


def curate_command(
    config: ConfigOption = None,
    overrides: SetOption = None,
    input_path: Annotated[Path | None, typer.Option("--input", help="SFT rows to curate (input).")] = None,
    output_dir: Annotated[
        Path | None, typer.Option("--output-dir", help="Versions go here (output_dir).")
    ] = None,
    reward_model: Annotated[
        Path | None, typer.Option("--reward-model", help="Score by this reward model (score.reward_model).")
    ] = None,
) -> None:
    """Curate SFT data: rule filters, dedup, decontamination, quality scores -> a versioned dataset + report."""
    sugar = {"input": input_path, "output_dir": output_dir, "score.reward_model": reward_model}
    with cli_errors():
        cfg = load_config(CurateConfig, config, option_overrides(sugar, overrides))
        result, version = curate_file(cfg)
    print_report(result, version)


def curation_scorers(settings: CurationSettings | None) -> dict[str, Scorer] | None:
    """For `train sft` with a `curate:` block: its scorers (None when it has no score settings)."""
    if settings is None:
        return None
    return {name: with_progress(name, s) for name, s in build_scorers(settings.score).items()} or None


data_app = typer.Typer(help="Training data: curate SFT data into versioned datasets.", no_args_is_help=True)
data_app.command("curate")(curate_command)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
