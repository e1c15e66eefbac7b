"""The study as phases over a Flower Grid: stats -> ssl -> install -> finetune (all folds at once) -> evaluate.

Each round's global arrays are checkpointed in the run directory; with ``resume=true`` a phase
continues from its last checkpoint (and a finished phase is not repeated).
"""

from __future__ import annotations

import csv
import io
import random
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from logging import INFO
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from client.records import CONFIG, SIGNATURE, from_arrays, signed_digest, to_arrays
from psp_model.evaluate.metrics import N_BINS, metrics_from_histograms
from psp_model.evaluate.shap_rank import (
    combine_site_shap,
    rank_features,
    raw_feature_names,
    select_features,
    subset_manifest,
)
from psp_model.io import atomic_write_text
from psp_model.nets.encoder import MRIEncoder, encoder_fingerprint
from psp_model.preprocess.clinical import ClinicalStats, FeatureManifest, build_manifest
from psp_model.preprocess.nyul import NyulLandmarks, combine_landmarks
from psp_model.profiles import get_profile
from psp_model.signing import sign_bytes, verify_file
from psp_model.site_tasks import (
    NYUL_PREFIX,
    initial_finetune_state,
    initial_ssl_state,
    landmarks_to_arrays,
)
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
    data_hash: str = ""


@dataclass
class Federation:
    grid: Grid
    study: StudyConfig
    run: RunDir
    sites: list[Site] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)
    sent_to: dict[str, int] = field(default_factory=dict)  # message id -> destination node
    expected_nodes: int = 0  # simulation: its SuperNodes, registered while the ServerApp starts

    def sign(self, content: RecordDict) -> bytes | None:
        """The study's signature over a message's arrays (None when the study has no signing key)."""
        key = self.run.signing_key
        return None if key is None else sign_bytes(signed_digest(content), key)

    def signed(self, records: dict) -> dict:
        """``records`` with the signature added to their config record (when the study signs)."""
        if (signature := self.sign(RecordDict(dict(records)))) is not None:
            records[CONFIG][SIGNATURE] = signature
        return records

    def with_role(self, role: str) -> list[Site]:
        return [s for s in self.sites if role in s.roles]

    def send(self, sites: list[Site], message_type: str, records: dict) -> list[Message]:
        """One message per site, the replies sorted by site name (deterministic downstream)."""
        messages = [Message(RecordDict(dict(records)), dst_node_id=s.node_id, message_type=message_type)
                    for s in sites]
        replies = list(self.grid.send_and_receive(messages, timeout=self.study.round_timeout))
        self.sent_to.update({m.metadata.message_id: m.metadata.dst_node_id for m in messages})  # ids set on push
        names = {s.node_id: s.name for s in self.sites}
        return sorted(replies, key=lambda m: names.get(self.sender(m), str(self.sender(m))))

    def sender(self, reply: Message) -> int:
        """The node a reply answers for: the SuperLink answers for an unreachable node under its own id (1)."""
        return self.sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)


def run_study(grid: Grid, study: StudyConfig, run: RunDir, *, expected_nodes: int = 0) -> dict:
    """Run the study's phases; return the final metrics (also written to ``metrics.json``).

    ``timings.json`` records the wall seconds of every phase and of the whole study. ``expected_nodes``:
    nodes to wait for before ``stats`` besides ``min-sites`` (a simulation knows how many it starts).
    """
    random.seed(study.seed)
    run.root.mkdir(parents=True, exist_ok=True)
    run.write_json("config.json", study.to_run_config())
    fed = Federation(grid, study, run, expected_nodes=expected_nodes)
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
    encoder_hash = None
    if {"finetune", "evaluate", "shap", "select"} & set(phases):
        if manifest is None:
            raise StudyError("no training site sent statistics, so there is no feature manifest to fine-tune "
                             "or evaluate with: check that a site with role 'train' is connected and has usable cases")
        encoder_hash = timed("install", lambda: install_model(fed, encoder, landmarks, manifest))
        heads = (timed("finetune", lambda: phase_finetune(fed, manifest, encoder, encoder_hash)) if "finetune" in phases
                 else [_released(run, f"fold_{fold}") for fold in range(study.folds)])
        run.release_json("ensemble.json", {
            "profile": study.profile, "head_variant": study.head_variant, "encoder_mode": study.encoder_mode,
            "folds": study.folds,
            "encoder_hash": encoder_hash, "feature_manifest": manifest.to_json(),
            "nyul_landmarks": {k: v.tolist() for k, v in landmarks.to_arrays().items()},
        })
        if "evaluate" in phases:
            results = timed("evaluate", lambda: phase_evaluate(fed, heads, encoder_hash))
        if "shap" in phases:
            ranking = timed("shap", lambda: phase_shap(fed, heads, encoder_hash, manifest))
        elif "select" in phases:
            ranking = [tuple(entry) for entry in run.read_json("shap.json")["ranking"]]
        if "select" in phases:
            timed("select", lambda: phase_select(fed, ranking, manifest, encoder, encoder_hash))
    timings["study"] = time.perf_counter() - study_started
    run.write_json("timings.json", timings)
    run.write_json("provenance.json", provenance(fed, encoder_hash))
    _write_rounds(fed)
    return results


