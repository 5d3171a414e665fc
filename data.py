"""
Datasets for DiT / SiT / MeanFlow training, and the one-time SD-VAE latent cache.

Pixel space:  ShapesDataset (built-in, procedural, no download) or ImageFolder (root/<class>/<image>).
Latent space: encode ImageNet once with the SD-VAE into a cache of posterior means and stds, then train
              on LatentCache, drawing a fresh posterior sample x = mean + std * randn every step.

Build the latent cache (resumable: rerun the same command after an interruption):

    # one process (CPU or one GPU)
    python data.py cache --data-path /data/imagenet/train --image-size 256 --vae ema --out cache/in256_ema
    # one node, 8 GPUs
    torchrun --standalone --nproc_per_node=8 data.py cache --data-path /data/imagenet/train \
        --image-size 256 --vae ema --out cache/in256_ema
    # several nodes (the cache folder must be on a filesystem every node writes to)
    torchrun --nnodes=2 --node_rank=$NODE_RANK --nproc_per_node=8 --master_addr=$MASTER --master_port=29500 \
        data.py cache --data-path /data/imagenet/train --image-size 256 --vae ema --out /shared/in256_ema

Look at the built-in dataset:  python data.py shapes --out shapes.png

Cache layout (format version 1), all arrays written through np.lib.format.open_memmap:
    config.json            vae, image size, dataset root, number of images, class-list and file-list hashes, dtype, ...
    mean.npy, std.npy      (N, 2, C, H/f, W/f): posterior mean and std of image i, unflipped [i, 0] and
                           horizontally flipped [i, 1], already multiplied by the scale 0.18215, so a training
                           sample is mean + std * randn. f = 2 ** (len(block_out_channels) - 1) from the VAE
                           config (8 for the SD-VAE: 4x32x32 latents at 256px).
    labels.npy             (N,) int64
    chunks/000123.json     done-marker of chunk 123 (images [123*K, 124*K)), written only after its data is on
                           disk; holds crc32 checksums and sums of the chunk's arrays.
    complete.json          written last, after every chunk's checksum was verified; a cache without it is
                           incomplete and LatentCache refuses it.
float16 is the default storage dtype (--dtype): it halves the ImageNet-256 cache (2 x 21 GB instead of 2 x 42 GB);
its relative rounding of 5e-4 is far below the posterior std the training sample adds anyway (stds under 6e-5 become
float16 subnormals and keep an absolute precision of 6e-8).
"""

import argparse
import datetime
import hashlib
import json
import math
import os
import sys
import time
import warnings
import zlib

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader, Dataset, DistributedSampler

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif")
VAE_SCALE = 0.18215  # SD-VAE latent scale factor (SPEC §7)
VAE_ALIASES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
CACHE_FORMAT_VERSION = 1

# -----------------------------------------------------------------------------
# Built-in procedural dataset


SHAPES = ("circle", "square", "triangle", "ring", "cross", "diamond", "stripes", "checker", "x", "crescent")


def _uniform(seed, index, stream):
    # counter-based RNG (splitmix64 finaliser): a sample depends only on (seed, index), never on num_samples
    # or on which other samples are rendered together
    with np.errstate(over="ignore"):
        z = (np.uint64(seed % 2**64) * np.uint64(0x9E3779B97F4A7C15)
             + index.astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
             + np.uint64(stream) * np.uint64(0x94D049BB133111EB) + np.uint64(0x2545F4914F6CDD1D))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53  # [0, 1)


def _hsv_to_rgb(h, s, v):
    # h, s, v: (n,) in [0, 1] -> (n, 3)
    i = np.floor(h * 6.0).astype(np.int64) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack([np.stack(c, 1) for c in
                      [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]], 0)  # (6, n, 3)
    return table[i, np.arange(len(h))]


