"""The study as phases over a Flower Grid: stats -> ssl -> install -> finetune (per fold) -> evaluate.

Each round's global arrays are checkpointed in the run directory; with ``resume=true`` a phase
continues from its last checkpoint (and a finished phase is not repeated).
"""

from __future__ import annotations

import csv
import io
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from client.records import from_arrays, to_arrays
from psp_model.evaluate.metrics import metrics_from_histograms
from psp_model.io import atomic_write_text
from psp_model.nets.encoder import MRIEncoder, encoder_fingerprint
from psp_model.preprocess.clinical import ClinicalStats, FeatureManifest, build_manifest
from psp_model.preprocess.nyul import NyulLandmarks, combine_landmarks
from psp_model.profiles import get_profile
from psp_model.site_tasks import NYUL_PREFIX, initial_head_state, initial_ssl_state, landmarks_to_arrays
from psp_model.study import StudyConfig
from psp_model.wire import PHASE_KEY
from server.run_dir import RunDir, load_verified_npz
from server.strategy import SiteFedAvg, SiteFedProx, TooFewRepliesError


class StudyError(RuntimeError):
    """The study cannot go on (no eligible site, too few replies...); the message says why and what to do."""


@dataclass
class Site:
    """A connected site as the server knows it: its node, name, roles and aggregate counts."""

    node_id: int
    name: str
    roles: list[str]
    counts: dict[str, float] = field(default_factory=dict)


@dataclass
class Federation:
    grid: Grid
    study: StudyConfig
    run: RunDir
    sites: list[Site] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)

    def with_role(self, role: str) -> list[Site]:
        return [s for s in self.sites if role in s.roles]

    def send(self, sites: list[Site], message_type: str, records: dict) -> list[Message]:
        """One message per site, the replies sorted by site name (deterministic downstream)."""
        messages = [Message(RecordDict(dict(records)), dst_node_id=s.node_id, message_type=message_type)
                    for s in sites]
        replies = list(self.grid.send_and_receive(messages, timeout=self.study.round_timeout))
        names = {s.node_id: s.name for s in self.sites}
        return sorted(replies, key=lambda m: names.get(m.metadata.src_node_id, str(m.metadata.src_node_id)))


def run_study(grid: Grid, study: StudyConfig, run: RunDir) -> dict:
    """Run the study's phases; return the final metrics (also written to ``metrics.json``).

    ``timings.json`` records the wall seconds of every phase and of the whole study.
    """
    random.seed(study.seed)
    run.root.mkdir(parents=True, exist_ok=True)
    run.write_json("config.json", study.to_run_config())
    fed = Federation(grid, study, run)
    timings: dict[str, float] = {}

    def timed(name: str, work):
        started = time.perf_counter()
        value = work()
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - started
        return value

    study_started = time.perf_counter()
    landmarks, manifest = timed("stats", lambda: phase_stats(fed))
    phases = study.phase_list
    encoder = timed("ssl", lambda: phase_ssl(fed, landmarks)) if "ssl" in phases else _released(run, "encoder")
    results: dict = {}
    if "finetune" in phases or "evaluate" in phases:
        if manifest is None:
            raise StudyError("no training site sent statistics, so there is no feature manifest to fine-tune "
                             "or evaluate with: check that a site with role 'train' is connected and has usable cases")
        encoder_hash = timed("install", lambda: install_model(fed, encoder, landmarks, manifest))
        heads = [timed("finetune", lambda fold=fold: phase_finetune(fed, fold, manifest, encoder_hash))
                 if "finetune" in phases else _released(run, f"fold_{fold}") for fold in range(study.folds)]
        run.write_json("models/ensemble.json", {
            "profile": study.profile, "head_variant": study.head_variant, "folds": study.folds,
            "encoder_hash": encoder_hash, "feature_manifest": manifest.to_json(),
            "nyul_landmarks": {k: v.tolist() for k, v in landmarks.to_arrays().items()},
        })
        if "evaluate" in phases:
            results = timed("evaluate", lambda: phase_evaluate(fed, heads, encoder_hash))
    timings["study"] = time.perf_counter() - study_started
    run.write_json("timings.json", timings)
    _write_rounds(fed)
    return results


