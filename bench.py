"""
Speed and accuracy measurements, one section per concern, printed as one table:

    python bench.py                       # every section on the auto-detected device (cuda > mps > cpu)
    python bench.py --only dispersive     # one section
    python bench.py --smoke               # tiny shapes, a few seconds: checks that the script runs
    python bench.py --full --json         # the larger shapes too, machine-readable output

Each row reads: name, what was measured, value and unit, the baseline's value, ratio = value / baseline
(for times, < 1 means faster than the baseline). Adding a section: write `bench_x(args) -> list of rows`
(build rows with `row(...)`) and register it in SECTIONS.
"""

import argparse
import json
import math
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from dispersive import VARIANTS, dispersive_loss


# ----------------------------------------------------------------------------- helpers

def pick_device(name):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def synchronize(device):
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timeit(fn, warmup, iters, device):
    """Median wall time of fn() in milliseconds, synchronising the device around every call."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        synchronize(device)  # asynchronous kernels must finish inside the timed interval
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def peak_mib(fn, device):
    """Peak CUDA memory allocated by fn() above what was allocated before, in MiB."""
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20


def row(name, what, value, unit, baseline=None):
    ratio = value / baseline if baseline not in (None, 0) and value is not None else None
    return dict(name=name, what=what, value=value, unit=unit, baseline=baseline, ratio=ratio)


def environment(device):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    env = dict(cpu=cpu, cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
               python=platform.python_version(), device=str(device))
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return env


def print_table(rows):
    def fmt(x):
        if x is None:
            return "-"
        if isinstance(x, float):
            return f"{x:.4g}"
        return str(x)
    cols = ["name", "what", "value", "unit", "baseline", "ratio"]
    cells = [[fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for line in cells:
        print("  ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in enumerate(zip(line, widths))))


# ----------------------------------------------------------------------------- dispersive loss

def naive_dispersive(z, variant, tau=0.5, margin=1.0):
    """The straightforward torch.pdist formulation (the official code's, for infonce_l2 at τ = 1)."""
    z = z.reshape(z.shape[0], -1)  # (B, d)
    B, d = z.shape
    if variant == "covariance":  # the explicit (d, d) covariance: only feasible for small d
        C = torch.cov(F.normalize(z, dim=1).T)
        return C.pow(2).sum() - C.diagonal().pow(2).sum()
    if variant == "infonce_cos":
        cos = 1 - torch.pdist(F.normalize(z, dim=1)).pow(2) / 2  # ‖a − b‖² = 2 − 2cos for unit rows
        cos = torch.cat([cos, cos, torch.ones(B, device=z.device)])
        return torch.log(torch.exp(cos / tau).mean())
    D = torch.pdist(z).pow(2) / d
    if variant == "hinge":
        return (margin - D).clamp_min(0).pow(2).mean()  # the i < j half has the same mean as i ≠ j
    D = torch.cat([D, D, torch.zeros(B, device=z.device)])
    return torch.log(torch.exp(-D / tau).mean())


def bench_dispersive(args):
    device = args.device
    if args.smoke:
        shapes = [("tiny", 8, 4, 8)]
        warmup, iters = 1, 2
    else:
        shapes = [("SiT-B/2", 256, 256, 768)]  # global batch 256, 256 tokens × 768 channels
        if args.full:
            shapes.append(("SiT-XL/2", 32, 256, 1152))  # official per-GPU batch, d = 295k
            if device.type != "cpu":
                shapes.append(("SiT-XL/2", 256, 256, 1152))  # the whole global batch (gather=True)
        warmup, iters = (1, 2) if device.type == "cpu" else (5, 20)  # a 2-core CPU needs ~1 s per call
    rows = []
    gen = torch.Generator().manual_seed(0)
    for label, B, T, D in shapes:
        z = torch.randn(B, T, D, generator=gen).to(device).requires_grad_(True)
        d = T * D
        what = f"fwd+bwd {label} B={B} d={d} fp32"

        def step(loss_fn):
            z.grad = None
            loss_fn().backward()

        for v in VARIANTS:
            ours = timeit(lambda: step(lambda: dispersive_loss(z, v)), warmup, iters, device)
            base = None
            if v != "covariance" or d <= 4096:  # the (d, d) baseline would need d² floats
                base = timeit(lambda: step(lambda: naive_dispersive(z, v)), warmup, iters, device)
            rows.append(row(f"dispersive/{v}", what, ours, "ms", base))
            if device.type == "cuda":
                base_mem = peak_mib(lambda: step(lambda: naive_dispersive(z, v)), device) if base else None
                rows.append(row(f"dispersive/{v}", f"extra peak memory {label} B={B}",
                                peak_mib(lambda: step(lambda: dispersive_loss(z, v)), device), "MiB", base_mem))

        # accuracy of the float32 Gram formulation (TF32 if enabled) against a float64 recomputation;
        # the baseline column is the pdist formulation's error
        with torch.no_grad():
            ref = dispersive_loss(z.double(), tau=1.0).item()
            err = abs(dispersive_loss(z, tau=1.0).item() - ref) / abs(ref)
            err_naive = abs(naive_dispersive(z, "infonce_l2", tau=1.0).item() - ref) / abs(ref)
        rows.append(row("dispersive/infonce_l2", f"rel. error vs fp64 {label} B={B}", err, "", err_naive))
        rows.append(row("dispersive/infonce_l2", f"value at init {label} B={B} (−log B = {-math.log(B):.3f})",
                        dispersive_loss(z.detach(), tau=0.5).item(), ""))
        del z
    return rows


# ----------------------------------------------------------------------------- main

SECTIONS = {
    "dispersive": bench_dispersive,
}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Speed and accuracy benchmarks, printed as one table.")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    parser.add_argument("--only", choices=sorted(SECTIONS), default=None, help="run one section only")
    parser.add_argument("--full", action="store_true", help="add the larger (slower) shapes to each section")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and few iterations, for a quick check")
    parser.add_argument("--json", action="store_true", help="print one JSON object (env, rows) instead of a table")
    args = parser.parse_args(argv)
    args.device = pick_device(args.device)

    env = environment(args.device)
    if not args.json:
        print(" | ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    rows = []
    for name, fn in SECTIONS.items():
        if args.only in (None, name):
            rows += fn(args)
    if args.json:
        print(json.dumps(dict(env=env, rows=rows), indent=1))
    else:
        print_table(rows)
    return rows


if __name__ == "__main__":
    main()
