"""
Sample DiT / SiT / MeanFlow checkpoints: a PNG grid, or N samples in ADM's .npz format for FID (arr_0 uint8
(N, H, W, 3), arr_1 int64 labels, meta: a JSON string of every setting that changes the images).

    python sample.py --ckpt runs/sit-b2 --cfg-scale 4.0                               # grid of 8 classes, EMA
    torchrun --standalone --nproc_per_node=8 sample.py --ckpt runs/sit-b2 --num-samples 50000 --out sit-b2.npz
    torchrun --nnodes=2 --node_rank=$NODE_RANK --nproc_per_node=8 --master_addr=$MASTER --master_port=29500 \
        sample.py --ckpt runs/sit-xl2 --num-samples 50000 --out /shared/sit-xl2.npz      # --out on a shared disk

--ckpt takes our run folders and checkpoints, the official DiT/SiT train.py checkpoints, and released weights
(with --model and --image-size). Sample i's label and noise (initial and every stochastic step) depend only on
(seed, i), so the file is the same for any number of GPUs and batch size (dopri5 alone adapts its steps to the
whole batch: meta then records --batch-size). Shards of --shard-size samples make a run resumable: rerun it.
"""

import argparse
import difflib
import json
import math
import os
import sys
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import data
import dit
import meanflow
import sit

MODELS = {**dit.DiT_models, **sit.SiT_models, **meanflow.MeanFlow_models}
SAMPLERS = {"dit": ("ddpm", "ddim"), "sit": sit.SAMPLERS, "meanflow": ("meanflow",)}  # the first is the paper's
OPTIONS = {"dit": ("cfg_scale", "guide_channels", "eta"), "meanflow": (),  # the flags each family's sampler takes
           "sit": ("cfg_scale", "guide_channels", "guidance_interval", "path", "atol", "rtol")}
DEFAULT_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]          # the official DiT sample.py grid
# SiT's --sampling-method names: SDE Euler, Heun; ODE (torchdiffeq) euler, heun2, dopri5
SIT_METHODS = {"Euler": "sde", "Heun": "sde-heun", "euler": "ode-euler", "heun": "ode-heun", "heun2": "ode-heun"}


# ---------------------------------------------------------------------------------------------------------
# Model: our checkpoints, official DiT/SiT training checkpoints, released raw state dicts
# ---------------------------------------------------------------------------------------------------------

def family_of(name):
    """'dit' | 'sit' | 'meanflow' of a registry name; ValueError naming close matches for an unknown one."""
    if name not in MODELS:
        close = difflib.get_close_matches(str(name), list(MODELS), n=4, cutoff=0.4) or list(MODELS)
        raise ValueError(f"unknown model {name!r}: did you mean {' or '.join(close)}?")
    return {"DiT": "dit", "SiT": "sit", "MeanFlow": "meanflow"}[name.split("-")[0]]


def build_model(name, image_size, num_classes, latent, class_dropout_prob=0.1):
    """(model, family) in pixel space (3 channels, image_size) or SD-VAE latents (4 channels, image_size // 8)."""
    family, factor, patch = family_of(name), 8 if latent else 1, int(name.rsplit("/", 1)[1])
    if image_size % (patch * factor):
        raise ValueError(f"image size {image_size} is not divisible by {'8 (the VAE) × ' * latent}the patch size "
                         f"{patch} of {name}: use a multiple of {patch * factor}.")
    return MODELS[name](input_size=image_size // factor, in_channels=4 if latent else 3, num_classes=num_classes,
                        class_dropout_prob=class_dropout_prob), family


