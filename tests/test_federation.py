"""The real Flower simulation (in-process, tiny profile): every phase, what leaves the sites, resume."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from psp_model.audit import verify_audit_log
from psp_model.sites import load_site_config
from psp_model.study import StudyConfig
from psp_model.wire import ALLOWED, disallowed_names
from server.run_dir import load_verified_npz
from simulation.federation import simulate_study

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def study(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> StudyConfig:
    run_dir = tmp_path_factory.mktemp("run") / "study"
    return StudyConfig(profile="tiny", cohort_dir=str(tiny_cohort), run_dir=str(run_dir), folds=3, ssl_rounds=2,
                       finetune_rounds=2, finetune_local_epochs=3, batch_size=4, seed=7)


@pytest.fixture(scope="module")
def finished_run(study: StudyConfig) -> Path:
    return simulate_study(study)


def test_every_phase_writes_its_outputs(finished_run: Path, study: StudyConfig) -> None:
    for round_ in (1, 2):
        load_verified_npz(finished_run / "checkpoints" / "ssl" / f"round_{round_:03d}.npz")
    for fold in range(study.folds):
        head = load_verified_npz(finished_run / "models" / f"fold_{fold}.npz")
        assert head and all(name.startswith("head.") for name in head)
    metrics = json.loads((finished_run / "metrics.json").read_text())
    pooled = metrics["test"]["ensemble_pooled"]
    assert pooled["defined"] == 1.0 and 0.0 <= pooled["auc"] <= 1.0
    assert pooled["n_pos"] + pooled["n_neg"] > 0
    assert metrics["validation"]["folds"]["auc"]["folds_defined"] >= 1
    ensemble = json.loads((finished_run / "models" / "ensemble.json").read_text())
    assert ensemble["folds"] == study.folds and len(ensemble["encoder_hash"]) == 64


def test_finetune_sends_only_the_head(finished_run: Path) -> None:
    rounds = json.loads((finished_run / "rounds.json").read_text())
    ssl = [r["bytes_to_each_site"] for r in rounds if r["phase"] == "ssl"]
    finetune = [r["bytes_to_each_site"] for r in rounds if r["phase"] == "finetune"]
    assert ssl and finetune and max(finetune) < min(ssl)
    stats = json.loads((finished_run / "stats.json").read_text())
    assert {s["name"] for s in stats["sites"]} >= {"burdenko", "uker", "brats2021"}


def test_only_allowed_names_and_no_case_ids_leave_the_sites(finished_run: Path, tiny_cohort: Path) -> None:
    case_ids = set()
    logs = 0
    for config_path in sorted((tiny_cohort / "site_configs").glob("*.yaml")):
        site = load_site_config(config_path)
        case_ids |= {p.name for p in site.root.iterdir() if p.is_dir()}
        audit = Path(site.work_dir) / "audit" / "outgoing.jsonl"
        if not audit.is_file():
            continue
        logs += 1
        assert verify_audit_log(audit) == []
        for line in audit.read_text().splitlines():
            entry = json.loads(line)
            if not entry["sent"]:
                continue
            phase = entry["phase"]
            assert phase in ALLOWED
            assert disallowed_names(phase, "arrays", list(entry["arrays"]),
                                    site_patterns=site.privacy.allowed_arrays) == []
            assert disallowed_names(phase, "metrics", entry["metrics"]) == []
            assert disallowed_names(phase, "configs", entry["configs"]) == []
            assert not any(cid in line for cid in case_ids if len(cid) > 3)
    assert logs >= 3


def test_test_site_never_sends_training_statistics(finished_run: Path, tiny_cohort: Path) -> None:
    site = load_site_config(tiny_cohort / "site_configs" / "uker.yaml")
    entries = [json.loads(line) for line in (Path(site.work_dir) / "audit" / "outgoing.jsonl").read_text().splitlines()]
    stats = [e for e in entries if e["phase"] == "stats"]
    assert stats and all(not e["arrays"] for e in stats)
    assert all(not name.startswith(("encoder.", "head.")) for e in entries for name in e["arrays"])


def test_resume_after_a_crash_ends_with_the_same_weights(finished_run: Path, study: StudyConfig,
                                                         tmp_path: Path) -> None:
    crashed = tmp_path / "crashed"
    shutil.copytree(finished_run, crashed)
    # The server died after round 1 of fold 1: later checkpoints and released models never got written.
    for path in [*crashed.glob("checkpoints/finetune/fold_1/round_002.*"), *crashed.glob("checkpoints/finetune/fold_2/*"),
                 *crashed.glob("models/fold_1.*"), *crashed.glob("models/fold_2.*"), crashed / "metrics.json"]:
        path.unlink()
    simulate_study(replace(study, run_dir=str(crashed), resume=True, phases="stats,ssl,finetune"))
    trained = {(r["phase"], r.get("fold"), r["round"]) for r in json.loads((crashed / "rounds.json").read_text())
               if r["phase"] in ("ssl", "finetune")}
    assert trained == {("finetune", 1, 2), ("finetune", 2, 1), ("finetune", 2, 2)}, "resume redid finished rounds"
    for fold in (1, 2):
        expected = load_verified_npz(finished_run / "models" / f"fold_{fold}.npz")
        resumed = load_verified_npz(crashed / "models" / f"fold_{fold}.npz")
        assert expected.keys() == resumed.keys()
        for name in expected:
            np.testing.assert_array_equal(resumed[name], expected[name], err_msg=name)


@pytest.mark.parametrize("mode", ["transfer", "scratch"])
def test_end_to_end_encoder_modes_train_and_send_the_encoder(finished_run: Path, study: StudyConfig, mode: str,
                                                           tmp_path: Path) -> None:
    run_dir = tmp_path / mode
    (run_dir / "models").mkdir(parents=True)
    for name in ("encoder.npz", "encoder.sha256"):
        shutil.copy(finished_run / "models" / name, run_dir / "models" / name)
    simulate_study(replace(study, run_dir=str(run_dir), phases="stats,finetune,evaluate", encoder_mode=mode, folds=2,
                           finetune_rounds=1, finetune_local_epochs=1))
    ssl_encoder = load_verified_npz(finished_run / "models" / "encoder.npz")
    fold = load_verified_npz(run_dir / "models" / "fold_0.npz")
    encoder = {k: v for k, v in fold.items() if k.startswith("encoder.")}
    assert encoder.keys() == ssl_encoder.keys(), "the trained encoder must travel with the head"
    assert any(not np.array_equal(encoder[k], ssl_encoder[k]) for k in encoder), "the encoder did not train"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test"]["ensemble_pooled"]["defined"] == 1.0
    assert json.loads((run_dir / "models" / "ensemble.json").read_text())["encoder_mode"] == mode


def test_shap_ranks_every_feature_and_selection_picks_a_best_m(finished_run: Path, study: StudyConfig,
                                                               tmp_path: Path) -> None:
    run_dir = tmp_path / "shap"
    shutil.copytree(finished_run / "models", run_dir / "models")
    simulate_study(replace(study, run_dir=str(run_dir), phases="stats,shap,select", finetune_rounds=1,
                           finetune_local_epochs=1))
    shap = json.loads((run_dir / "shap.json").read_text())
    assert {"age", "sex", "days_since_rt", "dose_d98", "mgmt"} <= set(shap["features"])
    assert len(shap["mean_abs_shap"]) == len(shap["features"]) and all(v >= 0 for v in shap["mean_abs_shap"])
    assert shap["n_cases"] == sum(site["n_cases"] for site in shap["per_site"].values()) > 0
    selection = shap["selection"]
    assert selection["m"] == list(range(1, len(shap["features"]) + 1))
    assert 1 <= selection["best_m"] <= len(shap["features"])
    assert selection["val_auc"][selection["best_m"] - 1] == max(selection["val_auc"])


def test_fedprox_runs_every_round_of_a_study_to_evaluation(finished_run: Path, study: StudyConfig,
                                                             tmp_path: Path) -> None:
    run_dir = tmp_path / "fedprox"
    shutil.copytree(finished_run / "models", run_dir / "models")
    simulate_study(replace(study, run_dir=str(run_dir), phases="stats,finetune,evaluate", strategy="fedprox",
                           proximal_mu=0.5, folds=2, finetune_rounds=2, finetune_local_epochs=1))
    rounds = [r for r in json.loads((run_dir / "rounds.json").read_text()) if r["phase"] == "finetune"]
    assert [(r["fold"], r["round"]) for r in rounds] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert all(r["replies"] == r["nodes"] for r in rounds)
    assert json.loads((run_dir / "config.json").read_text())["strategy"] == "fedprox"
    assert json.loads((run_dir / "metrics.json").read_text())["test"]["ensemble_pooled"]["defined"] == 1.0