def phase_stats(fed: Federation) -> tuple[NyulLandmarks, FeatureManifest | None]:
    """Ask every site for aggregates; combine landmarks (ssl + train sites) and clinical stats (train only).

    The feature manifest is None when no training site answered (enough for an SSL-only study).
    """
    node_ids = _wait_for_nodes(fed)
    probes = [Site(node_id=n, name=str(n), roles=[]) for n in node_ids]
    replies = fed.send(probes, MessageType.QUERY, {"config": ConfigRecord({PHASE_KEY: "stats"})})
    landmark_parts, clinical_parts, failed = [], [], {}
    for reply in replies:
        if reply.has_error():
            failed[node := fed.sender(reply)] = reply.error.reason
            log(INFO, "stats: node %s failed: %s", node, reply.error.reason)
            continue
        config, metrics = reply.content["config"], reply.content["metrics"]
        site = Site(reply.metadata.src_node_id, str(config["site-name"]), list(config["site-roles"]), dict(metrics),
                    str(config.get("data-hash", "")))
        fed.sites.append(site)
        arrays = to_arrays(reply.content["arrays"]) if "arrays" in reply.content else {}
        if "test" not in site.roles and any(k.startswith(NYUL_PREFIX) for k in arrays):
            landmark_parts.append(NyulLandmarks.from_arrays(
                {k[len(NYUL_PREFIX):]: v for k, v in arrays.items() if k.startswith(NYUL_PREFIX)}))
        if "train" in site.roles:
            clinical_parts.append(ClinicalStats.from_arrays(
                {k.removeprefix("clinical."): v for k, v in arrays.items() if k.startswith("clinical.")}))
    fed.sites.sort(key=lambda s: s.name)
    if len(fed.sites) < fed.study.min_sites:
        silent = sorted(set(node_ids) - {s.node_id for s in fed.sites} - set(failed))
        raise StudyError(f"{len(fed.sites)} of the {len(node_ids)} connected sites sent statistics, min-sites = "
                         f"{fed.study.min_sites} (failed: {failed or 'none'}; no reply within round-timeout: "
                         f"{silent or 'none'}); check those sites' logs and QC reports, or lower min-sites")
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
    [arrays] = _federated_rounds(fed, "ssl", sites, [Series("ssl", None, initial_ssl_state(fed.study), {})],
                                 fed.study.ssl_rounds, {"nyul": from_arrays(landmarks_to_arrays(landmarks))})
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
    replies = fed.send(sites, MessageType.QUERY, fed.signed({
        "arrays": record, "nyul": from_arrays(landmarks_to_arrays(landmarks)),
        "config": ConfigRecord({PHASE_KEY: "install", "manifest-json": manifest.to_json()}),
    }))
    failed = {fed.sender(m): m.error.reason for m in replies if m.has_error()}
    wrong = [m.metadata.src_node_id for m in replies
             if not m.has_error() and str(m.content["config"]["encoder-hash"]) != fingerprint]
    fed.rounds.append({"phase": "install", "round": 0, "nodes": len(sites), "replies": len(replies) - len(failed),
                       "bytes_to_each_site": record.count_bytes(), "failures": failed})
    if failed or wrong:
        raise StudyError(f"installing the encoder failed at nodes {failed or wrong}; "
                         "the sites must hold the same encoder before fine-tuning")
    return fingerprint