def _shape_mask(kind, a, b, freq):
    # a, b: shape-local coordinates (n, H, W), unit = shape radius; freq: (n, 1, 1) texture cycles per unit
    if kind == 0:  # circle
        return a * a + b * b <= 1.0
    if kind == 1:  # square
        return np.maximum(np.abs(a), np.abs(b)) <= 0.8
    if kind == 2:  # triangle, apex up (b grows downwards)
        return (b <= 0.75) & (np.abs(a) <= (b + 0.95) * 0.6)
    if kind == 3:  # ring
        r2 = a * a + b * b
        return (r2 <= 1.0) & (r2 >= 0.5**2)
    if kind == 4:  # plus-shaped cross
        return (((np.abs(a) <= 0.3) & (np.abs(b) <= 1.0)) | ((np.abs(b) <= 0.3) & (np.abs(a) <= 1.0)))
    if kind == 5:  # diamond
        return np.abs(a) + np.abs(b) <= 1.0
    if kind == 6:  # horizontal stripes in a square patch
        return (np.maximum(np.abs(a), np.abs(b)) <= 0.9) & (np.floor((b + 0.9) * freq * 2) % 2 == 0)
    if kind == 7:  # checkerboard patch
        return ((np.maximum(np.abs(a), np.abs(b)) <= 0.9)
                & ((np.floor((a + 0.9) * 2.23) + np.floor((b + 0.9) * 2.23)) % 2 == 0))  # 4x4 cells
    if kind == 8:  # x-shaped cross
        p, q = (a + b) * 0.7071, (a - b) * 0.7071
        return (((np.abs(p) <= 0.3) & (np.abs(q) <= 1.0)) | ((np.abs(q) <= 0.3) & (np.abs(p) <= 1.0)))
    if kind == 9:  # crescent: a disk minus a shifted disk
        return (a * a + b * b <= 1.0) & ((a - 0.5) ** 2 + (b + 0.1) ** 2 > 0.75**2)
    raise ValueError(kind)


def render_shapes(indices, num_classes, image_size, seed, supersample=2):
    """Render the samples `indices` -> (uint8 images (n, 3, S, S), int64 labels (n,)); label = index % classes."""
    idx = np.asarray(indices, dtype=np.int64)
    n, S = len(idx), image_size
    y = idx % num_classes
    u = [_uniform(seed, idx, k) for k in range(14)]
    r = 0.42 + 0.22 * u[0]                          # shape radius, image spans [-1, 1]
    cx = (2 * u[1] - 1) * (0.95 - r)                # keep the shape inside the image
    cy = (2 * u[2] - 1) * (0.95 - r)
    theta = (2 * u[3] - 1) * 0.3                    # small rotation: the square never looks like the diamond
    freq = 1.6 + 0.6 * u[4]
    hue = (y / num_classes + (2 * u[5] - 1) * 0.03) % 1.0  # each class has its own hue on top of its shape
    fg = _hsv_to_rgb(hue, 0.55 + 0.4 * u[6], 0.75 + 0.25 * u[7])
    bg0 = _hsv_to_rgb(u[8], 0.5 * u[9], 0.05 + 0.3 * u[10])
    bg1 = _hsv_to_rgb((u[8] + 0.15 * u[11]) % 1.0, 0.5 * u[9], 0.05 + 0.3 * u[12])
    phi = 2 * np.pi * u[13]

    Ss = S * supersample
    g = ((np.arange(Ss) + 0.5) / Ss * 2 - 1).astype(np.float32)
    f32 = lambda v: v[:, None, None].astype(np.float32)  # noqa: E731  (n,) -> (n, 1, 1)
    alpha = np.empty((n, S, S), dtype=np.float32)
    for kind in np.unique(y):  # one shape per pass, so each pixel is evaluated once
        sel = np.flatnonzero(y == kind)
        dx, dy = g[None, None, :] - f32(cx[sel]), g[None, :, None] - f32(cy[sel])   # (m, 1, Ss), (m, Ss, 1)
        c, s, rr = f32(np.cos(theta[sel])), f32(np.sin(theta[sel])), f32(r[sel])
        a, b = (c * dx + s * dy) / rr, (c * dy - s * dx) / rr                         # (m, Ss, Ss)
        mask = _shape_mask(int(kind), a, b, f32(freq[sel])).astype(np.float32)
        alpha[sel] = mask.reshape(len(sel), S, supersample, S, supersample).mean((2, 4))  # anti-aliased coverage

    gs = ((np.arange(S) + 0.5) / S * 2 - 1).astype(np.float32)
    t = 0.5 + 0.35 * (f32(np.cos(phi)) * gs[None, None, :] + f32(np.sin(phi)) * gs[None, :, None])  # (n, S, S)
    bg0, bg1, fg = (v.astype(np.float32)[:, :, None, None] for v in (bg0, bg1, fg))
    bg = bg0 + (bg1 - bg0) * t[:, None]                                              # (n, 3, S, S) gradient
    img = bg + (fg - bg) * alpha[:, None]
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8), y


