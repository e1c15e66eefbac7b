"""The study report: both formats hold every section, the HTML is self-contained, numbers match the files."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from typer.testing import CliRunner

from psp_model.evaluate.metrics import metrics_from_histograms, score_histograms
from psp_model.evaluate.report import write_report
from server.cli import app

SECTIONS = ("Key results", "Cohort", "Results", "Figures", "Feature importance (SHAP)", "Ablations",
            "Traffic and timings", "Configuration and provenance")
FOLDS = 3
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _scores(rng: np.random.Generator, n_tp: int, n_psp: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.r_[np.ones(n_tp, int), np.zeros(n_psp, int)]
    return np.where(labels == 1, rng.beta(4, 2, labels.size), rng.beta(2, 4, labels.size)), labels


def _histogram(rng: np.random.Generator, n_tp: int, n_psp: int) -> tuple[list, float]:
    """A site's (2, 1000) score histogram (as JSON lists) and its Brier sum."""
    scores, labels = _scores(rng, n_tp, n_psp)
    return score_histograms(scores, labels).tolist(), float(((scores - labels) ** 2).sum())


def _fold_summary(per_fold: list[dict]) -> dict:
    summary: dict = {"per_fold": per_fold}
    for key in ("auc", "accuracy", "sensitivity", "specificity", "balanced_accuracy", "brier"):
        values = [m[key] for m in per_fold]
        summary[key] = {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)),
                        "folds_defined": len(values)}
    return summary


def _site_counts(n_tp: int, n_psp: int, age: float) -> dict:
    n = n_tp + n_psp
    counts = {"n-cases-ok": n, "n-cases-error": 1, "n-tp": n_tp, "n-psp": n_psp, "num-examples": n,
              "cohort.age.mean": age, "cohort.age.sd": 11.0, "cohort.days_since_rt.mean": 95.5,
              "cohort.days_since_rt.sd": 40.4, "cohort.sex.F": n // 2, "cohort.sex.M": n - n // 2,
              "cohort.idh.mutant": 2, "cohort.idh.wildtype": n - 5, "cohort.idh.unknown": 3,
              "cohort.mgmt.methylated": 5, "cohort.mgmt.unmethylated": n - 9, "cohort.mgmt.unknown": 4}
    for feature, mean in (("dose_mean", 55.0), ("dose_min", 30.0), ("dose_median", 58.0), ("dose_d98", 41.5)):
        counts[f"cohort.{feature}.mean"], counts[f"cohort.{feature}.sd"] = mean, 6.0
    return counts


