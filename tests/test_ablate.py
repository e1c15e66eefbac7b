"""``psp-sim ablate`` and the centralised reference on the tiny cohort (in-process Flower simulations).

One small main run (2 folds, 1 SSL round, 1 x 2 fine-tuning epochs) serves every test; the ablation
variants inherit its config, which keeps the whole module to a few minutes on a laptop CPU.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from psp_model.study import StudyConfig
from simulation.ablate_cmd import BASELINE_NAMES, PROPOSED, VARIANTS, _tables, ablate
from simulation.central import CENTRAL_FILE, central_reference
from simulation.cli import app
from simulation.federation import simulate_study

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def main_run(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, StudyConfig]:
    """``<out>/run`` holding a finished small federated study (what ``psp-sim run`` leaves)."""
    out = tmp_path_factory.mktemp("ablate")
    study = StudyConfig(profile="tiny", cohort_dir=str(tiny_cohort), run_dir=str(out / "run"), folds=2,
                        ssl_rounds=1, finetune_rounds=1, finetune_local_epochs=2, batch_size=4, seed=3)
    simulate_study(study)
    return out, study


def test_central_reference_writes_a_defined_auc(main_run: tuple[Path, StudyConfig], tiny_cohort: Path) -> None:
    out, study = main_run
    result = central_reference(tiny_cohort, out / "run", study)
    written = json.loads((out / "run" / CENTRAL_FILE).read_text())
    pooled = written["test"]["ensemble_pooled"]
    assert pooled["defined"] == 1.0 and 0.0 <= pooled["auc"] <= 1.0
    assert pooled["auc_ci_low"] <= pooled["auc"] <= pooled["auc_ci_high"]
    assert written["epochs"] == 2 and written["train_sites"] == ["burdenko"]
    assert len(written["validation"]["folds"]["per_fold"]) == study.folds
    assert result["test"]["ensemble_pooled"]["auc"] == pooled["auc"]


def test_central_reference_refuses_a_run_whose_models_disagree(main_run: tuple[Path, StudyConfig],
                                                                tiny_cohort: Path, tmp_path: Path) -> None:
    out, study = main_run
    shutil.copytree(out / "run" / "models", tmp_path / "models")
    ensemble = json.loads((tmp_path / "models" / "ensemble.json").read_text())
    (tmp_path / "models" / "ensemble.json").write_text(json.dumps({**ensemble, "encoder_hash": "0" * 64}))
    with pytest.raises(RuntimeError, match="does not match ensemble.json's encoder_hash"):
        central_reference(tiny_cohort, tmp_path, study)


def test_ablate_writes_three_tables_and_a_rerun_reuses_every_variant(main_run: tuple[Path, StudyConfig]) -> None:
    out, _ = main_run
    runner = CliRunner()
    first = runner.invoke(app, ["ablate", "--profile", "tiny", "--out", str(out)])
    assert first.exit_code == 0, first.output
    ablation = json.loads((out / "run" / "ablation.json").read_text())
    tables = ablation["tables"]
    curves = ablation["histograms"]["modalities"]
    assert set(curves) == {"MRI only", "clinical only", "multimodal (proposed)"}
    assert all(np.asarray(hist).shape == (2, 1000) and np.sum(hist) > 0 for hist in curves.values())
    expected = {
        "baselines": [*BASELINE_NAMES.values(), "Proposed, trained centrally", PROPOSED],
        "modalities": [v.method for v in VARIANTS if v.table == "modalities"] + [PROPOSED],
        "encoders": [v.method for v in VARIANTS if v.table == "encoders"] + [PROPOSED],
    }
    assert {name: [row["method"] for row in rows] for name, rows in tables.items()} == expected
    for rows in tables.values():
        for row in rows:
            assert 0.0 <= row["auc"] <= 1.0 and len(row["auc_ci"]) == 2
            assert 0.5 < row["bayes_auc"] <= 1.0 and row["note"]
    baselines = {row["method"]: row for row in tables["baselines"]}
    assert all(baselines[m]["note"].startswith("central, pooled") for m in BASELINE_NAMES.values())
    markdown = (out / "ablation.md").read_text()
    for title in ("Table 2", "Table 3", "Table 4", "Bayes AUC", "Federated / central AUC"):
        assert title in markdown
    assert all(method in markdown for rows in expected.values() for method in rows)

    finished = sorted((out / "ablation").glob("*/metrics.json"))
    assert len(finished) == len(BASELINE_NAMES) + len(VARIANTS)
    stamps = [p.stat().st_mtime_ns for p in finished]
    second = runner.invoke(app, ["ablate", "--profile", "tiny", "--out", str(out)])
    assert second.exit_code == 0, second.output
    assert second.output.count("finished before, reused") == len(BASELINE_NAMES) + len(VARIANTS) + 1
    assert "running" not in second.output
    assert [p.stat().st_mtime_ns for p in finished] == stamps
    assert json.loads((out / "run" / "ablation.json").read_text())["tables"] == tables


def test_ablate_refuses_an_unknown_table_and_another_profile(main_run: tuple[Path, StudyConfig]) -> None:
    out, _ = main_run
    with pytest.raises(typer.BadParameter, match=r"\['scaling'\]: choose among baselines, modalities, encoders"):
        _tables("modalities,scaling")
    with pytest.raises(typer.BadParameter, match="holds a 'tiny' run; pass --profile tiny or another --out"):
        ablate(profile="demo", out=out, only="modalities", seed=0, workers=1)
    with pytest.raises(typer.BadParameter, match=r"'full' is not one of \['tiny', 'demo'\]"):
        ablate(profile="full", out=out, only="modalities", seed=0, workers=1)


def test_rows_of_undefined_metrics_are_null_not_nan() -> None:
    from simulation.ablate_cmd import _row

    metrics = {"test": {"ensemble_pooled": {"auc": float("nan"), "accuracy": 0.5}}}
    row = _row(metrics, "m", "n", None)
    assert row["auc"] is None and row["auc_ci"] == [None, None] and row["accuracy"] == 0.5
    assert not any(isinstance(v, float) and math.isnan(v) for v in row.values())