def load_model(ckpt, model_name=None, image_size=None, weights="ema"):
    """(model in eval mode on the CPU, family, cfg) from our checkpoint (its `config`), an official DiT/SiT
    train.py checkpoint (its `args`) or a released raw state dict (model_name and image_size needed)."""
    base = os.path.basename(str(ckpt))
    release = not os.path.exists(ckpt) and base in dit.PRETRAINED_URLS   # fetched once into torch.hub's cache
    obj = dit.load_url(dit.PRETRAINED_URLS[base], file_name=base) if release else dit.read_checkpoint(ckpt)
    a = obj.get("args") if isinstance(obj, dict) else None
    if isinstance(obj, dict) and isinstance(obj.get("config"), dict):   # ours: the config names the model
        cfg = dict(obj["config"], step=obj.get("step"))
    elif isinstance(a, argparse.Namespace):                   # official train.py: only SiT's args have a path_type
        if getattr(a, "prediction", "velocity") != "velocity":
            raise ValueError(f"{ckpt} predicts the {a.prediction}: only velocity-predicting SiTs can be sampled here.")
        cfg = dict(model=("SiT-" if hasattr(a, "path_type") else "DiT-") + a.model.split("-", 1)[-1], latent=True,
                   image_size=a.image_size, num_classes=a.num_classes, vae=getattr(a, "vae", "ema"), step=None,
                   path=getattr(a, "path_type", "linear").lower())
    else:                                                     # released weights: a raw state dict
        if model_name is None or image_size is None:
            raise ValueError(f"{ckpt} is a raw state dict: give its --model and --image-size (e.g. DiT-XL/2, 256).")
        named = base.split("-")[0]                            # DiT-XL-2-256x256.pt: only a name can tell
        if named in ("DiT", "SiT", "MeanFlow") and named != model_name.split("-")[0]:
            raise ValueError(f"{base} looks like {named} weights but --model is {model_name}: pass a {named} --model.")
        state = dit.state_dict_of(obj, prefer=weights) if isinstance(obj, dict) else {}
        w, table = state.get("x_embedder.proj.weight"), state.get("y_embedder.embedding_table.weight")
        if w is None or table is None:
            raise ValueError(f"{ckpt} is not a DiT/SiT/MeanFlow state dict (no x_embedder / y_embedder weights).")
        obj, cfg = {weights: state}, dict(model=model_name, image_size=image_size, latent=w.shape[1] != 3, step=None,
                                          num_classes=table.shape[0] - 1, vae="ema", raw=True)
        # important! DiT and SiT weights share one layout: only the user can say which family they are
        cfg["note"] = f"note: {base} is sampled as {family_of(model_name)} because --model is {model_name}"
    if model_name not in (None, cfg["model"]):
        raise ValueError(f"{ckpt} is a {cfg['model']} checkpoint but --model is {model_name}: drop --model.")
    if image_size not in (None, cfg["image_size"]):
        raise ValueError(f"{ckpt} was trained at {cfg['image_size']}px but --image-size is {image_size}: drop it.")
    if not isinstance(obj.get(weights), dict):
        raise ValueError(f"{ckpt} has no '{weights}' weights: choose the other --weights (ema or model).")
    model, family = build_model(cfg["model"], cfg["image_size"], cfg["num_classes"], cfg["latent"],
                                cfg.get("class_dropout_prob", 0.1))
    return dit.load_checkpoint(model, obj[weights]).eval().requires_grad_(False), family, cfg


# ---------------------------------------------------------------------------------------------------------
# Per-sample randomness: everything about sample i depends only on (seed, i)
# ---------------------------------------------------------------------------------------------------------

def sample_seed(seed, index):
    """Seed of sample `index`'s generator: splitmix64(seed) plus an odd multiple of the index, a bijection mod 2**32
    (torch's CPU generator keeps 32 bits: a 64-bit hash would make two of 50K samples share noise with p ~25%)."""
    x = (seed + 0x9E3779B97F4A7C15) % 2**64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return ((x ^ (x >> 31)) + index * 0x9E3779B1) % 2**32


