"""The quickstart report: one self-contained HTML file (plots embedded as base64 PNG) and a Markdown summary.

Everything comes from the files the stages wrote (trainer logs, the pulled dataset's manifest, the
reward model's eval.json, eval/eval.json, serve/result.json, state.json), so the report can be
rebuilt from disk with `prefloop quickstart --stages report`.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
from pathlib import Path
from typing import Any

from serving.quickstart.context import Context, read_json
from serving.quickstart.stages import preferences_dir

Row = dict[str, Any]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")  # titles are wider than the axes
    _plt().close(fig)
    return buf.getvalue()


def _series(history: list[Row], key: str) -> tuple[list[float], list[float]]:
    points = [(h["step"], h[key]) for h in history if key in h and "step" in h]
    return [p[0] for p in points], [p[1] for p in points]


def _load(path: Path) -> Any:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def plot_training(ctx: Context) -> dict[str, bytes]:
    plt = _plt()
    plots: dict[str, bytes] = {}
    sft = _load(ctx.path("sft") / "log_history.json") or []
    if sft:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(*_series(sft, "loss"), marker="o", label="train")
        if _series(sft, "eval_loss")[0]:
            ax.plot(*_series(sft, "eval_loss"), marker="s", label="eval")
        ax.set(title="SFT loss", xlabel="step", ylabel="loss")
        ax.legend()
        plots["SFT loss"] = _png(fig)
    reward = _load(ctx.path("reward") / "log_history.json") or []
    reward_eval = _load(ctx.path("reward") / "reward_eval.json")
    if reward:
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
        left.plot(*_series(reward, "loss"), marker="o", label="train")
        left.set(title="Reward model loss", xlabel="step", ylabel="loss")
        # the reward trainer evaluates once after training (reward_eval.json), so the curve is the
        # logged training batches' pair accuracy; a per-epoch eval split shows too where it ran
        right.plot(*_series(reward, "accuracy"), marker="o", label="train batches")
        steps, acc = _series(reward, "eval_accuracy")
        if steps:
            right.plot(steps, acc, marker="s", label="eval split (per epoch)")
        if reward_eval:
            right.axhline(
                reward_eval["accuracy"],
                color="tab:green",
                ls="--",
                label=f"held-out pairs: {reward_eval['accuracy']:.2f}",
            )
        right.axhline(0.5, color="grey", lw=0.8, label="chance")
        right.set(title="Reward model accuracy", xlabel="step", ylim=(0, 1))
        right.legend(fontsize=8)
        plots["Reward model loss and held-out accuracy"] = _png(fig)
    aligned = _load(ctx.path(ctx.config.algorithm) / "log_history.json") or []
    if aligned:
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
        left.plot(*_series(aligned, "loss"), marker="o")
        left.set(title=f"{ctx.config.algorithm.upper()} loss", xlabel="step")
        right.plot(*_series(aligned, "rewards/margins"), marker="o", label="train")
        if _series(aligned, "eval_rewards/margins")[0]:
            right.plot(*_series(aligned, "eval_rewards/margins"), marker="s", label="eval")
        right.set(title="Reward margin (chosen - rejected)", xlabel="step")
        right.legend(fontsize=8)
        plots[f"{ctx.config.algorithm.upper()} loss and reward margin per step"] = _png(fig)
    return plots


def plot_agreement(manifest: Row) -> bytes:
    import numpy as np

    plt = _plt()
    agreement = manifest["agreement"]
    kappas = agreement.get("pairwise_cohen_kappa", {})
    names = sorted(
        {n for key in kappas for n in key.split("|")} | set(agreement.get("agreement_with_consensus", {}))
    )
    matrix = np.full((len(names), len(names)), np.nan)
    for key, value in kappas.items():
        a, b = key.split("|")
        i, j = names.index(a), names.index(b)
        matrix[i, j] = matrix[j, i] = value if value is not None else np.nan
    np.fill_diagonal(matrix, 1.0)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.6))
    im = left.imshow(matrix, vmin=-0.2, vmax=1, cmap="viridis")
    left.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    left.set_yticks(range(len(names)), names, fontsize=8)
    for i in range(len(names)):
        for j in range(len(names)):
            if not np.isnan(matrix[i, j]):
                left.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", color="w", fontsize=8)
    left.set_title("Cohen's kappa per annotator pair")
    fig.colorbar(im, ax=left, fraction=0.046)
    consensus = agreement.get("agreement_with_consensus", {})
    right.bar(list(consensus), list(consensus.values()), color="tab:blue")
    right.set_ylim(0, 1)
    right.set_title("agreement with the others' majority")
    right.tick_params(axis="x", rotation=20, labelsize=8)
    return _png(fig)


def plot_win_rates(eval_result: Row) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    labels, rates, lows, highs = [], [], [], []
    for key, label in (
        ("rubric_win_rate", "rubric (ground truth)"),
        ("reward_model_win_rate", "reward model"),
    ):
        r = eval_result[key]
        labels.append(label)
        rates.append(r["win_rate"])
        lows.append(r["win_rate"] - r["ci95"][0])
        highs.append(r["ci95"][1] - r["win_rate"])
    ax.barh(labels, rates, xerr=[lows, highs], color=["tab:green", "tab:purple"], capsize=6)
    ax.axvline(0.5, color="grey", ls="--")
    ax.set_xlim(0, 1)
    ax.set_title(
        f"{eval_result['algorithm'].upper()} vs SFT win rate on {eval_result['prompts']} held-out prompts (95% CI)"
    )
    return _png(fig)


def plot_feedback(serve: Row) -> bytes:
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    posted = serve["feedback_posted"]
    left.bar(list(posted), list(posted.values()), color="tab:orange")
    left.set_title("feedback posted by kind (via /v1/feedback)")
    loop = serve["loop"]
    ev = loop.get("eval") or {}
    gate = loop.get("gate") or {}
    names, values, limits = [], [], []
    for metric, limit_key in (("win_rate", "min_win_rate"), ("length_ratio", "max_length_ratio")):
        if metric in ev:
            names.append(metric)
            values.append(ev[metric])
            limits.append(gate.get(limit_key))
    bars = right.bar(names, values, color="tab:green" if loop["status"] == "promoted" else "tab:red")
    for bar, limit in zip(bars, limits, strict=True):
        if limit is not None:
            right.hlines(limit, bar.get_x(), bar.get_x() + bar.get_width(), color="k", ls="--")
    right.set_title(f"loop gate: {loop['status']} ({loop.get('version')})")
    return _png(fig)


def plot_times(state: Row) -> bytes:
    plt = _plt()
    stages = [(n, r.get("wall_s", 0.0)) for n, r in state["stages"].items() if n != "report"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.barh([s[0] for s in stages][::-1], [s[1] for s in stages][::-1], color="tab:grey")
    ax.set(title="wall time per stage (s, when it last ran)", xlabel="seconds")
    return _png(fig)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def summary_rows(
    ctx: Context, eval_result: Row, manifest: Row | None, reward_eval: Row | None, serve: Row | None
) -> list[tuple[str, str]]:
    r, m = eval_result["rubric_win_rate"], eval_result["reward_model_win_rate"]
    algo = eval_result["algorithm"].upper()
    rows = [
        (
            f"rubric win rate, {algo} vs SFT ({r['prompts']} held-out prompts)",
            f"{_pct(r['win_rate'])} [{_pct(r['ci95'][0])}, {_pct(r['ci95'][1])}]  W/T/L {r['wins']}/{r['ties']}/{r['losses']}",
        ),
        (
            f"reward-model win rate, {algo} vs SFT",
            f"{_pct(m['win_rate'])} [{_pct(m['ci95'][0])}, {_pct(m['ci95'][1])}]",
        ),
        (
            "mean rubric score (0-5), SFT -> " + algo,
            f"{eval_result['rubric_mean']['sft']:.2f} -> {eval_result['rubric_mean']['aligned']:.2f}",
        ),
        ("KL to SFT (per token)", f"{eval_result['kl_to_sft']['aligned']:.4f}"),
        (
            "mean length (tokens), SFT -> " + algo,
            f"{eval_result['mean_length_tokens']['sft']:.1f} -> {eval_result['mean_length_tokens']['aligned']:.1f}",
        ),
    ]
    if manifest:
        alpha = manifest["agreement"].get("krippendorff_alpha")
        rows.append(
            (
                "annotated pairs kept (majority) / records with votes",
                f"{manifest['pairs']} / {manifest['records_with_votes']}",
            )
        )
        rows.append(
            ("Krippendorff's alpha (3 simulated annotators)", f"{alpha:.3f}" if alpha is not None else "n/a")
        )
    if reward_eval:
        rows.append(
            (
                "reward model held-out pair accuracy",
                f"{_pct(reward_eval['accuracy'])} ({reward_eval['pairs']} pairs)",
            )
        )
    if serve:
        loop = serve["loop"]
        why = "; ".join(loop["gate_failures"]) or "gate passed"
        rows.append(("feedback posted", ", ".join(f"{k} {v}" for k, v in serve["feedback_posted"].items())))
        rows.append(
            (
                "loop turn",
                f"{loop['status']} {loop.get('version')} ({why}); serving {serve['current_version']}",
            )
        )
    return rows


def artifacts(ctx: Context) -> list[tuple[str, Path]]:
    out = [
        ("SFT adapter", ctx.path("sft")),
        ("sampled pairs", ctx.path("samples") / "pairs.jsonl"),
        ("Argilla server home (SQLite, logs)", ctx.root / "argilla"),
        ("simulated annotators' credentials", ctx.root / "argilla" / "annotators.json"),
    ]
    with contextlib.suppress(OSError, ValueError, KeyError):
        out.append(("pulled preference dataset (+ votes, manifest)", preferences_dir(ctx)))
    out += [
        ("reward model (+ reward_eval.json / .png)", ctx.path("reward")),
        (f"{ctx.config.algorithm.upper()} adapter", ctx.path(ctx.config.algorithm)),
        ("evaluation (win rates with intervals, samples)", ctx.path("eval") / "eval.json"),
        ("feedback store + registry (SQLite)", ctx.path("serve") / "feedback.db"),
        ("serving result (feedback, loop, registry)", ctx.path("serve") / "result.json"),
        ("stage state (fingerprints, wall times)", ctx.root / "state.json"),
    ]
    return [(k, p) for k, p in out if p.exists()]


def write_report(ctx: Context) -> tuple[Path, Path]:
    state = read_json(ctx.root / "state.json")
    eval_result = read_json(ctx.path("eval") / "eval.json")
    try:
        manifest = read_json(preferences_dir(ctx) / "manifest.json")
    except (OSError, ValueError, KeyError):
        manifest = None
    reward_eval = _load(ctx.path("reward") / "reward_eval.json")
    serve = _load(ctx.path("serve") / "result.json")

    plots = plot_training(ctx)
    if manifest and manifest["agreement"].get("pairwise_cohen_kappa"):
        plots["Annotator agreement"] = plot_agreement(manifest)
    plots["Win rates with 95% intervals"] = plot_win_rates(eval_result)
    if serve:
        plots["Feedback and the loop's gate decision"] = plot_feedback(serve)
    plots["Stage wall times"] = plot_times(state)

    out = ctx.path("report")
    out.mkdir(parents=True, exist_ok=True)
    (out / "win_rates.png").write_bytes(plots["Win rates with 95% intervals"])

    rows = summary_rows(ctx, eval_result, manifest, reward_eval, serve)
    algo = eval_result["algorithm"].upper()
    times = [
        (n, r.get("wall_s", 0.0), r.get("skipped", False))
        for n, r in state["stages"].items()
        if n != "report"
    ]
    arts = artifacts(ctx)

    md = [
        "# prefloop quickstart",
        "",
        f"Model `{ctx.config.model}`; annotators: **simulated** team of three (see the rubric)"
        if ctx.config.annotation.mode == "simulated"
        else f"Model `{ctx.config.model}`; annotators: humans in the Argilla UI",
        "",
    ]
    md += ["| result | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
    md += [
        "| stage | wall time |",
        "|---|---|",
        *(f"| {n} | {w:.1f} s{' (earlier run)' if s else ''} |" for n, w, s in times),
        "",
    ]
    crit = eval_result["criteria"]
    md += ["| rubric criterion (mean over held-out replies) | SFT | " + algo + " |", "|---|---|---|"]
    md += [f"| {name} | {crit['sft'][name]:.2f} | {crit['aligned'][name]:.2f} |" for name in crit["sft"]]
    md += [""]
    md += [
        "Rubric (`" + str(ctx.config.rubric) + "`):",
        "",
        *(f"- {line}" for line in ctx.rubric.describe()),
        "",
    ]
    md += ["Artifacts:", "", *(f"- {k}: `{p}`" for k, p in arts), ""]
    md_path = out / "summary.md"
    md_path.write_text("\n".join(md))

    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>prefloop quickstart report</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}"
        "th{background:#f4f4f4}img{max-width:100%;display:block;margin:0.5em 0 1.5em}.sim{background:#fff3cd;padding:6px 10px}"
        "td.t{white-space:pre-wrap;font-size:90%}</style></head><body>",
        "<h1>prefloop quickstart</h1>",
        f"<p>Model <code>{esc(ctx.config.model)}</code>, algorithm <b>{esc(ctx.config.algorithm.upper())}</b>.</p>",
    ]
    if ctx.config.annotation.mode == "simulated":
        parts.append(
            "<p class='sim'><b>Simulated annotators.</b> The preference votes come from three programmatic raters "
            "(Argilla users <code>sim-noisy</code>, <code>sim-position</code>, <code>sim-shorter</code>) following the rubric below, "
            "each with its own imperfection; run with <code>--human</code> to annotate yourself.</p>"
        )
    parts.append("<h2>Summary</h2><table id='summary'><tr><th>result</th><th>value</th></tr>")
    parts += [f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in rows]
    parts.append(
        "</table><h2>Rubric</h2><ul>"
        + "".join(f"<li>{esc(line)}</li>" for line in ctx.rubric.describe())
        + "</ul>"
    )
    parts.append(
        f"<h2>Rubric criteria on held-out replies</h2><table><tr><th>criterion</th><th>SFT</th><th>{esc(algo)}</th></tr>"
    )
    parts += [
        f"<tr><td>{esc(n)}</td><td>{crit['sft'][n]:.2f}</td><td>{crit['aligned'][n]:.2f}</td></tr>"
        for n in crit["sft"]
    ]
    parts.append("</table>")
    parts.append("<h2>Stage wall times</h2><table><tr><th>stage</th><th>seconds</th></tr>")
    parts += [
        f"<tr><td>{esc(n)}</td><td>{w:.1f}{' (earlier run)' if s else ''}</td></tr>" for n, w, s in times
    ]
    parts.append("</table><h2>Plots</h2>")
    for title, data in plots.items():
        parts.append(
            f"<h3>{esc(title)}</h3><img class='plot' alt='{esc(title)}' src='data:image/png;base64,{base64.b64encode(data).decode()}'>"
        )
    parts.append(
        "<h2>Before / after on held-out prompts</h2><table><tr><th>prompt</th><th>SFT</th><th>"
        + esc(ctx.config.algorithm.upper())
        + "</th></tr>"
    )
    for s in eval_result["samples"][:8]:
        parts.append(
            f"<tr><td>{esc(s['prompt'])}</td><td class='t'>{esc(s['sft'])}<br><i>rubric {s['rubric_sft']:.2f}</i></td>"
            f"<td class='t'>{esc(s['aligned'])}<br><i>rubric {s['rubric_aligned']:.2f}</i></td></tr>"
        )
    parts.append(
        "</table><h2>Artifacts</h2><ul>"
        + "".join(f"<li>{esc(k)}: <code>{esc(str(p))}</code></li>" for k, p in arts)
        + "</ul>"
    )
    parts.append("</body></html>")
    html_path = out / "report.html"
    html_path.write_text("\n".join(parts))
    return html_path, md_path
