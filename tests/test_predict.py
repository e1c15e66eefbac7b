"""psp-predict on a held-out test-site case of a tiny simulated study: same numbers as the evaluate path."""

from __future__ import annotations

import csv
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from client.predict_cmd import app
from psp_model.errors import CaseError, ConfigError
from psp_model.io import load_verified_npz
from psp_model.predict import CLINICAL_JSON, Ensemble, Prediction, load_case, load_ensemble, predict_case
from psp_model.preprocess.clinical import FeatureManifest
from psp_model.preprocess.nyul import NyulLandmarks
from psp_model.preprocess.pipeline import PreprocessSettings, preprocess_site
from psp_model.sites import SiteConfig, load_site_config
from psp_model.study import StudyConfig
from psp_model.train.finetune import ClassifierData, predict_proba
from simulation.federation import simulate_study

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def study(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> StudyConfig:
    run_dir = tmp_path_factory.mktemp("predict_run") / "study"
    return StudyConfig(profile="tiny", cohort_dir=str(tiny_cohort), run_dir=str(run_dir), folds=2, ssl_rounds=1,
                       finetune_rounds=2, finetune_local_epochs=2, batch_size=4, seed=11)


@pytest.fixture(scope="module")
def run_dir(study: StudyConfig) -> Path:
    return simulate_study(study)


@pytest.fixture(scope="module")
def case_dir(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first test-site case, alone in a psp-case site of its own (with its clinical.csv row)."""
    test_site = next(site for path in sorted((tiny_cohort / "site_configs").glob("*.yaml"))
                     if "test" in (site := load_site_config(path)).roles)
    source = sorted(p for p in test_site.root.iterdir() if p.is_dir())[0]
    root = tmp_path_factory.mktemp("held_out") / test_site.name
    shutil.copytree(source, root / source.name)
    with (test_site.root / "clinical.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    with (root / "clinical.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerow(next(row for row in rows if row["case_id"] == source.name))
    return root / source.name


@pytest.fixture(scope="module")
def ensemble(run_dir: Path) -> Ensemble:
    return load_ensemble(run_dir)


@pytest.fixture(scope="module")
def prediction(ensemble: Ensemble, case_dir: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[Prediction, int]:
    """The prediction and how many times the MRI encoder ran for it."""
    calls = []
    handle = ensemble.models[0].encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        result = predict_case(ensemble, case_dir, out_dir=tmp_path_factory.mktemp("prediction"), device="cpu")
    finally:
        handle.remove()
    return result, len(calls)


def evaluate_path_probabilities(case_dir: Path, study: StudyConfig, run_dir: Path) -> tuple[np.ndarray, dict]:
    """Per-fold P(TP) of the case as a test site's evaluate phase computes it (deterministic registration)."""
    from psp_model.site_tasks import (
        LocalSite,
        classifier_inputs,
        fold_classifier,
        install_study_model,
        load_installed,
    )

    site = SiteConfig(name="held_out", roles=("test",), layout="psp-case", root=case_dir.parent)
    preprocess_site(site, PreprocessSettings(profile=study.profile, deterministic_registration=True), progress=False)
    local = LocalSite(site, study)
    models = run_dir / "models"
    spec = json.loads((models / "ensemble.json").read_text())
    landmarks = NyulLandmarks.from_arrays({k: np.asarray(v) for k, v in spec["nyul_landmarks"].items()})
    install_study_model(local, load_verified_npz(models / "encoder.npz"), landmarks,
                        FeatureManifest.from_json(spec["feature_manifest"]))
    installed = load_installed(local, spec["encoder_hash"])
    tokens, clinical, manifest = classifier_inputs(local, installed)
    data = ClassifierData(tokens, clinical, local.data.labels)
    probs = [predict_proba(fold_classifier(local, installed, manifest, load_verified_npz(models / f"fold_{k}.npz"),
                                       what=f"fold {k}"), data)[0] for k in range(spec["folds"])]
    return np.asarray(probs), local.data.dose[0]


def test_prediction_matches_the_evaluate_phase(prediction, case_dir: Path, study: StudyConfig, run_dir: Path) -> None:
    result, _ = prediction
    expected, dose = evaluate_path_probabilities(case_dir, study, run_dir)
    assert result.dose == pytest.approx(dose, abs=1e-9)
    np.testing.assert_allclose(result.per_fold, expected, atol=1e-5, rtol=0)
    assert result.probability == pytest.approx(np.mean(result.per_fold), abs=1e-12)
    assert abs(result.probability - expected.mean()) < 1e-5


def test_the_mri_is_encoded_once_for_all_folds(prediction, study: StudyConfig) -> None:
    result, encoder_calls = prediction
    assert len(result.per_fold) == study.folds == 2
    assert encoder_calls == 1 and result.model["images_encoded"] == 1


def test_spread_features_and_json(prediction) -> None:
    result, _ = prediction
    folds = np.asarray(result.per_fold)
    assert result.spread == pytest.approx({"sd": folds.std(ddof=1), "min": folds.min(), "max": folds.max()})
    payload = json.loads(json.dumps(result.to_json()))
    assert set(payload) >= {"case_id", "probability", "per_fold", "spread", "features", "map", "inputs", "checks",
                            "model", "lesion_centre_voxel"}
    names = [f["feature"] for f in payload["features"]]
    assert sorted(names) == sorted(["age", "days_since_rt", "dose_mean", "dose_min", "dose_median", "dose_d98",
                                    "sex", "idh", "mgmt"])
    effects = [abs(f["effect"]) for f in payload["features"]]
    assert effects == sorted(effects, reverse=True) and max(effects) > 0
    assert all(f["direction"] in ("towards TP", "towards PsP", "none") for f in payload["features"])
    assert "P(true progression)" in result.summary()


def test_feature_effect_is_the_change_when_set_to_the_reference(prediction, ensemble: Ensemble, case_dir: Path
                                                                ) -> None:
    result, _ = prediction
    effect = next(f for f in result.features if f.feature == "age")
    assert effect.reference == pytest.approx(ensemble.manifest.center[ensemble.manifest.features.index("age")])
    shifted = case_dir.parent.parent / "age_at_reference" / case_dir.name
    shutil.copytree(case_dir, shifted)
    (shifted / CLINICAL_JSON).write_text(json.dumps({**result.clinical, "age": effect.reference}))
    again = predict_case(ensemble, shifted, device="cpu")
    assert result.probability - again.probability == pytest.approx(effect.effect, abs=1e-6)


def test_the_map_png_decodes(prediction) -> None:
    result, _ = prediction
    assert result.map_kind == "guided cross-attention" and result.map_png.is_file()
    pixels = matplotlib.image.imread(result.map_png)
    assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.std() > 0.05


def test_an_altered_fold_file_is_refused(run_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(run_dir / "models", tmp_path / "models")
    path = tmp_path / "models" / "fold_0.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"fold_0\.npz does not match its SHA-256.*copy the whole models/"):
        load_ensemble(tmp_path)
    (tmp_path / "models" / "fold_0.sha256").unlink()
    with pytest.raises(ConfigError, match=r"fold_0\.npz has no fold_0\.sha256"):
        load_ensemble(tmp_path)
    path.unlink()
    with pytest.raises(ConfigError, match=r"fold_0\.npz not found"):
        load_ensemble(tmp_path)


def _models_copy(run_dir: Path, tmp_path: Path) -> Path:
    shutil.copytree(run_dir / "models", tmp_path / "models")
    return tmp_path / "models"


@pytest.mark.parametrize(("edit", "match"), [
    (lambda spec: spec.pop("nyul_landmarks"), r"lacks key\(s\) \['nyul_landmarks'\]"),
    (lambda spec: spec.update(head_variant="linear"), "head_variant 'linear' is not one of"),
    (lambda spec: spec.update(encoder_mode="frozen"), "encoder_mode 'frozen' is not one of"),
    (lambda spec: spec.update(folds=0), "folds must be a positive integer"),
    (lambda spec: spec.update(feature_manifest="{}"), "unusable feature_manifest or nyul_landmarks"),
    (lambda spec: spec.update(encoder_hash="0" * 64), r"encoder\.npz is not the encoder 000000000000"),
    (lambda spec: spec.update(profile="demo"), r"encoder\.npz does not fit the 'demo' encoder"),
])
def test_an_inconsistent_ensemble_json_is_refused(run_dir: Path, tmp_path: Path, edit, match: str) -> None:
    models = _models_copy(run_dir, tmp_path)
    spec = json.loads((models / "ensemble.json").read_text())
    edit(spec)
    (models / "ensemble.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match=match):
        load_ensemble(tmp_path)


def test_unreadable_ensemble_json_and_foreign_fold_file_are_refused(run_dir: Path, tmp_path: Path) -> None:
    from server.run_dir import RunDir

    models = _models_copy(run_dir, tmp_path)
    fold = load_verified_npz(models / "fold_1.npz")
    RunDir(tmp_path).save_model("fold_1", dict(list(fold.items())[1:]))
    with pytest.raises(ConfigError, match=r"fold_1\.npz does not fit the multimodal head .*missing"):
        load_ensemble(tmp_path)
    (models / "ensemble.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"ensemble\.json is not readable JSON"):
        load_ensemble(tmp_path)


def test_trust_requires_signed_models(run_dir: Path, tmp_path: Path) -> None:
    from psp_model.signing import generate_signing_key, sign_file

    shutil.copytree(run_dir / "models", tmp_path / "models")
    key = generate_signing_key(tmp_path / "k.pem", tmp_path / "k.pub.pem")
    for path in (tmp_path / "models").glob("*"):
        if path.suffix in (".npz", ".json"):
            sign_file(path, key)
    assert len(load_ensemble(tmp_path, trust=tmp_path / "k.pub.pem").models) == 2
    (tmp_path / "models" / "ensemble.sig").unlink()
    with pytest.raises(ConfigError, match=r"ensemble\.json has no signature"):
        load_ensemble(tmp_path, trust=tmp_path / "k.pub.pem")
    sign_file(tmp_path / "models" / "ensemble.json", key)
    (tmp_path / "models" / "fold_1.npz").unlink()
    with pytest.raises(ConfigError, match=r"fold_1\.npz not found"):
        load_ensemble(tmp_path, trust=tmp_path / "k.pub.pem")


def test_the_site_config_signing_key_applies_and_other_layouts_are_refused(run_dir: Path, case_dir: Path,
                                                                           tmp_path: Path) -> None:
    from psp_model.signing import generate_signing_key

    generate_signing_key(tmp_path / "k.pem", tmp_path / "k.pub.pem")
    config = tmp_path / "site.yaml"
    config.write_text(f"name: clinic\nroles: [test]\nlayout: psp-case\nroot: {case_dir.parent}\n"
                      f"model_signing_key: {tmp_path / 'k.pub.pem'}\n")
    result = CliRunner().invoke(app, ["--run", str(run_dir), "--case", str(case_dir), "--site-config", str(config)])
    assert result.exit_code == 2 and "has no signature" in result.output, result.output
    other = replace(load_site_config(config), layout="brats2021")
    with pytest.raises(ConfigError, match="psp-predict reads cases in the psp-case layout"):
        predict_case(load_ensemble(run_dir), case_dir, site_config=other)


def test_clinical_json_is_preferred_over_clinical_csv(case_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(case_dir, tmp_path / case_dir.name)
    shutil.copy(case_dir.parent / "clinical.csv", tmp_path / "clinical.csv")
    case, source = load_case(tmp_path / case_dir.name)
    assert source.endswith("clinical.csv") and case.clinical["age"] != "33"
    (tmp_path / case_dir.name / CLINICAL_JSON).write_text(json.dumps(
        {"age": 33, "sex": "F", "idh": "unknown", "mgmt": "unknown", "days_since_rt": 90}))
    case, source = load_case(tmp_path / case_dir.name)
    assert source.endswith(CLINICAL_JSON) and case.clinical["age"] == "33" and case.clinical["label"] == ""


@pytest.mark.parametrize(("content", "match"), [
    ({"age": 33, "sex": "F", "idh": "unknown", "mgmt": "unknown", "days_since_rt": 90, "kps": 80},
     r"unknown key\(s\) \['kps'\]"),
    ({"case_id": "other"}, "names case_id 'other'"),
    ({"age": [33]}, "age must be a string or a number"),
    ([1, 2], "must hold one JSON object"),
])
def test_malformed_clinical_json_is_refused(case_dir: Path, tmp_path: Path, content, match: str) -> None:
    folder = tmp_path / case_dir.name
    folder.mkdir()
    (folder / CLINICAL_JSON).write_text(json.dumps(content))
    with pytest.raises(CaseError, match=match):
        load_case(folder)


def test_a_case_without_clinical_values_is_refused(tmp_path: Path) -> None:
    (tmp_path / "P1").mkdir()
    with pytest.raises(CaseError, match=r"no clinical values.*Fix: write clinical\.json"):
        load_case(tmp_path / "P1")


@pytest.mark.parametrize(("csv_text", "folder", "match"), [
    ("case_id,age\nP1,60\n", "P1", r"missing column\(s\)"),
    ("case_id,label,age,sex,idh,mgmt,days_since_rt\nP1,,60,F,unknown,unknown,9\nP1,,61,F,unknown,unknown,9\n",
     "P1", r"appears 2 times in clinical\.csv.*Fix: correct"),
    ("", ".P1", r"not read as a case folder \(a hidden folder\?\)"),
])
def test_a_broken_clinical_csv_or_folder_is_refused(tmp_path: Path, csv_text: str, folder: str, match: str) -> None:
    (tmp_path / folder).mkdir()
    if csv_text:
        (tmp_path / "clinical.csv").write_text(csv_text)
    with pytest.raises(CaseError, match=match):
        load_case(tmp_path / folder)


def _broken_copy(case_dir: Path, tmp_path: Path, break_it) -> Path:
    folder = tmp_path / "site" / case_dir.name
    shutil.copytree(case_dir, folder)
    shutil.copy(case_dir.parent / "clinical.csv", folder.parent / "clinical.csv")
    break_it(folder)
    return folder


def _nan_t1ce(folder: Path) -> None:
    image = nib.load(folder / "t1ce.nii.gz")
    data = np.asarray(image.dataobj, dtype=np.float32)
    data[data.shape[0] // 2, data.shape[1] // 2, data.shape[2] // 2] = np.nan
    nib.save(nib.Nifti1Image(data, image.affine), folder / "t1ce.nii.gz")


@pytest.mark.parametrize(("break_it", "match"), [
    (lambda folder: shutil.rmtree(folder), r"case folder .* not found\. Fix: pass --case"),
    (lambda folder: (folder / "flair.nii.gz").unlink(), r"missing flair\.nii\.gz in .*Fix: a psp-case folder holds"),
    (_nan_t1ce, r"t1ce has 1 NaN/inf voxels.*Fix: correct or re-export"),
    (lambda folder: (folder / CLINICAL_JSON).write_text(json.dumps(
        {"age": 61, "sex": "male", "idh": "unknown", "mgmt": "unknown", "days_since_rt": 90})),
     r"sex 'male' is not one of \['F', 'M'\]"),
    (lambda folder: (folder / "rtdose.dcm").write_bytes(b"not DICOM"), r"dose: .*Fix: check the planning CT"),
], ids=["no-folder", "missing-modality", "nan-voxels", "unknown-category", "broken-rtdose"])
def test_bad_cases_give_one_line_errors(run_dir: Path, case_dir: Path, tmp_path: Path, break_it, match: str) -> None:
    folder = _broken_copy(case_dir, tmp_path, break_it)
    result = CliRunner().invoke(app, ["--run", str(run_dir), "--case", str(folder), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and f"case {case_dir.name}:" in error[0]
    assert re.search(match, error[0]), error[0]
    assert "Traceback" not in result.output


def test_a_run_dir_without_models_is_refused(case_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["--run", str(tmp_path), "--case", str(case_dir)])
    assert result.exit_code == 2
    assert "holds no released models. Fix: pass --run the run directory" in result.output
    assert "Traceback" not in result.output


def test_the_cli_writes_prediction_json(run_dir: Path, case_dir: Path, tmp_path: Path, prediction) -> None:
    result = CliRunner().invoke(app, ["--run", str(run_dir), "--case", str(case_dir), "--out", str(tmp_path),
                                      "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "prediction.json").read_text())
    assert written["probability"] == pytest.approx(prediction[0].probability, abs=1e-12)
    assert Path(written["map"]["png"]).is_file()


def test_a_clinical_only_ensemble_predicts_without_a_map(ensemble: Ensemble, case_dir: Path, tmp_path: Path) -> None:
    from psp_model.nets.fusion import build_classifier
    from psp_model.site_tasks import head_config

    config = head_config(ensemble.profile, len(ensemble.manifest.features), "clinical-only")
    clinical_only = replace(ensemble, head_variant="clinical-only",
                            models=tuple(build_classifier(config, None).eval() for _ in range(2)))
    result = predict_case(clinical_only, case_dir, out_dir=tmp_path, device="cpu")
    assert result.map_png is None and result.model["images_encoded"] == 0 and 0 < result.probability < 1
    assert "no map: the clinical-only head" in result.summary() and not list(tmp_path.glob("*.png"))
