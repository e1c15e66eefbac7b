"""SSL training-step benchmark: our step vs a plain MONAI ``ViTAutoEnc`` loop, same tokens and width.

For each encoder config (tiny / small / full) it reports step time, volumes per second, peak memory,
FLOPs per step (``torch.utils.flop_counter``) and model FLOP utilisation against a large fp32 and a
large bf16 matmul timed in the same run on the same device. The reference is the MONAI tutorial's
loop: ``ViTAutoEnc`` in fp32, two forward passes, ``L1Loss`` + ``ContrastiveLoss`` (L1 + CL x L1),
plain Adam; its volume side and (square) patch are chosen to give the same token grid (full:
128^3 / 16^3, N = 512). Augmentation is timed separately (both loops would pay it equally).

Each measurement runs in its own subprocess so that peak memory (``ru_maxrss`` on CPU,
``torch.cuda.max_memory_allocated`` on CUDA) belongs to that model alone; the timed steps of the
two loops are interleaved in one process so both see the same load on a shared machine.

    OMP_NUM_THREADS=2 python bench/train_step.py --configs tiny,small,full --steps 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from monai.losses import ContrastiveLoss
from monai.networks.nets import ViTAutoEnc
from torch.utils.flop_counter import FlopCounterMode

from psp_model.nets.encoder import EncoderConfig, SSLAutoencoder
from psp_model.train.device import pick_device, resolve_precision
from psp_model.train.ssl import SSLConfig, ssl_forward, ssl_optimizer, ssl_transforms, train_ssl

CONFIGS = {"tiny": EncoderConfig.tiny, "small": EncoderConfig.small, "full": EncoderConfig.full}
TEMPERATURE = 0.05


def reference_shape(config: EncoderConfig) -> tuple[int, int]:
    """(volume side, patch side) for ``ViTAutoEnc``: the square patch nearest ours, same token grid."""
    patch = config.patch_size[0]
    root = math.isqrt(patch)
    square = min((root * root, (root + 1) ** 2), key=lambda s: (abs(s - patch), s))
    return config.grid[0] * square, square


class Ours:
    """Our training step exactly as ``train_ssl`` runs it (minus augmentation and data loading)."""

    def __init__(self, config: EncoderConfig, batch: int, device: torch.device, dtype: torch.dtype) -> None:
        self.model = SSLAutoencoder(config).to(device)
        self.optimizer = ssl_optimizer(self.model, 1e-4)
        self.dtype = dtype
        view_1, view_2, self.original = make_views(config.img_size, config.in_channels, batch, device)
        self.views = torch.cat([view_1, view_2])  # train_ssl stacks them this way directly

    def step(self) -> float:
        total, _, _ = ssl_forward(self.model, self.views, self.original, dtype=self.dtype, temperature=TEMPERATURE)
        total.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total.item()

    def count_flops(self) -> int:
        """Model FLOPs: counted on the einsum attention path, since the counter skips CPU fused attention."""
        chosen = self.model.encoder.use_flash_attention
        self.model.encoder.use_flash_attention = False
        with FlopCounterMode(display=False) as counter:
            self.step()
        self.model.encoder.use_flash_attention = chosen
        return counter.get_total_flops()


class Reference:
    """The MONAI tutorial's loop: ``ViTAutoEnc`` fp32, two forwards, L1 + CL x L1, plain Adam."""

    def __init__(self, config: EncoderConfig, batch: int, device: torch.device) -> None:
        side, patch = reference_shape(config)
        self.model = ViTAutoEnc(
            in_channels=config.in_channels, out_channels=config.in_channels, img_size=side, patch_size=patch,
            hidden_size=config.hidden_size, mlp_dim=config.mlp_dim, num_layers=config.num_layers,
            num_heads=config.num_heads,
        ).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.l1 = torch.nn.L1Loss()
        self.contrastive = ContrastiveLoss(temperature=TEMPERATURE)
        self.views = make_views((side,) * 3, config.in_channels, batch, device)

    def step(self) -> float:
        view_1, view_2, original = self.views
        self.optimizer.zero_grad()
        out_1, _ = self.model(view_1)
        out_2, _ = self.model(view_2)
        r_loss = self.l1(out_1, original)
        cl_loss = self.contrastive(out_1.flatten(start_dim=1), out_2.flatten(start_dim=1))
        total = r_loss + cl_loss * r_loss
        total.backward()
        self.optimizer.step()
        return total.item()

    def count_flops(self) -> int:
        with FlopCounterMode(display=False) as counter:
            self.step()
        return counter.get_total_flops()


