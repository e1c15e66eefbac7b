"""Federated fine-tuning against central training over several seeds, on a finished run's encoder.

    OMP_NUM_THREADS=1 .venv/bin/python bench/federated_vs_central.py --out out/demo --seeds 0,1,2,3,4 \
        --json bench/results/federated_vs_central_demo.json

One demo run's test site has 20 cases, so one seed's federated / central AUC ratio moves by a few
hundredths with the shuffling alone. This repeats the fine-tuning phase for several study seeds (new
folds, new head initialisation, new shuffles) on the run's released encoder, landmarks and manifest:
- central: ``simulation.central.central_heads``, the reference ``psp-sim run`` writes;
- federated: every training site runs ``finetune_update`` (the ClientApp's code) each round and the
  rounds are FedAvg-ed weighted by examples, as the ServerApp does, without the Flower transport;
  once with each site keeping its optimiser state between rounds (the default) and once restarting it.
Reported: each seed's test-site ensemble AUC for the three, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from psp_model.evaluate.metrics import metrics_from_histograms  # noqa: E402
from psp_model.io import load_verified_npz  # noqa: E402
from psp_model.preprocess.clinical import FeatureManifest  # noqa: E402
from psp_model.preprocess.nyul import NyulLandmarks  # noqa: E402
from psp_model.site_tasks import LocalSite, evaluate_site, finetune_update, initial_finetune_state  # noqa: E402
from psp_model.study import StudyConfig  # noqa: E402
from simulation.central import central_heads, install_everywhere, local_sites  # noqa: E402
from simulation.run_cmd import STUDY_DEFAULTS  # noqa: E402


def fedavg(replies: list[tuple[dict[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
    """Weighted mean of the sites' arrays (FedAvg by examples)."""
    total = sum(weight for _, weight in replies)
    return {name: sum(arrays[name] * (weight / total) for arrays, weight in replies).astype(np.float32)
            for name in replies[0][0]}


def federated_heads(sites: list[LocalSite], study: StudyConfig, manifest: FeatureManifest,
                    encoder: dict[str, np.ndarray], encoder_hash: str) -> list[dict[str, np.ndarray]]:
    train = [s for s in sites if "train" in s.site.roles]
    heads = []
    for fold in range(study.folds):
        arrays = initial_finetune_state(study, manifest, fold, encoder)
        for round_ in range(1, study.finetune_rounds + 1):
            replies = [finetune_update(s, arrays, fold=fold, round_=round_, encoder_hash=encoder_hash) for s in train]
            arrays = fedavg([(r.arrays, r.metrics["num-examples"]) for r in replies])
        heads.append(arrays)
    return heads


def test_auc_federated(sites: list[LocalSite], heads: list[dict[str, np.ndarray]], encoder_hash: str) -> float:
    histograms = [evaluate_site(s, heads, encoder_hash=encoder_hash).arrays["hist.ensemble"]
                  for s in sites if "test" in s.site.roles]
    return metrics_from_histograms(np.sum(histograms, axis=0))["auc"]


def test_auc_central(sites: list[LocalSite], study: StudyConfig, encoder: dict[str, np.ndarray],
                     encoder_hash: str) -> float:
    evaluations = central_heads(sites, study, encoder, encoder_hash)
    histograms = [evaluations[s.site.name].histograms["ensemble"] for s in sites if "test" in s.site.roles]
    return metrics_from_histograms(np.sum(histograms, axis=0))["auc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="a finished `psp-sim run --out` folder")
    parser.add_argument("--profile", default="demo", choices=sorted(STUDY_DEFAULTS))
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cohort, run = (args.out / args.profile / "cohort").resolve(), (args.out / args.profile / "run").resolve()
    released = json.loads((run / "models" / "ensemble.json").read_text())
    encoder = load_verified_npz(run / "models" / "encoder.npz")
    landmarks = NyulLandmarks.from_arrays({k: np.asarray(v) for k, v in released["nyul_landmarks"].items()})
    manifest = FeatureManifest.from_json(released["feature_manifest"])
    rows = []
    print("| seed | central | federated, site optimiser kept | ratio | federated, restarted each round | ratio |")
    print("|---|---|---|---|---|---|")
    for seed in [int(s) for s in args.seeds.split(",")]:
        row: dict[str, float] = {"seed": seed}
        for keep in (True, False):
            study = replace(STUDY_DEFAULTS[args.profile], seed=seed, keep_site_optimizer=keep, device="cpu",
                            cohort_dir=str(cohort), run_dir=str(run.parent / f"bench-seed-{seed}-{keep}"))
            sites = local_sites(cohort, study)
            encoder_hash = install_everywhere(sites, encoder, landmarks, manifest)
            if keep:
                row["central"] = test_auc_central(sites, study, encoder, encoder_hash)
            heads = federated_heads(sites, study, manifest, encoder, encoder_hash)
            row["kept" if keep else "restarted"] = test_auc_federated(sites, heads, encoder_hash)
        rows.append(row)
        print(f"| {seed} | {row['central']:.3f} | {row['kept']:.3f} | {row['kept'] / row['central']:.3f} "
              f"| {row['restarted']:.3f} | {row['restarted'] / row['central']:.3f} |", flush=True)
    for key in ("kept", "restarted"):
        ratios = [r[key] / r["central"] for r in rows]
        print(f"{key}: ratio mean {np.mean(ratios):.3f}, min {np.min(ratios):.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
