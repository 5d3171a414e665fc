"""
Speed and accuracy of every part, one section per concern, printed as one table (the README's performance table):

    python bench.py                                         # every section, CPU-sized, on cuda > mps > cpu
    python bench.py --only train --smoke                    # one section, tiny shapes (the tests run --smoke)
    python bench.py --device cuda --full --compile --json   # GPU: XL/2 sizes, the paper's steps, MFU

A row is: name, what was measured, value and unit, the baseline measured in the same run (float32 eager, math
attention, the torch.pdist loss, the official SDE's two network calls per step, scipy's sqrtm), and ratio = value /
baseline. The variants of one model are timed interleaved, in a new random order each round, so drift of the machine
hits them alike. A section is a generator bench_x(args) of rows, registered in SECTIONS.
"""

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from contextlib import nullcontext
from functools import partial

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image

import data
import dit
import fid
import meanflow
import sample
import train
from dispersive import VARIANTS, DispersiveConfig, dispersive_loss


# ----------------------------------------------------------------------------- dispersive loss

def naive_dispersive(z, variant, tau=0.5, margin=1.0):
    """The baseline: the straightforward torch.pdist formulation (the official code's, for infonce_l2 at τ = 1);
    none for covariance (its explicit (d, d) matrix would not fit)."""
    z = z.reshape(len(z), -1)  # (B, d)
    if variant == "infonce_cos":  # ‖a − b‖² = 2 − 2cos for unit rows
        cos = 1 - torch.pdist(F.normalize(z, dim=1)).pow(2) / 2
        return torch.log(torch.exp(torch.cat([cos, cos, torch.ones(len(z), device=z.device)]) / tau).mean())
    D = torch.pdist(z).pow(2) / z.shape[1]  # the pairs i < j
    if variant == "hinge":  # the i < j half has the same mean as i ≠ j
        return (margin - D).clamp_min(0).pow(2).mean()
    return torch.log(torch.exp(-torch.cat([D, D, torch.zeros(len(z), device=z.device)]) / tau).mean())


def bench_dispersive(args):
    """fwd+bwd time of each variant against naive_dispersive; the float32 error of infonce_l2 against float64."""
    device, gen = args.device, torch.Generator().manual_seed(0)
    if args.smoke:
        shapes = [("tiny", 8, 4, 8)]
    else:  # the per-GPU batch 32 of SiT-B/2 (256 tokens × 768), XL/2 with --full; the global batch 256 on a GPU
        shapes = [(f"SiT-{s}", B, 256, D) for s, D in [("B/2", 768)] + [("XL/2", 1152)] * args.full  # d = 295k
                  for B in [32] + [256] * (device.type != "cpu" or args.full and s == "B/2")]
    for label, B, T, D in shapes:
        z, what = torch.randn(B, T, D, generator=gen).to(device).requires_grad_(True), f"{label} B={B}"
        for v in VARIANTS:
            fns = {"ours": lambda: torch.autograd.grad(dispersive_loss(z, v), z)}
            if v != "covariance":
                fns["base"] = lambda: torch.autograd.grad(naive_dispersive(z, v), z)
            ms = timeit(fns, device, *args.budget)
            yield row(f"dispersive/{v}", f"fwd+bwd {what} d={T * D} fp32", ms["ours"], "ms", ms.get("base"))
            if device.type == "cuda":
                mib = {k: peak_mib(fn, device) for k, fn in fns.items()}
                yield row(f"dispersive/{v}", f"extra peak memory {what}", mib["ours"], "MiB", mib.get("base"))
        with torch.no_grad():  # the float32 Gram formulation (TF32 if enabled) against float64; baseline: pdist's
            ref = dispersive_loss(z.double(), tau=1.0).item()
            err = [abs(f(z, "infonce_l2", tau=1.0).item() / ref - 1) for f in (dispersive_loss, naive_dispersive)]
            yield row("dispersive/infonce_l2", f"rel. error vs fp64 {what}", err[0], "", err[1])
            yield row("dispersive/infonce_l2", f"value at init {what} (−log B = {-np.log(B):.3f})",
                      dispersive_loss(z, tau=0.5).item(), "")


# ----------------------------------------------------------------------------- network, training, sampling