def write_fake_run(root: Path, *, optional: bool = True, seed: int = 0) -> Path:
    """A run directory with every file of the contract (``optional=False``: only the required ones)."""
    rng = np.random.default_rng(seed)
    run_dir = root / "run-20260101-000000"
    (run_dir / "models").mkdir(parents=True)

    def write(name: str, payload: object) -> None:
        (run_dir / name).write_text(json.dumps(payload, indent=1))

    write("config.json", {"profile": "tiny", "phases": "stats,ssl,finetune,evaluate", "run-dir": str(run_dir),
                          "seed": 0, "folds": FOLDS, "strategy": "fedavg", "encoder-mode": "ssl",
                          "head-variant": "multimodal", "finetune-lr": 0.0001, "resume": False})
    write("stats.json", {"sites": [
        {"node_id": 1, "name": "burdenko", "roles": ["train"], "counts": _site_counts(34, 25, 57.0)},
        {"node_id": 2, "name": "uker", "roles": ["test"], "counts": _site_counts(11, 9, 58.5)},
        {"node_id": 3, "name": "mannheim", "roles": ["test"], "counts": _site_counts(8, 6, 61.0)},
        {"node_id": 4, "name": "brats", "roles": ["ssl"], "counts": {"n-cases-ok": 40, "n-cases-error": 0}},
    ]})
    rounds: list[dict] = [{"phase": "ssl", "fold": None, "round": r, "nodes": 2, "replies": 2,
                           "bytes_to_each_site": 4_000_000, "bytes_from_each_site": [4_000_100, 4_000_200],
                           "metrics": {"train-loss": 1.0 / r}} for r in (1, 2)]
    rounds.append({"phase": "install", "round": 0, "nodes": 3, "replies": 3, "bytes_to_each_site": 3_000_000,
                   "failures": {}})
    rounds += [{"phase": "finetune", "fold": k, "round": r, "nodes": 1, "replies": 1, "bytes_to_each_site": 20_000,
                "bytes_from_each_site": [20_500],
                "metrics": {"train-loss": 0.7 - 0.1 * r + 0.03 * k, "val-loss": 0.75 - 0.05 * r + 0.02 * k}}
               for k in range(FOLDS) for r in (1, 2, 3)]
    write("rounds.json", rounds)
    write("timings.json", {"stats": 1.25, "ssl": 75.0, "install": 0.5, "finetune": 3725.0, "evaluate": 2.0,
                           "study": 3804.0})

    histograms: dict = {"test": {}, "test_sites": {"uker": {}, "mannheim": {}}, "validation": {},
                        "brier_sums": {"test": {}, "test_sites": {"uker": {}, "mannheim": {}}, "validation": {}}}
    for key in ["ensemble", *(f"fold-{k}" for k in range(FOLDS))]:
        for site, (n_tp, n_psp) in (("uker", (11, 9)), ("mannheim", (8, 6))):
            histograms["test_sites"][site][key], histograms["brier_sums"]["test_sites"][site][key] = \
                _histogram(rng, n_tp, n_psp)
        sites = histograms["test_sites"].values()
        histograms["test"][key] = np.sum([s[key] for s in sites], axis=0).tolist()
        histograms["brier_sums"]["test"][key] = sum(s[key] for s in histograms["brier_sums"]["test_sites"].values())
    for k in range(FOLDS):
        histograms["validation"][f"fold-{k}"], histograms["brier_sums"]["validation"][f"fold-{k}"] = \
            _histogram(rng, 12, 8)

    def metrics(*path: str) -> dict:
        hist, brier = histograms, histograms["brier_sums"]
        for key in path:
            hist, brier = hist[key], brier[key]
        return metrics_from_histograms(np.asarray(hist), brier_sum=brier)

    write("metrics.json", {
        "test": {"ensemble_pooled": metrics("test", "ensemble"),
                 "ensemble_per_site": {s: metrics("test_sites", s, "ensemble") for s in ("uker", "mannheim")},
                 "folds": _fold_summary([metrics("test", f"fold-{k}") for k in range(FOLDS)])},
        "validation": {"folds": _fold_summary([metrics("validation", f"fold-{k}") for k in range(FOLDS)])},
        "sites_reporting": ["burdenko", "mannheim", "uker"]})
    if not optional:
        return run_dir
    write("histograms.json", histograms)
    features = ["age", "days_since_rt", "dose_min", "dose_d98", "idh=mutant", "mgmt=methylated"]
    write("shap.json", {"features": features, "mean_abs_shap": [0.05, 0.21, 0.12, 0.1, 0.01, 0.07], "n_cases": 59,
                        "per_site": {"burdenko": {"mean_abs_shap": [0.05, 0.21, 0.12, 0.1, 0.01, 0.07],
                                                  "n_cases": 59}},
                        "selection": {"m": [1, 2, 3, 4, 5, 6], "val_auc": [0.7, 0.75, 0.8, 0.86, 0.84, 0.83],
                                      "best_m": 4}})
    pooled_auc = json.loads((run_dir / "metrics.json").read_text())["test"]["ensemble_pooled"]["auc"]
    write("central.json", {"test": {"ensemble_pooled": {**metrics("test", "ensemble"), "auc": pooled_auc / 0.99}},
                           "validation": {"folds": _fold_summary([metrics("validation", "fold-0")] * 2)},
                           "epochs": 30})
    row = {"auc": 0.753, "auc_ci": [0.52, 0.98], "accuracy": 0.75, "sensitivity": 0.727, "specificity": 0.8,
           "bayes_auc": None, "note": "<b>paper</b> | ours"}
    write("ablation.json", {
        "tables": {"baselines": [{**row, "method": "random forest (Sun et al.)", "auc": 0.53}],
                   "modalities": [{**row, "method": "MRI only"}, {**row, "method": "multimodal", "bayes_auc": 0.91}],
                   "encoders": [{**row, "method": "ViT self-supervised"}]},
        "histograms": {"modalities": {"MRI only": histograms["test"]["fold-0"],
                                      "multimodal": histograms["test"]["ensemble"]}}})
    write("provenance.json", {"code_version": "0.3.0", "git_commit": "abc1234", "encoder_hash": "e" * 64,
                              "created": "2026-01-01T00:00:00Z", "packages": {"torch": "2.13.0", "flwr": "1.41.0"},
                              "sites": {"burdenko": {"n_cases": 59, "data_hash": "d" * 64}}})
    return run_dir


