"""`prefloop reward score` and `prefloop eval`. (`train reward` is in serving/train_commands.py.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from alignment.cli_common import ConfigOption, SetOption, cli_errors, option_overrides

reward_app = typer.Typer(help="Reward models: score responses.", no_args_is_help=True)


@reward_app.command("score")
def score_command(
    reward_model: Annotated[Path, typer.Argument(help="Reward model directory (adapter or full model).")],
    prompt: Annotated[str | None, typer.Option(help="One prompt (with --response).")] = None,
    response: Annotated[str | None, typer.Option(help="The response to score.")] = None,
    input_path: Annotated[
        Path | None,
        typer.Option("--input", help="JSONL/datasets rows with prompt+response, or preference pairs."),
    ] = None,
    output: Annotated[Path | None, typer.Option(help="Write scored JSONL here (default: stdout).")] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 16,
) -> None:
    """Score responses with a reward model: one pair from the options, or a file of rows."""
    from alignment.data_files import DataError, read_rows, write_jsonl
    from alignment.preference_data import prompt_messages
    from reward.scorer import RewardScorer

    with cli_errors():
        if (prompt is None) != (response is None) or (prompt is None) == (input_path is None):
            raise typer.BadParameter("give either --prompt and --response, or --input")
        scorer = RewardScorer.from_pretrained(reward_model, batch_size=batch_size)
        if prompt is not None and response is not None:
            print(f"{scorer([prompt], [response])[0]:.6g}")
            return
        assert input_path is not None
        rows = list(read_rows(input_path))
        prompts, responses, slots = [], [], []
        pairs: tuple[list, list, list, list] = ([], [], [], [])  # prompt, chosen, rejected, row
        for i, (where, row) in enumerate(rows):
            keys = [k for k in ("response", "chosen", "rejected") if k in row]
            if not keys:
                raise DataError(f"{where}: row needs 'response' or 'chosen'/'rejected' to score")
            messages = prompt_messages(row, where)
            texts = {k: row[k] if isinstance(row[k], str) else row[k][-1]["content"] for k in keys}
            if "chosen" in texts and "rejected" in texts:  # one packed row: the prompt runs once
                for part, value in zip(
                    pairs, (messages, texts.pop("chosen"), texts.pop("rejected"), i), strict=True
                ):
                    part.append(value)
            for key, text in texts.items():
                prompts.append(messages)
                responses.append(text)
                slots.append((i, f"reward_{key}" if key != "response" else "reward"))
        rewards = scorer(prompts, responses) if prompts else []
        scored = [dict(row) for _, row in rows]
        for (i, key), value in zip(slots, rewards, strict=True):
            scored[i][key] = value
        if pairs[0]:
            chosen_rewards, rejected_rewards = scorer.score_pairs(*pairs[:3])
            for i, c, r in zip(pairs[3], chosen_rewards, rejected_rewards, strict=True):
                scored[i]["reward_chosen"], scored[i]["reward_rejected"] = c, r
        if output is not None:
            write_jsonl(output, scored)
        else:
            sys.stdout.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in scored)


def eval_command(
    config: ConfigOption = None,
    overrides: SetOption = None,
    candidate: Annotated[Path | None, typer.Option(help="Candidate adapter (candidate.adapter).")] = None,
    baseline: Annotated[Path | None, typer.Option(help="Baseline adapter (baseline.adapter).")] = None,
    reward_model: Annotated[Path | None, typer.Option(help="Reward model directory (reward_model).")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch (threads).")] = None,
) -> None:
    """Candidate vs baseline on held-out prompts: win rates (reward model, LLM judge), KL, length,
    perplexity, reference metrics, error analysis (eval.json/.md/.png)."""
    from alignment.config import load_config
    from reward.eval_report import print_comparison
    from reward.evaluate import EvalConfig, run_eval

    sugar = {
        "candidate.adapter": candidate,
        "baseline.adapter": baseline,
        "reward_model": reward_model,
        "threads": threads,
    }
    with cli_errors():
        cfg = load_config(EvalConfig, config, option_overrides(sugar, overrides))
        result = run_eval(cfg)
    print_comparison(result)
    print(f"wrote {cfg.output_dir / 'eval.json'}, eval.md and eval.png")


def register(app: typer.Typer) -> None:
    app.add_typer(reward_app, name="reward")
    app.command("eval")(eval_command)
