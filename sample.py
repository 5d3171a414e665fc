"""
Sample from DiT / SiT / MeanFlow checkpoints: an image grid, or many samples in ADM's npz format for FID.

Our checkpoints carry their model and config; sampling uses the EMA weights:

    python sample.py --ckpt runs/sit-b2/checkpoint.pt --cfg-scale 4.0                 # grid PNG of 8 classes
    python sample.py --ckpt runs/sit-b2/checkpoint.pt --classes 1 2 3 --seed 1 --out grid.png

The released weights are raw state dicts, so the model and image size are given:

    python sample.py --ckpt DiT-XL-2-256x256.pt --model DiT-XL/2 --image-size 256 --cfg-scale 4.0
    python sample.py --ckpt SiT-XL-2-256x256.pt --model SiT-XL/2 --image-size 256 --cfg-scale 4.0

50K samples for FID (one node; several nodes: same flags, the --out folder on a shared filesystem):

    torchrun --standalone --nproc_per_node=8 sample.py --ckpt runs/sit-b2/checkpoint.pt \
        --num-samples 50000 --out samples/sit-b2.npz
    torchrun --nnodes=2 --node_rank=$NODE_RANK --nproc_per_node=8 --master_addr=$MASTER --master_port=29500 \
        sample.py --ckpt runs/sit-xl2/checkpoint.pt --num-samples 50000 --cfg-scale 1.5 --out /shared/sit-xl2.npz
    python fid.py samples/sit-b2.npz VIRTUAL_imagenet256_labeled.npz --mode tf      # ADM evaluator numbers

Reproducibility: sample i gets its label from (seed, i) and its initial noise from its own generator seeded from
(seed, i); the stochastic samplers (DDPM, SDE) draw every step's noise from the same per-sample generators through
their `noise_fn` hook. The npz is then the same for any number of GPUs and any batch size (up to float rounding of
batched kernels). Only dopri5 picks its steps from the error of the whole batch: its images never depend on the
number of processes (batches are cut from fixed shards) but do depend on --batch-size, which `meta` then records. Work is written as
shards of --shard-size samples into OUT_shards/; an interrupted run resumes when rerun with the same command, and
rank 0 merges the shards into OUT.
The npz holds arr_0 (N, H, W, 3) uint8, arr_1 (N,) int64 labels, and `meta`: a JSON string of every setting that
affects FID (ADM's evaluator reads only arr_0).
"""

import argparse
import datetime
import inspect
import json
import math
import os
import sys
import time
import zipfile
from contextlib import nullcontext

import numpy as np
import torch

VAE_SCALE = 0.18215  # SD-VAE latent scale (SPEC §7)
DEFAULT_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]  # the official DiT sample.py grid

# per family: samplers (the first is the paper's default) and default number of steps
SAMPLERS = {
    "dit": ("ddpm", "ddim"),                                          # DDPM-250 (DiT paper)
    "sit": ("sde", "sde-heun", "ode-euler", "ode-heun", "dopri5"),    # SDE Euler-Maruyama 250 (SiT paper)
    "meanflow": ("meanflow",),                                        # u(z, r, t) steps, 1-NFE default
}
DEFAULT_STEPS = {"dit": 250, "sit": 250, "meanflow": 1}
RELEASE_PREFIXES = ("DiT-", "SiT-", "MeanFlow-")


# ---------------------------------------------------------------------------------------------------------
# Per-sample randomness: everything about sample i depends only on (seed, i)
# ---------------------------------------------------------------------------------------------------------

def _splitmix64(x):
    x = (x + 0x9E3779B97F4A7C15) % 2**64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return x ^ (x >> 31)


def sample_seed(seed, index):
    """Seed of sample `index`'s generator. torch's CPU generator (mt19937) keeps only the low 32 bits of a seed, so
    a 64-bit hash would make two of 50K samples share noise with probability ~25%; an odd-multiplier affine map of the
    index is a bijection mod 2**32, so every index < 2**32 gets its own stream at a given seed."""
    return (_splitmix64(seed) + index * 0x9E3779B1) % 2**32