def write_truth(root: Path, metrics: dict) -> Path:
    """A truth summary putting uker at 0.96 of its Bayes AUC (PASS) and mannheim at 0.50 (BELOW)."""
    per_site = metrics["test"]["ensemble_per_site"]
    path = root / "truth_summary.json"
    path.write_text(json.dumps({"sites": {"uker": {"n": 20, "n_tp": 11, "bayes_auc": per_site["uker"]["auc"] / 0.96},
                                          "mannheim": {"n": 14, "n_tp": 8,
                                                       "bayes_auc": per_site["mannheim"]["auc"] / 0.5}}}))
    return path


@pytest.fixture(scope="module")
def full_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    root = tmp_path_factory.mktemp("full")
    run_dir = write_fake_run(root)
    truth = write_truth(root, json.loads((run_dir / "metrics.json").read_text()))
    markdown, html = write_report(run_dir, truth_summary=truth)
    assert (markdown, html) == (run_dir / "report.md", run_dir / "report.html")
    return run_dir, markdown.read_text(), html.read_text()


def _fmt_ci(values: dict, key: str) -> str:
    return f"{values[key]:.3f} [{values[key + '_ci_low']:.3f}–{values[key + '_ci_high']:.3f}]"


def test_every_section_is_in_both_files_in_order(full_report: tuple[Path, str, str]) -> None:
    _, markdown, html = full_report
    md_positions = [markdown.index(f"## {s}\n") if s != "Key results" else markdown.index("**Key results**")
                    for s in SECTIONS]
    html_positions = [html.index(f"<h2>{s}</h2>") for s in SECTIONS]
    assert md_positions == sorted(md_positions) and html_positions == sorted(html_positions)
    for subsection in ("Targets", "Single fold models", "Traffic per round", "Timings", "Provenance"):
        assert f"### {subsection}\n" in markdown and f"<h3>{subsection}</h3>" in html
    assert markdown.startswith("# psp-fl study report: run-20260101-000000\n")


