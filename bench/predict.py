"""Ensemble prediction cost: 5 fold heads on one case vs one model, for tiny / small / full encoders.

    OMP_NUM_THREADS=2 .venv/bin/python bench/predict.py --configs tiny,small,full --repeats 3

The frozen encoder is shared by every fold, so ``ensemble_predict`` encodes the volume once and runs
the five small heads on the same tokens. Target: the ensemble costs at most 1.2x a single model.
The single model is the same encoder + one head (``PSPClassifier`` forward on the volume).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from psp_model.nets.encoder import EncoderConfig, MRIEncoder  # noqa: E402
from psp_model.nets.fusion import HeadConfig, build_classifier, build_head  # noqa: E402
from psp_model.train.device import pick_device  # noqa: E402
from psp_model.train.token_cache import ensemble_predict  # noqa: E402

CONFIGS = {"tiny": EncoderConfig.tiny, "small": EncoderConfig.small, "full": EncoderConfig.full}
N_FEATURES = 12


def _median_seconds(work, repeats: int) -> float:
    work()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, repeats: int, device: torch.device) -> dict:
    config = CONFIGS[name]()
    torch.manual_seed(0)
    encoder = MRIEncoder(config)
    head_config = HeadConfig(n_clinical=N_FEATURES, dim=config.hidden_size)
    heads = [build_head(head_config) for _ in range(5)]
    single = build_classifier(head_config, encoder, encoder_mode="ssl", encoder_weights=encoder.state_dict())
    single.head = heads[0]
    single.eval().to(device)
    volume = torch.randn(1, config.in_channels, *config.img_size)
    clinical = torch.randn(1, N_FEATURES)

    def one_model() -> None:
        with torch.inference_mode():
            torch.sigmoid(single(volume.to(device), clinical.to(device)))

    def five_folds() -> None:
        ensemble_predict(encoder, heads, volume, clinical, device=str(device))

    single_s = _median_seconds(one_model, repeats)
    ensemble_s = _median_seconds(five_folds, repeats)
    return {"config": name, "tokens": config.n_tokens, "hidden": config.hidden_size,
            "single_s": single_s, "ensemble5_s": ensemble_s, "ratio": ensemble_s / single_s}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="tiny,small,full", help="comma-separated encoder configs")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    rows = [measure(name, args.repeats, device) for name in args.configs.split(",")]
    print(f"device {device}\n| config | tokens x width | one model s | 5-fold ensemble s | ratio |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['config']} | {row['tokens']} x {row['hidden']} | {row['single_s']:.3f} | "
              f"{row['ensemble5_s']:.3f} | {row['ratio']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
