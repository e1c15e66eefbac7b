"""The study report: ``report.md`` and one self-contained ``report.html``, from a run directory alone.

Reads only the run-directory contract: config.json (required), stats.json, rounds.json, timings.json,
metrics.json, histograms.json, shap.json, central.json, ablation.json, provenance.json. A missing
file turns what needs it into one sentence, so a study that stopped half-way still gets a report.
Both formats are rendered from one list of blocks, so they cannot disagree; the HTML embeds its
figures as PNG data URIs and its CSS inline (no external resources: it can be mailed or archived).
"""

from __future__ import annotations

import base64
import json
import math
import re
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from psp_model.evaluate.plots import PHASES as TRAINING_PHASES
from psp_model.evaluate.plots import (
    plot_calibration,
    plot_feature_ranking,
    plot_roc,
    plot_training_curves,
)
from psp_model.io import atomic_write_text
from psp_model.schema import CATEGORICAL

__all__ = ["BAYES_RATIO_TARGET", "CENTRAL_RATIO_TARGET", "write_report"]

BAYES_RATIO_TARGET = 0.90  # synthetic cohorts: ensemble AUC must reach 90 % of the generator's Bayes AUC
CENTRAL_RATIO_TARGET = 0.97  # federated training must reach 97 % of the same model trained on pooled data

_METRICS = (("auc", "AUC"), ("accuracy", "accuracy"), ("sensitivity", "sensitivity"),
            ("specificity", "specificity"), ("balanced_accuracy", "balanced acc."))
_CONTINUOUS = (("age", "Age, years, mean ± sd"), ("days_since_rt", "Days since RT, mean ± sd"),
               ("dose_mean", "Lesion mean dose, Gy, mean ± sd"), ("dose_min", "Lesion min dose, Gy, mean ± sd"),
               ("dose_median", "Lesion median dose, Gy, mean ± sd"), ("dose_d98", "Lesion D98, Gy, mean ± sd"))
_CATEGORICAL_TITLES = {"sex": "Sex", "idh": "IDH", "mgmt": "MGMT"}
_LEVEL_TITLES = {"F": "female", "M": "male"}
_ABLATION_TITLES = {"baselines": "Comparison with baselines (as the paper's Table 2)",
                    "modalities": "Input modality (as the paper's Table 3)",
                    "encoders": "Training of the MRI encoder (as the paper's Table 4)"}
_MISSING = "–"
_UNDEFINED = "n/a"


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Text:
    text: str
    tone: str = ""  # "pass" / "below" colour the line in HTML; Markdown keeps the words


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]
    numeric: bool = True  # right-align every column but the first


@dataclass(frozen=True)
class Figure:
    path: Path
    caption: str


@dataclass(frozen=True)
class KeyResults:
    items: list[Text]


Block = Heading | Text | Table | Figure | KeyResults


@dataclass(frozen=True)
class _Check:
    """One acceptance ratio of a synthetic study (None when the ratio is undefined)."""

    label: str
    ratio: float | None
    target: float
    why_undefined: str = ""

    def as_text(self) -> Text:
        if self.ratio is None:
            return Text(f"{self.label}: undefined ({self.why_undefined})")
        verdict = "PASS" if self.ratio >= self.target else "BELOW"
        return Text(f"{self.label} = {self.ratio:.2f} (target ≥ {self.target:.2f}) {verdict}", verdict.lower())