class ShapesDataset(Dataset):
    """Class-conditional toy images: class k is shape SHAPES[k] in hue k/num_classes, with random position, size,
    rotation, colour jitter and a gradient background. Sample i is a pure function of (seed, i); label = i % classes.
    Returns (x float32 (3, S, S) in [-1, 1], y int64). Samples are pre-rendered in __init__ (~0.1 s per 10k at 32px)
    unless they would take more than `max_prerender_bytes`, in which case each is rendered on access."""

    def __init__(self, num_classes=10, image_size=32, num_samples=10000, seed=0, max_prerender_bytes=2**30):
        if not 1 <= num_classes <= len(SHAPES):
            raise ValueError(f"ShapesDataset has {len(SHAPES)} shape classes; pass num_classes in 1..{len(SHAPES)}.")
        if image_size < 8:
            raise ValueError("ShapesDataset needs image_size >= 8 for the shapes to be recognisable.")
        self.num_classes, self.image_size, self.num_samples, self.seed = num_classes, image_size, num_samples, seed
        self.classes = list(SHAPES[:num_classes])
        self.images = None
        if num_samples * 3 * image_size**2 <= max_prerender_bytes:
            per = max(1, 2**22 // (4 * image_size**2))  # bounds the float32 temporaries to ~16 MB per array
            parts = [render_shapes(np.arange(i, min(i + per, num_samples)), num_classes, image_size, seed)[0]
                     for i in range(0, num_samples, per)]
            self.images = np.concatenate(parts) if parts else np.zeros((0, 3, image_size, image_size), np.uint8)

    def __len__(self):
        return self.num_samples

    def __getitem__(self, i):
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(i)
        i = i % self.num_samples
        if self.images is not None:
            img = self.images[i]
        else:
            img = render_shapes([i], self.num_classes, self.image_size, self.seed)[0][0]
        x = torch.from_numpy(img).float() / 127.5 - 1.0
        return x, torch.tensor(i % self.num_classes, dtype=torch.int64)


# -----------------------------------------------------------------------------
# Image folders (ImageNet)


def center_crop_arr(pil_image, image_size):
    """ADM's center crop: halve with BOX while the short side is >= 2 * image_size, BICUBIC-resize the short side
    to image_size, then crop the center. Returns a uint8 array (image_size, image_size, channels)."""
    # BOX halving by hand rather than PIL's reducing_gap, exactly as ADM, so the pixels match its data pipeline
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


def _is_image(name):
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def _scan(folder):
    # recursive, sorted, relative to folder; hidden folders (.ipynb_checkpoints, ...) skipped
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.relpath(os.path.join(dirpath, f), folder) for f in sorted(filenames) if _is_image(f)]
    return found


class ImageFolder(Dataset):
    """Images under root/<class>/**/<image>; classes sorted by name to indices 0..K-1 (`.classes`, `.class_to_idx`).
    If root holds images directly (no class folders) or unconditional=True, every image under root is used with
    label 0 and `.num_classes == 0`, which means unconditional (the model gets no class embedding).
    Returns (x float32 (3, S, S) in [-1, 1], y int64): RGB, ADM center crop, horizontal flip with probability
    `flip` (True = 0.5, False = 0, or a float). An unreadable or truncated image is skipped with a warning naming
    it and replaced by the next readable one, so batches stay full; more than `max_bad` distinct bad files in one
    process (each DataLoader worker counts its own, `.num_bad`) raise a RuntimeError."""

    def __init__(self, root, image_size, flip=True, unconditional=False, max_bad=100):
        if not os.path.isdir(root):
            raise ValueError(f"Image folder {root!r} does not exist; check --data-path.")
        self.root, self.image_size, self.max_bad = os.path.abspath(root), int(image_size), int(max_bad)
        self.flip_prob = 0.5 if flip is True else 0.0 if flip is False else float(flip)
        class_dirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        loose = [e.name for e in os.scandir(root) if e.is_file() and _is_image(e.name)]
        if unconditional or not class_dirs:
            self.classes, paths = [], _scan(root)
            labels = [0] * len(paths)
        else:
            if loose:
                warnings.warn(f"{len(loose)} images directly in {root} are ignored: with class folders present only "
                              f"root/<class>/ images are used (pass unconditional=True to use all images).")
            self.classes, paths, labels = class_dirs, [], []
            for k, name in enumerate(class_dirs):
                found = _scan(os.path.join(root, name))
                if not found:
                    warnings.warn(f"Class folder {os.path.join(root, name)} holds no images; its index {k} is unused.")
                paths += [os.path.join(name, p) for p in found]
                labels += [k] * len(found)
        if not paths:
            raise ValueError(f"No images ({', '.join(IMG_EXTENSIONS)}) found under {root!r}; check --data-path.")
        self.class_to_idx = {c: k for k, c in enumerate(self.classes)}
        self.num_classes = len(self.classes)
        # one bytes array, not a list of str: DataLoader workers forked from the trainer then share it without
        # copy-on-read of a million refcounted objects
        self.paths = np.array([p.encode("utf-8") for p in paths])
        self.labels = np.asarray(labels, dtype=np.int64)
        self.bad_files = set()

    @property
    def num_bad(self):
        return len(self.bad_files)

    def __len__(self):
        return len(self.paths)

    def path(self, i):
        return os.path.join(self.root, self.paths[i].decode("utf-8"))

    def _load(self, i):
        ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must raise, not come back half grey
        with Image.open(self.path(i)) as im:
            im.load()
            return center_crop_arr(im.convert("RGB"), self.image_size)

    def __getitem__(self, i):
        n = len(self.paths)
        i = int(i) % n
        for attempt in range(n):
            j = (i + attempt) % n
            if j in self.bad_files:
                continue
            try:
                arr = self._load(j)
                break
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
                self.bad_files.add(j)
                warnings.warn(f"Skipping unreadable image {self.path(j)} ({type(e).__name__}: {e}); "
                              f"{self.num_bad} bad file(s) so far in this process.")
                if self.num_bad > self.max_bad:
                    raise RuntimeError(f"More than max_bad={self.max_bad} unreadable images under {self.root}; "
                                       f"fix or remove them, or raise --max-bad.") from e
        else:
            raise RuntimeError(f"No readable image under {self.root}.")
        if self.flip_prob > 0 and torch.rand(()).item() < self.flip_prob:
            arr = arr[:, ::-1]
        x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float() / 127.5 - 1.0  # (3, S, S)
        return x, torch.tensor(self.labels[j], dtype=torch.int64)


