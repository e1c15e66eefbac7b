"""Signed global models: the server signs what it releases, sites and ``psp-predict`` verify before loading.

Ed25519 (``cryptography``). The coordinator's key pair comes from ``psp-server certs``
(``model_signing.pem`` stays with the server, ``model_signing.pub.pem`` goes to every site). A model
file ``models/fold_0.npz`` is signed in ``models/fold_0.sig`` (raw 64-byte signature over the file's
bytes); arrays sent in a Flower message are signed through :func:`arrays_digest`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from psp_model.errors import ConfigError, SignatureError
from psp_model.io import atomic_write

__all__ = ["PRIVATE_KEY_FILE", "PUBLIC_KEY_FILE", "arrays_digest", "generate_signing_key", "key_fingerprint",
           "load_private_key", "load_public_key", "load_study_signing_key", "sign_bytes", "sign_file",
           "signature_path", "verify_bytes", "verify_file"]

PRIVATE_KEY_FILE = "model_signing.pem"
PUBLIC_KEY_FILE = "model_signing.pub.pem"
_MAKE_KEYS = "make a key pair with 'psp-server certs --out DIR' (writes DIR/model_signing.pem and .pub.pem)"


def generate_signing_key(private_path: Path, public_path: Path) -> Ed25519PrivateKey:
    """Write a new key pair: the private key readable by its owner only (mode 600), the public key in PEM."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_key(Path(private_path), private, mode=0o600)
    _write_key(Path(public_path), public, mode=0o644)
    return key


def _write_key(path: Path, data: bytes, *, mode: int) -> None:
    def write(tmp: Path) -> None:
        tmp.chmod(mode)  # before the key is in it
        tmp.write_bytes(data)

    atomic_write(path, write)


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """The server's signing key; ``ConfigError`` (path and fix) when missing or not an Ed25519 PEM key."""
    key = _load(Path(path), "private", serialization.load_pem_private_key, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError([f"{path}: not an Ed25519 private key (found {type(key).__name__}). Fix: {_MAKE_KEYS}."])
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """The key a site trusts; ``ConfigError`` (path and fix) when missing or not an Ed25519 PEM public key."""
    key = _load(Path(path), "public", serialization.load_pem_public_key)
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError([(f"{path}: not an Ed25519 public key (found {type(key).__name__}). "
                           f"Fix: use the {PUBLIC_KEY_FILE} written by 'psp-server certs'.")])
    return key


def load_study_signing_key(signing_key: str, *, where: str = "run config") -> Ed25519PrivateKey | None:
    """The study's ``signing-key`` loaded on the server (``None`` for ``''``: models go out unsigned).

    Checked here, not in ``StudyConfig``, because the sites parse the same run config and do not
    hold the file.
    """
    if not signing_key:
        return None
    try:
        return load_private_key(signing_key)
    except ConfigError as exc:
        raise ConfigError([f"{where}: key 'signing-key': {p.rstrip('.')}; or set signing-key='' to release "
                           "unsigned models." for p in exc.problems]) from None


def _load(path: Path, kind: str, loader, **options):
    if not path.is_file():
        raise ConfigError([(f"{path}: model-signing {kind} key not found. Fix: {_MAKE_KEYS}, "
                           "or correct the path.")])
    try:
        return loader(path.read_bytes(), **options)
    except (ValueError, TypeError) as exc:
        raise ConfigError([f"{path}: not a PEM {kind} key ({exc}). Fix: {_MAKE_KEYS}."]) from exc


def key_fingerprint(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """First 16 hex digits of SHA-256 over the raw public key: tells two keys apart in messages."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign_bytes(data: bytes, key: Ed25519PrivateKey) -> bytes:
    """The 64-byte Ed25519 signature of ``data``."""
    return key.sign(data)


def verify_bytes(data: bytes, signature: bytes | None, public_key: Ed25519PublicKey, *, what: str) -> None:
    """Raise ``SignatureError`` unless ``signature`` is ``public_key``'s signature of ``data``.

    ``what`` names the thing in the message (e.g. "global model of finetune fold 2, round 3").
    """
    if not signature:
        raise SignatureError(f"{what} is unsigned, and this site only accepts models signed by key "
                             f"{key_fingerprint(public_key)}. Fix: the coordinator sets the study's 'signing-key' "
                             "to its model_signing.pem; or remove 'model_signing_key' from the site config "
                             "to accept unsigned models.")
    try:
        public_key.verify(bytes(signature), data)
    except InvalidSignature:
        raise SignatureError(f"{what} does not verify with the trusted key {key_fingerprint(public_key)}: it was "
                             "altered, or signed with another key. Fix: do not use it; check that the site's "
                             f"'model_signing_key' is the coordinator's current {PUBLIC_KEY_FILE}.") from None


def signature_path(path: str | Path) -> Path:
    """Where the signature of ``path`` lives: ``fold_0.npz`` -> ``fold_0.sig`` (beside ``fold_0.sha256``)."""
    return Path(path).with_suffix(".sig")


def sign_file(path: str | Path, key: Ed25519PrivateKey) -> Path:
    """Sign the bytes of ``path`` into :func:`signature_path` (written atomically); return that path."""
    signature = sign_bytes(Path(path).read_bytes(), key)
    return atomic_write(signature_path(path), lambda tmp: tmp.write_bytes(signature))


def verify_file(path: str | Path, public_key: Ed25519PublicKey) -> None:
    """Raise ``SignatureError`` unless ``path`` carries a valid signature by ``public_key``."""
    path = Path(path)
    sig = signature_path(path)
    if not sig.is_file():
        raise SignatureError(f"{path} has no signature ({sig} is missing) and only models signed by key "
                             f"{key_fingerprint(public_key)} are loaded. Fix: copy {sig.name} along with "
                             f"{path.name} from the run's models/ folder, or have the coordinator sign it.")
    verify_bytes(path.read_bytes(), sig.read_bytes(), public_key, what=f"model file {path} (signature {sig.name})")


def arrays_digest(arrays: dict[str, np.ndarray]) -> bytes:
    """SHA-256 over named arrays in a canonical form: sorted names, then each one's dtype, shape and bytes.

    The same arrays give the same digest whatever the dict order or memory layout; any change of a
    name, dtype (byte order included), shape or value changes it. Sign it with :func:`sign_bytes`.
    """
    digest = hashlib.sha256(b"psp-fl arrays v1\0")
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        if array.dtype.hasobject:
            raise ValueError(f"array {name!r} has dtype object: only numeric arrays can be signed")
        header = f"{name}\0{array.dtype.str}\0{','.join(map(str, array.shape))}\0{array.nbytes}\0"
        digest.update(header.encode())
        digest.update(array.tobytes())
    return digest.digest()


def message_digest(arrays: dict[str, np.ndarray], texts: dict[str, str] | None = None) -> bytes:
    """Digest of what one server message hands a site: named arrays plus named texts (e.g. a manifest).

    Server and site compute it from the same records, so a signature over it covers all of them.
    """
    digest = hashlib.sha256(arrays_digest(arrays))
    for name in sorted(texts or {}):
        digest.update(f"\0{name}\0{len(texts[name])}\0".encode())
        digest.update(texts[name].encode())
    return digest.digest()