def write_report(run_dir: Path, *, truth_summary: Path | None = None) -> tuple[Path, Path]:
    """Write ``<run_dir>/report.md`` and ``<run_dir>/report.html`` (figures in ``<run_dir>/figures/``).

    ``truth_summary`` (synthetic cohorts only: the cohort's ``truth_summary.json``) adds the ensemble
    AUC as a fraction of the generator's Bayes-optimal AUC. Returns ``(markdown_path, html_path)``.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir} has no config.json, so it is not a psp-fl run directory: "
                                "give the folder the study wrote (its --run-dir)")
    if truth_summary is not None and not Path(truth_summary).is_file():
        raise FileNotFoundError(f"truth summary {truth_summary} not found: give the cohort's truth_summary.json "
                                "or leave it out (real cohorts have none)")
    files = {name: _load(run_dir / f"{name}.json") for name in (
        "config", "stats", "rounds", "timings", "metrics", "histograms", "shap", "central", "ablation", "provenance")}
    truth = _load(Path(truth_summary)) if truth_summary is not None else None
    checks = _target_checks(files["metrics"], truth, files["central"])
    blocks = [
        *_header_section(run_dir, files["config"], files["metrics"], files["histograms"], checks),
        *_cohort_section(files["stats"]),
        *_results_section(files["metrics"], files["histograms"], files["central"], truth, checks),
        *_figures_section(run_dir / "figures", files),
        *_shap_section(files["shap"]),
        *_ablation_section(files["ablation"]),
        *_traffic_section(files["rounds"], files["timings"]),
        *_config_section(run_dir, files["config"], files["provenance"]),
    ]
    title = f"psp-fl study report: {run_dir.name}"
    markdown = atomic_write_text(run_dir / "report.md", _to_markdown(blocks, run_dir))
    html = atomic_write_text(run_dir / "report.html", _to_html(blocks, title))
    return markdown, html


def _load(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}): it was cut off or edited; "
                         "re-run the phase that writes it or delete it") from None


# ----------------------------------------------------------------------------------------------- sections

def _header_section(run_dir: Path, config: dict, metrics: dict | None, histograms: dict | None,
                    checks: list[_Check]) -> list[Block]:
    keys = ("profile", "folds", "head-variant", "encoder-mode", "strategy", "seed")
    blocks: list[Block] = [Heading(f"psp-fl study report: {run_dir.name}", 1),
                           Table(["run", *keys], [[str(run_dir), *(_cell(config.get(k)) for k in keys)]],
                                 numeric=False)]
    items: list[Text] = []
    pooled = (metrics or {}).get("test", {}).get("ensemble_pooled")
    if pooled:
        brier = _defined(pooled, "brier", _brier(histograms, "test", "ensemble"))
        items.append(Text(f"Test sites pooled, soft-voting ensemble, {_n_cases(pooled)} cases (TP/PsP): "
                          f"AUC {_with_ci(pooled, 'auc')}, accuracy {_num(pooled.get('accuracy'))}, "
                          f"sensitivity {_num(pooled.get('sensitivity'))}, "
                          f"specificity {_num(pooled.get('specificity'))}, Brier {_num(brier)}."))
    cv = (metrics or {}).get("validation", {}).get("folds")
    if cv:
        items.append(Text(f"Cross-validation at the training sites: AUC {_mean_sd(cv.get('auc'))} over folds."))
    items += [check.as_text() for check in checks]
    blocks.append(KeyResults(items or [Text("No evaluation in this run (metrics.json is missing).")]))
    return blocks


def _cohort_section(stats: dict | None) -> list[Block]:
    blocks: list[Block] = [Heading("Cohort"), Text("Aggregates each site sent (no per-patient data leaves a site).")]
    if not stats or not stats.get("sites"):
        return blocks + [Text("No stats.json in this run: the cohort table needs the 'stats' phase.")]
    sites = stats["sites"]
    header = ["", *(f"{s['name']} ({', '.join(s['roles'])})" if s.get("roles") else s["name"] for s in sites)]
    counts = [s.get("counts", {}) for s in sites]
    rows = [["Usable cases", *(_integer(c.get("n-cases-ok")) for c in counts)],
            ["Skipped by QC", *(_integer(c.get("n-cases-error")) for c in counts)],
            ["True progression, n (%)", *(_share(c.get("n-tp"), _labelled(c)) for c in counts)],
            ["Pseudoprogression, n (%)", *(_share(c.get("n-psp"), _labelled(c)) for c in counts)]]
    rows.append(_continuous_row(counts, *_CONTINUOUS[0]))
    for feature, title in _CATEGORICAL_TITLES.items():
        rows += _categorical_rows(counts, feature, title)
    rows += [_continuous_row(counts, feature, title) for feature, title in _CONTINUOUS[1:]]
    return blocks + [Table(header, rows), Text(f"{_MISSING}: the site did not send that aggregate.")]


def _results_section(metrics: dict | None, histograms: dict | None, central: dict | None, truth: dict | None,
                     checks: list[_Check]) -> list[Block]:
    blocks: list[Block] = [Heading("Results")]
    if not metrics:
        return blocks + [Text("No metrics.json in this run: the 'evaluate' phase did not run.")]
    header = ["evaluation", *(title for _, title in _METRICS), "Brier", "cases (TP/PsP)"]
    test, validation = metrics.get("test", {}), metrics.get("validation", {})
    rows = []
    if test.get("ensemble_pooled"):
        rows.append(_metric_row("test sites pooled, soft-voting ensemble", test["ensemble_pooled"],
                                _brier(histograms, "test", "ensemble")))
        for site, values in test.get("ensemble_per_site", {}).items():
            rows.append(_metric_row(f"test site {site}, ensemble", values,
                                    _brier(histograms, "test_sites", site, "ensemble")))
    if central and central.get("test", {}).get("ensemble_pooled"):
        rows.append(_metric_row("central training (pooled data), ensemble", central["test"]["ensemble_pooled"],
                                None))
    if test.get("folds"):
        rows.append(_summary_row("test sites pooled, single fold models (mean ± sd)", test["folds"],
                                 _fold_briers(histograms, "test")))
    if validation.get("folds"):
        rows.append(_summary_row("cross-validation at training sites (mean ± sd)", validation["folds"],
                                 _fold_briers(histograms, "validation")))
    if central and central.get("validation", {}).get("folds"):
        rows.append(_summary_row("central training, cross-validation (mean ± sd)", central["validation"]["folds"],
                                 []))
    blocks += [Table(header, rows),
               Text(f"95 % confidence intervals in brackets; {_UNDEFINED}: undefined (one class only); "
                    f"{_MISSING}: not in this run's files. Sites reporting: "
                    f"{', '.join(metrics.get('sites_reporting', [])) or _MISSING}.")]
    blocks += _per_fold_blocks(test.get("folds"), validation.get("folds"))
    blocks.append(Heading("Targets", 3))
    if truth is None:
        blocks.append(Text("No truth summary given: the Bayes-AUC targets apply to synthetic cohorts only."))
    if central is None:
        blocks.append(Text("No central.json in this run: there is no federated vs central comparison."))
    return blocks + [check.as_text() for check in checks]


def _figures_section(folder: Path, files: dict[str, Any]) -> list[Block]:
    blocks: list[Block] = [Heading("Figures")]
    histograms, rounds, shap, ablation = files["histograms"], files["rounds"], files["shap"], files["ablation"]
    if histograms:
        blocks += _histogram_figures(folder, histograms)
    else:
        blocks.append(Text("No histograms.json in this run: ROC and calibration curves need the 'evaluate' phase."))
    trained = [entry for entry in rounds or [] if entry.get("phase") in TRAINING_PHASES]
    if any(entry.get("metrics") for entry in trained):
        blocks.append(Figure(plot_training_curves(trained, folder / "training_curves.png"),
                             "Training and validation loss per federated round."))
    else:
        blocks.append(Text("No per-round losses in rounds.json: no training curves."))
    if shap:
        order = _shap_order(shap)
        features = [shap["features"][i] for i in order]
        best = shap.get("selection", {}).get("best_m", 0)
        blocks.append(Figure(plot_feature_ranking(
            features, [shap["mean_abs_shap"][i] for i in order], folder / "shap_ranking.png",
            title="Mean |SHAP| per feature", highlight=frozenset(features[:best])),
            "Mean |SHAP| per feature over the validation folds"
            + (f" (the {best} selected features highlighted)." if best else ".")))
    modality_curves = (ablation or {}).get("histograms", {}).get("modalities")
    if modality_curves:
        blocks.append(Figure(plot_roc(_arrays(modality_curves), folder / "roc_modalities.png",
                                      title="ROC by input modality, test sites"),
                             "ROC of the soft-voting ensemble per input modality at the test sites."))
    return blocks


def _shap_section(shap: dict | None) -> list[Block]:
    blocks: list[Block] = [Heading("Feature importance (SHAP)")]
    if not shap:
        return blocks + [Text("No shap.json in this run: SHAP feature ranking was not computed.")]
    selection = shap.get("selection") or {}
    best = selection.get("best_m", 0)
    per_site = shap.get("per_site", {})
    header = ["rank", "feature", f"mean |SHAP| (pooled, {shap.get('n_cases', _MISSING)} cases)",
              *(f"{site} ({entry.get('n_cases', _MISSING)} cases)" for site, entry in per_site.items()), "selected"]
    order = _shap_order(shap)
    rows = [[str(rank), shap["features"][i], _num(shap["mean_abs_shap"][i], 4),
             *(_num(entry["mean_abs_shap"][i], 4) for entry in per_site.values()), "yes" if rank <= best else ""]
            for rank, i in enumerate(order, start=1)]
    blocks.append(Table(header, rows))
    if not selection:
        return blocks + [Text("shap.json has no feature-count selection: no m was chosen.")]
    blocks += [Text(f"Selection: the first m features by mean |SHAP|; best m = {best} "
                    f"(validation AUC {_num(dict(zip(selection['m'], selection['val_auc'])).get(best))})."),
               Table(["m", "validation AUC"],
                     [[f"{m} (best)" if m == best else str(m), _num(auc)]
                      for m, auc in zip(selection["m"], selection["val_auc"])])]
    return blocks


def _shap_order(shap: dict) -> list[int]:
    """Feature indices by decreasing pooled mean |SHAP| (ties keep the file's order)."""
    return np.argsort(-np.asarray(shap["mean_abs_shap"], dtype=float), kind="stable").tolist()


def _ablation_section(ablation: dict | None) -> list[Block]:
    blocks: list[Block] = [Heading("Ablations")]
    if not ablation or not ablation.get("tables"):
        return blocks + [Text("No ablation.json in this run: no baselines, modality or encoder comparisons.")]
    header = ["method", "AUC [95 % CI]", "accuracy", "sensitivity", "specificity", "Bayes AUC", "note"]
    for name, entries in ablation["tables"].items():
        blocks.append(Heading(_ABLATION_TITLES.get(name, f"Ablation '{name}'"), 3))
        blocks.append(Table(header, [_ablation_row(entry) for entry in entries]))
    return blocks


def _traffic_section(rounds: list | None, timings: dict | None) -> list[Block]:
    blocks: list[Block] = [Heading("Traffic and timings"), Heading("Traffic per round", 3)]
    if rounds:
        header = ["phase", "fold", "round", "sites", "replies", "bytes to each site", "bytes from each site (mean)"]
        rows, sent, received = [], 0, 0
        for entry in rounds:
            from_sites = entry.get("bytes_from_each_site") or []
            to_site = entry.get("bytes_to_each_site", 0)
            sent += to_site * entry.get("nodes", 0)
            received += sum(from_sites)
            rows.append([entry["phase"], _cell(entry.get("fold")), _cell(entry.get("round")), _cell(entry.get("nodes")),
                         _cell(entry.get("replies")), f"{to_site:,}",
                         f"{sum(from_sites) / len(from_sites):,.0f}" if from_sites else _MISSING])
        blocks += [Table(header, rows), Text(f"In all: {sent:,} bytes sent to sites, {received:,} bytes received.")]
    else:
        blocks.append(Text("No rounds.json in this run: the study wrote no round log."))
    blocks.append(Heading("Timings", 3))
    if not timings:
        return blocks + [Text("No timings.json in this run: the study did not finish.")]
    return blocks + [Table(["step", "wall time"], [[step, _duration(seconds)] for step, seconds in timings.items()])]


def _config_section(run_dir: Path, config: dict, provenance: dict | None) -> list[Block]:
    blocks: list[Block] = [Heading("Configuration and provenance"), Heading("Study configuration", 3),
                           Table(["key", "value"], [[key, _cell(value)] for key, value in config.items()],
                                 numeric=False),
                           Heading("Provenance", 3)]
    if not provenance:
        blocks.append(Text("No provenance.json in this run: code version, packages and data hashes "
                           "were not recorded."))
    else:
        keys = ("code_version", "git_commit", "encoder_hash", "created")
        blocks.append(Table(["item", "value"], [[key, _cell(provenance.get(key))] for key in keys], numeric=False))
        sites = provenance.get("sites", {})
        blocks.append(Table(["site", "cases", "data hash"],
                            [[site, _cell(entry.get("n_cases")), _cell(entry.get("data_hash"))]
                             for site, entry in sites.items()], numeric=False))
        blocks.append(Table(["package", "version"], [[name, str(version)] for name, version in
                                                     sorted(provenance.get("packages", {}).items())], numeric=False))
    return blocks + [Text(f"Models: {run_dir / 'models'} (encoder, fold heads, ensemble.json); "
                          f"configuration: {run_dir / 'config.json'}.")]


# ------------------------------------------------------------------------------------------ section parts

def _target_checks(metrics: dict | None, truth: dict | None, central: dict | None) -> list[_Check]:
    test = (metrics or {}).get("test", {})
    checks = []
    if truth:
        for site, values in test.get("ensemble_per_site", {}).items():
            bayes = truth.get("sites", {}).get(site, {}).get("bayes_auc")
            label = f"test site {site}: ensemble AUC / Bayes AUC"
            if bayes is None or _undefined(values.get("auc")):
                checks.append(_Check(label, None, BAYES_RATIO_TARGET, "the site has one class or no Bayes AUC"))
            else:
                checks.append(_Check(label, values["auc"] / bayes, BAYES_RATIO_TARGET))
    if central and test.get("ensemble_pooled"):
        federated = test["ensemble_pooled"].get("auc")
        pooled = central.get("test", {}).get("ensemble_pooled", {}).get("auc")
        label = "federated / central AUC"
        if _undefined(federated) or _undefined(pooled) or not pooled:
            checks.append(_Check(label, None, CENTRAL_RATIO_TARGET, "an AUC is undefined"))
        else:
            checks.append(_Check(label, federated / pooled, CENTRAL_RATIO_TARGET))
    return checks


def _per_fold_blocks(test_folds: dict | None, validation_folds: dict | None) -> list[Block]:
    test_rows = (test_folds or {}).get("per_fold", [])
    validation_rows = (validation_folds or {}).get("per_fold", [])
    if not test_rows and not validation_rows:
        return []
    header = ["fold", "test AUC [95 % CI]", "test accuracy", "test sensitivity", "test specificity",
              "validation AUC [95 % CI]", "validation accuracy"]
    rows = []
    for fold in range(max(len(test_rows), len(validation_rows))):
        test = test_rows[fold] if fold < len(test_rows) else {}
        validation = validation_rows[fold] if fold < len(validation_rows) else {}
        rows.append([str(fold), _with_ci(test, "auc"), _num(test.get("accuracy")), _num(test.get("sensitivity")),
                     _num(test.get("specificity")), _with_ci(validation, "auc"), _num(validation.get("accuracy"))])
    return [Heading("Single fold models", 3), Table(header, rows)]


def _histogram_figures(folder: Path, histograms: dict) -> list[Block]:
    test, sites = histograms.get("test", {}), histograms.get("test_sites", {})
    blocks = _roc_figure(_fold_curves(test), folder / "roc_test.png", "ROC at the test sites (pooled)",
                         "ROC of each fold's model and of the soft-voting ensemble, test sites pooled.")
    if len(sites) > 1:
        for site, curves in sites.items():
            blocks += _roc_figure(_fold_curves(curves), folder / f"roc_test_{_file_part(site)}.png",
                                  f"ROC at test site {site}",
                                  f"ROC of each fold's model and of the ensemble at test site {site}.")
    blocks += _roc_figure(_fold_curves(histograms.get("validation", {})), folder / "roc_validation.png",
                          "ROC in cross-validation (training sites pooled)",
                          "ROC of each fold's model on its held-out fold, training sites pooled.")
    calibration = {"ensemble, test pooled": test["ensemble"]} if "ensemble" in test else {}
    if len(sites) > 1:
        calibration |= {f"ensemble, {site}": curves["ensemble"]
                        for site, curves in sites.items() if "ensemble" in curves}
    calibration = {label: hist for label, hist in _arrays(calibration).items() if hist.sum() > 0}
    if calibration:
        blocks.append(Figure(plot_calibration(calibration, folder / "calibration.png",
                                              title="Calibration of the ensemble at the test sites"),
                             "Observed fraction of TP against the predicted TP probability."))
    return blocks


def _roc_figure(curves: dict[str, np.ndarray], path: Path, title: str, caption: str) -> list[Block]:
    """The ROC figure of the curves that have both classes, and a sentence naming any left out."""
    drawable = {label: hist for label, hist in curves.items() if hist.sum(axis=1).all()}
    left_out = [label for label in curves if label not in drawable]
    blocks: list[Block] = [Figure(plot_roc(drawable, path, title=title), caption)] if drawable else []
    if left_out:
        blocks.append(Text(f"{title}: no curve for {', '.join(left_out)} (needs both TP and PsP cases)."))
    return blocks


def _fold_curves(histograms: dict) -> dict[str, np.ndarray]:
    """``fold-K`` / ``ensemble`` histograms as plot curves, folds first, named for a legend."""
    folds = sorted((k for k in histograms if k.startswith("fold-")), key=lambda k: int(k.split("-")[1]))
    curves = {key.replace("-", " "): np.asarray(histograms[key]) for key in folds}
    if "ensemble" in histograms:
        curves["ensemble"] = np.asarray(histograms["ensemble"])
    return curves


def _arrays(curves: dict) -> dict[str, np.ndarray]:
    return {label: np.asarray(values) for label, values in curves.items()}


def _continuous_row(counts: list[dict], feature: str, title: str) -> list[str]:
    cells = []
    for c in counts:
        mean, sd = c.get(f"cohort.{feature}.mean"), c.get(f"cohort.{feature}.sd")
        cells.append(_MISSING if mean is None else f"{_num(mean, 1)} ± {_num(sd, 1)}")
    return [title, *cells]


def _categorical_rows(counts: list[dict], feature: str, title: str) -> list[list[str]]:
    """One row per level: the schema's levels first, then any other level a site sent."""
    prefix = f"cohort.{feature}."
    sent = {key[len(prefix):] for c in counts for key in c if key.startswith(prefix)} - {"mean", "sd"}
    levels = [*CATEGORICAL.get(feature, ()), *sorted(sent - set(CATEGORICAL.get(feature, ())))]
    rows = []
    for level in levels:
        cells = []
        for c in counts:
            total = sum(c.get(f"{prefix}{other}", 0) for other in levels)
            cells.append(_share(c.get(f"{prefix}{level}"), total))
        rows.append([f"{title} {_LEVEL_TITLES.get(level, level)}, n (%)", *cells])
    return rows


def _metric_row(title: str, values: dict, brier: float | None) -> list[str]:
    return [title, *(_with_ci(values, key) for key, _ in _METRICS), _num(_defined(values, "brier", brier)),
            _n_cases(values)]


def _summary_row(title: str, summary: dict, briers: list[float]) -> list[str]:
    """Mean ± sd over folds; Brier from the summary, else from the sites' Brier sums per fold."""
    defined = summary.get("auc", {}).get("folds_defined")
    folds = len(summary.get("per_fold", []))
    note = f", AUC defined in {defined} of {folds} folds" if defined is not None and defined < folds else ""
    if not _undefined(summary.get("brier", {}).get("mean")):
        brier = _mean_sd(summary["brier"])
    elif briers:
        brier = f"{_num(np.mean(briers))} ± {_num(np.std(briers, ddof=1) if len(briers) > 1 else None)}"
    else:
        brier = _MISSING
    return [title + note, *(_mean_sd(summary.get(key)) for key, _ in _METRICS), brier, _MISSING]


def _ablation_row(entry: dict) -> list[str]:
    low, high = entry.get("auc_ci") or (None, None)
    return [entry.get("method", _MISSING), _value_ci(entry.get("auc"), low, high), _num(entry.get("accuracy")),
            _num(entry.get("sensitivity")), _num(entry.get("specificity")), _num(entry.get("bayes_auc")),
            entry.get("note", "")]


def _brier(histograms: dict | None, *path: str) -> float | None:
    """Mean Brier score: the summed squared errors the sites sent over the cases in the same histogram."""
    sums, counts = (histograms or {}).get("brier_sums"), histograms
    for key in path:
        sums = sums.get(key) if isinstance(sums, dict) else None
        counts = counts.get(key) if isinstance(counts, dict) else None
    if sums is None or counts is None:
        return None
    n = float(np.sum(counts))
    return float(sums) / n if n else None


def _fold_briers(histograms: dict | None, group: str) -> list[float]:
    folds = sorted((k for k in (histograms or {}).get(group, {}) if k.startswith("fold-")),
                   key=lambda k: int(k.split("-")[1]))
    briers = [_brier(histograms, group, key) for key in folds]
    return [b for b in briers if b is not None]


def _labelled(counts: dict) -> float | None:
    if "n-tp" not in counts or "n-psp" not in counts:
        return None
    return counts["n-tp"] + counts["n-psp"]


# ------------------------------------------------------------------------------------------- formatting

def _defined(values: dict, key: str, fallback: float | None) -> float | None:
    """``values[key]`` unless missing or NaN (a metrics dict built without Brier sums), else ``fallback``."""
    value = values.get(key)
    return fallback if _undefined(value) else value


def _undefined(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return _MISSING
    value = float(value)
    return _UNDEFINED if math.isnan(value) else f"{value:.{digits}f}"


def _value_ci(value: Any, low: Any, high: Any) -> str:
    if _undefined(value) or _undefined(low) or _undefined(high):
        return _num(value)
    return f"{_num(value)} [{_num(low)}–{_num(high)}]"


def _with_ci(values: dict, key: str) -> str:
    """``0.830 [0.710–0.950]`` from a metrics dict's ``key``, ``key_ci_low``, ``key_ci_high``."""
    return _value_ci(values.get(key), values.get(f"{key}_ci_low"), values.get(f"{key}_ci_high"))


def _mean_sd(entry: dict | None) -> str:
    if not entry:
        return _MISSING
    return f"{_num(entry.get('mean'))} ± {_num(entry.get('sd'))}"


def _n_cases(values: dict) -> str:
    if "n_pos" not in values or "n_neg" not in values:
        return _MISSING
    return f"{values['n_pos'] + values['n_neg']:.0f} ({values['n_pos']:.0f}/{values['n_neg']:.0f})"


def _integer(value: Any) -> str:
    return _MISSING if value is None else f"{value:.0f}"


def _share(count: Any, total: Any) -> str:
    """``28 (47.5)`` as in the paper's Table 1."""
    if count is None:
        return _MISSING
    return f"{count:.0f} ({100 * count / total:.1f})" if total else f"{count:.0f}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def _cell(value: Any) -> str:
    if value is None or value == "":
        return _MISSING
    return json.dumps(value) if isinstance(value, (dict, list, bool)) else str(value)


def _file_part(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


# -------------------------------------------------------------------------------------------- rendering

def _to_markdown(blocks: list[Block], run_dir: Path) -> str:
    lines: list[str] = []
    for block in blocks:
        match block:
            case Heading(text, level):
                lines += ["#" * level + " " + text, ""]
            case Text(text):
                lines += [text, ""]
            case KeyResults(items):
                lines += ["> **Key results**", ">", *(f"> - {item.text}" for item in items), ""]
            case Table(header, rows):
                lines += ["| " + " | ".join(_md_cell(c) for c in header) + " |", "|" + "---|" * len(header),
                          *("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows), ""]
            case Figure(path, caption):
                lines += [f"![{caption}]({path.relative_to(run_dir).as_posix()})", "", f"*{caption}*", ""]
    return "\n".join(lines)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _to_html(blocks: list[Block], title: str) -> str:
    body = "\n".join(_html_block(block) for block in blocks)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{_text(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n{body}\n</main>\n"
            "</body>\n</html>\n")


def _html_block(block: Block) -> str:
    match block:
        case Heading(text, level):
            return f"<h{level}>{_text(text)}</h{level}>"
        case Text(text, tone):
            return f"<p class=\"{tone}\">{_text(text)}</p>" if tone else f"<p>{_text(text)}</p>"
        case KeyResults(items):
            lines = "".join(f"<li class=\"{item.tone}\">{_text(item.text)}</li>" if item.tone
                            else f"<li>{_text(item.text)}</li>" for item in items)
            return f"<section class=\"key\"><h2>Key results</h2><ul>{lines}</ul></section>"
        case Table(header, rows, numeric):
            head = "".join(f"<th>{_text(c)}</th>" for c in header)
            body = "".join("<tr>" + "".join(f"<td>{_text(c)}</td>" for c in row) + "</tr>" for row in rows)
            css = "num" if numeric else "text"
            return (f"<div class=\"table\"><table class=\"{css}\"><thead><tr>{head}</tr></thead>"
                    f"<tbody>{body}</tbody></table></div>")
        case Figure(path, caption):
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            return (f"<figure><img src=\"data:image/png;base64,{data}\" alt=\"{escape(caption, quote=True)}\">"
                    f"<figcaption>{_text(caption)}</figcaption></figure>")
    raise TypeError(f"unknown report block {block!r}")


def _text(text: str) -> str:
    """Escape for an element's content (quotes stay readable in the source)."""
    return escape(text, quote=False)


_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; color: #1a1a1a;
       margin: 0; background: #fff; }
main { max-width: 72rem; margin: 0 auto; padding: 1.5rem 1.25rem 3rem; }
h1 { font-size: 1.6rem; margin: 0 0 .75rem; }
h2 { font-size: 1.3rem; margin: 2rem 0 .6rem; padding-bottom: .2rem; border-bottom: 2px solid #d0d7de; }
h3 { font-size: 1.05rem; margin: 1.4rem 0 .5rem; }
p { margin: .4rem 0; }
.table { overflow-x: auto; margin: .5rem 0 .8rem; }
table { border-collapse: collapse; font-size: .88rem; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d0d7de; padding: .25rem .55rem; vertical-align: top; }
th { background: #f3f5f7; text-align: left; font-weight: 600; }
table.num td:not(:first-child) { text-align: right; white-space: nowrap; }
table.text td { word-break: break-word; }
tbody tr:nth-child(even) { background: #fafbfc; }
.key { border: 1px solid #9ec5e8; background: #f1f7fd; border-radius: 6px; padding: .4rem 1rem; margin: 1rem 0; }
.key h2 { border: 0; margin: .3rem 0; font-size: 1.1rem; }
.key ul { margin: .3rem 0 .5rem; padding-left: 1.2rem; }
.pass { color: #116329; font-weight: 600; }
.below { color: #9a3412; font-weight: 600; }
figure { margin: 1rem 0; break-inside: avoid; page-break-inside: avoid; }
figure img { max-width: 100%; height: auto; max-height: 30rem; border: 1px solid #eee; }
figcaption { font-size: .85rem; color: #555; margin-top: .2rem; }
@media print {
  body { font-size: 10.5pt; }
  main { max-width: none; padding: 0; }
  h2 { break-after: avoid; page-break-after: avoid; }
  .table { overflow: visible; }
  table { font-size: 8.5pt; break-inside: auto; }
  table.num td:not(:first-child) { white-space: normal; }
  tr { break-inside: avoid; page-break-inside: avoid; }
  figure img { max-height: 16cm; }
}
"""