def phase_finetune(fed: Federation, manifest: FeatureManifest, encoder: dict[str, np.ndarray],
                   encoder_hash: str) -> list[dict[str, np.ndarray]]:
    """FedAvg rounds for every fold at once: only ``head.*`` arrays travel (and ``encoder.*`` unless it is frozen)."""
    series = [Series("finetune", fold, initial_finetune_state(fed.study, manifest, fold, encoder),
                     {"fold": fold, "encoder-hash": encoder_hash}) for fold in range(fed.study.folds)]
    heads = _federated_rounds(fed, "finetune", fed.with_role("train"), series, fed.study.finetune_rounds, {})
    for fold, head in enumerate(heads):
        fed.run.save_model(f"fold_{fold}", head)
    return heads


def phase_evaluate(fed: Federation, heads: list[dict[str, np.ndarray]], encoder_hash: str) -> dict:
    """Score histograms from every site -> pooled and per-site metrics (test) and per-fold CV metrics.

    The pooled histograms and Brier sums go to ``histograms.json`` so plots and the report can be
    redrawn from the run directory alone.
    """
    evaluations = _collect_evaluations(fed, fed.with_role("train") + fed.with_role("test"), heads, encoder_hash)
    pooled = pool_evaluations(evaluations, [s.name for s in fed.with_role("test")],
                              [s.name for s in fed.with_role("train")], len(heads))
    fed.run.write_json("histograms.json", pooled)
    results = metrics_from_pooled(pooled, len(heads))
    fed.run.write_json("metrics.json", results)
    return results


def _collect_evaluations(fed: Federation, sites: list[Site], heads: list[dict[str, np.ndarray]], encoder_hash: str,
                         features: list[str] | None = None) -> dict[str, SiteEvaluation]:
    records = {f"fold-{k}": from_arrays(h) for k, h in enumerate(heads)}
    config = {PHASE_KEY: "evaluate", "folds": len(heads), "encoder-hash": encoder_hash}
    records["config"] = ConfigRecord({**config, **({"features": features} if features is not None else {})})
    replies = fed.send(sites, MessageType.EVALUATE, fed.signed(records))
    by_name = {s.node_id: s for s in sites}
    evaluations: dict[str, SiteEvaluation] = {}
    for reply in replies:
        site = by_name[fed.sender(reply)]
        if reply.has_error():
            log(INFO, "evaluate: site %s failed: %s", site.name, reply.error.reason)
            continue
        metrics = reply.content["metrics"]
        evaluations[site.name] = SiteEvaluation(
            histograms={k.removeprefix("hist."): v for k, v in to_arrays(reply.content["arrays"]).items()},
            brier_sums={k.removeprefix("brier-sum."): float(v) for k, v in metrics.items()
                        if k.startswith("brier-sum.")})
    return evaluations


def phase_shap(fed: Federation, heads: list[dict[str, np.ndarray]], encoder_hash: str,
               manifest: FeatureManifest) -> list[tuple[str, float]]:
    """Rank the clinical/dose features by mean |SHAP| pooled over the training sites' validation folds."""
    if fed.study.head_variant == "mri-only":
        raise StudyError("phases 'shap'/'select' rank clinical and dose features, which the mri-only head does not "
                         "use: drop them from phases or use head-variant multimodal or clinical-only")
    sites = fed.with_role("train")
    records = {f"fold-{k}": from_arrays(h) for k, h in enumerate(heads)}
    records["config"] = ConfigRecord({PHASE_KEY: "shap", "folds": len(heads), "encoder-hash": encoder_hash})
    replies = fed.send(sites, MessageType.QUERY, fed.signed(records))
    names = {s.node_id: s.name for s in sites}
    per_site: dict[str, tuple[np.ndarray, int]] = {}
    for reply in replies:
        if reply.has_error():
            log(INFO, "shap: site %s failed: %s", names.get(fed.sender(reply), fed.sender(reply)), reply.error.reason)
            continue
        per_site[names[reply.metadata.src_node_id]] = (to_arrays(reply.content["arrays"])["shap.mean_abs"],
                                                        int(reply.content["metrics"]["num-examples"]))
    if not per_site:
        raise StudyError("no training site sent SHAP values: check the sites' logs")
    features = raw_feature_names(manifest)
    mean = combine_site_shap(list(per_site.values()))
    ranking = rank_features(features, mean)
    fed.run.write_json("shap.json", {
        "features": features, "mean_abs_shap": mean.tolist(), "n_cases": sum(n for _, n in per_site.values()),
        "per_site": {name: {"mean_abs_shap": values.tolist(), "n_cases": n} for name, (values, n) in per_site.items()},
        "ranking": [[name, value] for name, value in ranking],
    })
    log(INFO, "shap: ranking %s", ", ".join(f"{name} {value:.3f}" for name, value in ranking))
    return ranking


