"""Federation benchmark: bytes per round, federation overhead, and how many simulated sites fit.

    OMP_NUM_THREADS=1 .venv/bin/python bench/federation.py --json bench/results/federation_cpu.json

1. Bytes one site receives per round in ``ssl`` (encoder + decoder) and in ``finetune`` (head only),
   for the tiny, demo and full model shapes (the arrays that travel, counted by Flower's
   ``ArrayRecord.count_bytes``), and from a real tiny simulated study's ``rounds.json``.
2. Overhead: wall time of the simulated tiny study (stats, ssl, finetune x folds, evaluate, as the
   ServerApp timed it in ``timings.json``) over the wall time of the same local epochs trained
   centrally on the pooled data with the same code (``simulation.central.central_seconds``). The
   simulation engine's start (Ray) is reported apart: it is paid once per run, not per study phase.
3. Scale: a tiny SSL round with N simulated sites (copies of one SSL site sharing its preprocessed
   data) for growing N, until a round fails or exceeds ``--scale-timeout``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flwr.app import Array, ArrayRecord  # noqa: E402

from psp_model.preprocess.pipeline import PreprocessSettings, preprocess_site  # noqa: E402
from psp_model.site_tasks import head_config, initial_ssl_state  # noqa: E402
from psp_model.sites import load_site_config  # noqa: E402
from psp_model.study import StudyConfig  # noqa: E402
from simulation.central import central_seconds  # noqa: E402
from simulation.cohort import generate_cohort  # noqa: E402
from simulation.federation import simulate_study  # noqa: E402
from simulation.run_cmd import STUDY_DEFAULTS  # noqa: E402


def record_bytes(arrays: dict[str, np.ndarray]) -> int:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}).count_bytes()


def model_bytes(n_features: int = 13) -> list[dict]:
    """Bytes per round and site for each profile's model shapes (head with ``n_features`` inputs)."""
    from psp_model.nets.fusion import build_head
    from psp_model.profiles import get_profile

    rows = []
    for profile in ("tiny", "demo", "full"):
        ssl = record_bytes(initial_ssl_state(StudyConfig(profile=profile)))
        head = build_head(head_config(get_profile(profile), n_features, "multimodal"))
        finetune = record_bytes({f"head.{k}": v.detach().numpy() for k, v in head.state_dict().items()})
        rows.append({"profile": profile, "ssl_bytes": ssl, "finetune_bytes": finetune,
                     "finetune_over_ssl": finetune / ssl})
    return rows


def scale(cohort: Path, work: Path, counts: list[int], timeout: float) -> list[dict]:
    """One tiny SSL round with N copies of the brats2021 site (shared, already preprocessed data)."""
    source = load_site_config(cohort / "site_configs" / "brats2021.yaml")
    rows = []
    for n in counts:
        sites_dir = work / f"scale_{n}"
        (sites_dir / "site_configs").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (sites_dir / "site_configs" / f"s{i:03d}.yaml").write_text(
                f"name: s{i:03d}\nroles: [ssl]\nlayout: brats2021\nroot: {source.root}\nwork_dir: {source.work_dir}\n"
                "privacy:\n  min_aggregate_count: 1\n")
        study = StudyConfig(profile="tiny", phases="stats,ssl", ssl_rounds=1, cohort_dir=str(sites_dir),
                            run_dir=str(sites_dir / "run"), min_replies=n, round_timeout=timeout)
        started = time.perf_counter()
        try:
            simulate_study(study)
            replies = [r["replies"] for r in json.loads((sites_dir / "run" / "rounds.json").read_text())
                       if r["phase"] == "ssl"]
            ok = bool(replies) and replies[0] == n
        except Exception as exc:  # a failed scale step is a result, reported as such
            print(f"  {n} sites: failed: {exc}")
            ok = False
        seconds = time.perf_counter() - started
        rows.append({"sites": n, "completed": ok, "seconds": seconds})
        print(f"  {n} sites: {'completed' if ok else 'FAILED'} in {seconds:.0f} s", flush=True)
        shutil.rmtree(sites_dir, ignore_errors=True)
        if not ok or seconds > timeout:
            break
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", default="10,25,50,75", help="simulated site counts to try, in order")
    parser.add_argument("--scale-timeout", type=float, default=900.0, help="seconds one scale step may take")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    results: dict = {"model_bytes": model_bytes()}
    print("| profile | ssl bytes / site / round | finetune bytes / site / round | finetune / ssl |\n|---|---|---|---|")
    for row in results["model_bytes"]:
        print(f"| {row['profile']} | {row['ssl_bytes']:,} | {row['finetune_bytes']:,} | {row['finetune_over_ssl']:.2%} |")
    with tempfile.TemporaryDirectory() as tmp:
        cohort = Path(tmp) / "cohort"
        generate_cohort(cohort, seed=0, profile="tiny", progress=False)
        for path in sorted((cohort / "site_configs").glob("*.yaml")):
            preprocess_site(load_site_config(path), PreprocessSettings(profile="tiny"), progress=False)
        study = replace(STUDY_DEFAULTS["tiny"], phases="stats,ssl,finetune,evaluate", cohort_dir=str(cohort),
                        run_dir=str(Path(tmp) / "run"))
        started = time.perf_counter()
        simulate_study(study)
        total = time.perf_counter() - started
        federated = json.loads((Path(tmp) / "run" / "timings.json").read_text())
        central = central_seconds(cohort, study)
        results["overhead"] = {"simulation_total_s": total, "federated_s": federated, "central_s": central,
                               "ratio": {k: federated[k] / central[k] for k in central}}
        print(f"whole simulation incl. engine start: {total:.1f} s")
        for key in central:
            print(f"overhead {key}: federated {federated[key]:.1f} s / central {central[key]:.1f} s = "
                  f"{federated[key] / central[key]:.2f}")
        rounds = json.loads((Path(tmp) / "run" / "rounds.json").read_text())
        results["tiny_run_bytes"] = {phase: max(r["bytes_to_each_site"] for r in rounds if r["phase"] == phase)
                                     for phase in ("ssl", "finetune")}
        print(f"tiny run, bytes to each site per round: {results['tiny_run_bytes']}")
        results["scale"] = scale(cohort, Path(tmp), [int(n) for n in args.scale.split(",")], args.scale_timeout)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
