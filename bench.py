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
import random
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


def timeit_interleaved(fns, warmup, rounds, device):
    """Median wall time in ms of each callable in the dict `fns`, timed in turn within each round (in a new
    random order each round), so a slow drift of the machine (other jobs, clocks) and the traces one variant
    leaves for the next (allocator, caches) hit every variant alike and the ratios between them hold."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times = {name: [] for name in names}
    order = random.Random(0)
    for _ in range(rounds):
        for name in order.sample(names, len(names)):
            synchronize(device)
            t0 = time.perf_counter()
            fns[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


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
        # per-GPU batch 32 (global 256 on 8 GPUs), 256 tokens × 768 channels; the whole global batch with --full
        # or on a GPU (one GPU at global batch 256, or gather=True)
        shapes = [("SiT-B/2", 32, 256, 768)]
        if args.full or device.type != "cpu":
            shapes.append(("SiT-B/2", 256, 256, 768))
        if args.full:
            shapes.append(("SiT-XL/2", 32, 256, 1152))  # d = 295k
            if device.type != "cpu":
                shapes.append(("SiT-XL/2", 256, 256, 1152))
        warmup, iters = (1, 3) if device.type == "cpu" else (5, 20)
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
            fns = {"ours": lambda: step(lambda: dispersive_loss(z, v))}
            if v != "covariance" or d <= 4096:  # the (d, d) baseline would need d² floats
                fns["base"] = lambda: step(lambda: naive_dispersive(z, v))
            ms = timeit_interleaved(fns, warmup, iters, device)
            rows.append(row(f"dispersive/{v}", what, ms["ours"], "ms", ms.get("base")))
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


# ----------------------------------------------------------------------------- networks, training, sampling

def dit_macs_per_image(model):
    """Multiply-adds of one forward pass, counted analytically (DiT's "118.6 GFLOPs" for XL/2 at 256² is this
    count, fvcore's convention: one multiply-add = one flop). Real FLOPs are twice this."""
    T, D, depth = model.x_embedder.num_patches, model.hidden_size, model.depth
    p, C = model.patch_size, model.in_channels
    per_block = 12 * T * D * D + 2 * T * T * D + 6 * D * D  # qkv, proj, mlp (8TD²); QKᵀ and AV; adaLN
    embed = T * D * p * p * C + 256 * D + D * D + 2 * D * D + T * D * p * p * model.out_channels
    return depth * per_block + embed


def peak_tflops(device, precision):
    """Dense peak of the GPU for MFU (override with --peak-tflops); None when unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    table = {"H100": (989.0, 494.5), "H200": (989.0, 494.5), "A100": (312.0, 156.0)}  # (bf16, tf32)
    for key, (bf16, tf32) in table.items():
        if key in name:
            return bf16 if precision == "bf16" else tf32
    return None


def _inputs(model, B, device, gen, family="sit"):
    x = torch.randn(B, model.in_channels, model.input_size, model.input_size, generator=gen).to(device)
    y = torch.randint(0, model.num_classes, (B,), generator=gen).to(device)
    return x, y


def _autocast(device, precision):
    from contextlib import nullcontext
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def _sizes(args, kind):
    """(model name, latent, image size, batch) per section and mode: tiny for --smoke, CPU-sized by default,
    the paper's XL/2 on GPUs with --full."""
    gpu = args.device.type == "cuda"
    if args.smoke:
        return {"network": [("DiT-T/4", False, 32, 2)],
                "train": [("SiT-T/4", False, 32, 4), ("MeanFlow-T/4", False, 32, 4), ("DiT-T/4", False, 32, 4)],
                "sample": [("SiT-T/4", False, 32, 2)]}[kind]
    if kind == "network":
        sizes = [("DiT-S/2", True, 256, 32 if gpu else 4)]
        if gpu or args.full:
            sizes.append(("DiT-B/2", True, 256, 32 if gpu else 4))
        return sizes + ([("DiT-XL/2", True, 256, 32)] if gpu and args.full else [])
    if kind == "train":
        if gpu:
            big = "XL/2" if args.full else "B/2"
            return [(f"SiT-{big}", True, 256, 32), (f"MeanFlow-{big}", True, 256, 32), (f"DiT-{big}", True, 256, 32)]
        if args.full:
            return [("SiT-B/2", True, 256, 4)] + [(f"{f}-B/4", True, 256, 8) for f in ("SiT", "MeanFlow", "DiT")]
        return [(f"{f}-B/4", True, 256, 4) for f in ("SiT", "MeanFlow", "DiT")]
    if gpu:
        return [("SiT-XL/2" if args.full else "SiT-B/2", True, 256, 16)]
    # CPU: SiT-B/2 at the paper's steps with --full (tens of minutes), else SiT-B/4 at a tenth of the steps
    return [("SiT-B/2", True, 256, 2)] if args.full else [("SiT-B/4", True, 256, 2)]


def bench_network(args):
    """Forward and forward+backward images/s of DiT at latent 32×32: fused SDPA (ours) against explicit math
    attention (the baseline), float32 eager; bf16 autocast and torch.compile where they pay (GPU, or --full)."""
    import train
    device, rows = args.device, []
    warmup, iters = (1, 1) if args.smoke else ((1, 3) if device.type == "cpu" else (5, 20))
    gen = torch.Generator().manual_seed(0)
    for name, latent, size, B in _sizes(args, "network"):
        model, _ = train.build_model(name, size, 1000 if not args.smoke else 10, latent)
        model = model.to(device)
        x, y = _inputs(model, B, device, gen)
        t = torch.randint(0, 1000, (B,), generator=gen).to(device)
        macs = dit_macs_per_image(model)
        variants = [("fp32", False)]
        if device.type == "cuda" or args.full:
            variants += [("bf16", False)]
            if args.compile:
                variants += [("bf16", True)]
        for precision, compiled in variants:
            net = torch.compile(model) if compiled else model
            label = f"{precision}{' compile' if compiled else ''}"

            def fwd():
                with torch.no_grad(), _autocast(device, precision):
                    net(x, t, y)

            def fwd_bwd():
                with _autocast(device, precision):
                    out = net(x, t, y)
                out.float().square().mean().backward()

            for what, fn, factor in (("fwd", fwd, 1), ("fwd+bwd", fwd_bwd, 3)):
                def attention(fused, fn=fn):
                    model.set_fused_attention(fused)
                    fn()
                fns = {"ours": lambda: attention(True)}
                if precision == "fp32" and not compiled:
                    fns["base"] = lambda: attention(False)
                ms = timeit_interleaved(fns, warmup, iters, device)
                model.set_fused_attention(True)
                base = B / (ms["base"] / 1e3) if "base" in ms else None
                ips = B / (ms["ours"] / 1e3)
                rows.append(row(f"network/{name}", f"{what} {label} B={B} img/s (baseline: math attention)",
                                ips, "img/s", base))
                peak = peak_tflops(device, precision)
                if peak:
                    tflops = 2 * factor * macs * ips / 1e12
                    rows.append(row(f"network/{name}", f"{what} {label} achieved TFLOP/s (MFU of {peak:g})",
                                    tflops, "TFLOP/s", peak))
        model.zero_grad(set_to_none=True)
    return rows


class _NaiveDispersive:
    """DispersiveConfig stand-in whose loss is the torch.pdist formulation (the baseline)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.weight, self.tau, self.enabled = cfg.weight, cfg.tau, cfg.enabled

    def resolve_block(self, depth):
        return self.cfg.resolve_block(depth)

    def loss(self, z):
        return naive_dispersive(z.float(), self.cfg.variant, self.cfg.tau)


def bench_train(args):
    """One optimizer step (AdamW + EMA) per family: images/s with and without the dispersive term, the overhead,
    MeanFlow's step against SiT's (with and without training-time CFG), and the baseline (float32 eager, math
    attention, torch.pdist loss). All variants of a model are timed interleaved, round by round."""
    import copy
    import train
    from dispersive import DispersiveConfig
    device, rows = args.device, []
    warmup, rounds = (1, 1) if args.smoke else ((1, 3) if device.type == "cpu" else (5, 20))
    precision = "bf16" if device.type == "cuda" else "fp32"

    def setup(name, latent, size, B):
        torch.manual_seed(0)
        model, family = train.build_model(name, size, 1000 if not args.smoke else 10, latent)
        model = model.to(device)
        # make every layer active, as after some training (adaLN-Zero starts as the identity)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad and p.abs().sum() == 0:
                    p.normal_(0, 0.02)
        params = list(model.parameters())
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=0, fused=True)
        ema = [p.detach().clone() for p in params]
        x, y = _inputs(model, B, device, torch.Generator().manual_seed(0))

        objective = train.build_objective(name, family)

        def make(reg, prec, fused, net=model, obj=objective):
            loss = train.TrainLoss(net, obj, reg, model.depth)

            def step():
                model.set_fused_attention(fused)
                train.train_step(loss, opt, lambda: (x, y), autocast=lambda: _autocast(device, prec),
                                 ema=(ema, params))
            return step
        return model, family, objective, make

    none = DispersiveConfig(variant="none")
    for name, latent, size, B in _sizes(args, "train"):
        model, family, objective, make = setup(name, latent, size, B)
        disp = DispersiveConfig.preset("paper", model.depth)

        # the dispersive term's own cost: its forward + backward on features of the block's shape
        feats = torch.randn(B, model.x_embedder.num_patches, model.hidden_size, device=device, requires_grad=True)

        def disp_only():
            feats.grad = None
            with _autocast(device, precision):
                disp.loss(feats).backward()

        fns = {"ours_none": make(none, precision, True), "ours_disp": make(disp, precision, True),
               "base_none": make(none, "fp32", False), "base_disp": make(_NaiveDispersive(disp), "fp32", False),
               "disp_only": disp_only}
        if family == "meanflow":
            plain = copy.copy(objective)  # without training-time CFG (ω = 1, κ = 0): no guidance forward
            plain.omega, plain.kappa = 1.0, 0.0
            fns["ours_none_nocfg"] = make(none, precision, True, obj=plain)
            sit_name = "SiT-" + name.split("-", 1)[1]  # SiT of the same size, timed in the same rounds
            fns["sit_none"] = setup(sit_name, latent, size, B)[3](none, precision, True)
        if args.compile:
            fns["ours_disp_compiled"] = make(disp, precision, True, net=torch.compile(model))
        ms = timeit_interleaved(fns, warmup + (2 if args.compile else 0), rounds, device)
        model.set_fused_attention(True)
        what = f"{precision} B={B}"
        block = disp.resolve_block(model.depth)
        rows.append(row(f"train/{name}", f"step img/s, no disp ({what})", B / ms["ours_none"] * 1e3, "img/s",
                        B / ms["base_none"] * 1e3))
        rows.append(row(f"train/{name}", f"step img/s, with disp block {block} ({what})",
                        B / ms["ours_disp"] * 1e3, "img/s", B / ms["base_disp"] * 1e3))
        if args.compile:
            rows.append(row(f"train/{name}", f"step img/s, with disp, torch.compile network ({what})",
                            B / ms["ours_disp_compiled"] * 1e3, "img/s", B / ms["ours_disp"] * 1e3))
        rows.append(row(f"train/{name}", "dispersive overhead, step vs step (baseline: pdist loss)",
                        100 * (ms["ours_disp"] / ms["ours_none"] - 1), "%",
                        100 * (ms["base_disp"] / ms["base_none"] - 1)))
        rows.append(row(f"train/{name}", "dispersive loss fwd+bwd alone, % of the step",
                        100 * ms["disp_only"] / ms["ours_none"], "%"))
        peak = peak_tflops(device, precision)
        if peak and family != "meanflow":
            rows.append(row(f"train/{name}", "MFU with disp (3 × fwd FLOPs)",
                            100 * 3 * 2 * dit_macs_per_image(model) * B / (ms["ours_disp"] / 1e3) / (peak * 1e12),
                            "%"))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            fns["ours_disp"]()
            synchronize(device)
            rows.append(row(f"train/{name}", f"peak memory ({what})",
                            torch.cuda.max_memory_allocated(device) / 2 ** 30, "GiB"))
        if family == "meanflow":
            size_name = name.split("-", 1)[1]
            rows.append(row(f"train/{name}", f"step time vs SiT-{size_name}, training-time CFG ({what})",
                            ms["ours_none"], "ms", ms["sit_none"]))
            rows.append(row(f"train/{name}", f"step time vs SiT-{size_name}, no CFG (ω = 1, κ = 0)",
                            ms["ours_none_nocfg"], "ms", ms["sit_none"]))
        del model, make, fns, feats
    return rows


def bench_sample(args):
    """Sampling images/s and network calls per image for each sampler. The baseline runs the same sampler with
    math attention in float32, and for the SDE the official two network calls per step."""
    import dit as dit_module
    import meanflow as meanflow_module
    import sit as sit_module
    import train
    device, rows = args.device, []
    paper = args.full or device.type == "cuda"
    for name, latent, size, B in _sizes(args, "sample"):
        size_name = name.split("-", 1)[1]
        nets = {}
        for family in ("sit", "dit", "meanflow"):
            fam_name = {"sit": "SiT", "dit": "DiT", "meanflow": "MeanFlow"}[family] + "-" + size_name
            if fam_name not in train.MODELS:
                fam_name = {"sit": "SiT", "dit": "DiT", "meanflow": "MeanFlow"}[family] + "-B/4"
            torch.manual_seed(0)
            net, _ = train.build_model(fam_name, size, 1000 if not args.smoke else 10, latent)
            with torch.no_grad():
                for p in net.parameters():
                    if p.requires_grad and p.abs().sum() == 0:
                        p.normal_(0, 0.02)
            nets[family] = (fam_name, net.to(device).eval())
        if args.smoke:
            steps = dict(sde=3, ode_heun=2, ode_euler=3, ddpm=3, ddim=3)
        elif paper:
            steps = dict(sde=250, ode_heun=125, ode_euler=250, ddpm=250, ddim=50)
        else:  # a 2-core CPU: a tenth of the paper's steps or less; NFE per image is printed so rates convert
            steps = dict(sde=10, ode_heun=5, ode_euler=10, ddpm=10, ddim=5)
        gen = torch.Generator().manual_seed(0)
        cases = [
            ("sit", "sde", dict(sampler="sde", num_steps=steps["sde"])),
            ("sit", "ode-heun", dict(sampler="ode-heun", num_steps=steps["ode_heun"])),
            ("sit", "ode-euler", dict(sampler="ode-euler", num_steps=steps["ode_euler"])),
            ("dit", "ddpm", dict(sampler="ddpm", num_steps=steps["ddpm"])),
            ("dit", "ddim", dict(sampler="ddim", num_steps=steps["ddim"])),
            ("meanflow", "1-NFE", dict(num_steps=1)),
            ("meanflow", "2-NFE", dict(num_steps=2)),
        ]
        for family, label, kw in cases:
            fam_name, net = nets[family]
            fn = {"sit": sit_module.sample, "dit": dit_module.sample, "meanflow": meanflow_module.sample}[family]
            z = torch.randn(B, net.in_channels, net.input_size, net.input_size, generator=gen).to(device)
            y = torch.randint(0, net.num_classes, (B,), generator=gen).to(device)
            calls = [0]

            def counted(*a, _net=net, **k):
                calls[0] += 1
                return _net(*a, **k)

            def go(model):
                calls[0] = 0
                with _autocast(device, "bf16" if device.type == "cuda" else "fp32"):
                    fn(model, z, y, **kw)

            ms = timeit(lambda: go(counted), 0, 1, device)
            nfe = calls[0]
            net.set_fused_attention(False)
            if label == "sde":  # the official SDE evaluates the network twice per step (velocity, then score)
                def twice(*a, **k):
                    calls[0] += 1
                    net(*a, **k)
                    return net(*a, **k)
                base_ms = timeit(lambda: go(twice), 0, 1, device)
            else:
                base_ms = timeit(lambda: go(counted), 0, 1, device)
            net.set_fused_attention(True)
            rows.append(row(f"sample/{fam_name}", f"{label} {kw.get('num_steps')} steps, B={B}: img/s", B / ms * 1e3,
                            "img/s", B / base_ms * 1e3))
            rows.append(row(f"sample/{fam_name}", f"{label}: network calls per image batch", nfe, "NFE"))
    return rows


def bench_fid(args):
    """FID Inception feature extraction images/s (random weights: the speed is the same) and the Fréchet
    distance of 2048-d statistics: eigenvalue form (ours) against scipy.linalg.sqrtm (baseline)."""
    import numpy as np
    import fid
    device, rows = args.device, []
    model = fid.FIDInception().to(device).eval()
    B = 2 if args.smoke else (8 if device.type == "cpu" else 200)
    n = B if args.smoke else (2 * B if device.type == "cpu" else 10 * B)
    images = np.random.default_rng(0).integers(0, 256, size=(n, 256, 256, 3), dtype=np.uint8)
    for mode in ("pytorch-fid", "tf"):
        ms = timeit(lambda: fid.extract_features(images, model, mode=mode, batch_size=B, device=device), 0, 1,
                    device)
        rows.append(row("fid/inception", f"features img/s ({mode}, 256² input, batch {B})", n / ms * 1e3, "img/s"))
    dim = 64 if args.smoke else 2048
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((dim * 2, dim)), rng.standard_normal((dim * 2, dim)) + 0.1
    (mu1, s1), (mu2, s2) = fid.compute_statistics(a), fid.compute_statistics(b)
    t0 = time.perf_counter()
    fd = fid.frechet_distance(mu1, s1, mu2, s2)
    ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    fd_ref = fid.frechet_distance_sqrtm(mu1, s1, mu2, s2)
    base = time.perf_counter() - t0
    rows.append(row("fid/frechet", f"FD of {dim}-d statistics (baseline: scipy sqrtm)", ours, "s", base))
    rows.append(row("fid/frechet", "FD relative difference eig vs sqrtm", abs(fd - fd_ref) / abs(fd_ref), ""))
    return rows


def bench_data(args):
    """Data loading images/s: a JPEG folder (decode + ADM crop + flip) and the latent cache (memmap reads),
    through the trainer's DataLoader (2 workers)."""
    import tempfile
    import numpy as np
    from PIL import Image
    import data
    rows = []
    n, size = (16, 64) if args.smoke else ((256, 256) if args.full else (64, 256))
    workers = 0 if args.smoke else 2
    with tempfile.TemporaryDirectory() as root:
        rng = np.random.default_rng(0)
        for c in range(2):
            os.makedirs(os.path.join(root, "img", f"class{c}"))
            for i in range(n // 2):
                arr = rng.integers(0, 256, size=(size + 32, size + 64, 3), dtype=np.uint8)
                Image.fromarray(arr).save(os.path.join(root, "img", f"class{c}", f"{i}.jpg"), quality=90)

        def rate(ds, batch):
            loader, _ = data.make_loader(ds, batch, 0, 1, 0, workers)
            t0 = time.perf_counter()
            count = 0
            for batch_data in loader:
                count += len(batch_data[0])
            return count / (time.perf_counter() - t0)

        ds = data.ImageFolder(os.path.join(root, "img"), size)
        rows.append(row("data/jpeg", f"ImageFolder img/s ({size}², {workers} workers)", rate(ds, 16), "img/s"))
        try:
            import diffusers
            vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                                          norm_num_groups=8, sample_size=size,
                                          down_block_types=("DownEncoderBlock2D",) * 2,
                                          up_block_types=("UpDecoderBlock2D",) * 2)
            vae.save_pretrained(os.path.join(root, "vae"))
            data.build_cache(os.path.join(root, "img"), os.path.join(root, "cache"), image_size=size,
                             vae=os.path.join(root, "vae"), batch_size=16, num_workers=0, device="cpu",
                             log=lambda *a, **k: None)
            cache = data.LatentCache(os.path.join(root, "cache"))
            rows.append(row("data/cache", f"LatentCache img/s (latents {tuple(cache.latent_shape)}, {workers} workers)",
                            rate(cache, 16), "img/s"))
        except ImportError:
            rows.append(row("data/cache", "LatentCache img/s: skipped (pip install diffusers)", None, ""))
    return rows


# ----------------------------------------------------------------------------- main

SECTIONS = {
    "dispersive": bench_dispersive,
    "network": bench_network,
    "train": bench_train,
    "sample": bench_sample,
    "fid": bench_fid,
    "data": bench_data,
}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Speed and accuracy benchmarks, printed as one table.")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    parser.add_argument("--only", choices=sorted(SECTIONS), default=None, help="run one section only")
    parser.add_argument("--full", action="store_true", help="add the larger (slower) shapes to each section")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and few iterations, for a quick check")
    parser.add_argument("--json", action="store_true", help="print one JSON object (env, rows) instead of a table")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile in the network section")
    args = parser.parse_args(argv)
    args.device = pick_device(args.device)

    env = environment(args.device)
    if not args.json:
        print(" | ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    rows = []
    for name, fn in SECTIONS.items():
        if args.only in (None, name):
            t0 = time.perf_counter()
            section = fn(args)
            rows += section
            if not args.json:  # progress: each section's rows as soon as they exist
                print(f"[{name}: {time.perf_counter() - t0:.0f} s]", flush=True)
    if args.device.type != "cuda":  # the CUDA rows carry their own peak memory
        try:
            import resource
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
            rows.append(row("bench/process", "peak resident memory of this run (all sections)", rss / 2 ** 20,
                            "GiB"))
        except ImportError:  # not on this platform
            pass
    if args.json:
        print(json.dumps(dict(env=env, rows=rows), indent=1))
    else:
        print_table(rows)
    return rows


if __name__ == "__main__":
    main()
