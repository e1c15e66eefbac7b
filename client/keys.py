"""A site's SuperNode authentication key pair (EC, OpenSSH format, as Flower expects)."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from psp_model.io import atomic_write


def make_site_keys(out_dir: Path, name: str = "site_key", *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``<name>`` (private, stays at the site) and ``<name>.pub`` (sent to the coordinator)."""
    private_path, public_path = out_dir / name, out_dir / f"{name}.pub"
    for path in (private_path, public_path):
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass --overwrite to replace this site's key pair "
                                  "(the coordinator must then register the new public key)")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)

    def write_private(tmp: Path) -> None:
        tmp.write_bytes(private)
        tmp.chmod(0o600)

    atomic_write(private_path, write_private)
    atomic_write(public_path, lambda tmp: tmp.write_bytes(public + b"\n"))
    return private_path, public_path