# -----------------------------------------------------------------------------
# SD-VAE


def resolve_vae_name(name_or_path):
    """'ema' / 'mse' -> the Hugging Face id; a local folder -> its absolute path; anything else unchanged."""
    name_or_path = str(name_or_path)
    if name_or_path in VAE_ALIASES:
        return VAE_ALIASES[name_or_path]
    if os.path.isdir(name_or_path):
        return os.path.abspath(name_or_path)
    return name_or_path


def load_vae(name_or_path, device="cpu"):
    """The SD-VAE as a frozen diffusers AutoencoderKL in eval mode: 'ema', 'mse', a hub id, or a local folder."""
    try:
        from diffusers.models import AutoencoderKL
    except ImportError as e:
        raise ImportError("Latent mode needs diffusers for the SD-VAE: pip install diffusers") from e
    name = resolve_vae_name(name_or_path)
    try:
        vae = AutoencoderKL.from_pretrained(name, low_cpu_mem_usage=False)  # 80 MB: no need for accelerate
    except Exception as e:
        raise RuntimeError(f"Could not load the VAE {name!r} ({type(e).__name__}: {e}); download it once with "
                           f"network access, or pass a local folder saved with save_pretrained to --vae.") from e
    return vae.to(device).eval().requires_grad_(False)


def vae_downsample_factor(vae):
    # each down block but the last halves the resolution: 8 for the SD-VAE's 4 blocks
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode_posterior(vae, x):
    """x (N, 3, H, W) in [-1, 1] -> posterior (mean, std), each (N, C, H/f, W/f), scaled by 0.18215."""
    dist = vae.encode(x).latent_dist
    return dist.mean * VAE_SCALE, dist.std * VAE_SCALE


def sample_posterior(mean, std, generator=None):
    """A fresh latent x = mean + std * eps, eps ~ N(0, I), drawn on mean's device (called every training step)."""
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + std * eps


# -----------------------------------------------------------------------------
# Latent cache


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _write_json(path, obj):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: a marker is either absent or whole


def _chunk_marker(path, c):
    return os.path.join(path, "chunks", f"{c:06d}.json")


def _chunk_checksums(mean, std, labels):
    return {"mean": zlib.crc32(np.ascontiguousarray(mean).tobytes()),
            "std": zlib.crc32(np.ascontiguousarray(std).tobytes()),
            "labels": zlib.crc32(np.ascontiguousarray(labels).tobytes())}


