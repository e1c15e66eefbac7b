"""The study config: one set of defaults shared by pyproject.toml and the code, validated once."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from psp_model.errors import ConfigError
from psp_model.study import StudyConfig

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_pyproject_run_config_matches_the_defaults() -> None:
    run_config = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert run_config == StudyConfig().to_run_config()
    assert StudyConfig.from_run_config(run_config) == StudyConfig()


def test_values_are_coerced_from_flower_types() -> None:
    study = StudyConfig.from_run_config({"resume": "true", "folds": 3, "proximal-mu": 1, "profile": "demo"})
    assert study.resume is True and study.folds == 3 and study.proximal_mu == 1.0 and study.profile == "demo"


@pytest.mark.parametrize(("override", "message"), [
    ({"colour": "blue"}, r"unknown key 'colour'. Fix: remove it"),
    ({"folds": "many"}, r"key 'folds': 'many' is not a int"),
    ({"folds": 1}, r"key 'folds': 1 folds. Fix: use at least 2"),
    ({"run-dir": "runs/x"}, r"key 'run-dir': 'runs/x' is relative .* Fix: give an absolute path"),
    ({"strategy": "fedprox"}, r"key 'proximal-mu': fedprox with proximal-mu 0 .* Fix: set proximal-mu > 0"),
    ({"phases": "stats,train"}, r"key 'phases': unknown or no phases \['train'\]"),
    ({"profile": "huge"}, r"key 'profile': unknown profile 'huge'. Fix: use one of"),
    ({"resume": "maybe"}, r"key 'resume': 'maybe' is not a bool"),
])
def test_bad_values_fail_with_the_key_and_the_fix(override: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        StudyConfig.from_run_config(override)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        StudyConfig.from_run_config({"colour": 1, "folds": 0, "strategy": "sgd"})
    assert len(caught.value.problems) == 3


def test_signing_key_must_be_absolute() -> None:
    assert StudyConfig.from_run_config({"signing-key": "/coordinator/certs/model_signing.pem"}).signing_key
    with pytest.raises(ConfigError, match=r"key 'signing-key': 'certs/model_signing.pem' is relative .* Fix: give "
                                          r"the absolute path of model_signing.pem, or '' for unsigned models"):
        StudyConfig.from_run_config({"signing-key": "certs/model_signing.pem"})
