"""Keys for the coordinator: a private CA, a SuperLink server certificate and the model-signing key pair."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from psp_model.io import atomic_write
from psp_model.signing import PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, generate_signing_key


@dataclass(frozen=True)
class CertificatePaths:
    """Files written by :func:`make_certificates`. Sites get ``ca_cert`` and ``signing_public_key``."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    signing_key: Path
    signing_public_key: Path


def make_certificates(out_dir: Path, hosts: list[str], *, days: int = 825, overwrite: bool = False) -> CertificatePaths:
    """Write a CA, a server certificate whose SANs are ``hosts`` (DNS names and/or IP addresses) and the
    Ed25519 key pair that signs released models (private keys: mode 600).

    ``hosts`` must include every address the sites dial (e.g. the coordinator's DNS name), or TLS fails.
    """
    if not hosts:
        raise ValueError("hosts is empty: list the DNS names / IP addresses sites use to reach the SuperLink")
    paths = CertificatePaths(out_dir / "ca.crt", out_dir / "ca.key", out_dir / "server.pem", out_dir / "server.key",
                             out_dir / PRIVATE_KEY_FILE, out_dir / PUBLIC_KEY_FILE)
    existing = [p for p in vars(paths).values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass overwrite=True (--overwrite) to replace the certificates")
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "psp-fl federation CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(paths.ca_key, ca_key)
    _write_key(paths.server_key, server_key)
    atomic_write(paths.ca_cert, lambda tmp: tmp.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM)))
    atomic_write(paths.server_cert, lambda tmp: tmp.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM)))
    generate_signing_key(paths.signing_key, paths.signing_public_key)
    return paths


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())

    def write(tmp: Path) -> None:
        tmp.write_bytes(data)
        tmp.chmod(0o600)

    atomic_write(path, write)