def verify_cache(path, log=None, reread=True):
    """Re-read every chunk (unless reread=False), compare its crc32 with the done-marker; returns the totals of
    all markers for complete.json."""
    cfg = _read_json(os.path.join(path, "config.json"))
    mean = np.load(os.path.join(path, "mean.npy"), mmap_mode="r")
    std = np.load(os.path.join(path, "std.npy"), mmap_mode="r")
    labels = np.load(os.path.join(path, "labels.npy"), mmap_mode="r")
    K, N = cfg["chunk_size"], cfg["num_images"]
    s1 = s2 = s_std = 0.0
    crcs = []
    t0 = time.time()
    for c in range(cfg["num_chunks"]):
        marker_path = _chunk_marker(path, c)
        if not os.path.exists(marker_path):
            raise RuntimeError(f"Latent cache {path} misses chunk {c}; rerun `python data.py cache` to finish it.")
        marker = _read_json(marker_path)
        a, b = c * K, min((c + 1) * K, N)
        if reread and _chunk_checksums(mean[a:b], std[a:b], labels[a:b]) != marker["crc32"]:
            raise RuntimeError(f"Latent cache {path}: chunk {c} (images {a}..{b - 1}) does not match its checksum; "
                               f"delete {marker_path} and rerun `python data.py cache` to re-encode it.")
        s1, s2, s_std = s1 + marker["sum_mean"], s2 + marker["sumsq_mean"], s_std + marker["sum_std"]
        crcs.append(f"{marker['crc32']['mean']:08x}{marker['crc32']['std']:08x}{marker['crc32']['labels']:08x}")
        if log and (c + 1) % 200 == 0:
            log(f"verified {c + 1}/{cfg['num_chunks']} chunks | {time.time() - t0:.0f}s")
    count = N * 2 * math.prod(cfg["latent_shape"])
    m = s1 / count
    return {"num_chunks": cfg["num_chunks"], "num_images": N,
            "checksum": hashlib.sha256("".join(crcs).encode()).hexdigest(),
            "latent_mean": m, "latent_std": math.sqrt(max(s2 / count - m * m, 0.0)),
            "posterior_std_mean": s_std / count}


# what a cache is checked against when resuming a build; chunking and dtype too, since markers index them
_IDENTITY_KEYS = ("format_version", "vae", "image_size", "data_path", "unconditional", "num_images",
                  "classes_sha256", "files_sha256", "latent_shape", "dtype", "chunk_size")


def _normalise(key, value):
    if key == "vae":
        return resolve_vae_name(value)
    if key == "data_path":
        return os.path.abspath(value)
    if key == "latent_shape":
        return list(value)
    return value


class LatentCache(Dataset):
    """A finished latent cache as a Dataset of (mean, std, y): float32 (C, h, w), float32 (C, h, w), int64.
    The dataset has N entries (one per image); with flip=True each access picks the stored unflipped or flipped
    posterior at random (torch RNG, seeded per DataLoader worker), which is the random horizontal flip of pixel
    training. expect={"vae": "ema", "image_size": 256, ...} refuses a cache built with other settings.
    The trainer draws x = sample_posterior(mean, std) on its device each step."""

    def __init__(self, path, flip=True, expect=None):
        self.path = os.path.abspath(path)
        cfg_path = os.path.join(self.path, "config.json")
        if not os.path.exists(cfg_path):
            raise ValueError(f"{path!r} is not a latent cache (no config.json); build one with `python data.py cache`.")
        self.config = _read_json(cfg_path)
        if self.config.get("format_version") != CACHE_FORMAT_VERSION:
            raise ValueError(f"Latent cache {path!r} has format version {self.config.get('format_version')}, this "
                             f"code reads {CACHE_FORMAT_VERSION}; rebuild it with `python data.py cache`.")
        for key, want in (expect or {}).items():
            if key not in self.config:
                raise ValueError(f"Unknown cache setting {key!r} in expect; known: {', '.join(sorted(self.config))}.")
            have = self.config[key]
            if _normalise(key, have) != _normalise(key, want):
                raise ValueError(f"Latent cache {path!r} was built with {key}={have!r}, but {want!r} is asked for; "
                                 f"point to a cache built with {key}={want!r} or build one (python data.py cache).")
        if not os.path.exists(os.path.join(self.path, "complete.json")):
            done = sum(n.endswith(".json") for n in os.listdir(os.path.join(self.path, "chunks")))
            raise ValueError(f"Latent cache {path!r} is incomplete ({done}/{self.config['num_chunks']} chunks); rerun "
                             f"the same `python data.py cache` command to finish it (it resumes).")
        self.flip = flip
        self.num_classes = self.config["num_classes"]
        self.classes = self.config["classes"]
        self.latent_shape = tuple(self.config["latent_shape"])
        self.labels = np.load(os.path.join(self.path, "labels.npy"))
        self._mean = self._std = None  # opened lazily, so each DataLoader worker maps the files itself

    def __len__(self):
        return len(self.labels)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_mean"] = state["_std"] = None
        return state

    def __getitem__(self, i):
        if self._mean is None:
            self._mean = np.load(os.path.join(self.path, "mean.npy"), mmap_mode="r")
            self._std = np.load(os.path.join(self.path, "std.npy"), mmap_mode="r")
        f = int(torch.randint(2, ()).item()) if self.flip else 0
        mean = torch.from_numpy(self._mean[i, f].astype(np.float32))
        std = torch.from_numpy(self._std[i, f].astype(np.float32))
        return mean, std, torch.tensor(self.labels[i], dtype=torch.int64)

    def verify(self):
        """Full integrity check (reads the whole cache): every chunk's crc32 against its done-marker."""
        stats = verify_cache(self.path)
        recorded = _read_json(os.path.join(self.path, "complete.json"))
        if stats["checksum"] != recorded["checksum"]:
            raise RuntimeError(f"Latent cache {self.path}: chunk markers changed after completion; rebuild it.")
        return stats