def phase_select(fed: Federation, ranking: list[tuple[str, float]], manifest: FeatureManifest,
                 encoder: dict[str, np.ndarray], encoder_hash: str) -> dict:
    """The paper's feature selection: federated cross-validation with the top M ranked features, M = 1..F.

    Each M trains every fold like ``finetune`` (resumable per M and fold); the best mean validation AUC
    over folds picks M (ties: fewer features). The result is added to ``shap.json`` as ``selection``.
    """
    sites, names = fed.with_role("train"), [name for name, _ in ranking]
    val_auc: dict[int, float] = {}
    for m in range(1, len(names) + 1):
        keep = names[:m]
        subset = subset_manifest(manifest, keep)
        series = [Series(f"select_m{m:02d}", fold, initial_finetune_state(fed.study, subset, fold, encoder),
                         {"fold": fold, "encoder-hash": encoder_hash, "features": keep})
                  for fold in range(fed.study.folds)]
        heads = _federated_rounds(fed, "finetune", sites, series, fed.study.finetune_rounds, {})
        evaluations = _collect_evaluations(fed, sites, heads, encoder_hash, features=keep)
        pooled = pool_evaluations(evaluations, [], [s.name for s in sites], fed.study.folds)
        validation = metrics_from_pooled(pooled, fed.study.folds)["validation"]
        val_auc[m] = validation["folds"]["auc"]["mean"] if "folds" in validation else float("nan")
        log(INFO, "select: top %d features -> validation AUC %.3f", m, val_auc[m])
    best = select_features(ranking, val_auc)
    selection = {"m": list(val_auc), "val_auc": list(val_auc.values()), "best_m": best, "features": names[:best]}
    shap = fed.run.read_json("shap.json")
    fed.run.write_json("shap.json", {**shap, "selection": selection})
    return selection


@dataclass
class SiteEvaluation:
    """One site's evaluation reply: histograms and Brier sums keyed ``ensemble`` / ``fold-K``."""

    histograms: dict[str, np.ndarray]
    brier_sums: dict[str, float] = field(default_factory=dict)


def pool_evaluations(evaluations: dict[str, SiteEvaluation], test_sites: list[str], train_sites: list[str],
                     folds: int) -> dict:
    """Sum histograms and Brier sums over the test sites (per model) and over the training sites (per fold)."""
    keys = ["ensemble", *(f"fold-{k}" for k in range(folds))]

    def pooled(names: list[str], key: str) -> tuple[np.ndarray, float] | None:
        parts = [evaluations[n] for n in names if key in evaluations[n].histograms]
        if not parts:
            return None
        return (np.sum([p.histograms[key] for p in parts], axis=0),
                float(sum(p.brier_sums.get(key, float("nan")) for p in parts)))

    result: dict = {"test": {}, "test_sites": {}, "validation": {},
                    "brier_sums": {"test": {}, "test_sites": {}, "validation": {}}}
    tests = [n for n in test_sites if n in evaluations]
    trains = [n for n in train_sites if n in evaluations]
    for key in keys:
        if (entry := pooled(tests, key)) is not None:
            result["test"][key], result["brier_sums"]["test"][key] = entry
        if key != "ensemble" and (entry := pooled(trains, key)) is not None:
            result["validation"][key], result["brier_sums"]["validation"][key] = entry
    result["sites_reporting"] = sorted(evaluations)
    for name in tests:
        result["test_sites"][name] = dict(evaluations[name].histograms)
        result["brier_sums"]["test_sites"][name] = dict(evaluations[name].brier_sums)
    return result