def make_labels(indices, num_classes, seed, class_mode):
    """Labels of the given sample indices; label i depends only on (seed, i, num_classes, class_mode).

    balanced: every aligned group of num_classes consecutive indices holds each class once, in a random order
    (N a multiple of num_classes gives exactly N / num_classes images per class). uniform: i.i.d. uniform labels,
    as the official DiT / SiT sample_ddp.py.
    """
    indices = np.asarray(indices, dtype=np.int64)
    out = np.empty(len(indices), dtype=np.int64)
    for group in np.unique(indices // num_classes):
        rng = np.random.default_rng([seed, 1, int(group)])  # stream 1: labels (noise uses torch generators)
        if class_mode == "balanced":
            table = rng.permutation(num_classes)
        else:
            table = rng.integers(num_classes, size=num_classes)
        sel = indices // num_classes == group
        out[sel] = table[indices[sel] % num_classes]
    return out


class IndexedNoise:
    """Standard normal noise whose row j comes from sample indices[j]'s own generator (seeded by sample_seed).

    The first call gives the initial noise z; a stochastic sampler that receives this object as `noise_fn` calls it
    as a drop-in for torch.randn_like(x) at every step. Each row's stream is therefore the same whatever batch the
    sample is drawn in. Drawn on the CPU, so the noise is also the same on every device.
    """

    def __init__(self, seed, indices):
        self.generators = [torch.Generator().manual_seed(sample_seed(seed, int(i))) for i in indices]

    def randn(self, shape, device="cpu", dtype=torch.float32):
        n = len(self.generators)
        if shape[0] % n:
            raise ValueError(f"noise for a batch of {shape[0]} rows requested from {n} per-sample streams")
        rows = torch.stack([torch.randn(tuple(shape[1:]), generator=g) for g in self.generators])
        # a sampler that carries the CFG-doubled batch [x; x] asks for k*n rows: the copies get the same noise
        rows = rows.repeat(shape[0] // n, *([1] * (len(shape) - 1)))
        return rows.to(device=device, dtype=dtype)

    def __call__(self, x):
        return self.randn(x.shape, x.device, x.dtype)


def to_uint8(x):
    """[-1, 1] images (N, 3, H, W) -> uint8 (N, H, W, 3) with the DiT/ADM conversion clamp(127.5 x + 128)."""
    return torch.clamp(127.5 * x.float() + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# ---------------------------------------------------------------------------------------------------------
# Model, VAE, samplers
# ---------------------------------------------------------------------------------------------------------

def _fail(msg):
    raise SystemExit(f"error: {msg}")


def fetch_release(name):
    """Path of a released checkpoint (DiT-XL-2-256x256.pt, SiT-XL-2-256x256.pt, ...) downloaded once into the cache
    that dit.py and sit.py use; one process per node downloads while the others wait."""
    import dit
    import sit

    url = {**dit.PRETRAINED_URLS, **sit.PRETRAINED_URLS}[name]
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dispersive")
    dst = os.path.join(cache, name)
    if not os.path.exists(dst) and int(os.environ.get("LOCAL_RANK", 0)) == 0:
        os.makedirs(cache, exist_ok=True)
        print(f"downloading {url} -> {dst}")
        try:
            torch.hub.download_url_to_file(url, dst + ".part", progress=True)
        except Exception as e:  # network errors come in many types
            _fail(f"could not download {name} ({type(e).__name__}): download it by hand and pass its path to --ckpt.")
        os.replace(dst + ".part", dst)
    _barrier()
    return dst


def load_model(ckpt, model_name=None, image_size=None, weights="ema"):
    """(model in eval mode on the CPU, family, config) from a train.py checkpoint or a released raw state dict."""
    import dit
    import sit
    import train

    path = ckpt
    if not os.path.isfile(path) and os.path.basename(path) in {**dit.PRETRAINED_URLS, **sit.PRETRAINED_URLS}:
        path = fetch_release(os.path.basename(path))
    if not os.path.isfile(path):
        _fail(f"checkpoint {ckpt} does not exist: pass the checkpoint.pt of a training run or a released "
              f"DiT/SiT .pt file to --ckpt.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickles of other kinds, truncated files, ...
        _fail(f"could not read {ckpt} as a PyTorch checkpoint ({type(e).__name__}): pass a checkpoint.pt written "
              f"by train.py or a released DiT/SiT .pt file.")
    if not isinstance(obj, dict) or not obj:
        _fail(f"{ckpt} holds no state dict: pass a checkpoint.pt written by train.py or a released DiT/SiT .pt file.")

    if isinstance(obj.get("config"), dict):  # our training checkpoint: the model is described by its config
        cfg = dict(obj["config"])
        if model_name is not None and model_name != cfg["model"]:
            _fail(f"{ckpt} is a {cfg['model']} checkpoint but --model is {model_name}: drop --model (our "
                  f"checkpoints carry their model) or pass a {model_name} checkpoint.")
        if image_size is not None and image_size != cfg["image_size"]:
            _fail(f"{ckpt} was trained at {cfg['image_size']}px but --image-size is {image_size}: drop --image-size.")
        if weights not in obj:
            _fail(f"{ckpt} has no '{weights}' weights: choose --weights {'model' if weights == 'ema' else 'ema'}.")
        state = obj[weights]
        cfg.update(step=obj.get("step"), raw=False)
    else:  # released weights: a raw state dict
        if model_name is None or image_size is None:
            _fail(f"{ckpt} is a raw state dict without a config: give --model and --image-size "
                  f"(e.g. --model DiT-XL/2 --image-size 256).")
        base = os.path.basename(ckpt)
        for prefix in RELEASE_PREFIXES:  # DiT and SiT releases have identical keys and shapes: trust the name
            if base.startswith(prefix) and not model_name.startswith(prefix):
                _fail(f"{base} looks like a {prefix[:-1]} checkpoint but --model is {model_name}: pass the matching "
                      f"--model (e.g. {prefix}XL/2).")
        state = dit.extract_state_dict(obj)
        w = state.get("x_embedder.proj.weight")
        table = state.get("y_embedder.embedding_table.weight")
        if w is None or table is None:
            _fail(f"{ckpt} is not a DiT/SiT/MeanFlow state dict (no x_embedder / y_embedder weights).")
        cfg = dict(model=model_name, image_size=image_size, latent=w.shape[1] != 3,
                   num_classes=table.shape[0] - 1, class_dropout_prob=0.1, vae="ema", step=None, raw=True)

    try:
        model, family = train.build_model(cfg["model"], cfg["image_size"], cfg["num_classes"], cfg["latent"],
                                          class_dropout_prob=cfg.get("class_dropout_prob", 0.1))
    except ValueError as e:  # train.check_model_name: unknown name, or a size the patch does not divide
        _fail(str(e).rstrip(".") + ".")
    try:
        dit.load_checkpoint(model, state, prefer="ema")
    except ValueError as e:
        _fail(str(e))
    return model.eval().requires_grad_(False), family, cfg


def family_sampler(family):
    if family == "dit":
        from dit import sample
    elif family == "sit":
        from sit import sample
    elif family == "meanflow":
        from meanflow import sample
    else:
        raise ValueError(f"unknown model family {family!r}")
    return sample


def resolve_precision(precision, device):
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def autocast(precision, device):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


class Sampler:
    """Everything needed to turn sample indices into uint8 images: model, family sampler, VAE and settings."""

    def __init__(self, model, family, cfg, args, device, vae=None):
        self.model, self.family, self.cfg, self.args, self.device, self.vae = model, family, cfg, args, device, vae
        self.fn = family_sampler(family)
        params = inspect.signature(self.fn).parameters
        self.stochastic = args.sampler in ("ddpm", "sde", "sde-heun") or (args.sampler == "ddim" and args.eta > 0)
        # why images may depend on which samples share a batch (see the module docstring)
        self.batch_note = "dopri5 picks its steps from the error of the whole batch" if args.sampler == "dopri5" else None
        self.kwargs = dict(num_steps=args.num_steps)
        if family == "dit":
            self.kwargs.update(sampler=args.sampler, cfg_scale=args.cfg_scale, guide_channels=args.guide_channels,
                               eta=args.eta)
        elif family == "sit":
            self.kwargs.update(sampler=args.sampler, cfg_scale=args.cfg_scale, guide_channels=args.guide_channels,
                               guidance_interval=tuple(args.guidance_interval), atol=args.atol, rtol=args.rtol,
                               path=args.path)
        if "guidance_interval" not in params and tuple(args.guidance_interval) != (0.0, 1.0):
            _fail(f"the {family} sampler has no guidance interval: drop --guidance-interval.")
        m = model.module if hasattr(model, "module") else model
        self.shape = (m.in_channels, m.input_size, m.input_size)

    @torch.no_grad()
    def images(self, indices, labels):
        """uint8 (n, H, W, 3) images of the given sample indices and labels."""
        noise = IndexedNoise(self.args.seed, indices)
        z = noise.randn((len(indices),) + self.shape, self.device)
        y = torch.as_tensor(labels, dtype=torch.long, device=self.device)
        kwargs = dict(self.kwargs)
        if self.stochastic:
            kwargs["noise_fn"] = noise  # each sample's step noise from its own stream: batching changes nothing
        with autocast(self.args.precision, self.device):
            x = self.fn(self.model, z, y, **kwargs)
        x = x.float()
        if self.vae is not None:
            # decoded in float32 like the official code: the VAE's output feeds FID directly
            x = self.vae.decode(x / VAE_SCALE).sample
        return to_uint8(x)


def settings(args, family, cfg, sampler):
    """Every setting that changes the images (printed, stored in the npz and compared when resuming)."""
    noise = "per-sample generators seeded from (seed, index)"
    if sampler.batch_note:
        noise += f"; {sampler.batch_note}: images depend on batch_size"
    return dict(
        model=cfg["model"], family=family, ckpt=os.path.abspath(args.ckpt), step=cfg.get("step"),
        weights="raw" if cfg["raw"] else args.weights, image_size=cfg["image_size"],
        latent=bool(cfg["latent"]), vae=args.vae if cfg["latent"] else None, sampler=args.sampler,
        num_steps=args.num_steps, cfg_scale=args.cfg_scale, guide_channels=args.guide_channels,
        guidance_interval=list(args.guidance_interval) if family == "sit" else None,
        eta=args.eta if args.sampler == "ddim" else None, path=args.path if family == "sit" else None,
        atol=args.atol if args.sampler == "dopri5" else None, rtol=args.rtol if args.sampler == "dopri5" else None,
        seed=args.seed, num_samples=args.num_samples, class_mode=args.class_mode, num_classes=cfg["num_classes"],
        precision=args.precision, noise=noise, batch_size=args.batch_size if sampler.batch_note else None,
    )


def summary_line(meta):
    keys = ["model", "ckpt", "step", "sampler", "num_steps", "cfg_scale", "guide_channels", "guidance_interval",
            "seed", "num_samples", "class_mode", "vae", "precision"]
    return "summary | " + " | ".join(f"{k} {meta[k]}" for k in keys if k in meta)


# ---------------------------------------------------------------------------------------------------------
# Shards and the merged npz
# ---------------------------------------------------------------------------------------------------------

def shard_path(shard_dir, start):
    return os.path.join(shard_dir, f"shard_{start:07d}.npz")


def write_shard(path, images, labels):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:  # a file object: np.savez would otherwise append .npz to the temporary name
        np.savez(f, arr_0=images, arr_1=labels)
    os.replace(tmp, path)  # atomic: a shard on disk is always complete


def write_npz(path, shard_files, num_samples, meta):
    """Stream the shards into one npz (arr_0, arr_1, meta) holding one shard in memory at a time."""
    with np.load(shard_files[0]) as shard:
        first = shard["arr_0"]
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (num_samples,) + first.shape[1:]}
    labels, count = [], 0
    tmp = f"{path}.tmp{os.getpid()}"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            for name in shard_files:
                with np.load(name) as shard:
                    images = shard["arr_0"]
                    labels.append(shard["arr_1"])
                if images.shape[1:] != first.shape[1:] or images.dtype != np.uint8:
                    raise ValueError(f"shard {name} holds {images.dtype} images of shape {images.shape[1:]}, "
                                     f"expected uint8 {first.shape[1:]}")
                f.write(np.ascontiguousarray(images).tobytes())
                count += len(images)
        if count != num_samples:
            raise ValueError(f"the shards hold {count} images, expected {num_samples}")
        for key, arr in (("arr_1", np.concatenate(labels).astype(np.int64)), ("meta", np.array(json.dumps(meta)))):
            with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, arr, allow_pickle=False)
    os.replace(tmp, path)


def _dist():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _broadcast(obj):
    if _dist()[1] == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _barrier():
    if _dist()[1] > 1:
        torch.distributed.barrier()


def run_npz(sampler, args, meta, num_classes, log):
    rank, world = _dist()
    N, S = args.num_samples, args.shard_size
    shard_dir = args.shard_dir or os.path.splitext(args.out)[0] + "_shards"
    starts = list(range(0, N, S))

    pending = None
    if rank == 0 and os.path.exists(args.out):
        pending = f"{args.out} already exists: remove it or choose another --out."
    elif rank == 0:
        os.makedirs(shard_dir, exist_ok=True)
        meta_file = os.path.join(shard_dir, "meta.json")
        if os.path.exists(meta_file):
            with open(meta_file) as f:
                old = json.load(f)
            changed = {k: (old.get(k), v) for k, v in meta.items() if k != "shard_size" and old.get(k) != v}
            if old.get("shard_size") != S:
                changed["shard_size"] = (old.get("shard_size"), S)
            if changed:
                diff = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
                pending = f"the shards in {shard_dir} were made with other settings ({diff}): rerun with those " \
                          f"settings, or remove the folder or choose another --out to start afresh."
        else:
            with open(meta_file + ".tmp", "w") as f:
                json.dump(dict(meta, shard_size=S), f, indent=1)
            os.replace(meta_file + ".tmp", meta_file)
        if pending is None:
            for name in os.listdir(shard_dir):
                if ".tmp" in name:  # a write cut short by an interruption
                    os.remove(os.path.join(shard_dir, name))
            pending = [s for s in starts if not os.path.exists(shard_path(shard_dir, s))]
    pending = _broadcast(pending)
    if isinstance(pending, str):
        _fail(pending)
    mine = pending[rank::world]
    if rank == 0:
        log(f"{len(starts) - len(pending)}/{len(starts)} shards of {S} already in {shard_dir}; "
            f"{len(pending)} to sample on {world} process(es)")

    t0, done, todo = time.time(), 0, sum(min(S, N - s) for s in mine)
    for k, start in enumerate(mine):
        if args.max_shards is not None and k >= args.max_shards:
            break
        stop = min(start + S, N)
        images, labels = [], make_labels(range(start, stop), num_classes, args.seed, args.class_mode)
        for b in range(start, stop, args.batch_size):
            idx = list(range(b, min(b + args.batch_size, stop)))
            images.append(sampler.images(idx, labels[b - start: b - start + len(idx)]))
            done += len(idx)
            if rank == 0:
                rate = done / (time.time() - t0)
                eta = datetime.timedelta(seconds=int((todo - done) / max(rate, 1e-9)))
                log(f"rank 0 {done}/{todo} | {rate:.2f} img/s per process, ~{rate * world:.1f} img/s total | eta {eta}")
        write_shard(shard_path(shard_dir, start), np.concatenate(images), labels)
    _barrier()

    if rank == 0:
        missing = [s for s in starts if not os.path.exists(shard_path(shard_dir, s))]
        if missing:
            log(f"{len(missing)}/{len(starts)} shards still missing in {shard_dir}: rerun the same command to resume")
            return False
        files = [shard_path(shard_dir, s) for s in starts]
        for s, name in zip(starts, files):  # a shard from other settings would carry other labels
            with np.load(name) as shard:
                expect = make_labels(range(s, min(s + S, N)), num_classes, args.seed, args.class_mode)
                if not np.array_equal(shard["arr_1"], expect):
                    _fail(f"{name} does not belong to this run (its labels differ): remove {shard_dir} and rerun.")
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        write_npz(args.out, files, N, meta)
        log(f"wrote {args.out}: arr_0 ({N}, {', '.join(map(str, np.load(files[0])['arr_0'].shape[1:]))}) uint8, "
            f"arr_1 ({N},) int64, meta")
        if not args.keep_shards:
            for name in files + [os.path.join(shard_dir, "meta.json")]:
                os.remove(name)
            if not os.listdir(shard_dir):
                os.rmdir(shard_dir)
    return True


def save_grid(images, path, nrow, padding=2):
    """uint8 (n, H, W, 3) -> one PNG, nrow images per row, black padding (torchvision make_grid's layout)."""
    from PIL import Image

    n, H, W, _ = images.shape
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (H + padding) + padding, nrow * (W + padding) + padding, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, nrow)
        y, x = padding + r * (H + padding), padding + c * (W + padding)
        grid[y: y + H, x: x + W] = img
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid).save(path)