class _Indexed(Dataset):
    # the cache build needs each sample's label as loaded (a bad image is replaced by the next one, label too)
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        x, y = self.ds[i]
        return x, y, i


def _dist_info():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier():
    if _dist_info()[1] > 1:
        torch.distributed.barrier()


def default_device():
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def build_cache(data_path, out, image_size=256, vae="ema", batch_size=64, num_workers=8, dtype="float16",
                chunk_size=1024, max_chunks=None, unconditional=False, max_bad=100, device=None, verify=True,
                log=print):
    """Encode every image of `data_path` (unflipped and flipped) into the cache `out`; see the module docstring.
    Under torch.distributed each rank encodes its share of the unfinished chunks. Resumes from the chunks already
    done; refuses a folder holding a cache built with other settings. `max_chunks` stops each rank after that many
    chunks (to split a long build, and to test resumption). Returns {"encoded_chunks": [...], "complete": bool}."""
    if dtype not in ("float16", "float32"):
        raise ValueError("--dtype must be float16 or float32.")
    rank, world = _dist_info()
    log = log if rank == 0 else (lambda *a, **k: None)
    device = torch.device(device or default_device())
    out = os.path.abspath(out)
    model = load_vae(vae, device)
    f = vae_downsample_factor(model)
    if image_size % f:
        raise ValueError(f"--image-size {image_size} must be a multiple of the VAE's downsampling factor {f}.")
    ds = ImageFolder(data_path, image_size, flip=False, unconditional=unconditional, max_bad=max_bad)
    N = len(ds)
    latent_shape = [model.config.latent_channels, image_size // f, image_size // f]
    config = {
        "format_version": CACHE_FORMAT_VERSION, "vae": resolve_vae_name(vae), "image_size": image_size,
        "data_path": ds.root, "unconditional": ds.num_classes == 0, "num_images": N,
        "num_classes": ds.num_classes, "classes": ds.classes,
        "classes_sha256": hashlib.sha256("\n".join(ds.classes).encode()).hexdigest(),
        "files_sha256": hashlib.sha256(b"\n".join(ds.paths.tolist())).hexdigest(),
        "latent_shape": latent_shape, "downsample_factor": f, "scale": VAE_SCALE, "dtype": dtype,
        "flips": ["none", "horizontal"], "chunk_size": chunk_size, "num_chunks": (N + chunk_size - 1) // chunk_size,
        "layout": "mean.npy, std.npy: (N, 2, C, h, w), [:, 1] horizontally flipped, scaled; labels.npy: (N,)",
    }
    cfg_path = os.path.join(out, "config.json")
    # every rank checks an existing cache before the barrier, so a mismatch stops all ranks, not just rank 0
    if os.path.exists(cfg_path):
        old = _read_json(cfg_path)
        for key in _IDENTITY_KEYS:
            if old.get(key) != config[key]:
                raise SystemExit(f"{out} holds a latent cache built with {key}={old.get(key)!r}, not {config[key]!r}; "
                                 f"pass another --out or delete {out} to rebuild.")
        if os.path.exists(os.path.join(out, "complete.json")):
            log(f"latent cache {out} is already complete")
            return {"encoded_chunks": [], "complete": True}
    elif rank == 0:
        os.makedirs(os.path.join(out, "chunks"), exist_ok=True)
        # arrays before config.json: a config on disk means the arrays exist with their final shapes
        shape = (N, 2, *latent_shape)
        for name, shp, dt in (("mean", shape, dtype), ("std", shape, dtype), ("labels", (N,), "int64")):
            arr = np.lib.format.open_memmap(os.path.join(out, f"{name}.npy"), mode="w+", dtype=dt, shape=shp)
            del arr  # header written, file sized (sparse); data arrives chunk by chunk
        _write_json(cfg_path, config)
    _barrier()
    done = {int(n[:6]) for n in os.listdir(os.path.join(out, "chunks")) if n.endswith(".json") and n[:6].isdigit()}
    todo = [c for c in range(config["num_chunks"]) if c not in done]
    _barrier()  # every rank has listed the done chunks before any rank writes a new marker
    mine = todo[rank::world][:max_chunks]
    log(f"latent cache {out}: {N} images, {config['num_chunks']} chunks of {chunk_size}, {len(done)} done, "
        f"{len(todo)} to encode on {world} process(es), latents {latent_shape} {dtype}")

    offsets = {n: np.load(os.path.join(out, f"{n}.npy"), mmap_mode="r").offset for n in ("mean", "std", "labels")}
    files = {n: open(os.path.join(out, f"{n}.npy"), "r+b") for n in offsets}
    bounds = {c: (c * chunk_size, min((c + 1) * chunk_size, N)) for c in mine}
    # batches never straddle chunks, so every chunk is encoded the same way whichever rank or run does it
    batches = [list(range(s, min(s + batch_size, bounds[c][1]))) for c in mine
               for s in range(bounds[c][0], bounds[c][1], batch_size)]
    loader = DataLoader(_Indexed(ds), batch_sampler=batches, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    np_dtype = np.dtype(dtype)
    encoded, buf, t0, n_img = [], None, time.time(), 0
    try:
        for x, y, idx in loader:
            c = int(idx[0]) // chunk_size
            a, b = bounds[c]
            if buf is None:
                buf = (np.empty((b - a, 2, *latent_shape), np_dtype), np.empty((b - a, 2, *latent_shape), np_dtype),
                       np.empty(b - a, np.int64))
            x = x.to(device, non_blocking=True)
            mean, std = encode_posterior(model, torch.cat([x, x.flip(3)]))      # (2B, C, h, w)
            B = len(idx)
            rows = slice(int(idx[0]) - a, int(idx[-1]) + 1 - a)
            buf[0][rows] = torch.stack([mean[:B], mean[B:]], 1).float().cpu().numpy()  # (B, 2, C, h, w)
            buf[1][rows] = torch.stack([std[:B], std[B:]], 1).float().cpu().numpy()
            buf[2][rows] = y.numpy()
            n_img += B
            if int(idx[-1]) + 1 == b:  # chunk finished: data to disk first, then its marker
                for n, arr in zip(("mean", "std", "labels"), buf):
                    files[n].seek(offsets[n] + a * arr[0].nbytes)
                    files[n].write(arr.tobytes())
                    files[n].flush()
                    os.fsync(files[n].fileno())
                m64 = buf[0].astype(np.float64)
                _write_json(_chunk_marker(out, c), {
                    "chunk": c, "start": a, "end": b, "crc32": _chunk_checksums(*buf),
                    "sum_mean": float(m64.sum()), "sumsq_mean": float((m64 * m64).sum()),
                    "sum_std": float(buf[1].astype(np.float64).sum())})
                encoded.append(c)
                buf = None
                el = time.time() - t0
                left = (len(mine) - len(encoded)) * el / len(encoded)
                log(f"chunk {len(encoded)}/{len(mine)} (rank 0) | {n_img / el:.1f} img/s per process | "
                    f"eta {datetime.timedelta(seconds=int(left))}")
    finally:
        for fh in files.values():
            fh.close()
    _barrier()
    finished = {n for n in os.listdir(os.path.join(out, "chunks")) if n.endswith(".json")}
    complete = len(finished) == config["num_chunks"]
    if not complete:
        log(f"stopped with {len(finished)}/{config['num_chunks']} chunks done; rerun the same command to finish.")
    elif rank == 0:
        stats = verify_cache(out, log, reread=verify)
        _write_json(os.path.join(out, "complete.json"), stats)
        log(f"latent cache complete: {json.dumps(stats)}")
    _barrier()
    return {"encoded_chunks": encoded, "complete": complete}


# -----------------------------------------------------------------------------
# Loaders


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way: after set_epoch(epoch), skip_batches(k) (or
    set_start_index(k * batch_size)) makes the next pass yield exactly the batches an uninterrupted pass would
    have yielded after its first k, without loading the skipped ones. set_epoch resets the start to 0."""

    def __init__(self, dataset, num_replicas, rank, shuffle=True, seed=0, drop_last=False, batch_size=1):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.batch_size = batch_size
        self.start_index = 0

    def set_epoch(self, epoch):
        super().set_epoch(epoch)
        self.start_index = 0

    def set_start_index(self, k):
        if not 0 <= k <= self.num_samples:
            raise ValueError(f"start index {k} outside the epoch's {self.num_samples} samples per rank.")
        self.start_index = k

    def skip_batches(self, k):
        self.set_start_index(k * self.batch_size)

    def __iter__(self):
        return iter(list(super().__iter__())[self.start_index:])

    def __len__(self):
        return self.num_samples - self.start_index


def make_loader(dataset, batch_size, rank, world_size, seed, num_workers, shuffle=True, drop_last=True):
    """(loader, sampler) with a per-rank batch of `batch_size` (global batch = batch_size * world_size).
    The sampler is seeded with the global seed (SPEC §7) and pads the last uneven share like DiT's; the loader drops
    the last partial batch. Resume mid-epoch: sampler.set_epoch(epoch); sampler.skip_batches(steps_done_in_epoch)."""
    sampler = ResumableDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                          batch_size=batch_size)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        pin_memory=torch.cuda.is_available(), drop_last=drop_last,
                        persistent_workers=num_workers > 0)
    return loader, sampler


# -----------------------------------------------------------------------------
# Command line


def main(argv=None):
    parser = argparse.ArgumentParser(description="Build the SD-VAE latent cache, or preview the built-in dataset.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("cache", help="encode an image folder with the SD-VAE into a resumable latent cache")
    p.add_argument("--data-path", required=True, help="image folder: root/<class>/<image> (ImageNet train)")
    p.add_argument("--image-size", type=int, default=256, help="center-crop size in pixels (latents are size/8)")
    p.add_argument("--vae", default="ema", help="'ema', 'mse' (stabilityai/sd-vae-ft-*) or a local diffusers folder")
    p.add_argument("--out", required=True, help="cache folder; rerun with the same folder to resume a build")
    p.add_argument("--batch-size", type=int, default=64, help="images per VAE forward (x2 with the flipped copies)")
    p.add_argument("--num-workers", type=int, default=8, help="DataLoader workers per process for image decoding")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                   help="storage dtype of mean and std (float16 halves the cache)")
    p.add_argument("--chunk-size", type=int, default=1024, help="images per done-marker, the unit of resumption")
    p.add_argument("--max-chunks", type=int, default=None, help="stop each process after this many chunks")
    p.add_argument("--unconditional", action="store_true", help="ignore class folders: all labels 0")
    p.add_argument("--max-bad", type=int, default=100, help="unreadable images tolerated per process before stopping")
    p.add_argument("--device", default=None, help="cuda / mps / cpu (default: autodetect, cuda:LOCAL_RANK)")
    p.add_argument("--dist-backend", default="gloo", choices=["gloo", "nccl"],
                   help="torch.distributed backend under torchrun; only barriers travel over it")
    p.add_argument("--no-verify", action="store_true", help="skip re-reading all chunks against their checksums")
    q = sub.add_parser("shapes", help="save a grid of ShapesDataset samples (rows = classes) as a PNG")
    q.add_argument("--out", default="shapes.png", help="output PNG path")
    q.add_argument("--image-size", type=int, default=32, help="image size in pixels")
    q.add_argument("--per-class", type=int, default=10, help="samples per class (columns)")
    q.add_argument("--seed", type=int, default=0, help="dataset seed")
    args = parser.parse_args(argv)
    print(vars(args))

    if args.command == "shapes":
        K, S, M = len(SHAPES), args.image_size, args.per_class
        imgs, _ = render_shapes(np.arange(K * M), K, S, args.seed)            # index i has class i % K
        grid = imgs.reshape(M, K, 3, S, S).transpose(1, 3, 0, 4, 2).reshape(K * S, M * S, 3)
        Image.fromarray(grid).save(args.out)
        print(f"wrote {args.out}: rows {', '.join(SHAPES)}")
        return

    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if distributed:
        # generous timeout: ranks wait at barriers while others scan a million files or finish the last chunk
        torch.distributed.init_process_group(args.dist_backend, timeout=datetime.timedelta(hours=3))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    try:
        build_cache(args.data_path, args.out, image_size=args.image_size, vae=args.vae, batch_size=args.batch_size,
                    num_workers=args.num_workers, dtype=args.dtype, chunk_size=args.chunk_size,
                    max_chunks=args.max_chunks, unconditional=args.unconditional, max_bad=args.max_bad,
                    device=args.device, verify=not args.no_verify)
    finally:
        if distributed:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