def summarise_evaluation(histograms: dict[str, dict[str, np.ndarray]], test_sites: list[str],
                         train_sites: list[str], folds: int) -> dict:
    """Metrics from per-site ``hist.*`` arrays (as sites send them, without Brier sums)."""
    evaluations = {name: SiteEvaluation({k.removeprefix("hist."): v for k, v in arrays.items()})
                   for name, arrays in histograms.items()}
    return metrics_from_pooled(pool_evaluations(evaluations, test_sites, train_sites, folds), folds)


def metrics_from_pooled(pooled: dict, folds: int) -> dict:
    """Metrics (with CIs) from pooled histograms; fold metrics as mean and sd over folds."""
    def metrics(part: str, key: str, site: str | None = None) -> dict[str, float]:
        hist = pooled[part][site][key] if site else pooled[part][key]
        brier = pooled["brier_sums"][part][site].get(key) if site else pooled["brier_sums"][part].get(key)
        return metrics_from_histograms(np.asarray(hist), brier_sum=brier)

    results: dict = {"test": {}, "validation": {}}
    if "ensemble" in pooled["test"]:
        results["test"]["ensemble_pooled"] = metrics("test", "ensemble")
        results["test"]["ensemble_per_site"] = {n: metrics("test_sites", "ensemble", n) for n in pooled["test_sites"]}
        results["test"]["folds"] = _fold_summary([metrics("test", f"fold-{k}") for k in range(folds)])
    if any(f"fold-{k}" in pooled["validation"] for k in range(folds)):
        # A fold no site could report (too few cases for its privacy policy) stays in the list, undefined.
        results["validation"]["folds"] = _fold_summary([
            metrics("validation", f"fold-{k}") if f"fold-{k}" in pooled["validation"]
            else metrics_from_histograms(np.zeros((2, N_BINS))) for k in range(folds)])
    results["sites_reporting"] = pooled["sites_reporting"]
    return results


def _fold_summary(per_fold: list[dict[str, float]]) -> dict:
    """Mean and sd over the folds where the metric is defined; per-fold CIs stay in ``per_fold``."""
    keys = [k for k in per_fold[0] if k not in ("n_pos", "n_neg", "defined") and "_ci_" not in k]
    summary = {"per_fold": per_fold}
    for key in keys:
        values = np.array([m[key] for m in per_fold if m["defined"]], dtype=float)
        values = values[np.isfinite(values)]
        summary[key] = {"mean": float(values.mean()) if values.size else float("nan"),
                        "sd": float(values.std(ddof=1)) if values.size > 1 else float("nan"),
                        "folds_defined": int(values.size)}
    return summary


@dataclass
class Series:
    """One model trained over federated rounds: the SSL encoder, a fold's head, a selection candidate's head.

    ``name`` names its checkpoints and log entries (``ssl``, ``finetune``, ``select_mMM``); ``config`` rides
    along in its messages.
    """

    name: str
    fold: int | None
    arrays: dict[str, np.ndarray]
    config: dict
    done: int = 0