def make_labels(indices, num_classes, seed, class_mode):
    """Labels of sample indices, each a function of (seed, i, num_classes, class_mode) only. uniform: i.i.d. as in
    DiT/SiT's sample_ddp.py; balanced: every aligned group of num_classes indices holds each class once."""
    indices, out = np.asarray(indices, dtype=np.int64), np.empty(len(indices), dtype=np.int64)
    for group in np.unique(indices // num_classes):
        rng = np.random.default_rng([seed, 1, int(group)])  # stream 1: labels (noise uses torch generators)
        table = rng.permutation(num_classes) if class_mode == "balanced" else rng.integers(0, num_classes, num_classes)
        sel = indices // num_classes == group
        out[sel] = table[indices[sel] % num_classes]
    return out


def indexed_noise(seed, indices):
    """noise(x): standard normal like x (one row per index) whose row j comes from sample indices[j]'s own CPU
    generator; it makes the initial noise and, as a sampler's `generator`, every step's noise, so a sample's noise
    is the same in any batch and on any device."""
    generators = [torch.Generator().manual_seed(sample_seed(seed, int(i))) for i in indices]
    return lambda x: torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators]).to(x.device, x.dtype)


# ---------------------------------------------------------------------------------------------------------
# Sampling and images
# ---------------------------------------------------------------------------------------------------------

def generate(family, model, z, y, sampler=None, num_steps=None, cfg_scale=1.0, generator=None, **options):
    """x in model space (latents, or pixels in [-1, 1]) from noise z and labels y by the family's sampler, with the
    options it takes (dit: guide_channels, eta; sit: guide_channels, guidance_interval, path, atol, rtol; progress)."""
    options = {k: v for k, v in options.items() if k in OPTIONS[family] + ("progress",)}  # e.g. path only for SiT
    if family == "meanflow":
        assert cfg_scale == 1.0 and sampler in (None, "meanflow"), "MeanFlow's guidance is trained in"
        return meanflow.sample(model, z, y, num_steps=num_steps or 1, **options)
    return (dit.sample if family == "dit" else sit.sample)(
        model, z, y, sampler=sampler or SAMPLERS[family][0], num_steps=num_steps or 250, cfg_scale=cfg_scale,
        generator=generator, **options)