# ---------------------------------------------------------------------------------------------------------
# Script
# ---------------------------------------------------------------------------------------------------------

def get_parser():
    p = argparse.ArgumentParser(description="Sample a grid PNG, or --num-samples images into an npz for FID.")
    p.add_argument("--ckpt", required=True, help="checkpoint.pt of a training run, or a released DiT/SiT .pt file")
    p.add_argument("--model", default=None, help="model name, e.g. DiT-XL/2 (needed for released raw state dicts)")
    p.add_argument("--image-size", type=int, default=None, help="image size in pixels (needed for released weights)")
    p.add_argument("--weights", default="ema", choices=["ema", "model"], help="which weights of our checkpoints")
    p.add_argument("--vae", default=None,
                   help="SD-VAE for latent models: ema, mse or a local diffusers folder (default: the checkpoint's, "
                        "ema for released weights)")
    p.add_argument("--sampler", default=None,
                   help="dit: ddpm (default) | ddim; sit: sde (default, Euler-Maruyama) | sde-heun | ode-euler | "
                        "ode-heun | dopri5; meanflow: meanflow")
    p.add_argument("--num-steps", type=int, default=None, help="sampling steps (default: dit 250, sit 250, meanflow 1)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale w (1 = no guidance)")
    p.add_argument("--guide-channels", type=int, default=None,
                   help="guide only the first k output channels (default: all; 3 reproduces the official DiT/SiT "
                        "code and their published FIDs)")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=[0.0, 1.0], metavar=("LO", "HI"),
                   help="SiT: apply guidance only for t in [LO, HI] (t = 1 is data)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM η (0 = deterministic)")
    p.add_argument("--path", default=None, choices=["linear", "gvp", "vp"],
                   help="SiT interpolant (default: the checkpoint's, linear for released weights)")
    p.add_argument("--atol", type=float, default=1e-6, help="dopri5 absolute tolerance (SiT code default)")
    p.add_argument("--rtol", type=float, default=1e-3, help="dopri5 relative tolerance (SiT code default)")
    p.add_argument("--seed", type=int, default=0, help="global seed; sample i depends only on (seed, i)")
    p.add_argument("--classes", type=int, nargs="+", default=None,
                   help="grid: class labels, one image each (default: the official DiT sample.py classes)")
    p.add_argument("--nrow", type=int, default=4, help="grid: images per row")
    p.add_argument("--num-samples", type=int, default=None, help="write this many samples into an npz for FID")
    p.add_argument("--class-mode", default="uniform", choices=["uniform", "balanced"],
                   help="npz labels: uniform i.i.d. (official DiT/SiT) or balanced (each class equally often)")
    p.add_argument("--out", default=None, help="output .png (grid) or .npz (default: under samples/)")
    p.add_argument("--shard-dir", default=None,
                   help="folder of the resumable shards (default: OUT without .npz, plus _shards)")
    p.add_argument("--shard-size", type=int, default=250, help="samples per shard, the unit of resumption")
    p.add_argument("--keep-shards", action="store_true", help="keep the shards after merging")
    p.add_argument("--max-shards", type=int, default=None,
                   help="stop each process after this many shards (to split a long run; rerun to resume)")
    p.add_argument("--batch-size", type=int, default=125,
                   help="samples per sampler call and process (no effect on the images unless meta says so)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "tf32", "bf16"],
                   help="auto: bf16 autocast on GPUs that support it, else fp32; tf32: fp32 with TF32 matmuls "
                        "(the official DiT/SiT sampling setting)")
    p.add_argument("--device", default=None, help="cuda / mps / cpu (default: autodetect, cuda:LOCAL_RANK)")
    p.add_argument("--dist-backend", default=None, choices=["nccl", "gloo"],
                   help="torch.distributed backend under torchrun (default: nccl on GPUs, else gloo)")
    return p


