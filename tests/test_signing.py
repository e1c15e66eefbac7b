"""Signed global models: a file or message that is unsigned, altered or signed with another key is refused."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import numpy as np
import pytest
import typer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from psp_model.errors import ConfigError, SignatureError
from psp_model.signing import (
    arrays_digest,
    generate_signing_key,
    load_private_key,
    load_public_key,
    load_study_signing_key,
    sign_bytes,
    sign_file,
    verify_bytes,
    verify_file,
)
from server.certs_cmd import certs


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("keys")
    generate_signing_key(folder / "model_signing.pem", folder / "model_signing.pub.pem")
    return folder / "model_signing.pem", folder / "model_signing.pub.pem"


@pytest.fixture
def model(tmp_path) -> Path:
    path = tmp_path / "models" / "fold_0.npz"
    path.parent.mkdir()
    np.savez(path, **{"head.w": np.arange(6, dtype=np.float32).reshape(2, 3)})
    return path


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generated_private_key_is_readable_by_its_owner_only(keys):
    private, public = keys
    assert _mode(private) == 0o600
    assert _mode(public) == 0o644
    assert load_private_key(private).public_key() == load_public_key(public)


def test_signed_file_verifies_and_its_signature_sits_beside_the_sha256(keys, model):
    signature = sign_file(model, load_private_key(keys[0]))
    assert signature == model.parent / "fold_0.sig" and len(signature.read_bytes()) == 64
    verify_file(model, load_public_key(keys[1]))


def test_altered_file_is_refused(keys, model):
    sign_file(model, load_private_key(keys[0]))
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 1
    model.write_bytes(bytes(data))
    with pytest.raises(SignatureError, match=re.escape(f"model file {model} (signature fold_0.sig) does not verify")
                       + r".*altered, or signed with another key\. Fix: do not use it"):
        verify_file(model, load_public_key(keys[1]))


def test_file_signed_with_another_key_is_refused(keys, model, tmp_path):
    other = generate_signing_key(tmp_path / "other.pem", tmp_path / "other.pub.pem")
    sign_file(model, other)
    with pytest.raises(SignatureError, match=r"does not verify with the trusted key [0-9a-f]{16}"):
        verify_file(model, load_public_key(keys[1]))


def test_unsigned_file_is_refused(keys, model):
    with pytest.raises(SignatureError, match=re.escape(f"{model} has no signature ({model.with_suffix('.sig')} is "
                                                       "missing)") + r".*Fix: copy fold_0\.sig along with"):
        verify_file(model, load_public_key(keys[1]))


def test_message_signature_round_trip_and_refusals(keys):
    arrays = {"head.w": np.ones((2, 2), np.float32)}
    private, public = load_private_key(keys[0]), load_public_key(keys[1])
    signature = sign_bytes(arrays_digest(arrays), private)
    verify_bytes(arrays_digest(arrays), signature, public, what="global model of round 1")
    with pytest.raises(SignatureError, match=r"global model of round 1 is unsigned.*Fix: the coordinator sets"):
        verify_bytes(arrays_digest(arrays), None, public, what="global model of round 1")
    changed = {"head.w": arrays["head.w"] + 1}
    with pytest.raises(SignatureError, match=r"global model of round 1 does not verify"):
        verify_bytes(arrays_digest(changed), signature, public, what="global model of round 1")


def test_arrays_digest_ignores_order_and_memory_layout():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.array([1, 2], dtype=np.int64)
    assert arrays_digest({"a": a, "b": b}) == arrays_digest({"b": b, "a": np.asfortranarray(a)})
    assert arrays_digest({"a": a.T.copy().T}) == arrays_digest({"a": a})


@pytest.mark.parametrize("change", [
    lambda a: {"a": a.astype(np.float64)},
    lambda a: {"a": a.astype(">f4")},
    lambda a: {"a": a.reshape(4, 3)},
    lambda a: {"a": np.where(np.arange(12).reshape(3, 4) == 5, np.nextafter(a, 99), a)},
    lambda a: {"b": a},
    lambda a: {"a": a, "b": np.zeros(0, np.float32)},
])
def test_arrays_digest_changes_with_any_dtype_shape_value_or_name(change):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert arrays_digest(change(a)) != arrays_digest({"a": a})


def test_arrays_digest_rejects_object_arrays():
    with pytest.raises(ValueError, match="array 'x' has dtype object"):
        arrays_digest({"x": np.array([None])})


def test_bad_key_files_name_the_file_and_the_fix(keys, tmp_path):
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError, match=re.escape(f"{missing}: model-signing public key not found. Fix: make a "
                                                    "key pair with 'psp-server certs")):
        load_public_key(missing)
    with pytest.raises(ConfigError, match=re.escape(f"{keys[0]}: not a PEM public key")):
        load_public_key(keys[0])
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_private, ec_public = tmp_path / "ec.pem", tmp_path / "ec.pub.pem"
    ec_private.write_bytes(ec_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    ec_public.write_bytes(ec_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(ConfigError, match=r"ec\.pem: not an Ed25519 private key \(found \w+\)\. Fix: make a key pair"):
        load_private_key(ec_private)
    with pytest.raises(ConfigError, match=r"ec\.pub\.pem: not an Ed25519 public key \(found \w+\)\. Fix: use the"):
        load_public_key(ec_public)


def test_study_signing_key_is_loaded_on_the_server_only_when_set(keys, tmp_path):
    assert load_study_signing_key("") is None
    assert load_study_signing_key(str(keys[0])).public_key() == load_public_key(keys[1])
    with pytest.raises(ConfigError, match=r"run config: key 'signing-key': .*nope\.pem: model-signing private key "
                                          r"not found\. .*or set signing-key='' to release unsigned models"):
        load_study_signing_key(str(tmp_path / "nope.pem"))


def test_psp_server_certs_writes_the_signing_keys_and_says_where_they_go(tmp_path):
    app = typer.Typer()
    app.command()(certs)
    result = CliRunner().invoke(app, ["--out", str(tmp_path), "--host", "fl.example.org"])
    assert result.exit_code == 0, result.output
    assert _mode(tmp_path / "model_signing.pem") == 0o600
    assert _mode(tmp_path / "ca.key") == 0o600 and _mode(tmp_path / "server.key") == 0o600
    load_private_key(tmp_path / "model_signing.pem")
    lines = result.output.splitlines()
    assert any("model_signing.pub.pem" in line and "send to every site" in line for line in lines)
    assert any("model_signing.pem" in line and f'signing-key="{tmp_path.resolve()}' in line for line in lines)