def make_views(img_size, channels: int, batch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Augmented (view 1, view 2, original) batches of random volumes, as ``train_ssl`` builds them."""
    transforms = ssl_transforms(img_size)
    transforms.set_random_state(seed=0)
    generator = torch.Generator().manual_seed(0)
    items = [transforms({"image": torch.randn(channels, *img_size, generator=generator)}) for _ in range(batch)]
    return tuple(torch.stack([torch.as_tensor(item[key]).as_subclass(torch.Tensor) for item in items]).to(device)
                 for key in ("image", "image_2", "gt_image"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Best FLOP/s of a large square matmul (3072 on CPU, 8192 on CUDA), over 3 timed repeats."""
    n = 8192 if device.type == "cuda" else 3072
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def worker_measure(config_name: str, impl: str, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Peak memory of one step (after building), then FLOPs of one step."""
    config = CONFIGS[config_name]()
    torch.manual_seed(0)
    before = peak_memory_bytes(device)
    runner = Ours(config, batch, device, dtype) if impl == "ours" else Reference(config, batch, device)
    built = peak_memory_bytes(device)
    runner.step()
    sync(device)
    peak = peak_memory_bytes(device)
    return {"peak_mem_bytes": peak, "built_mem_bytes": built, "start_mem_bytes": before,
            "flops_per_step": runner.count_flops()}


def worker_time(config_name: str, batch: int, steps: int, device: torch.device, dtype: torch.dtype,
                reference: bool) -> dict:
    """Interleaved timed steps of both loops, matmul peaks before and after, augmentation time."""
    config = CONFIGS[config_name]()
    torch.manual_seed(0)
    runners = {"ours": Ours(config, batch, device, dtype)}
    if reference:
        runners["reference"] = Reference(config, batch, device)
    peaks = {"fp32": matmul_flops(device, torch.float32), "bf16": matmul_flops(device, torch.bfloat16)}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for index in range(steps + 1):  # the first step of each is warm-up
        for name, runner in runners.items():
            sync(device)
            start = time.perf_counter()
            runner.step()
            sync(device)
            if index:
                times[name].append(time.perf_counter() - start)
    peaks = {key: max(value, matmul_flops(device, getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[key])))
             for key, value in peaks.items()}
    transforms = ssl_transforms(config.img_size)
    volume = torch.randn(config.in_channels, *config.img_size)
    start = time.perf_counter()
    for _ in range(2):
        transforms({"image": volume.clone()})
    return {"step_s": times, "matmul_flops": peaks, "augment_s_per_volume": (time.perf_counter() - start) / 2}


def smooth_volumes(n: int, size: int, channels: int = 2) -> list[torch.Tensor]:
    """Sums of Gaussian blobs, z-normalised: learnable structure for the precision check."""
    generator = torch.Generator().manual_seed(0)
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, size)] * 3, indexing="ij"))
    volumes = []
    for _ in range(n):
        volume = torch.zeros(channels, size, size, size)
        for _ in range(4):
            centre = torch.rand(3, 1, 1, 1, generator=generator) * 1.2 - 0.6
            width = 0.15 + 0.25 * torch.rand(1, generator=generator)
            volume += (torch.rand(channels, 1, 1, 1, generator=generator) + 0.5) * torch.exp(
                -((grid - centre) ** 2).sum(0) / (2 * width**2))
        volumes.append((volume - volume.mean()) / volume.std())
    return volumes


def learning_check(epochs: int, device: str) -> dict:
    """Same init, data and seed, fp32 vs bf16 autocast: does reduced precision change the loss curve?"""
    volumes = smooth_volumes(8, EncoderConfig.tiny().img_size[0])
    curves = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = SSLAutoencoder(EncoderConfig.tiny())
        config = SSLConfig(epochs=epochs, batch_size=4, lr=1e-3, precision=precision, device=device)
        curves[precision] = train_ssl(model, volumes, config, progress=False)
    return curves


def run_worker(args: argparse.Namespace, **job) -> dict:
    command = [sys.executable, __file__, "--worker", json.dumps(job), "--device", args.device,
               "--precision", args.precision, "--batch", str(args.batch)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {job} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_config(args: argparse.Namespace, name: str) -> dict:
    config = CONFIGS[name]()
    side, patch = reference_shape(config)
    impls = ["ours", "reference"] if args.reference else ["ours"]
    measured = {impl: run_worker(args, kind="measure", config=name, impl=impl) for impl in impls}
    timed = run_worker(args, kind="time", config=name, steps=args.steps, reference=args.reference)
    rows = []
    for impl in impls:
        step_s = statistics.median(timed["step_s"][impl])
        flops = measured[impl]["flops_per_step"]
        achieved = flops / step_s
        rows.append({
            "config": name,
            "impl": impl,
            "input": f"{args.batch}x2 views x {config.in_channels}x{config.img_size[0] if impl == 'ours' else side}^3",
            "patch": config.patch_size[0] if impl == "ours" else patch,
            "tokens": config.n_tokens,
            "hidden": config.hidden_size,
            "precision": args.precision if impl == "ours" else "fp32",
            "step_s_median": step_s,
            "step_s_all": timed["step_s"][impl],
            "volumes_per_s": args.batch / step_s,
            "peak_mem_bytes": measured[impl]["peak_mem_bytes"],
            "mem_after_build_bytes": measured[impl]["built_mem_bytes"],
            "flops_per_step": flops,
            "achieved_flops": achieved,
            "mfu_vs_fp32_matmul": achieved / timed["matmul_flops"]["fp32"],
            "mfu_vs_bf16_matmul": achieved / timed["matmul_flops"]["bf16"],
        })
    summary = {"config": name, "rows": rows, "matmul_flops": timed["matmul_flops"],
               "augment_s_per_volume": timed["augment_s_per_volume"]}
    if args.reference:
        summary["speedup_vs_reference"] = rows[1]["step_s_median"] / rows[0]["step_s_median"]
    return summary


def print_table(results: list[dict]) -> None:
    header = (f"{'config':6} {'impl':9} {'input':26} {'N':>4} {'step s':>8} {'vol/s':>7} {'peak MB':>8} "
              f"{'GFLOP':>8} {'GFLOP/s':>8} {'MFU32':>6} {'MFU16':>6}")
    print(header)
    print("-" * len(header))
    for result in results:
        for row in result["rows"]:
            print(f"{row['config']:6} {row['impl']:9} {row['input']:26} {row['tokens']:>4} "
                  f"{row['step_s_median']:8.3f} {row['volumes_per_s']:7.2f} {row['peak_mem_bytes'] / 2**20:8.0f} "
                  f"{row['flops_per_step'] / 1e9:8.1f} {row['achieved_flops'] / 1e9:8.1f} "
                  f"{row['mfu_vs_fp32_matmul']:6.1%} {row['mfu_vs_bf16_matmul']:6.1%}")
        peaks = result["matmul_flops"]
        line = (f"  matmul peak fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s; "
                f"augmentation {result['augment_s_per_volume']:.3f} s/volume")
        if "speedup_vs_reference" in result:
            line += f"; speed-up vs reference {result['speedup_vs_reference']:.2f}x"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,small,full", help="comma-separated: tiny, small, full")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per loop after one warm-up (default 3)")
    parser.add_argument("--batch", type=int, default=2, help="volumes per step, each seen as 2 views (default 2)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1...")
    parser.add_argument("--precision", default="bf16", choices=["auto", "fp32", "bf16", "fp16"],
                        help="autocast for our loop (default bf16; the reference is always fp32)")
    parser.add_argument("--no-reference", dest="reference", action="store_false", help="skip the ViTAutoEnc loop")
    parser.add_argument("--json", type=Path, default=Path("bench/results/train_step.json"), help="where to write")
    parser.add_argument("--learning-check", type=int, default=0, metavar="EPOCHS",
                        help="also train the tiny config for EPOCHS in fp32 and in bf16 and print both loss curves")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = pick_device(args.device)
    dtype = resolve_precision(device, args.precision)

    if args.worker:
        job = json.loads(args.worker)
        if job["kind"] == "measure":
            out = worker_measure(job["config"], job["impl"], args.batch, device, dtype)
        else:
            out = worker_time(job["config"], args.batch, job["steps"], device, dtype, job["reference"])
        print(json.dumps(out))
        return

    names = [name.strip() for name in args.configs.split(",") if name.strip()]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {sorted(CONFIGS)}")
    environment = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_start": os.getloadavg(),
        "batch": args.batch,
        "steps": args.steps,
        "precision": args.precision,
    }
    print(json.dumps(environment))
    results = []
    for name in names:
        results.append(bench_config(args, name))
        print_table(results[-1:])
    report = {"environment": environment, "results": results}
    if args.learning_check:
        report["learning_check"] = learning_check(args.learning_check, args.device)
        for precision, curve in report["learning_check"].items():
            print(f"tiny SSL loss per epoch, {precision}: " + " ".join(f"{loss:.4f}" for loss in curve))
    environment["load_avg_end"] = os.getloadavg()
    print("load average start", environment["load_avg_start"], "end", environment["load_avg_end"])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