def phase_stats(fed: Federation) -> tuple[NyulLandmarks, FeatureManifest | None]:
    """Ask every site for aggregates; combine landmarks (ssl + train sites) and clinical stats (train only).

    The feature manifest is None when no training site answered (enough for an SSL-only study).
    """
    node_ids = _wait_for_nodes(fed)
    probes = [Site(node_id=n, name=str(n), roles=[]) for n in node_ids]
    replies = fed.send(probes, MessageType.QUERY, {"config": ConfigRecord({PHASE_KEY: "stats"})})
    landmark_parts, clinical_parts = [], []
    for reply in replies:
        if reply.has_error():
            log(INFO, "stats: node %s failed: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        config, metrics = reply.content["config"], reply.content["metrics"]
        site = Site(reply.metadata.src_node_id, str(config["site-name"]), list(config["site-roles"]), dict(metrics))
        fed.sites.append(site)
        arrays = to_arrays(reply.content["arrays"]) if "arrays" in reply.content else {}
        if "test" not in site.roles and any(k.startswith(NYUL_PREFIX) for k in arrays):
            landmark_parts.append(NyulLandmarks.from_arrays(
                {k[len(NYUL_PREFIX):]: v for k, v in arrays.items() if k.startswith(NYUL_PREFIX)}))
        if "train" in site.roles:
            clinical_parts.append(ClinicalStats.from_arrays(
                {k.removeprefix("clinical."): v for k, v in arrays.items() if k.startswith("clinical.")}))
    fed.sites.sort(key=lambda s: s.name)
    if not landmark_parts:
        raise StudyError("no ssl or training site sent statistics: check the sites' QC reports and logs")
    landmarks = combine_landmarks(landmark_parts)
    manifest = build_manifest(ClinicalStats.combine(clinical_parts)) if clinical_parts else None
    fed.run.write_json("stats.json", {
        "sites": [vars(s) for s in fed.sites],
        "nyul_landmarks": {k: v.tolist() for k, v in landmarks.to_arrays().items()},
        "feature_manifest": manifest.to_json() if manifest else None,
    })
    log(INFO, "stats: %d sites: %s", len(fed.sites), ", ".join(f"{s.name} {s.roles}" for s in fed.sites))
    return landmarks, manifest


def phase_ssl(fed: Federation, landmarks: NyulLandmarks) -> dict[str, np.ndarray]:
    """FedAvg rounds of self-supervised pretraining over the ``ssl`` sites; returns the encoder arrays."""
    sites = fed.with_role("ssl")
    if not sites:
        raise StudyError("phase 'ssl' needs at least one site with role 'ssl'; add one or drop 'ssl' from phases")
    arrays = _federated_rounds(fed, "ssl", None, sites, initial_ssl_state(fed.study), fed.study.ssl_rounds,
                               {"nyul": from_arrays(landmarks_to_arrays(landmarks))}, {})
    encoder = {k: v for k, v in arrays.items() if k.startswith("encoder.")}
    fed.run.save_model("encoder", encoder)
    return encoder


def install_model(fed: Federation, encoder: dict[str, np.ndarray], landmarks: NyulLandmarks,
                  manifest: FeatureManifest) -> str:
    """Send the frozen encoder, landmarks and manifest once to training and test sites."""
    model = MRIEncoder(get_profile(fed.study.profile).encoder)
    model.load_state_dict({k.removeprefix("encoder."): torch.as_tensor(v) for k, v in encoder.items()})
    fingerprint = encoder_fingerprint(model)
    sites = fed.with_role("train") + fed.with_role("test")
    record = from_arrays(encoder)
    replies = fed.send(sites, MessageType.QUERY, {
        "arrays": record, "nyul": from_arrays(landmarks_to_arrays(landmarks)),
        "config": ConfigRecord({PHASE_KEY: "install", "manifest-json": manifest.to_json()}),
    })
    failed = {m.metadata.src_node_id: m.error.reason for m in replies if m.has_error()}
    wrong = [m.metadata.src_node_id for m in replies
             if not m.has_error() and str(m.content["config"]["encoder-hash"]) != fingerprint]
    fed.rounds.append({"phase": "install", "round": 0, "nodes": len(sites), "replies": len(replies) - len(failed),
                       "bytes_to_each_site": record.count_bytes(), "failures": failed})
    if failed or wrong:
        raise StudyError(f"installing the encoder failed at nodes {failed or wrong}; "
                         "the sites must hold the same encoder before fine-tuning")
    return fingerprint


def phase_finetune(fed: Federation, fold: int, manifest: FeatureManifest, encoder_hash: str
                   ) -> dict[str, np.ndarray]:
    """FedAvg rounds of the head for fold ``fold``: only ``head.*`` arrays travel."""
    sites = fed.with_role("train")
    head = _federated_rounds(fed, "finetune", fold, sites, initial_head_state(fed.study, manifest, fold),
                             fed.study.finetune_rounds, {}, {"fold": fold, "encoder-hash": encoder_hash})
    fed.run.save_model(f"fold_{fold}", head)
    return head


def phase_evaluate(fed: Federation, heads: list[dict[str, np.ndarray]], encoder_hash: str) -> dict:
    """Score histograms from every site -> pooled and per-site metrics (test) and per-fold CV metrics."""
    sites = fed.with_role("train") + fed.with_role("test")
    records = {f"fold-{k}": from_arrays(h) for k, h in enumerate(heads)}
    records["config"] = ConfigRecord({PHASE_KEY: "evaluate", "folds": len(heads), "encoder-hash": encoder_hash})
    replies = fed.send(sites, MessageType.EVALUATE, records)
    by_name = {s.node_id: s for s in sites}
    histograms: dict[str, dict[str, np.ndarray]] = {}
    for reply in replies:
        site = by_name[reply.metadata.src_node_id]
        if reply.has_error():
            log(INFO, "evaluate: site %s failed: %s", site.name, reply.error.reason)
            continue
        histograms[site.name] = to_arrays(reply.content["arrays"])
    results = summarise_evaluation(histograms, [s.name for s in fed.with_role("test")],
                                   [s.name for s in fed.with_role("train")], len(heads))
    fed.run.write_json("metrics.json", results)
    return results


def summarise_evaluation(histograms: dict[str, dict[str, np.ndarray]], test_sites: list[str],
                         train_sites: list[str], folds: int) -> dict:
    """Pooled (summed histograms) and per-site metrics; fold metrics as mean and sd over folds."""
    def pooled(names: Iterable[str], key: str) -> np.ndarray | None:
        parts = [histograms[n][key] for n in names if n in histograms and key in histograms[n]]
        return np.sum(parts, axis=0) if parts else None

    results: dict = {"test": {}, "validation": {}}
    test_names = [n for n in test_sites if n in histograms]
    if test_names:
        results["test"]["ensemble_pooled"] = metrics_from_histograms(pooled(test_names, "hist.ensemble"))
        results["test"]["ensemble_per_site"] = {
            n: metrics_from_histograms(histograms[n]["hist.ensemble"]) for n in test_names}
        results["test"]["folds"] = _fold_summary(
            [metrics_from_histograms(pooled(test_names, f"hist.fold-{k}")) for k in range(folds)])
    train_names = [n for n in train_sites if n in histograms]
    if train_names:
        results["validation"]["folds"] = _fold_summary(
            [metrics_from_histograms(pooled(train_names, f"hist.fold-{k}")) for k in range(folds)])
    results["sites_reporting"] = sorted(histograms)
    return results


def _fold_summary(per_fold: list[dict[str, float]]) -> dict:
    keys = [k for k in per_fold[0] if k not in ("n_pos", "n_neg", "defined")]
    summary = {"per_fold": per_fold}
    for key in keys:
        values = np.array([m[key] for m in per_fold if m["defined"]], dtype=float)
        summary[key] = {"mean": float(np.nanmean(values)) if values.size else float("nan"),
                        "sd": float(np.nanstd(values, ddof=1)) if values.size > 1 else float("nan"),
                        "folds_defined": int(values.size)}
    return summary


def _federated_rounds(fed: Federation, phase: str, fold: int | None, sites: list[Site],
                      initial: dict[str, np.ndarray], total_rounds: int, extra_records: dict, config: dict
                      ) -> dict[str, np.ndarray]:
    """Run the remaining rounds of one phase (resuming from its last checkpoint), checkpointing each."""
    if not sites:
        raise StudyError(f"phase '{phase}' has no eligible site")
    done, arrays = 0, initial
    if fed.study.resume and (last := fed.run.last_round(phase, fold=fold)) is not None:
        done, arrays = last
        log(INFO, "%s%s: resuming after round %d of %d", phase, "" if fold is None else f" fold {fold}",
            done, total_rounds)
    if done >= total_rounds:
        return arrays
    node_ids = [s.node_id for s in sites]
    min_replies = min(fed.study.min_replies, len(sites))
    if fed.study.strategy == "fedprox":
        strategy = SiteFedProx(node_ids, min_replies=min_replies, proximal_mu=fed.study.proximal_mu,
                               extra_records=extra_records)
    else:
        strategy = SiteFedAvg(node_ids, min_replies=min_replies, extra_records=extra_records)
    strategy.site_names = {s.node_id: s.name for s in sites}

    def checkpoint(server_round: int, record: ArrayRecord) -> None:
        if server_round > 0:
            fed.run.save_round(phase, done + server_round, to_arrays(record), fold=fold)

    started = time.perf_counter()
    try:
        result = strategy.start(
            fed.grid, from_arrays(arrays), num_rounds=total_rounds - done, timeout=fed.study.round_timeout,
            train_config=ConfigRecord({PHASE_KEY: phase, "round-offset": done, **config}), evaluate_fn=checkpoint)
    except TooFewRepliesError as exc:
        raise StudyError(str(exc)) from None
    finally:
        for entry in strategy.round_log:
            fed.rounds.append({"phase": phase, "fold": fold, **entry, "round": done + entry["round"]})
    log(INFO, "%s%s: %d rounds in %.1f s", phase, "" if fold is None else f" fold {fold}",
        total_rounds - done, time.perf_counter() - started)
    return to_arrays(result.arrays)


def _wait_for_nodes(fed: Federation) -> list[int]:
    """Connected nodes, once at least ``min-sites`` (or one) are there; a clear error after the timeout."""
    needed = max(1, fed.study.min_sites)
    deadline = time.monotonic() + fed.study.round_timeout
    while len(node_ids := sorted(fed.grid.get_node_ids())) < needed:
        if time.monotonic() > deadline:
            raise StudyError(f"{len(node_ids)} site(s) connected within round-timeout, min-sites = {needed}; "
                             "start the sites' SuperNodes (psp-client start) or lower min-sites")
        time.sleep(1)
    return node_ids


def _released(run: RunDir, name: str) -> dict[str, np.ndarray]:
    path = run.root / "models" / f"{name}.npz"
    if not path.is_file():
        raise StudyError(f"{path} does not exist: run the phase that produces it first (phases=...)")
    return load_verified_npz(path)


def _write_rounds(fed: Federation) -> None:
    fed.run.write_json("rounds.json", fed.rounds)
    buffer = io.StringIO()
    columns = ["phase", "fold", "round", "nodes", "replies", "bytes_to_each_site", "bytes_from_each_site",
               "train_loss", "val_loss"]
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for entry in fed.rounds:
        metrics = entry.get("metrics", {})
        received = entry.get("bytes_from_each_site", [])
        writer.writerow({**entry, "bytes_from_each_site": int(np.mean(received)) if received else 0,
                         "train_loss": metrics.get("train-loss"), "val_loss": metrics.get("val-loss")})
    atomic_write_text(fed.run.root / "rounds.csv", buffer.getvalue())
