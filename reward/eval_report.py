"""How a comparison is shown: the rich table (`prefloop eval`), eval.md and eval.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

SUMMARY_KEYS = (
    "mean_reward",
    "kl_to_reference",
    "mean_length",
    "ended_with_eos",
    "implicit_reward_accuracy",
    "perplexity",
    "rouge_l",
    "bleu",
    "chrf",
)


def _ci(interval: list[float] | None) -> str:
    return f"[{interval[0]:.2f}, {interval[1]:.2f}]" if interval else ""


def win_rate_rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(judge, win rate with its 95% interval, W/T/L) for each judge of the comparison."""
    rows = [
        (
            "reward model",
            f"{result['win_rate']:.3f} {_ci(result.get('win_rate_ci95'))}",
            f"W {result['wins']} / T {result['ties']} / L {result['losses']}",
        )
    ]
    if judge := result.get("judge"):
        bias = (
            f", picks A {judge['position_bias']:.2f}"
            if judge["position_bias"] == judge["position_bias"]
            else ""
        )
        rows.append(
            (
                f"LLM judge ({judge['model']})",
                f"{judge['win_rate']:.3f} {_ci(judge.get('win_rate_ci95'))}",
                f"W {judge['wins']} / T {judge['ties']} / L {judge['losses']}, "
                f"{judge['parse_failures']} parse failures{bias}",
            )
        )
    return rows


def print_comparison(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"candidate vs baseline on {result['prompts']} prompts")
    table.add_column("metric")
    table.add_column("candidate", justify="right")
    table.add_column("baseline", justify="right")
    table.add_row("model", result["candidate"]["model"], result["baseline"]["model"])
    for key in SUMMARY_KEYS:
        cells = [result[side].get(key) for side in ("candidate", "baseline")]
        if any(c is not None for c in cells):
            table.add_row(key, *("-" if c is None else f"{c:.4g}" for c in cells))
    if "perplexity_increase" in result:
        table.add_row("perplexity increase", f"{result['perplexity_increase']:+.2%}", "")
    for judge, rate, counts in win_rate_rows(result):
        table.add_row(f"win rate by {judge} (95% CI)", rate, counts)
    console = Console()
    console.print(table)
    for judge, losses in result.get("error_analysis", {}).items():
        if not losses:
            continue
        worst = Table(title=f"where the candidate lost most (by {judge})", show_lines=True)
        for column in ("prompt", "candidate", "baseline", "score"):
            worst.add_column(column, overflow="fold", max_width=48 if column != "score" else 18)
        for row in losses:
            score = (
                f"{row['candidate_reward']:.3g} vs {row['baseline_reward']:.3g}"
                if "margin" in row
                else f"judge {row['judge_score']:.2f}"
            )
            worst.add_row(row["prompt"], row["candidate"], row["baseline"], score)
        console.print(worst)


def _cell(text: Any, limit: int = 200) -> str:
    text = str(text).replace("\n", " ").replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def report_markdown(result: dict[str, Any]) -> str:
    """eval.md: the metrics table, every win rate with its interval, and the error analysis."""
    cand, base = result["candidate"], result["baseline"]
    lines = [
        f"# Evaluation: candidate vs baseline on {result['prompts']} prompts",
        "",
        "| metric | candidate | baseline |",
        "| --- | ---: | ---: |",
        f"| model | {_cell(cand['model'])} | {_cell(base['model'])} |",
    ]
    for key in SUMMARY_KEYS:
        cells = [cand.get(key), base.get(key)]
        if any(c is not None for c in cells):
            lines.append(f"| {key} | " + " | ".join("-" if c is None else f"{c:.4g}" for c in cells) + " |")
    lines += ["", "| judge | win rate [95% CI] | outcome |", "| --- | --- | --- |"]
    lines += [f"| {j} | {r} | {c} |" for j, r, c in win_rate_rows(result)]
    if "perplexity_increase" in result:
        lines.append(f"\nPerplexity increase of the candidate: {result['perplexity_increase']:+.2%}.")
    for judge, losses in result.get("error_analysis", {}).items():
        lines += ["", f"## Where the candidate lost most (by {judge})", ""]
        if not losses:
            lines.append("No losses.")
            continue
        lines += ["| prompt | candidate | baseline | score |", "| --- | --- | --- | --- |"]
        for row in losses:
            score = (
                f"{row['candidate_reward']:.3g} vs {row['baseline_reward']:.3g}"
                if "margin" in row
                else f"{row['judge_score']:.2f}"
            )
            lines.append(
                f"| {_cell(row['prompt'])} | {_cell(row['candidate'])} | {_cell(row['baseline'])} | {score} |"
            )
    return "\n".join(lines) + "\n"


def plot_comparison(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    cand, base = np.array(result["candidate"]["rewards"]), np.array(result["baseline"]["rewards"])
    bins = np.linspace(min(cand.min(), base.min()), max(cand.max(), base.max()) + 1e-6, 20)
    left.hist(base, bins=bins, alpha=0.6, label="baseline")
    left.hist(cand, bins=bins, alpha=0.6, label="candidate")
    left.set(xlabel="reward", ylabel="responses", title="Reward of sampled responses")
    left.legend()
    right.bar(
        ["wins", "ties", "losses"],
        [result["wins"], result["ties"], result["losses"]],
        color=["tab:green", "tab:grey", "tab:red"],
    )
    right.set_title(f"Candidate win rate {result['win_rate']:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