def to_uint8(x):
    """[-1, 1] images (N, 3, H, W) -> uint8 (N, H, W, 3) by DiT/ADM's clamp(127.5 x + 128, 0, 255)."""
    return torch.clamp(127.5 * x.float() + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _atomic(path, write):
    """write(file) into a temporary file, then rename it: a file on disk is always complete, whatever stops us."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(f"{path}.tmp{os.getpid()}", "wb") as f:
        write(f)
    os.replace(f"{path}.tmp{os.getpid()}", path)


def save_pngs(folder, start, images):
    """Sample start + j as folder/{start + j:06d}.png, the layout of DiT's sample_ddp.py (pytorch-fid, clean-fid);
    nothing when folder is None."""
    for i, image in enumerate(images if folder else [], start):
        _atomic(os.path.join(folder, f"{i:06d}.png"), lambda f: Image.fromarray(image).save(f, format="PNG"))


def save_grid(images, path, nrow, padding=2):
    """uint8 (n, H, W, 3) -> one PNG of nrow images per row on black padding (torchvision make_grid's layout)."""
    n, H, W, _ = images.shape
    grid = np.zeros((math.ceil(n / nrow) * (H + padding) + padding, nrow * (W + padding) + padding, 3), np.uint8)
    for i, img in enumerate(images):
        y, x = padding + i // nrow * (H + padding), padding + i % nrow * (W + padding)
        grid[y: y + H, x: x + W] = img
    _atomic(path, lambda f: Image.fromarray(grid).save(f, format="PNG"))
    return path


class Grids:
    """train.py's sample grids: fixed noise sampled with the EMA weights, one row per class (at most 10), written as
    run_dir/samples_<tag>.png; on the built-in shapes also their shape accuracy and shape FD (probe.py). A call returns
    the metrics row."""

    def __init__(self, cfg, family, ema, device, autocast, log):
        self.cfg, self.family, self.ema, self.device, self.autocast, self.log = cfg, family, ema, device, autocast, log
        rows = torch.linspace(0, max(cfg.num_classes - 1, 0), max(1, min(cfg.num_classes, 10))).round().long()
        self.y = rows.repeat_interleave(cfg.grid_per_class).to(device)
        noise = torch.Generator().manual_seed(cfg.global_seed)
        self.z = torch.randn(len(self.y), ema.in_channels, ema.input_size, ema.input_size, generator=noise).to(device)
        self.vae = data.load_vae(cfg.vae, device) if cfg.latent else None

    @torch.no_grad()
    def __call__(self, step, tag=None):
        cfg, t0 = self.cfg, time.time()
        # fork_rng: sampling must not move the training RNG (bit-exact resume)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), self.autocast():
            x = generate(self.family, self.ema, self.z, self.y, cfg.grid_sampler, cfg.grid_steps,
                         1.0 if self.family == "meanflow" else cfg.grid_cfg, path=cfg.path)
            if self.vae is not None:
                x = torch.cat([self.vae.decode(b.float() / data.VAE_SCALE).sample for b in x.split(32)])
        images = to_uint8(x)
        path = save_grid(images, f"{cfg.run_dir}/samples_{tag or f'{step:06d}'}.png", cfg.grid_per_class)
        metrics = {}
        if not (cfg.data_path or cfg.latent_cache):  # the built-in shapes: do the samples show the asked-for shapes?
            import probe  # lazily: it brings fid.py and scipy, which no other run needs
            metrics = probe.shape_metrics(images, self.y.cpu().numpy())
        self.log(f"wrote {path} ({time.time() - t0:.1f}s)" + "".join(f" | {k} {v:.4g}" for k, v in metrics.items()))
        return dict(step=step, **metrics)


# ---------------------------------------------------------------------------------------------------------
# Shards and the merged npz
# ---------------------------------------------------------------------------------------------------------

def write_npz(file, shard_files, num_samples, meta):
    """Stream the shards into one npz (arr_0, arr_1, meta), one shard in memory at a time."""
    with zipfile.ZipFile(file, "w", allowZip64=True) as zf:  # stored, not compressed, as np.savez
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            shape = (num_samples,) + np.load(shard_files[0])["arr_0"].shape[1:]
            np.lib.format.write_array_header_1_0(f, dict(descr="|u1", fortran_order=False, shape=shape))
            for name in shard_files:
                f.write(np.load(name)["arr_0"].tobytes())
        labels = np.concatenate([np.load(name)["arr_1"] for name in shard_files]).astype(np.int64)
        for key, arr in (("arr_1", labels), ("meta", np.array(json.dumps(meta)))):
            with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, arr, allow_pickle=False)


def run_npz(draw, args, meta, num_classes, rank, world, log):
    """Sample this process's missing shards (shard k belongs to rank k % world), then merge them on rank 0."""
    N, S, shard_dir = args.num_samples, args.shard_size, os.path.splitext(args.out)[0] + "_shards"
    settings, meta_file = dict(meta, shard_size=S), os.path.join(shard_dir, "meta.json")
    shards = {s: os.path.join(shard_dir, f"shard_{s:07d}.npz") for s in range(0, N, S)}
    # every process reads the same meta.json: rank 0 writes it (atomically) only when it holds these settings
    old = json.load(open(meta_file)) if os.path.exists(meta_file) else settings
    diff = ", ".join(f"{k} {old.get(k)} -> {v}" for k, v in settings.items() if old.get(k) != v)
    if diff:
        _fail(f"the shards in {shard_dir} were made with other settings ({diff}): rerun with those settings, or "
              f"remove the folder or choose another --out to start afresh.")
    if rank == 0:
        _atomic(meta_file, lambda f: f.write(json.dumps(settings, indent=1).encode()))
        log(f"{sum(map(os.path.exists, shards.values()))}/{len(shards)} shards of {S} already in {shard_dir}")
    mine = [s for s in list(shards)[rank::world] if not os.path.exists(shards[s])][:args.max_shards]
    progress = dit.Progress(sum(min(S, N - s) for s in mine), f"samples (rank 0 of {world})", enabled=rank == 0)
    for start in mine:
        labels = make_labels(range(start, min(start + S, N)), num_classes, args.seed, args.class_mode)
        images = draw(start, labels)
        _atomic(shards[start], lambda f: np.savez(f, arr_0=images, arr_1=labels))
        progress.update(len(labels))
    progress.close()
    if world > 1:
        dist.barrier()
    if rank != 0 or not all(map(os.path.exists, shards.values())):
        log(f"some shards are still missing in {shard_dir}: rerun the same command to resume")
        return rank != 0
    for s, name in shards.items() if args.sample_dir else ():  # PNGs on rank 0: right even after a resume
        save_pngs(args.sample_dir, s, np.load(name)["arr_0"])
    _atomic(args.out, lambda f: write_npz(f, list(shards.values()), N, meta))
    log(f"wrote {args.out} ({N} samples)" + f" and {N} PNGs into {args.sample_dir}" * bool(args.sample_dir))
    for name in [] if args.keep_shards else os.listdir(shard_dir):
        if name.startswith(("shard_", "meta.json")):  # shards, meta.json and writes cut short
            os.remove(os.path.join(shard_dir, name))
    if not os.listdir(shard_dir):
        os.rmdir(shard_dir)
    return True


# ---------------------------------------------------------------------------------------------------------
# Script
# ---------------------------------------------------------------------------------------------------------

POSITIVE = dit.checked(int, lambda v: v > 0, "an integer >= 1")
NATURAL = dit.checked(int, lambda v: v >= 0, "an integer >= 0")
NONNEGATIVE = dit.checked(float, lambda v: 0 <= v < math.inf, "a number >= 0")
UNIT = dit.checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
TOLERANCE = dit.checked(float, lambda v: 0 < v < 1, "a number in (0, 1)")


def get_parser():
    p = argparse.ArgumentParser(description="Sample a grid PNG, or --num-samples images into an npz for FID.")
    add = p.add_argument
    add("mode", nargs="?", choices=["ODE", "SDE"], help="SiT's sample.py mode: ODE (default method dopri5) or SDE")
    add("--ckpt", required=True, help="run folder or checkpoint (ours, official DiT/SiT), or DiT/SiT-XL-2-256x256.pt")
    add("--model", help="model name, e.g. DiT-XL/2 (needed for released weights)")
    add("--image-size", type=POSITIVE, help="image size in pixels (needed for released weights)")
    add("--weights", default="ema", choices=["ema", "model"], help="which weights of a training checkpoint")
    add("--vae", help="SD-VAE of latent models: ema, mse or a local diffusers folder (default: the checkpoint's)")
    add("--sampler", "--sampling-method", type=lambda s: SIT_METHODS.get(s, s), choices=sum(SAMPLERS.values(), ()),
        metavar="NAME", help="dit: ddpm (default), ddim; sit: sde (default), sde-heun, ode-euler, ode-heun, dopri5 "
        "(SiT's Euler, Heun, euler, heun2 too); meanflow: meanflow")
    add("--num-steps", "--num-sampling-steps", type=POSITIVE, help="sampling steps (default: dit, sit 250; meanflow 1)")
    add("--cfg-scale", type=NONNEGATIVE, default=1.0, help="classifier-free guidance scale (1: none, 0: unconditional)")
    add("--guide-channels", type=POSITIVE, help="guide only the first k channels (3: the official DiT/SiT code)")
    add("--guidance-interval", type=UNIT, nargs=2, default=[0.0, 1.0], metavar=("LO", "HI"),
        help="SiT: guide only for t in [LO, HI] (t = 1 is data)")
    add("--eta", type=UNIT, default=0.0, help="DDIM η (0: deterministic, 1: DDPM-like)")
    add("--path", "--path-type", type=str.lower, choices=["linear", "gvp", "vp"], help="SiT interpolant (SiT's "
        "Linear, GVP, VP too; default: the checkpoint's, linear for released weights)")
    add("--atol", type=TOLERANCE, default=1e-6, help="dopri5 absolute tolerance (SiT's default)")
    add("--rtol", type=TOLERANCE, default=1e-3, help="dopri5 relative tolerance (SiT's default)")
    add("--seed", "--global-seed", type=NATURAL, default=0, help="global seed; sample i depends only on (seed, i)")
    add("--classes", type=NATURAL, nargs="+", help="grid: class labels (default: those of DiT's sample.py)")
    add("--nrow", type=POSITIVE, default=4, help="grid: images per row")
    add("--num-samples", "--num-fid-samples", type=POSITIVE, help="write this many samples into an npz for FID")
    add("--class-mode", default="uniform", choices=["uniform", "balanced"],
        help="npz labels: uniform i.i.d. (as DiT/SiT) or balanced (each class equally often)")
    add("--out", help="output .png (grid) or .npz (default: under samples/; shards in OUT_shards/)")
    add("--sample-dir", metavar="DIR", help="also write each sample as DIR/000000.png ... (pytorch-fid, clean-fid)")
    add("--shard-size", type=POSITIVE, default=250, help="samples per shard, the unit of resumption")
    add("--keep-shards", action="store_true", help="keep the shards after merging")
    add("--max-shards", type=POSITIVE, help="stop each process after this many shards (rerun to resume)")
    add("--batch-size", "--per-proc-batch-size", type=POSITIVE, default=125, help="samples per process and call")
    add("--precision", default="auto", choices=["auto", "fp32", "tf32", "bf16"], help="auto: bf16 on GPUs that "
        "support it, else fp32; tf32: fp32 with TF32 matmuls (the official DiT/SiT setting)")
    add("--device", help="cuda / mps / cpu (default: autodetect, cuda:LOCAL_RANK)")
    return p


def _fail(msg):
    raise SystemExit(f"error: {msg}")


@torch.no_grad()
def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    with dit.distributed(args.device) as (rank, world, device):
        log = print if rank == 0 else (lambda *a, **k: None)
        if args.num_samples is None and world > 1:
            _fail("a grid is sampled by one process: run python sample.py without torchrun, or give --num-samples.")
        if not args.guidance_interval[0] < args.guidance_interval[1]:
            _fail(f"--guidance-interval {' '.join(map(str, args.guidance_interval))} is empty: give LO < HI.")
        try:  # the one-sentence errors of dit.py and data.py
            model, family, cfg = load_model(args.ckpt, args.model, args.image_size, args.weights)
            args.vae = (args.vae or cfg.get("vae") or "ema") if cfg["latent"] else None
            if args.vae:
                vae = data.load_vae(args.vae, device)
        except (ValueError, RuntimeError, ImportError) as e:
            _fail(str(e).rstrip(".") + ".")  # their sentences may lack the full stop
        K = cfg["num_classes"]

        # 1. the family's sampler and its options
        args.sampler = args.sampler or {"ODE": "dopri5", "SDE": "sde"}.get(args.mode) or SAMPLERS[family][0]
        if args.sampler not in SAMPLERS[family]:
            _fail(f"{cfg['model']} is a {family} model: choose --sampler from {', '.join(SAMPLERS[family])}.")
        for k in set(sum(OPTIONS.values(), ())) - set(OPTIONS[family]):  # e.g. MeanFlow's guidance is trained in
            if getattr(args, k) != parser.get_default(k):
                _fail(f"{cfg['model']} is sampled without --{k.replace('_', '-')} ({family} has none): drop it.")
        if args.cfg_scale != 1.0 and cfg.get("class_dropout_prob", 0.1) <= 0:
            _fail(f"{args.ckpt} was trained without label dropout, so it has no null class for CFG: use --cfg-scale 1.")
        if (args.guide_channels or 0) > model.in_channels:
            _fail(f"--guide-channels {args.guide_channels} out of range: the model has {model.in_channels} channels.")
        args.num_steps = args.num_steps or {"meanflow": 1}.get(family, 250)
        if args.sampler.startswith("sde") and args.num_steps < 2:
            _fail(f"--sampler {args.sampler} needs --num-steps >= 2 (its grid counts points, the last step included).")
        args.path = args.path or cfg.get("path") or "linear"
        options = {k: getattr(args, k) for k in OPTIONS[family]}
        if args.precision == "auto":
            args.precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.precision == "tf32"

        # 2. every setting that changes the images: printed, stored in the npz and compared when resuming
        note = "dopri5 adapts its steps to the whole batch: images depend on batch_size" * (args.sampler == "dopri5")
        keys = ("vae", "sampler", "num_steps", "seed", "num_samples", "class_mode", "precision")
        meta = dict(model=cfg["model"], family=family, ckpt=os.path.abspath(args.ckpt), step=cfg.get("step"),
                    weights="raw" if cfg.get("raw") else args.weights, image_size=cfg["image_size"], num_classes=K,
                    latent=bool(cfg["latent"]), **{k: getattr(args, k) for k in keys},
                    **options, noise="per-sample generators seeded from (seed, index)" + (note and "; " + note),
                    batch_size=args.batch_size if note else None)
        log(" | ".join(f"{k} {v}" for k, v in meta.items()) + "\n" * ("note" in cfg) + cfg.get("note", ""))
        model.to(device)

        def draw(start, labels):  # uint8 (n, H, W, 3) images of samples start, start + 1, ... in batches
            images = []
            for b in range(0, len(labels), args.batch_size):
                y = torch.as_tensor(labels[b: b + args.batch_size], device=device)
                noise = indexed_noise(args.seed, range(start + b, start + b + len(y)))
                z = noise(torch.empty(len(y), model.in_channels, model.input_size, model.input_size, device=device))
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                    x = generate(family, model, z, y, args.sampler, args.num_steps, generator=noise, **options)
                if args.vae:  # decoded in float32 like the official code: the pixels feed FID directly
                    x = vae.decode(x.float() / data.VAE_SCALE).sample
                images.append(to_uint8(x))
            return np.concatenate(images)

        # 3. a grid, or the npz
        name = f"{cfg['model'].replace('/', '-')}-{args.sampler}{args.num_steps}-cfg{args.cfg_scale}-seed{args.seed}"
        if args.num_samples is None:
            classes = args.classes or (DEFAULT_CLASSES if K == 1000 else list(range(min(8, K))))
            if max(classes) >= K:
                _fail(f"classes {[c for c in classes if c >= K]} are out of range: the model has classes 0..{K - 1}.")
            images, args.out = draw(0, classes), args.out or os.path.join("samples", name + ".png")
            save_pngs(args.sample_dir, 0, images)
            log(f"wrote {save_grid(images, args.out, args.nrow)}")
            return args.out
        args.out = args.out or os.path.join("samples", f"{name}-{args.num_samples}.npz")
        if not args.out.endswith(".npz"):
            _fail(f"--out {args.out} must end in .npz when --num-samples is given (ADM's sample format).")
        if os.path.exists(args.out):
            _fail(f"{args.out} already exists: remove it or choose another --out.")
        return args.out if run_npz(draw, args, meta, K, rank, world, log) else None


if __name__ == "__main__":
    main(sys.argv[1:])
