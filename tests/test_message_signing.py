"""Signed global models on the wire: the server's signature over a message, checked by the ClientApp."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from client.app import verify_signature
from client.records import CONFIG, SIGNATURE, from_arrays, signed_digest
from psp_model.errors import SignatureError
from psp_model.signing import generate_signing_key, sign_bytes
from psp_model.site_tasks import LocalSite
from psp_model.sites import load_site_config
from psp_model.study import StudyConfig


@pytest.fixture()
def keys(tmp_path: Path):
    private = generate_signing_key(tmp_path / "k.pem", tmp_path / "k.pub.pem")
    other = generate_signing_key(tmp_path / "o.pem", tmp_path / "o.pub.pem")
    return private, tmp_path / "k.pub.pem", other


def _content(**config) -> RecordDict:
    return RecordDict({
        "arrays": from_arrays({"head.w": np.arange(6, dtype=np.float32).reshape(2, 3)}),
        "nyul": from_arrays({"nyul.t1ce": np.linspace(0, 1, 5)}),
        CONFIG: ConfigRecord({"phase": "install", "manifest-json": '{"features": ["age"]}', **config}),
    })


def _site(tiny_cohort: Path, trusted: Path | None) -> LocalSite:
    site = load_site_config(tiny_cohort / "site_configs" / "burdenko.yaml")
    return LocalSite(replace(site, model_signing_key=trusted), StudyConfig())


def test_a_signed_message_verifies_and_any_change_is_refused(keys, tiny_cohort: Path) -> None:
    private, public_path, other = keys
    local = _site(tiny_cohort, public_path)
    content = _content()
    content[CONFIG][SIGNATURE] = sign_bytes(signed_digest(content), private)
    verify_signature(local, (content), "test model")

    altered = _content(**{SIGNATURE: content[CONFIG][SIGNATURE]})
    altered["arrays"] = from_arrays({"head.w": np.arange(6, dtype=np.float32).reshape(2, 3) + 1e-3})
    with pytest.raises(SignatureError, match="does not verify"):
        verify_signature(local, (altered), "test model")

    manifest_changed = _content(**{SIGNATURE: content[CONFIG][SIGNATURE]})
    manifest_changed[CONFIG]["manifest-json"] = '{"features": ["sex"]}'
    with pytest.raises(SignatureError, match="does not verify"):
        verify_signature(local, (manifest_changed), "test model")

    foreign = _content()
    foreign[CONFIG][SIGNATURE] = sign_bytes(signed_digest(foreign), other)
    with pytest.raises(SignatureError, match="does not verify"):
        verify_signature(local, (foreign), "test model")


def test_an_unsigned_model_is_refused_only_where_the_site_requires_signatures(keys, tiny_cohort: Path) -> None:
    _, public_path, _ = keys
    with pytest.raises(SignatureError, match="unsigned"):
        verify_signature(_site(tiny_cohort, public_path), (_content()), "test model")
    verify_signature(_site(tiny_cohort, None), (_content()), "test model")


def test_the_signature_does_not_depend_on_other_config_values(keys) -> None:
    assert signed_digest(_content()) == signed_digest(_content(**{"server-round": 3}))
