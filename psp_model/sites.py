"""Site configuration: one YAML file per site, validated once when it is loaded.

Example (``site_configs/burdenko.yaml``)::

    name: burdenko
    roles: [train]
    layout: psp-case
    root: ../data/synthetic/burdenko     # relative paths are relative to this file
    enhancing_labels: [1, 4]
    privacy:
      min_aggregate_count: 5
      allowed_arrays: ["encoder.*", "decoder.*", "head.*"]
      dp: {clip_norm: 1.0, noise_multiplier: 1.0, delta: 1.0e-5}   # optional: differential privacy
    model_signing_key: ../keys/model_signing.pub.pem   # optional: refuse unsigned or altered models
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from psp_model.errors import ConfigError
from psp_model.signing import load_public_key

Role = Literal["ssl", "train", "test"]
Layout = Literal["psp-case", "brats2021", "upenn-gbm", "ucsf-pdgm"]
ROLES: tuple[str, ...] = get_args(Role)
LAYOUTS: tuple[str, ...] = get_args(Layout)
_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


@dataclass(frozen=True)
class DPPolicy:
    """Differential privacy on every model update the site sends (applied by :mod:`psp_model.privacy`).

    Args:
        clip_norm: the update (local minus global weights, all arrays together) is scaled down to
            this L2 norm at most.
        noise_multiplier: Gaussian noise of standard deviation ``noise_multiplier * clip_norm`` is
            added to every weight of the clipped update; larger means more privacy, a noisier model.
        delta: the delta of the (epsilon, delta) guarantee reported; keep it well below 1 / (cases at the site).
    """

    clip_norm: float
    noise_multiplier: float
    delta: float


@dataclass(frozen=True)
class PrivacyPolicy:
    """What this site lets leave, enforced by the site's own client whatever the server asks.

    Args:
        min_aggregate_count: refuse to send any aggregate computed from fewer cases than this.
        allowed_arrays: shell-style patterns of model array names that may be sent.
        dp: clip and noise every model update before it leaves (``None``: off).
    """

    min_aggregate_count: int = 5
    allowed_arrays: tuple[str, ...] = ("encoder.*", "decoder.*", "head.*")
    dp: DPPolicy | None = None


@dataclass(frozen=True)
class SiteConfig:
    """One site of the federation.

    Args:
        name: short identifier (lower case, digits, ``-``/``_``), used in reports and run directories.
        roles: what the site takes part in: ``ssl`` (unlabelled pretraining), ``train``
            (labelled fine-tuning, cross-validation), ``test`` (external evaluation only).
        layout: how the data is laid out on disk (see README, "Canonical case layout").
        root: absolute folder holding the site's data.
        enhancing_labels: label values of the lesion map that form the enhancing lesion
            (BraTS 2021 convention: 1 necrotic core, 4 enhancing; 2 oedema is not lesion).
        privacy: the site's own privacy policy.
        model_signing_key: the coordinator's public model-signing key (``model_signing.pub.pem`` from
            ``psp-server certs``); when set, the site refuses any global model not signed with it.
        work_dir: where this site's preprocessed inputs, caches, QC reports and audit log go
            (default ``<root>/../psp-fl-work/<name>``; the data folder itself is only read).
        source: the YAML file this was read from (for error messages).
    """

    name: str
    roles: tuple[Role, ...]
    layout: Layout
    root: Path
    enhancing_labels: tuple[int, ...] = (1, 4)
    privacy: PrivacyPolicy = field(default_factory=PrivacyPolicy)
    model_signing_key: Path | None = None
    work_dir: Path | None = None
    source: Path | None = None

    def __post_init__(self) -> None:
        if self.work_dir is None:
            object.__setattr__(self, "work_dir", self.root.parent / "psp-fl-work" / self.name)


def load_site_config(path: str | Path, *, require_root: bool = True) -> SiteConfig:
    """Read and validate a site YAML; raise ``ConfigError`` listing every problem (file, key, fix).

    ``require_root=False`` checks everything but the existence of ``root`` (for configs that
    travel without their data, e.g. the templates in ``site_configs/``).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: site config not found. Fix: pass the path of an existing YAML file."])
    try:
        raw = yaml.safe_load(path.read_bytes())  # bytes: a non-UTF-8 file is a YAMLError
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML ({exc}). Fix: correct the YAML syntax."]) from exc
    return site_config_from_dict(raw, source=path, require_root=require_root)