def default_device():
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def main(argv=None):
    args = get_parser().parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    device = torch.device(args.device or default_device())
    if distributed and not torch.distributed.is_initialized():
        backend = args.dist_backend or ("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # generous timeout: ranks wait at the last barrier while others finish their final shard
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(hours=3))
    try:
        with torch.no_grad():
            return run(args, device)
    finally:
        if distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run(args, device):
    rank, world = _dist()
    log = print if rank == 0 else (lambda *a, **k: None)
    if args.num_samples is None and world > 1:
        _fail("a grid is sampled by one process: run python sample.py without torchrun, or give --num-samples.")
    if args.num_samples is not None and args.num_samples < 1:
        _fail(f"--num-samples must be positive, got {args.num_samples}.")
    if args.batch_size < 1 or args.shard_size < 1:
        _fail("--batch-size and --shard-size must be positive.")

    model, family, cfg = load_model(args.ckpt, args.model, args.image_size, args.weights)
    model.to(device)
    args.sampler = args.sampler or SAMPLERS[family][0]
    if args.sampler not in SAMPLERS[family]:
        _fail(f"{cfg['model']} is a {family} model: choose --sampler from {', '.join(SAMPLERS[family])}.")
    args.num_steps = args.num_steps or DEFAULT_STEPS[family]
    if family == "meanflow" and args.cfg_scale != 1.0:
        _fail("MeanFlow is sampled without CFG (its guidance is trained in, ω and κ): drop --cfg-scale.")
    if args.cfg_scale > 1.0 and cfg.get("class_dropout_prob", 0.1) <= 0:
        _fail(f"{args.ckpt} was trained without label dropout, so it has no null class for CFG: use --cfg-scale 1.")
    args.path = args.path or cfg.get("path", "linear")
    args.vae = (args.vae or cfg.get("vae") or "ema") if cfg["latent"] else None
    args.precision = resolve_precision(args.precision, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.precision == "tf32"
    num_classes = cfg["num_classes"]
    if args.guide_channels is not None and not 1 <= args.guide_channels <= model.in_channels:
        _fail(f"--guide-channels {args.guide_channels} is out of range: the model has {model.in_channels} channels "
              f"(3 reproduces the official DiT/SiT code on SD-VAE latents).")

    vae = None
    if cfg["latent"]:
        import data
        try:
            vae = data.load_vae(args.vae, device)
        except (ImportError, RuntimeError) as e:
            _fail(str(e))

    sampler = Sampler(model, family, cfg, args, device, vae)
    meta = settings(args, family, cfg, sampler)
    log(vars(args))
    log(summary_line(meta))
    if sampler.batch_note:
        log(f"note: {sampler.batch_note}: images do not depend on the number of processes but do on --batch-size")

    if args.num_samples is None:
        classes = args.classes or (DEFAULT_CLASSES if num_classes == 1000 else list(range(min(8, num_classes))))
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            _fail(f"classes {bad} are out of range: the model has {num_classes} classes (0..{num_classes - 1}).")
        out = args.out or os.path.join("samples", f"{cfg['model'].replace('/', '-')}-{args.sampler}{args.num_steps}-"
                                                  f"cfg{args.cfg_scale}-seed{args.seed}.png")
        images = np.concatenate([sampler.images(list(range(b, min(b + args.batch_size, len(classes)))),
                                                classes[b: b + args.batch_size])
                                 for b in range(0, len(classes), args.batch_size)])
        save_grid(images, out, args.nrow)
        log(f"wrote {out}")
        return out

    args.out = args.out or os.path.join("samples", f"{cfg['model'].replace('/', '-')}-{args.sampler}{args.num_steps}-"
                                                   f"cfg{args.cfg_scale}-seed{args.seed}-{args.num_samples}.npz")
    if not args.out.endswith(".npz"):
        _fail(f"--out {args.out} must end in .npz when --num-samples is given (ADM's sample format).")
    t0 = time.time()
    complete = run_npz(sampler, args, meta, num_classes, log)
    if complete:
        log(f"{summary_line(meta)} | {time.time() - t0:.0f}s")
    return args.out if complete else None


if __name__ == "__main__":
    main(sys.argv[1:])