def bench_network(args):
    """Forward and forward+backward img/s of DiT: fused SDPA (ours) against math attention (the baseline) in float32
    eager; bf16 autocast and torch.compile where they pay (GPU, or --full); achieved TFLOP/s on known GPUs."""
    device, gen, more = args.device, torch.Generator().manual_seed(0), args.device.type == "cuda" or args.full
    variants = [("fp32", False)] + [("bf16", False)] * more + [("bf16", True)] * (more and args.compile)
    for name, B in sizes(args, "network"):
        model, _, x, y = active_model(name, args, B, gen)
        t = torch.randint(0, 1000, (B,), generator=gen).to(device)
        for precision, compiled in variants:
            net, label = torch.compile(model) if compiled else model, precision + " compile" * compiled

            def forward(backward):
                with autocast(device, precision), torch.set_grad_enabled(backward):
                    out = net(x, t, y)
                if backward:
                    out.float().square().mean().backward()

            for what, passes in (("fwd", 1), ("fwd+bwd", 3)):  # a backward pass costs about two forwards
                fns = {k: with_attention(model, k == "ours", partial(forward, passes > 1))
                       for k in ["ours"] + ["base"] * (label == "fp32")}
                ips = {k: B / ms * 1e3 for k, ms in timeit(fns, device, *args.budget).items()}
                yield row(f"network/{name}", f"{what} {label} B={B} img/s (baseline: math attention)", ips["ours"],
                          "img/s", ips.get("base"))
                if peak := peak_tflops(device, precision):
                    yield row(f"network/{name}", f"{what} {label} achieved TFLOP/s (MFU of {peak:g})",
                              2 * passes * dit_macs(model) * ips["ours"] / 1e12, "TFLOP/s", peak)


def bench_train(args):
    """One optimizer step (fused AdamW + EMA) per family: img/s with and without the dispersive term, its overhead,
    MeanFlow's step against SiT's (with and without training-time CFG); the baseline is float32 eager with math
    attention and the torch.pdist loss. All variants of a model are timed interleaved, round by round."""
    device, precision, none = args.device, args.precision, DispersiveConfig(variant="none")
    for name, B in sizes(args, "train"):
        model, family, make = trainer(name, B, args)
        disp = DispersiveConfig.preset("paper", model.depth)
        naive = copy.copy(disp)  # the baseline's loss: torch.pdist
        naive.loss = lambda z: naive_dispersive(z.float(), disp.variant, disp.tau)
        feats = torch.randn(B, model.x_embedder.num_patches, model.hidden_size, device=device, requires_grad=True)
        fns = {"ours_none": make(none, precision, True), "ours_disp": make(disp, precision, True),
               "base_none": make(none, "fp32", False), "base_disp": make(naive, "fp32", False),
               "disp_only": lambda: torch.autograd.grad(disp.loss(feats), feats)}  # on features of the block's shape
        sit_name = "SiT-" + name.split("-", 1)[1]
        if family == "meanflow":  # without training-time CFG (ω = 1, κ = 0: no guidance forward), and SiT of its size
            plain = meanflow.MeanFlow(**{**meanflow.MeanFlow_defaults[name], "omega": 1.0, "kappa": 0.0})
            fns["ours_none_nocfg"] = make(none, precision, True, objective=plain)
            fns["sit_none"] = trainer(sit_name, B, args)[2](none, precision, True)
        if args.compile:
            fns["ours_disp_compiled"] = make(disp, precision, True, compiled=True)
        ms = timeit(fns, device, args.budget[0] + 2 * args.compile, args.budget[1])  # compiling takes the first calls
        ips, what, r = {k: B / v * 1e3 for k, v in ms.items()}, f"{precision} B={B}", partial(row, f"train/{name}")
        yield r(f"step img/s, no disp ({what})", ips["ours_none"], "img/s", ips["base_none"])
        yield r(f"step img/s, with disp block {disp.resolve_block(model.depth)} ({what})", ips["ours_disp"], "img/s",
                ips["base_disp"])
        if args.compile:
            yield r(f"step img/s, with disp, torch.compile network ({what})", ips["ours_disp_compiled"], "img/s",
                    ips["ours_disp"])
        yield r("dispersive overhead, step vs step (baseline: pdist loss)",
                100 * (ms["ours_disp"] / ms["ours_none"] - 1), "%", 100 * (ms["base_disp"] / ms["base_none"] - 1))
        yield r("dispersive loss fwd+bwd alone, % of the step", 100 * ms["disp_only"] / ms["ours_none"], "%")
        if (peak := peak_tflops(device, precision)) and family != "meanflow":  # a step: the FLOPs of 3 forwards
            yield r("MFU with disp (3 × fwd FLOPs)", 100 * 3 * 2 * dit_macs(model) * ips["ours_disp"] / (peak * 1e12),
                    "%")
        if device.type == "cuda":
            yield r(f"peak memory ({what})", peak_mib(fns["ours_disp"], device, extra=False) / 2 ** 10, "GiB")
        if family == "meanflow":
            yield r(f"step time vs {sit_name}, training-time CFG ({what})", ms["ours_none"], "ms", ms["sit_none"])
            yield r(f"step time vs {sit_name}, no CFG (ω = 1, κ = 0)", ms["ours_none_nocfg"], "ms", ms["sit_none"])
        del model, make, fns, feats  # before the next model: the peak memory rows count everything allocated


