"""The study: run-wide settings shared by the server and every site, parsed and validated once.

Keys are Flower run-config keys (kebab-case, ``[tool.flwr.app.config]`` in pyproject.toml,
overridable with ``flwr run -c "key=value"``); every key has a default because Flower's in-process
simulation passes an empty run config.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from psp_model.errors import ConfigError

PHASES: tuple[str, ...] = ("stats", "ssl", "finetune", "evaluate", "shap", "select")
PROFILES: tuple[str, ...] = ("tiny", "demo", "full")
STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox")


_NOT_TRAINING_KEYS = frozenset({"run-dir", "cohort-dir", "signing-key", "resume", "phases", "round-timeout",
                                "min-sites", "min-replies"})


@dataclass(frozen=True)
class StudyConfig:
    """Run-wide settings. Field ``ssl_rounds`` is run-config key ``ssl-rounds``, and so on.

    Args:
        profile: model/input size preset: ``tiny`` (tests, 32^3), ``demo`` (minutes on a laptop),
            ``full`` (2 x 160^3 input, ViT-B: the paper's configuration; wants a GPU).
        phases: comma-separated phases to run, in order: stats, ssl, finetune, evaluate, and the
            optional shap (federated SHAP ranking of the clinical/dose features) and select (the
            paper's feature selection: cross-validation with the top 1..F ranked features).
        run_dir: absolute folder for this run's outputs (checkpoints, metrics, models, report).
        cohort_dir: simulation only: the synthetic cohort whose ``site_configs/`` the simulated sites use.
        signing_key: absolute path, on the coordinator, of the private model-signing key
            (``model_signing.pem`` from ``psp-server certs``) that signs every released model; ``''``
            releases unsigned models, which sites with a ``model_signing_key`` refuse.
        seed: seeds sampling, fold splits and every local training step.
        folds: cross-validation folds (each site holds out its own fold k in fold k's run).
        ssl_rounds / finetune_rounds: federated rounds per phase (per fold for fine-tuning).
        ssl_local_epochs / finetune_local_epochs: local epochs per round at each site.
        min_replies: successful site replies a round needs; fewer aborts the phase (never a
            "global" model that is one site's update).
        min_sites: connected sites to wait for (up to ``round_timeout``) before the study starts, and
            to hear statistics from; 0 starts with whoever is connected (simulation starts every site at once).
        strategy: ``fedavg`` (weighted by examples) or ``fedprox`` (``proximal_mu`` > 0).
        round_timeout: seconds to wait for replies in one round (in fine-tuning, one round carries every
            fold, so a site trains all its folds within it).
        resume: continue from the last checkpoint in ``run_dir``.
        encoder_mode: ``ssl`` (frozen SSL encoder: the proposed method), ``transfer`` or ``scratch``.
        head_variant: ``multimodal``, ``clinical-only`` or ``mri-only``.
        ssl_lr / finetune_lr / batch_size / ssl_temperature: local optimisation settings.
        keep_site_optimizer: each training site keeps its own AdamW moments from one fine-tuning
            round to the next (stored in its work_dir, never sent); off restarts the optimiser every
            round, as textbook FedAvg does.
        device: ``auto`` (CUDA if present), ``cpu`` or ``cuda[:n]``; precision ``auto`` = bf16 on CUDA.
    """

    profile: str = "tiny"
    phases: str = "stats,ssl,finetune,evaluate"
    run_dir: str = ""
    cohort_dir: str = ""
    signing_key: str = ""
    seed: int = 0
    folds: int = 5
    ssl_rounds: int = 2
    ssl_local_epochs: int = 1
    finetune_rounds: int = 3
    finetune_local_epochs: int = 10
    min_replies: int = 1
    min_sites: int = 0
    strategy: str = "fedavg"
    proximal_mu: float = 0.0
    round_timeout: float = 3600.0
    resume: bool = False
    encoder_mode: str = "ssl"
    head_variant: str = "multimodal"
    ssl_lr: float = 1e-4
    finetune_lr: float = 1e-4
    keep_site_optimizer: bool = True
    batch_size: int = 4
    ssl_temperature: float = 0.05
    device: str = "auto"
    precision: str = "auto"

    @property
    def phase_list(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.phases.split(",") if p.strip())

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir)

    def to_run_config(self) -> dict[str, Any]:
        """The kebab-case mapping Flower expects (what ``from_run_config`` reads back)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def training_settings(self) -> dict[str, Any]:
        """The run config less the keys that do not change what a site computes (where, when, how long to wait)."""
        return {k: v for k, v in self.to_run_config().items() if k not in _NOT_TRAINING_KEYS}

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any], *, where: str = "run config") -> StudyConfig:
        """Parse and validate; raise ``ConfigError`` naming every bad key with its fix."""
        problems: list[str] = []
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            spec = known.get(key)
            if spec is None:
                problems.append(f"{where}: unknown key '{key}'. Fix: remove it or use one of {sorted(known)}.")
                continue
            default = spec.default if spec.default is not MISSING else None
            try:
                values[spec.name] = _coerce(value, type(default))
            except (TypeError, ValueError):
                problems.append(f"{where}: key '{key}': {value!r} is not a {type(default).__name__}. "
                                f"Fix: give a {type(default).__name__} such as {default!r}.")
        config = cls(**values)
        problems += config._problems(where)
        if problems:
            raise ConfigError(problems)
        return config

    def _problems(self, where: str) -> list[str]:
        problems = []

        def check(ok: bool, key: str, message: str, fix: str) -> None:
            if not ok:
                problems.append(f"{where}: key '{key}': {message}. Fix: {fix}.")

        check(self.profile in PROFILES, "profile", f"unknown profile {self.profile!r}", f"use one of {list(PROFILES)}")
        unknown = [p for p in self.phase_list if p not in PHASES]
        check(not unknown and bool(self.phase_list), "phases", f"unknown or no phases {unknown or self.phases!r}",
              f"list some of {list(PHASES)}, comma-separated")
        check(not self.run_dir or Path(self.run_dir).is_absolute(), "run-dir",
              f"{self.run_dir!r} is relative (the SuperLink resolves it against its own working directory)",
              "give an absolute path")
        check(not self.signing_key or Path(self.signing_key).is_absolute(), "signing-key",
              f"{self.signing_key!r} is relative (the SuperLink resolves it against its own working directory)",
              "give the absolute path of model_signing.pem, or '' for unsigned models")
        check(self.folds >= 2, "folds", f"{self.folds} folds", "use at least 2 (the paper uses 5)")
        for key in ("ssl_rounds", "finetune_rounds", "ssl_local_epochs", "finetune_local_epochs", "batch_size"):
            check(getattr(self, key) >= 1, key.replace("_", "-"), f"{getattr(self, key)} is below 1", "use 1 or more")
        check(self.min_replies >= 1, "min-replies", f"{self.min_replies} is below 1", "use 1 or more")
        check(self.min_sites >= 0, "min-sites", f"{self.min_sites} is negative", "use 0 (no wait) or more")
        check(self.strategy in STRATEGIES, "strategy", f"unknown strategy {self.strategy!r}",
              f"use one of {list(STRATEGIES)}")
        check(self.proximal_mu >= 0, "proximal-mu", f"{self.proximal_mu} is negative", "use 0 or more")
        check(self.strategy != "fedprox" or self.proximal_mu > 0, "proximal-mu",
              "fedprox with proximal-mu 0 is plain FedAvg", "set proximal-mu > 0 (e.g. 0.01) or strategy=fedavg")
        check(self.encoder_mode in ("ssl", "transfer", "scratch"), "encoder-mode",
              f"unknown mode {self.encoder_mode!r}", "use ssl, transfer or scratch")
        check(self.head_variant in ("multimodal", "clinical-only", "mri-only"), "head-variant",
              f"unknown variant {self.head_variant!r}", "use multimodal, clinical-only or mri-only")
        check(self.round_timeout > 0, "round-timeout", f"{self.round_timeout} s", "use a positive number of seconds")
        check(self.precision in ("auto", "fp32", "bf16", "fp16"), "precision", f"unknown {self.precision!r}",
              "use auto, fp32, bf16 or fp16")
        return problems


def _coerce(value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise ValueError(value)
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    if kind in (int, float) and isinstance(value, bool):
        raise TypeError(value)
    return kind(value)
