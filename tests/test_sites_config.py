"""Site config keys of the site's own privacy policy: differential privacy and the trusted model-signing key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from psp_model.errors import ConfigError
from psp_model.signing import generate_signing_key
from psp_model.sites import DPPolicy, load_site_config

DP = {"clip_norm": 1.0, "noise_multiplier": 1.1, "delta": 1e-5}


def _config(tmp_path: Path, **keys) -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    raw = {"name": "uker", "roles": ["train"], "layout": "psp-case", "root": "data", **keys}
    path = tmp_path / "uker.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_dp_and_signing_key_are_off_by_default(tmp_path):
    site = load_site_config(_config(tmp_path))
    assert site.privacy.dp is None and site.model_signing_key is None


def test_dp_policy_is_read_as_floats(tmp_path):
    site = load_site_config(_config(tmp_path, privacy={"dp": {"clip_norm": 2, "noise_multiplier": 0.8, "delta": 1e-6}}))
    assert site.privacy.dp == DPPolicy(clip_norm=2.0, noise_multiplier=0.8, delta=1e-6)
    assert site.privacy.min_aggregate_count == 5


@pytest.mark.parametrize(("dp", "message"), [
    ({**DP, "clip_norm": 0}, "key 'privacy.dp.clip_norm': expected a number above 0, got 0. Fix: use a positive"),
    ({**DP, "noise_multiplier": -1.0},
     "key 'privacy.dp.noise_multiplier': expected a number above 0, got -1.0. Fix: use a positive multiple"),
    ({**DP, "noise_multiplier": 0.0}, "key 'privacy.dp.noise_multiplier': expected a number above 0, got 0.0. "
                                      "Fix: use a positive multiple of clip_norm, e.g. 1.0 (0 would give no privacy)"),
    ({**DP, "delta": 1.5}, "key 'privacy.dp.delta': expected a number above 0 and below 1, got 1.5. Fix: use a small"),
    ({**DP, "delta": "1e-5"}, "key 'privacy.dp.delta': expected a number above 0 and below 1, got '1e-5'"),
    ({**DP, "clip_norm": True}, "key 'privacy.dp.clip_norm': expected a number above 0, got True"),
    ({k: v for k, v in DP.items() if k != "delta"}, "key 'privacy.dp.delta': missing (no safe default). Fix: set"),
    ({**DP, "epsilon": 3}, "key 'privacy.dp.epsilon': unknown key. Fix: remove it or use one of"),
    ("on", "key 'privacy.dp': expected a mapping, got 'on'. Fix: write 'dp: {clip_norm"),
])
def test_bad_dp_policy_names_file_key_and_fix(tmp_path, dp, message):
    path = _config(tmp_path, privacy={"dp": dp})
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {message}")):
        load_site_config(path)


def test_signing_key_is_relative_to_the_config_file(tmp_path):
    generate_signing_key(tmp_path / "keys" / "model_signing.pem", tmp_path / "keys" / "model_signing.pub.pem")
    site = load_site_config(_config(tmp_path, model_signing_key="keys/model_signing.pub.pem"))
    assert site.model_signing_key == (tmp_path / "keys" / "model_signing.pub.pem").resolve()


def test_bad_signing_key_names_file_key_and_fix(tmp_path):
    generate_signing_key(tmp_path / "model_signing.pem", tmp_path / "model_signing.pub.pem")
    path = _config(tmp_path, model_signing_key="missing.pub.pem")
    with pytest.raises(ConfigError, match=re.escape(
            f"{path}: key 'model_signing_key': {tmp_path.resolve() / 'missing.pub.pem'}: model-signing public key "
            "not found. Fix: copy the coordinator's model_signing.pub.pem")):
        load_site_config(path)
    path = _config(tmp_path, model_signing_key="model_signing.pem")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: key 'model_signing_key': ") + r".*model_signing\.pem: "
                       r"not a PEM public key .*Fix: copy the coordinator's"):
        load_site_config(path)
    path = _config(tmp_path, model_signing_key=["a"])
    with pytest.raises(ConfigError, match=re.escape(
            f"{path}: key 'model_signing_key': expected the path of a public key file, got ['a']")):
        load_site_config(path)


def test_site_config_templates_still_load():
    for path in sorted((Path(__file__).resolve().parents[1] / "site_configs").glob("*.yaml")):
        load_site_config(path, require_root=False)


def test_simulated_sites_trust_the_runs_signing_key(tmp_path):
    from simulation.cohort import set_model_signing_key

    configs = tmp_path / "cohort" / "site_configs"
    configs.mkdir(parents=True)
    (tmp_path / "cohort" / "uker").mkdir()
    (configs / "uker.yaml").write_text(yaml.safe_dump({"name": "uker", "roles": ["train"], "layout": "psp-case",
                                                       "root": "../uker"}))
    public = tmp_path / "keys" / "model_signing.pub.pem"
    generate_signing_key(tmp_path / "keys" / "model_signing.pem", public)
    assert set_model_signing_key(tmp_path / "cohort", public) == [configs / "uker.yaml"]
    written = yaml.safe_load((configs / "uker.yaml").read_text())["model_signing_key"]
    assert written == "../../keys/model_signing.pub.pem"
    assert load_site_config(configs / "uker.yaml").model_signing_key == public.resolve()