def bench_sample(args):
    """Sampling img/s and network calls per image batch of each sampler. The baseline runs the same sampler with math
    attention in float32, and for the SDE the official two network calls per step (velocity, then score)."""
    device, gen = args.device, torch.Generator().manual_seed(0)
    steps = ((3, 2, 3, 3, 3) if args.smoke else (250, 125, 250, 250, 50) if args.full or device.type == "cuda"
             else (10, 5, 10, 10, 5))  # the papers' steps; on a 2-core CPU a tenth (rates convert by NFE per image)
    cases = [(f, s, dict(sampler=s, num_steps=n))
             for f, s, n in zip(["SiT"] * 3 + ["DiT"] * 2, ("sde", "ode-heun", "ode-euler", "ddpm", "ddim"), steps)]
    cases += [("MeanFlow", f"{n}-NFE", dict(num_steps=n)) for n in (1, 2)]
    for name, B in sizes(args, "sample"):
        size_name = name.split("-", 1)[1]
        nets = {f: active_model(f"{f}-{size_name}", args, B, gen) for f in FAMILIES}
        for fam, label, kw in cases:
            (net, family, z, y), calls = nets[fam], []
            net.eval()  # no label dropout

            def counted(*a, **k):  # ours, counting the network calls
                calls.append(1)
                return net(*a, **k)

            def official(*a, **k):  # the official SDE evaluates the network twice per step
                return (net(*a, **k), net(*a, **k))[1] if label == "sde" else net(*a, **k)

            def run(model, precision):
                with autocast(device, precision):
                    sample.generate(family, model, z, y, **kw)

            ms = timeit({"ours": with_attention(net, True, partial(run, counted, args.precision)),
                         "base": with_attention(net, False, partial(run, official, "fp32"))}, device, 0, 1)
            yield row(f"sample/{fam}-{size_name}", f"{label} {kw['num_steps']} steps, B={B}: img/s",
                      B / ms["ours"] * 1e3, "img/s", B / ms["base"] * 1e3)
            yield row(f"sample/{fam}-{size_name}", f"{label}: network calls per image batch", len(calls), "NFE")


# ----------------------------------------------------------------------------- FID, data