def _federated_rounds(fed: Federation, phase: str, sites: list[Site], series: list[Series], total_rounds: int,
                      extra_records: dict) -> list[dict[str, np.ndarray]]:
    """Run the remaining rounds of independent model series together, checkpointing each after every round.

    Round r of every series goes out in one ``send_and_receive``, so five folds cost R round trips
    instead of 5 x R. Each series has its own strategy (FedAvg or FedProx); with ``resume=true`` each
    continues from its own last checkpoint. Returns the final arrays in the order of ``series``.
    """
    if not sites:
        raise StudyError(f"phase '{phase}' has no eligible site")
    for one in series:
        if fed.study.resume and (last := fed.run.last_round(one.name, fold=one.fold)) is not None:
            one.done, one.arrays = last
            log(INFO, "%s: resuming after round %d of %d", _label(one), one.done, total_rounds)
    pending = [(one, _strategy(fed, sites, extra_records)) for one in series if one.done < total_rounds]
    first_round = min((one.done for one, _ in pending), default=total_rounds) + 1
    started = time.perf_counter()
    try:
        for round_ in range(first_round, total_rounds + 1):
            active = [(one, strategy) for one, strategy in pending if one.done < round_]
            sent = [list(strategy.configure_train(round_, from_arrays(one.arrays),
                                                  ConfigRecord({PHASE_KEY: phase, **one.config}), fed.grid))
                    for one, strategy in active]
            replies = list(fed.grid.send_and_receive([m for batch in sent for m in batch],
                                                     timeout=fed.study.round_timeout))
            owner = {m.metadata.message_id: k for k, batch in enumerate(sent) for m in batch}  # ids set on push
            for k, (one, strategy) in enumerate(active):
                arrays, _ = strategy.aggregate_train(
                    round_, [r for r in replies if owner.get(r.metadata.reply_to_message_id) == k])
                if arrays is None:
                    raise StudyError(f"{_label(one)} round {round_}: the sites' replies could not be aggregated "
                                     "(see the warnings above); fix the sites, then rerun with resume=true")
                one.arrays, one.done = to_arrays(arrays), round_
                fed.run.save_round(one.name, round_, one.arrays, fold=one.fold)
    except TooFewRepliesError as exc:
        raise StudyError(str(exc)) from None
    finally:
        for one, strategy in pending:
            fed.rounds.extend({"phase": one.name, "fold": one.fold, **entry} for entry in strategy.round_log)
    if pending:
        log(INFO, "%s: rounds %d-%d of %s in %.1f s", phase, first_round, total_rounds,
            ", ".join(_label(one) for one, _ in pending), time.perf_counter() - started)
    return [one.arrays for one in series]


def _label(one: Series) -> str:
    return one.name if one.fold is None else f"{one.name} fold {one.fold}"


def _strategy(fed: Federation, sites: list[Site], extra_records: dict) -> SiteFedAvg | SiteFedProx:
    node_ids = [s.node_id for s in sites]
    min_replies = min(fed.study.min_replies, len(sites))
    if fed.study.strategy == "fedprox":
        strategy = SiteFedProx(node_ids, min_replies=min_replies, proximal_mu=fed.study.proximal_mu,
                               extra_records=extra_records)
    else:
        strategy = SiteFedAvg(node_ids, min_replies=min_replies, extra_records=extra_records)
    strategy.site_names = {s.node_id: s.name for s in sites}
    strategy.sign = fed.sign if fed.run.signing_key is not None else None
    return strategy


def provenance(fed: Federation, encoder_hash: str | None) -> dict:
    """What produced this run: code and package versions, the encoder, and each site's data digest."""
    packages = {}
    for name in ("psp-fl", "flwr", "torch", "monai", "numpy", "scikit-learn", "shap", "antspyx", "pydicom"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    return {
        "code_version": packages["psp-fl"],
        "git_commit": _git_commit(),
        "packages": packages,
        "encoder_hash": encoder_hash,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sites": {s.name: {"roles": s.roles, "n_cases": int(s.counts.get("num-examples", 0)),
                           "data_hash": s.data_hash} for s in fed.sites},
    }


def _git_commit() -> str | None:
    """The source checkout's commit when the code runs from one (None for an installed wheel)."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _wait_for_nodes(fed: Federation) -> list[int]:
    """Connected nodes, once at least ``min-sites``, the expected nodes (or one) are there; an error after the timeout.

    Flower's simulation registers its SuperNodes while the ServerApp starts: without waiting for all of them,
    a study could begin with the few registered so far and train without its training site.
    """
    needed = max(1, fed.study.min_sites, fed.expected_nodes)
    deadline = time.monotonic() + fed.study.round_timeout
    while len(node_ids := sorted(fed.grid.get_node_ids())) < needed:
        if time.monotonic() > deadline:
            raise StudyError(f"{len(node_ids)} site(s) connected within round-timeout, min-sites = {needed}; "
                             "start the sites' SuperNodes (psp-client start) or lower min-sites")
        time.sleep(1)
    return node_ids


def _released(run: RunDir, name: str) -> dict[str, np.ndarray]:
    """A model an earlier run released; with a signing key its signature must verify too."""
    path = run.root / "models" / f"{name}.npz"
    if not path.is_file():
        raise StudyError(f"{path} does not exist: run the phase that produces it first (phases=...)")
    if run.signing_key is not None:
        verify_file(path, run.signing_key.public_key())
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