def site_config_from_dict(
    raw: Any, *, source: Path | None = None, require_root: bool = True
) -> SiteConfig:
    """Validate a parsed site config mapping; relative ``root`` resolves against ``source``'s folder."""
    where = str(source) if source else "<site config>"
    problems: list[str] = []

    def problem(key: str, message: str, fix: str) -> None:
        problems.append(f"{where}: key '{key}': {message}. Fix: {fix}.")

    if not isinstance(raw, dict):
        raise ConfigError([f"{where}: expected a mapping of keys to values, got {type(raw).__name__}. "
                           "Fix: write the config as 'key: value' lines."])
    known = {f.name for f in fields(SiteConfig)} - {"source"}
    for key in sorted(set(raw) - known, key=str):
        problem(str(key), "unknown key", f"remove it or use one of {sorted(known)}")
    for key in ("name", "roles", "layout", "root"):
        if key not in raw:
            problem(key, "missing", f"add '{key}:' (see site_configs/burdenko.yaml)")

    name = raw.get("name")
    if "name" in raw and not (isinstance(name, str) and _NAME_PATTERN.fullmatch(name)):
        problem("name", f"{name!r} is not a valid site name", "use lower case letters, digits, '-' or '_'")

    roles = raw.get("roles")
    if isinstance(roles, str):
        roles = [roles]
    if "roles" in raw:
        if not isinstance(roles, list) or not roles:
            problem("roles", f"expected a non-empty list, got {roles!r}", f"list any of {list(ROLES)}")
            roles = []
        for role in roles:
            if role not in ROLES:
                problem("roles", f"unknown role {role!r}", f"use any of {list(ROLES)}")
        if len(set(map(str, roles))) != len(roles):
            problem("roles", f"repeated role in {roles!r}", "list each role once")
        if "test" in roles and "train" in roles:
            problem("roles", "a site cannot both train and test", "give the site 'train' or 'test', not both")

    layout = raw.get("layout")
    if "layout" in raw and layout not in LAYOUTS:
        problem("layout", f"unknown layout {layout!r}", f"use one of {list(LAYOUTS)}")
    if layout in LAYOUTS and layout != "psp-case" and isinstance(roles, list) and set(roles) - {"ssl"}:
        problem("roles", f"layout {layout!r} has no RT dose or labels, so it can only have role 'ssl'",
                "set 'roles: [ssl]' or convert the data to the psp-case layout")

    root_value = raw.get("root")
    root = Path()
    if "root" in raw:
        if not isinstance(root_value, str) or not root_value:
            problem("root", f"expected a folder path, got {root_value!r}", "give the folder holding the site's data")
        else:
            path = _config_path(root_value, source, "root", problem)
            if path is not None:
                root = path
                if require_root and not root.is_dir():
                    problem("root", f"folder {root} does not exist",
                            "point 'root' at the site's data folder (relative paths are relative to this file)")

    labels = raw.get("enhancing_labels", [1, 4])
    if not (isinstance(labels, list) and labels and all(type(v) is int and v > 0 for v in labels)):
        problem("enhancing_labels", f"expected a list of positive integers, got {labels!r}",
                "list the label values of the enhancing lesion, e.g. [1, 4] for BraTS 2021")
        labels = [1, 4]

    privacy = _privacy_from_dict(raw.get("privacy", {}), problem)
    model_signing_key = _signing_key_from_value(raw.get("model_signing_key"), source, problem)

    work_dir = None
    if raw.get("work_dir") is not None:
        if not isinstance(raw["work_dir"], str) or not raw["work_dir"]:
            problem("work_dir", f"expected a folder path, got {raw['work_dir']!r}",
                    "give a writable folder for preprocessed data, or remove the key for the default")
        else:
            work_dir = _config_path(raw["work_dir"], source, "work_dir", problem)

    if problems:
        raise ConfigError(problems)
    return SiteConfig(
        name=name,
        roles=tuple(roles),
        layout=layout,
        root=root,
        enhancing_labels=tuple(labels),
        privacy=privacy,
        model_signing_key=model_signing_key,
        work_dir=work_dir,
        source=source,
    )