def sqrtm_frechet(mu1, sigma1, mu2, sigma2):
    """The baseline: the reference formula (TTUR, pytorch-fid, ADM's evaluator) with scipy.linalg.sqrtm of Σ1 Σ2."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def bench_fid(args):
    """FID Inception feature extraction img/s (random weights: the speed is the same) and the Fréchet distance of
    2048-d statistics: eigenvalue form (ours) against scipy.linalg.sqrtm (the baseline)."""
    device, model = args.device, fid.FIDInception().to(args.device).eval()
    B, n = (2, 2) if args.smoke else (8, 16) if device.type == "cpu" else (200, 2000)  # batch, images
    images = np.random.default_rng(0).integers(0, 256, size=(n, 256, 256, 3), dtype=np.uint8)
    ms = timeit({m: partial(fid.extract_features, images, model, mode=m, batch_size=B, device=device)
                 for m in ("pytorch-fid", "tf")}, device, 0, 1)
    for mode, t in ms.items():
        yield row("fid/inception", f"features img/s ({mode}, 256² input, batch {B})", n / t * 1e3, "img/s")
    dim, rng, fd = 64 if args.smoke else 2048, np.random.default_rng(0), {}
    a, b = rng.standard_normal((dim * 2, dim)), rng.standard_normal((dim * 2, dim)) + 0.1
    stats = (*fid.compute_statistics(a), *fid.compute_statistics(b))  # mu1, s1, mu2, s2
    ms = timeit({"ours": lambda: fd.update(ours=fid.frechet_distance(*stats)),
                 "base": lambda: fd.update(base=sqrtm_frechet(*stats))}, device, 0, 1)
    yield row("fid/frechet", f"FD of {dim}-d statistics (baseline: sqrtm)", ms["ours"] / 1e3, "s", ms["base"] / 1e3)
    yield row("fid/frechet", "FD relative difference eig vs sqrtm", abs(fd["ours"] / fd["base"] - 1), "")


def bench_data(args):
    """Data loading img/s through the trainer's DataLoader: a JPEG folder (decode + ADM crop + flip) and the latent
    cache (memmap reads)."""
    n, size = (16, 64) if args.smoke else ((256, 256) if args.full else (64, 256))
    workers = 0 if args.smoke else 2

    def rate(dataset):  # img/s of one epoch
        t0, loader = time.perf_counter(), data.make_loader(dataset, 16, 0, 1, 0, workers)[0]
        return sum(len(batch[0]) for batch in loader) / (time.perf_counter() - t0)

    with tempfile.TemporaryDirectory() as root:
        rng, img = np.random.default_rng(0), os.path.join(root, "img")
        for i in range(n):  # two classes
            os.makedirs(os.path.join(img, f"class{i % 2}"), exist_ok=True)
            arr = rng.integers(0, 256, size=(size + 32, size + 64, 3), dtype=np.uint8)
            Image.fromarray(arr).save(os.path.join(img, f"class{i % 2}", f"{i}.jpg"), quality=90)
        yield row("data/jpeg", f"ImageFolder img/s ({size}², {workers} workers)", rate(data.ImageFolder(img, size)),
                  "img/s")
        try:
            import diffusers
        except ImportError:
            yield row("data/cache", "LatentCache img/s: skipped (pip install diffusers)", None, "")
            return
        vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                                      norm_num_groups=8, sample_size=size, down_block_types=("DownEncoderBlock2D",) * 2,
                                      up_block_types=("UpDecoderBlock2D",) * 2)  # a tiny random VAE: speed only
        vae.save_pretrained(os.path.join(root, "vae"))
        data.build_cache(img, os.path.join(root, "cache"), image_size=size, vae=os.path.join(root, "vae"),
                         batch_size=16, num_workers=0, device="cpu", log=lambda *a, **k: None)
        cache = data.LatentCache(os.path.join(root, "cache"))
        yield row("data/cache", f"LatentCache img/s (latents {cache.latent_shape}, {workers} workers)", rate(cache),
                  "img/s")


def bench_ablation(args):
    """The paper's claim on the CPU demo (`python train.py`): no regulariser, the paper's and the official presets and
    the contrastive baseline, 3 seeds each (1 seed, 10 steps at 16² with --smoke): shape accuracy (probe.py) at step
    1,000 and of the final grid, its shape FD, as mean ± sample std, and the run time. About an hour on 2 cores: it
    runs only with --only ablation."""
    settings = {"none": ["--disp", "none"], "paper": [], "official": ["--disp-preset", "official"],
                "contrastive": ["--disp", "contrastive"]}
    smoke = ["--steps", "10", "--sample-every", "10", "--image-size", "16"] * args.smoke  # grids at 0 and 10
    with tempfile.TemporaryDirectory() as root:
        for name, flags in settings.items():
            runs = []
            for seed in range(1 if args.smoke else 3):
                t0, argv = time.perf_counter(), [*flags, *smoke, "--global-seed", str(seed), "--results-dir", root]
                with open(os.path.join(train.main(argv)["run_dir"], "metrics.jsonl")) as f:
                    grids = [json.loads(line) for line in f if '"shape_acc"' in line]  # steps 0, 1000, ..., final
                runs.append((grids[1]["shape_acc"], grids[-1]["shape_acc"], grids[-1]["shape_fd"],
                             (time.perf_counter() - t0) / 60))
            early, acc, fd, minutes = np.mean(runs, 0)
            early_sd, acc_sd, fd_sd, _ = np.std(runs, 0, ddof=len(runs) > 1)  # the sample std of the seeds
            what, r = f"{len(runs)} seeds: mean, ± std", partial(row, f"ablation/{name}")
            yield r(f"shape accuracy, step {grids[1]['step']} ({what})", early, f"± {early_sd:.3f}")
            yield r(f"shape accuracy, final grid ({what})", acc, f"± {acc_sd:.3f}")
            yield r(f"shape FD, final grid ({what})", fd, f"± {fd_sd:.3f}")
            yield r("run time, mean", minutes, "min")


SECTIONS = {"dispersive": bench_dispersive, "network": bench_network, "train": bench_train, "sample": bench_sample,
            "fid": bench_fid, "data": bench_data, "ablation": bench_ablation}


# ----------------------------------------------------------------------------- models: sizes, setup, FLOPs

FAMILIES = ("SiT", "MeanFlow", "DiT")


def sizes(args, section):
    """[(model, batch)] of a section: T/4 with --smoke, else CPU-sized; the papers' on a GPU (XL/2 with --full)."""
    gpu, full = args.device.type == "cuda", args.full
    if args.smoke:
        return {"network": [("DiT-T/4", 2)], "sample": [("SiT-T/4", 2)],
                "train": [(f"{f}-T/4", 4) for f in FAMILIES]}[section]
    if section == "network":
        return [(f"DiT-{s}", 32 if gpu else 4) for s in ["S/2"] + ["B/2"] * (gpu or full) + ["XL/2"] * (gpu and full)]
    if section == "train":
        return ([(f"{f}-{'XL/2' if full else 'B/2'}", 32) for f in FAMILIES] if gpu else
                [("SiT-B/2", 4)] * full + [(f"{f}-B/4", 8 if full else 4) for f in FAMILIES])
    return [("SiT-XL/2" if full else "SiT-B/2", 16)] if gpu else [("SiT-B/2" if full else "SiT-B/4", 2)]