def test_html_is_self_contained(full_report: tuple[Path, str, str]) -> None:
    _, markdown, html = full_report
    assert not re.search(r"https?://", html)
    assert not re.search(r"<link|<script|@import|url\(", html)
    references = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]*)""", html)
    assert references and all(ref.startswith("data:image/png;base64,") for ref in references)
    assert len(references) == markdown.count("![") == 8


def test_embedded_images_decode_as_png_and_match_the_figure_files(full_report: tuple[Path, str, str]) -> None:
    run_dir, markdown, html = full_report
    embedded = [base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]
    files = [run_dir / name for name in re.findall(r"!\[[^]]*\]\(([^)]+)\)", markdown)]
    assert all(path.parent == run_dir / "figures" for path in files)
    assert embedded == [path.read_bytes() for path in files]
    for data in embedded:
        assert data.startswith(PNG_SIGNATURE)
        height, width = imread(io.BytesIO(data), format="png").shape[:2]
        assert height > 200 and width > 200


def test_numbers_shown_match_metrics_json(full_report: tuple[Path, str, str]) -> None:
    run_dir, markdown, html = full_report
    metrics = json.loads((run_dir / "metrics.json").read_text())
    pooled = metrics["test"]["ensemble_pooled"]
    expected = [_fmt_ci(pooled, key) for key in ("auc", "accuracy", "sensitivity", "specificity")]
    expected += [_fmt_ci(metrics["test"]["ensemble_per_site"][site], "auc") for site in ("uker", "mannheim")]
    cv = metrics["validation"]["folds"]["auc"]
    expected += [f"{cv['mean']:.3f} ± {cv['sd']:.3f}", f"{pooled['brier']:.3f}",
                 f"{pooled['n_pos'] + pooled['n_neg']:.0f} ({pooled['n_pos']:.0f}/{pooled['n_neg']:.0f})"]
    expected += [_fmt_ci(metrics["test"]["folds"]["per_fold"][k], "auc") for k in range(FOLDS)]
    for text in expected:
        assert text in markdown and text in html, text
    key_results = html[html.index('<section class="key">'):html.index("</section>")]
    assert _fmt_ci(pooled, "auc") in key_results


def test_cohort_table_follows_the_papers_table_1(full_report: tuple[Path, str, str]) -> None:
    _, markdown, _ = full_report
    table = {line.split(" | ")[0].lstrip("| "): line for line in markdown.splitlines() if line.startswith("| ")}
    assert table[""].startswith("|  | burdenko (train) | uker (test) | mannheim (test) | brats (ssl)")
    assert "| True progression, n (%) | 34 (57.6) | 11 (55.0) | 8 (57.1) | – |" in markdown
    assert "| Age, years, mean ± sd | 57.0 ± 11.0 | 58.5 ± 11.0 | 61.0 ± 11.0 | – |" in markdown
    assert "| Sex female, n (%) | 29 (49.2) | 10 (50.0) | 7 (50.0) | – |" in markdown
    assert "| IDH unknown, n (%) | 3 (5.1) | 3 (15.0) | 3 (21.4) | – |" in markdown
    assert "| Lesion D98, Gy, mean ± sd | 41.5 ± 6.0 |" in markdown
    assert "| Days since RT, mean ± sd | 95.5 ± 40.4 |" in markdown


def test_targets_pass_and_below_against_bayes_and_central(full_report: tuple[Path, str, str]) -> None:
    _, markdown, html = full_report
    for line in ("test site uker: ensemble AUC / Bayes AUC = 0.96 (target ≥ 0.90) PASS",
                 "test site mannheim: ensemble AUC / Bayes AUC = 0.50 (target ≥ 0.90) BELOW",
                 "federated / central AUC = 0.99 (target ≥ 0.97) PASS"):
        assert line in markdown and line in html
    assert '<p class="pass">test site uker' in html and '<li class="below">test site mannheim' in html


def test_shap_ablation_traffic_and_provenance_tables(full_report: tuple[Path, str, str]) -> None:
    _, markdown, html = full_report
    assert "| 1 | days_since_rt | 0.2100 | 0.2100 | yes |" in markdown
    assert "| 5 | age | 0.0500 | 0.0500 |  |" in markdown
    assert "best m = 4 (validation AUC 0.860)" in markdown and "| 4 (best) | 0.860 |" in markdown
    for title in ("Comparison with baselines", "Input modality", "Training of the MRI encoder"):
        assert title in markdown and title in html
    assert "| MRI only | 0.753 [0.520–0.980] | 0.750 | 0.727 | 0.800 | – | <b>paper</b> \\| ours |" in markdown
    assert "&lt;b&gt;paper&lt;/b&gt; | ours" in html and "<b>paper" not in html
    assert "| install |" in markdown and "| 4,000,000 | 4,000,150 |" in markdown
    assert "| finetune | 1 h 02 min |" in markdown and "| stats | 1.2 s |" in markdown
    assert "| git_commit | abc1234 |" in markdown and "| burdenko | 59 | " + "d" * 64 + " |" in markdown
    assert "| head-variant | multimodal |" in markdown and "| resume | false |" in markdown


def test_missing_optional_files_give_one_sentence_each(tmp_path: Path) -> None:
    run_dir = write_fake_run(tmp_path, optional=False)
    markdown, html = (path.read_text() for path in write_report(run_dir))
    for sentence in ("No histograms.json in this run: ROC and calibration curves need the 'evaluate' phase.",
                     "No shap.json in this run: SHAP feature ranking was not computed.",
                     "No ablation.json in this run: no baselines, modality or encoder comparisons.",
                     "No provenance.json in this run: code version, packages and data hashes were not recorded.",
                     "No truth summary given: the Bayes-AUC targets apply to synthetic cohorts only.",
                     "No central.json in this run: there is no federated vs central comparison."):
        assert sentence in markdown and sentence in html, sentence
    assert markdown.count("![") == 1  # the training curves: rounds.json is there
    (run_dir / "metrics.json").unlink()
    markdown, html = (path.read_text() for path in write_report(run_dir))
    for sentence in ("No metrics.json in this run: the 'evaluate' phase did not run.",
                     "No evaluation in this run (metrics.json is missing)."):
        assert sentence in markdown and sentence in html, sentence


def test_a_single_class_test_site_is_reported_not_fatal(tmp_path: Path) -> None:
    run_dir = write_fake_run(tmp_path)
    for name in ("rounds.json", "shap.json", "ablation.json"):
        (run_dir / name).unlink()
    tp_only = score_histograms(np.array([0.7, 0.8]), np.array([1, 1]))
    histograms = json.loads((run_dir / "histograms.json").read_text())
    histograms["test_sites"]["mannheim"]["ensemble"] = tp_only.tolist()
    (run_dir / "histograms.json").write_text(json.dumps(histograms))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["test"]["ensemble_per_site"]["mannheim"] = metrics_from_histograms(tp_only)
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    markdown, _ = (path.read_text() for path in write_report(run_dir, truth_summary=write_truth(tmp_path, metrics)))
    assert "| test site mannheim, ensemble | n/a |" in markdown
    assert "test site mannheim: ensemble AUC / Bayes AUC: undefined (the site has one class" in markdown
    assert "ROC at test site mannheim: no curve for ensemble (needs both TP and PsP cases)." in markdown
    assert "figures/roc_test_mannheim.png" in markdown  # its folds are still drawn
    assert "No rounds.json in this run" in markdown and "No per-round losses in rounds.json" in markdown


def test_bad_inputs_are_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="has no config.json.*give the folder the study wrote"):
        write_report(tmp_path)
    run_dir = write_fake_run(tmp_path, optional=False)
    with pytest.raises(FileNotFoundError, match="truth summary .* not found"):
        write_report(run_dir, truth_summary=tmp_path / "nowhere.json")
    (run_dir / "stats.json").write_text('{"sites": [')
    with pytest.raises(ValueError, match=r"stats.json is not valid JSON .*re-run the phase"):
        write_report(run_dir)


def test_cli_rebuilds_both_files_and_prints_their_paths(tmp_path: Path) -> None:
    run_dir = write_fake_run(tmp_path, optional=False)
    truth = write_truth(tmp_path, json.loads((run_dir / "metrics.json").read_text()))
    result = CliRunner().invoke(app, ["report", str(run_dir), "--truth", str(truth)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [f"report: {run_dir / 'report.md'}", f"report: {run_dir / 'report.html'}"]
    assert "Bayes AUC = 0.96" in (run_dir / "report.md").read_text()


@pytest.mark.parametrize("broken", ["no-config", "bad-json"])
def test_cli_fails_clearly_on_a_bad_run_dir(tmp_path: Path, broken: str) -> None:
    if broken == "no-config":
        run_dir, expected = tmp_path, "has no config.json"
    else:
        run_dir, expected = write_fake_run(tmp_path, optional=False), "is not valid JSON"
        (run_dir / "rounds.json").write_text("[{")
    result = CliRunner().invoke(app, ["report", str(run_dir)], env={"COLUMNS": "400"})  # no wrapped message
    assert result.exit_code == 2
    assert expected in result.output and "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)