def _config_path(text: str, source: Path | None, key: str, problem) -> Path | None:
    """``text`` as a path, ``~`` expanded, relative to ``source``'s folder; None after a problem."""
    try:
        if "\x00" in text:
            raise ValueError("it contains a NUL character")
        path = Path(text).expanduser()
    except (RuntimeError, ValueError) as exc:  # RuntimeError: '~someone' names no user of this machine
        problem(key, f"{text!r} is not a usable path ({exc})", "give a plain path, e.g. /data/site or ../data/site")
        return None
    return (source.parent / path).resolve() if not path.is_absolute() and source is not None else path


def _privacy_from_dict(raw: Any, problem) -> PrivacyPolicy:
    default = PrivacyPolicy()
    if raw is None:
        return default
    if not isinstance(raw, dict):
        problem("privacy", f"expected a mapping, got {raw!r}", "write 'privacy:' followed by indented keys")
        return default
    known = {f.name for f in fields(PrivacyPolicy)}
    for key in sorted(set(raw) - known, key=str):
        problem(f"privacy.{key}", "unknown key", f"remove it or use one of {sorted(known)}")
    count = raw.get("min_aggregate_count", default.min_aggregate_count)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        problem("privacy.min_aggregate_count", f"expected an integer >= 1, got {count!r}",
                "set the smallest number of cases any shared aggregate may come from, e.g. 5")
        count = default.min_aggregate_count
    arrays = raw.get("allowed_arrays", list(default.allowed_arrays))
    if not (isinstance(arrays, list) and all(isinstance(a, str) and a for a in arrays)):
        problem("privacy.allowed_arrays", f"expected a list of name patterns, got {arrays!r}",
                "list shell-style patterns such as 'head.*'")
        arrays = list(default.allowed_arrays)
    dp = _dp_from_dict(raw["dp"], problem) if raw.get("dp") is not None else None
    return PrivacyPolicy(min_aggregate_count=count, allowed_arrays=tuple(arrays), dp=dp)


_DP_RANGES = {
    "clip_norm": (0.0, math.inf, "a positive L2 norm, e.g. 1.0"),
    "noise_multiplier": (0.0, math.inf, "a positive multiple of clip_norm, e.g. 1.0 (0 would give no privacy)"),
    "delta": (0.0, 1.0, "a small probability such as 1e-5, well below 1 / (cases at the site)"),
}


def _dp_from_dict(raw: Any, problem) -> DPPolicy | None:
    if not isinstance(raw, dict):
        problem("privacy.dp", f"expected a mapping, got {raw!r}",
                "write 'dp: {clip_norm: 1.0, noise_multiplier: 1.0, delta: 1.0e-5}', or remove it to turn DP off")
        return None
    for key in sorted(set(raw) - set(_DP_RANGES), key=str):
        problem(f"privacy.dp.{key}", "unknown key", f"remove it or use one of {sorted(_DP_RANGES)}")
    values = {}
    for key, (low, high, fix) in _DP_RANGES.items():
        value = raw.get(key)
        if value is None:
            problem(f"privacy.dp.{key}", "missing (no safe default)", f"set {fix}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value < high:
            upper = "" if math.isinf(high) else f" and below {high:g}"
            problem(f"privacy.dp.{key}", f"expected a number above {low:g}{upper}, got {value!r}", f"use {fix}")
        else:
            values[key] = float(value)
    return DPPolicy(**values) if len(values) == len(_DP_RANGES) else None


def _signing_key_from_value(value: Any, source: Path | None, problem) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        problem("model_signing_key", f"expected the path of a public key file, got {value!r}",
                "give the path of the coordinator's model_signing.pub.pem, or remove the key to accept unsigned "
                "models")
        return None
    path = _config_path(value, source, "model_signing_key", problem)
    if path is None:
        return None
    try:
        load_public_key(path)
    except ConfigError as exc:
        problem("model_signing_key", " ".join(exc.problems).split(". Fix: ")[0],
                "copy the coordinator's model_signing.pub.pem (from 'psp-server certs') here and point "
                "'model_signing_key' at it (relative paths are relative to this file)")
        return None
    return path