def active_model(name, args, B, gen=None):
    """(model, family, x, y): the model on args.device for ImageNet 256² latents (32² pixels with --smoke) with every
    layer active as after some training (adaLN-Zero's zero weights get small random ones), and a random batch."""
    torch.manual_seed(0)
    model, family = sample.build_model(name, 32 if args.smoke else 256, 10 if args.smoke else 1000, not args.smoke)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.abs().sum() == 0:
                p.normal_(0, 0.02)
    model, gen = model.to(args.device), gen or torch.Generator().manual_seed(0)
    x = torch.randn(B, model.in_channels, model.input_size, model.input_size, generator=gen).to(args.device)
    return model, family, x, torch.randint(0, model.num_classes, (B,), generator=gen).to(args.device)


def trainer(name, B, args):
    """(model, family, make): make(disp, precision, fused, objective=None, compiled=False) -> a callable running one
    train.train_step (fused AdamW, EMA) on one fixed batch; objective None: the family's (train.build_objective)."""
    model, family, x, y = active_model(name, args, B)
    params = list(model.parameters())
    opt, ema = torch.optim.AdamW(params, lr=1e-4, weight_decay=0, fused=True), [p.detach().clone() for p in params]
    default = train.build_objective(name, family)

    def make(disp, precision, fused, objective=None, compiled=False):
        loss = train.TrainLoss(torch.compile(model) if compiled else model, objective or default, disp, model.depth)
        return with_attention(model, fused, lambda: train.train_step(
            loss, opt, lambda: (x, y), autocast=partial(autocast, args.device, precision), ema=(ema, params)))
    return model, family, make


def with_attention(model, fused, fn):
    """fn, run with fused SDPA (ours) or explicit math attention (the baseline) in `model`."""
    return lambda: (model.set_fused_attention(fused), fn())


