"""The run report (Markdown): cohort, metrics, traffic, provenance — from a run directory alone."""

from __future__ import annotations

import json
from pathlib import Path

from psp_model.io import atomic_write_text

_METRICS = ("auc", "accuracy", "sensitivity", "specificity", "balanced_accuracy")


def write_report(run_dir: Path, *, truth_summary: Path | None = None) -> Path:
    """Write ``<run_dir>/report.md``; ``truth_summary`` (synthetic cohorts only) adds the Bayes AUCs."""
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    stats = json.loads((run_dir / "stats.json").read_text())
    rounds = json.loads((run_dir / "rounds.json").read_text())
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    truth = json.loads(truth_summary.read_text()) if truth_summary and truth_summary.is_file() else None

    lines = [f"# psp-fl study report: {run_dir.name}", "",
             f"Profile `{config['profile']}`, {config['folds']} folds, head `{config['head-variant']}`, "
             f"encoder `{config['encoder-mode']}`, strategy `{config['strategy']}`, seed {config['seed']}.", "",
             "## Cohort (aggregate counts sent by the sites)", "",
             "| site | roles | usable cases | skipped (QC) | TP | PsP |", "|---|---|---|---|---|---|"]
    for site in stats["sites"]:
        counts = site["counts"]
        lines.append(f"| {site['name']} | {', '.join(site['roles'])} | {counts.get('n-cases-ok', 0):.0f} | "
                     f"{counts.get('n-cases-error', 0):.0f} | {_count(counts, 'n-tp')} | {_count(counts, 'n-psp')} |")
    lines += ["", "## Results", ""]
    if not metrics:
        lines.append("No evaluation in this run (phase 'evaluate' not run).")
    else:
        lines += _results(metrics, truth)
    lines += ["", "## Traffic per round (bytes one site receives / sends)", "",
              "| phase | fold | round | sites | replies | to each site | from each site (mean) |",
              "|---|---|---|---|---|---|---|"]
    for entry in rounds:
        received = entry.get("bytes_from_each_site") or []
        mean = sum(received) / len(received) if received else 0
        fold = "" if entry.get("fold") is None else entry["fold"]
        lines.append(f"| {entry['phase']} | {fold} | {entry['round']} | {entry.get('nodes', '')} | "
                     f"{entry.get('replies', '')} | {entry.get('bytes_to_each_site', 0):,} | {mean:,.0f} |")
    lines += ["", "## Provenance", "", f"- run directory: `{run_dir}`",
              f"- models: `{run_dir / 'models'}` (fold heads, encoder, ensemble.json)",
              f"- config: `{run_dir / 'config.json'}`", ""]
    return atomic_write_text(run_dir / "report.md", "\n".join(lines))


def _count(counts: dict, key: str) -> str:
    return f"{counts[key]:.0f}" if key in counts else "-"


def _results(metrics: dict, truth: dict | None) -> list[str]:
    lines = ["| evaluation | " + " | ".join(_METRICS) + " |", "|---|" + "---|" * len(_METRICS)]
    test = metrics.get("test", {})
    if "ensemble_pooled" in test:
        lines.append(_row("test sites, 5-fold soft-voting ensemble (pooled)", test["ensemble_pooled"]))
        for name, site_metrics in test.get("ensemble_per_site", {}).items():
            lines.append(_row(f"test site {name}, ensemble", site_metrics))
        lines.append(_fold_row("test sites, single fold models (mean ± sd)", test["folds"]))
    if "folds" in metrics.get("validation", {}):
        lines.append(_fold_row("cross-validation at training sites (mean ± sd)", metrics["validation"]["folds"]))
    if truth:
        lines += ["", "Bayes-optimal AUC of the synthetic generator (the best any model can do on these cases):", ""]
        for name, site in truth["sites"].items():
            if site.get("bayes_auc") is not None:
                lines.append(f"- {name}: {site['bayes_auc']:.3f} ({site['n']} cases, {site['n_tp']} TP)")
    return lines


def _row(title: str, values: dict) -> str:
    return f"| {title} | " + " | ".join(_fmt(values.get(k)) for k in _METRICS) + " |"


def _fold_row(title: str, summary: dict) -> str:
    cells = []
    for key in _METRICS:
        entry = summary.get(key, {})
        cells.append(f"{_fmt(entry.get('mean'))} ± {_fmt(entry.get('sd'))}")
    return f"| {title} | " + " | ".join(cells) + " |"


def _fmt(value) -> str:
    if value is None or value != value:
        return "n/a"
    return f"{value:.3f}"