def autocast(device, precision):
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def dit_macs(model):
    """Multiply-adds of one forward pass per image, counted analytically (DiT's "118.6 GFLOPs" for XL/2 at 256² is
    this count, fvcore's convention: one multiply-add = one flop). Real FLOPs are twice this."""
    T, D, p, C = model.x_embedder.num_patches, model.hidden_size, model.patch_size, model.in_channels
    per_block = 12 * T * D * D + 2 * T * T * D + 6 * D * D  # qkv, proj, mlp (8TD²); QKᵀ and AV; adaLN
    return model.depth * per_block + T * D * p * p * (C + model.out_channels) + 256 * D + 3 * D * D  # + embeddings


def peak_tflops(device, precision):
    """Dense peak TFLOP/s of the GPU for MFU; None when unknown."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    table = {"H100": (989.0, 494.5), "H200": (989.0, 494.5), "A100": (312.0, 156.0)}  # (bf16, tf32)
    return next((bf16 if precision == "bf16" else tf32 for k, (bf16, tf32) in table.items() if k in name), None)


# ----------------------------------------------------------------------------- timing, memory, table

def timeit(fns, device, warmup, rounds):
    """Median wall time in ms of each callable of the dict `fns`, timed in turn within each round (in a new random
    order each round), so that drift of the machine and the traces one variant leaves for the next (allocator,
    caches) hit every variant alike and the ratios between them hold."""
    for fn in list(fns.values()) * warmup:
        fn()
    times, order = {name: [] for name in fns}, np.random.default_rng(0)
    for _ in range(rounds):
        for name in order.permutation(list(fns)):
            synchronize(device)
            t0 = time.perf_counter()
            fns[name]()
            synchronize(device)  # asynchronous kernels must finish inside the timed interval
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


def synchronize(device):
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def peak_mib(fn, device, extra=True):
    """Peak CUDA memory while fn() runs, in MiB; extra=True: above what was allocated before (host-side counts)."""
    before = torch.cuda.memory_allocated(device) if extra else 0
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20


def row(name, what, value, unit, baseline=None):
    """One table row; ratio = value / baseline."""
    return dict(name=name, what=what, value=value, unit=unit, baseline=baseline,
                ratio=value / baseline if baseline not in (None, 0) and value is not None else None)


def environment(device):
    with open("/proc/cpuinfo") if os.path.exists("/proc/cpuinfo") else nullcontext([]) as f:  # Linux: the model name
        cpu = next((s.split(":", 1)[1].strip() for s in f if s.startswith("model name")), platform.processor())
    env = dict(cpu=cpu, cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
               python=platform.python_version(), device=str(device))
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    return env


def print_table(rows):
    cols = ["name", "what", "value", "unit", "baseline", "ratio"]
    cells = [["-" if r[c] is None else f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols]
             for r in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(cols)]
    for line in [cols, ["-" * w for w in widths]] + cells:  # text left-aligned, numbers right-aligned
        print("  ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in enumerate(zip(line, widths))))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Speed and accuracy benchmarks, printed as one table.")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    parser.add_argument("--only", choices=sorted(SECTIONS), default=None, help="run one section only")
    parser.add_argument("--full", action="store_true", help="add the larger (slower) shapes to each section")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and few iterations, for a quick check")
    parser.add_argument("--json", action="store_true", help="print one JSON object (env, rows) instead of a table")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (network and train sections)")
    args = parser.parse_args(argv)
    args.device = torch.device(dit.default_device() if args.device == "auto" else args.device)
    args.precision = "bf16" if args.device.type == "cuda" else "fp32"  # of "ours"; the baselines run in float32
    args.budget = (1, 1) if args.smoke else ((1, 3) if args.device.type == "cpu" else (5, 20))  # warmup, rounds
    env, rows = environment(args.device), []
    if not args.json:
        print(" | ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    for name, section in SECTIONS.items():
        if args.only == name or args.only is None and name != "ablation":
            t0 = time.perf_counter()
            rows += section(args)
            if not args.json:  # progress: a section takes minutes
                print(f"[{name}: {time.perf_counter() - t0:.0f} s]", flush=True)
    if args.device.type != "cuda" and os.name == "posix":  # the CUDA rows carry their own peak memory
        import resource
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        rows.append(row("bench/process", "peak resident memory of this run (all sections)", rss / 2 ** 20, "GiB"))
    if args.json:
        print(json.dumps(dict(env=env, rows=rows), indent=1))
    else:
        print_table(rows)
    return rows


if __name__ == "__main__":
    main()
