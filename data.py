"""
Data for DiT / SiT / MeanFlow training: the built-in shapes, ImageNet-style image folders, and the SD-VAE latent
cache (train on posterior samples x = mean + std * randn, a fresh one every step).

    python data.py shapes --out shapes.png                 # look at the built-in dataset
    python data.py cache --data-path /data/imagenet/train --image-size 256 --vae ema --out cache/in256_ema
    torchrun --standalone --nproc_per_node=8 data.py cache ...       # same, 8 GPUs
    torchrun --nnodes=2 --node_rank=$NODE_RANK --nproc_per_node=8 --master_addr=$MASTER --master_port=29500 \
        data.py cache ...                                  # several nodes: --out on a filesystem all of them write

A cache build resumes when rerun. Layout: config.json (the settings); mean.npy, std.npy (N, 2, C, H/8, W/8),
[i, 1] flipped, scaled by 0.18215; labels.npy (N,); chunks/000123.json, the done-marker of images [123 K, 124 K)
with their crc32s, written after the data; complete.json, written after every chunk was re-read.
Bad data a user must fix raises DataError with a one-line message.
"""

import argparse
import hashlib
import json
import os
import signal
import warnings
import zlib

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dit import Progress, checked, default_device, distributed

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif")
VAE_SCALE = 0.18215  # SD-VAE latent scale factor (Rombach et al.; DiT and SiT use the same)
VAE_ALIASES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
CACHE_FORMAT_VERSION = 1


class DataError(Exception):
    """Bad data a user must fix (unreadable images, a damaged latent cache); the message is one sentence on one line.
    Raised in a DataLoader worker, it reaches the main process as a DataError whose message is the worker's
    traceback, ending in that line: `e.sentence` is the sentence either way."""

    @property
    def sentence(self):
        return str(self).strip().splitlines()[-1].split("DataError: ", 1)[-1]


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
    i, f = np.floor(h * 6.0).astype(np.int64) % 6, h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack([np.stack(c, 1) for c in [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]])
    return table[i, np.arange(len(h))]


def _cross(a, b):
    return ((np.abs(a) <= 0.3) & (np.abs(b) <= 1.0)) | ((np.abs(b) <= 0.3) & (np.abs(a) <= 1.0))


# one mask per class, in SHAPES order: (a, b) shape-local coordinates (n, H, W), unit = shape radius, b grows
# downwards; f: (n, 1, 1) texture cycles per unit
_MASKS = (
    lambda a, b, f: a * a + b * b <= 1.0,                                                    # circle
    lambda a, b, f: np.maximum(np.abs(a), np.abs(b)) <= 0.8,                                 # square
    lambda a, b, f: (b <= 0.75) & (np.abs(a) <= (b + 0.95) * 0.6),                           # triangle, apex up
    lambda a, b, f: (a * a + b * b <= 1.0) & (a * a + b * b >= 0.25),                        # ring
    lambda a, b, f: _cross(a, b),                                                            # plus-shaped cross
    lambda a, b, f: np.abs(a) + np.abs(b) <= 1.0,                                            # diamond
    lambda a, b, f: (np.maximum(np.abs(a), np.abs(b)) <= 0.9) & (np.floor((b + 0.9) * f * 2) % 2 == 0),  # stripes
    lambda a, b, f: ((np.maximum(np.abs(a), np.abs(b)) <= 0.9)                               # checker, 4x4 cells
                     & ((np.floor((a + 0.9) * 2.23) + np.floor((b + 0.9) * 2.23)) % 2 == 0)),
    lambda a, b, f: _cross((a + b) * 0.7071, (a - b) * 0.7071),                              # x-shaped cross
    lambda a, b, f: (a * a + b * b <= 1.0) & ((a - 0.5) ** 2 + (b + 0.1) ** 2 > 0.75**2),  # crescent: disk - disk
)

def render_shapes(indices, num_classes, image_size, seed, supersample=2):
    """Render the samples `indices` -> (uint8 images (n, 3, S, S), int64 labels (n,)); label = index % classes."""
    idx = np.asarray(indices, dtype=np.int64)
    n, S, y = len(idx), image_size, idx % num_classes
    u = [_uniform(seed, idx, k) for k in range(14)]
    # a large shape near the centre: a 5-minute CPU run learns the shapes, not only their colours
    r = 0.55 + 0.2 * u[0]                           # shape radius, image spans [-1, 1]
    cx, cy = (2 * u[1] - 1) * (0.95 - r) * 0.3, (2 * u[2] - 1) * (0.95 - r) * 0.3  # inside the image
    theta = (2 * u[3] - 1) * 0.15                   # small rotation: the square never looks like the diamond
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
        mask = _MASKS[kind](a, b, f32(freq[sel])).astype(np.float32)
        alpha[sel] = mask.reshape(len(sel), S, supersample, S, supersample).mean((2, 4))  # anti-aliased coverage

    gs = ((np.arange(S) + 0.5) / S * 2 - 1).astype(np.float32)
    t = 0.5 + 0.2 * (f32(np.cos(phi)) * gs[None, None, :] + f32(np.sin(phi)) * gs[None, :, None])  # (n, S, S)
    bg0, bg1, fg = (v.astype(np.float32)[:, :, None, None] for v in (bg0, bg1, fg))
    bg = bg0 + (bg1 - bg0) * t[:, None]                                              # (n, 3, S, S) gradient
    img = bg + (fg - bg) * alpha[:, None]
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8), y


class ShapesDataset(Dataset):
    """Class-conditional toy images: class k is shape SHAPES[k] in hue k/num_classes, with random position, size,
    rotation, colour jitter and a gradient background. Sample i is a pure function of (seed, i); label = i % classes.
    Returns (x float32 (3, S, S) in [-1, 1], y int64). Pre-rendered in __init__ unless that takes more than
    `max_prerender_bytes`; then each sample is rendered on access."""

    def __init__(self, num_classes=10, image_size=32, num_samples=10000, seed=0, max_prerender_bytes=2**30):
        if not 1 <= num_classes <= len(SHAPES) or image_size < 8:
            raise ValueError(f"ShapesDataset takes num_classes in 1..{len(SHAPES)} (one per shape) and image_size >= 8 "
                             f"(for the shapes to be recognisable); got {num_classes} and {image_size}.")
        self.num_classes, self.image_size, self.num_samples, self.seed = num_classes, image_size, num_samples, seed
        self.classes, self.images = list(SHAPES[:num_classes]), None
        if num_samples * 3 * image_size**2 <= max_prerender_bytes:
            per = max(1, 2**22 // (4 * image_size**2))  # bounds the float32 temporaries to ~16 MB per array
            self.images = np.zeros((num_samples, 3, image_size, image_size), np.uint8)
            for i in range(0, num_samples, per):
                self.images[i:i + per] = render_shapes(np.arange(i, min(i + per, num_samples)), num_classes,
                                                       image_size, seed)[0]

    def __len__(self):
        return self.num_samples

    def __getitem__(self, i):
        i = range(self.num_samples)[i]  # IndexError out of range; negative indices count from the end
        img = self.images[i] if self.images is not None else render_shapes([i], self.num_classes, self.image_size,
                                                                           self.seed)[0][0]
        return torch.from_numpy(img).float() / 127.5 - 1.0, torch.tensor(i % self.num_classes, dtype=torch.int64)


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
    crop_y, crop_x = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


def _entries(path):
    # sorted (name, is_dir) of a folder's entries, links followed, hidden ones (.ipynb_checkpoints, ...) left out
    try:
        return sorted((e.name, e.is_dir()) for e in os.scandir(path) if not e.name.startswith("."))
    except OSError as e:
        warnings.warn(f"Skipping unreadable folder {path} ({e}).")
        return []


def scan_images(root, seen=None, rel=""):
    """Image paths under root/rel, relative to root, sorted, a folder's files before its subfolders (os.walk's order).
    Links are followed, but each real folder is entered once (`seen`: the (st_dev, st_ino) of those already entered):
    a link loop such as `ln -s . self` would otherwise hang the scan or count images many times. Hidden entries
    (.ipynb_checkpoints, ...) are left out."""
    seen = set() if seen is None else seen
    st = os.stat(os.path.join(root, rel))
    if (st.st_dev, st.st_ino) in seen:
        return []
    seen.add((st.st_dev, st.st_ino))
    entries = _entries(os.path.join(root, rel))
    found = [os.path.join(rel, n) for n, is_dir in entries if not is_dir and n.lower().endswith(IMG_EXTENSIONS)]
    for n in (n for n, is_dir in entries if is_dir):
        found += scan_images(root, seen, os.path.join(rel, n))
    return found


class ImageFolder(Dataset):
    """Images under root/<class>/**/<image>; classes sorted by name to 0..K-1 (`.classes`, `.class_to_idx`). If
    root holds images directly (no class folders) or unconditional=True, every image under root has label 0 and
    `.num_classes == 0` (unconditional). Links are followed, each real folder once.
    Returns (x float32 (3, S, S) in [-1, 1], y int64): RGB, ADM center crop, horizontal flip with probability
    `flip` (True = 0.5, False = 0, or a float). An unreadable image is skipped with a warning naming it and
    replaced by the next readable one; more than `max_bad` of them in one process (each DataLoader worker counts
    its own, `.bad_files`), or none readable at all, raise DataError."""

    def __init__(self, root, image_size, flip=True, unconditional=False, max_bad=100):
        if not os.path.isdir(root):
            raise ValueError(f"Image folder {root!r} does not exist; check --data-path.")
        self.root, self.image_size, self.max_bad = os.path.abspath(root), int(image_size), int(max_bad)
        self.flip_prob = 0.5 if flip is True else float(flip)
        top = _entries(self.root)
        self.classes = [] if unconditional else [n for n, is_dir in top if is_dir]
        loose = sum(not is_dir and n.lower().endswith(IMG_EXTENSIONS) for n, is_dir in top)
        if self.classes and loose:
            warnings.warn(f"{loose} images directly in {root} are ignored (not in a class folder; see unconditional).")
        st = os.stat(self.root)
        seen = {(st.st_dev, st.st_ino)} if self.classes else set()  # no class folder's link back to root is followed
        paths, labels = [], []
        for k, name in enumerate(self.classes or [""]):
            found = scan_images(self.root, seen, name)
            if self.classes and not found:
                warnings.warn(f"Class folder {os.path.join(root, name)} holds no images; its index {k} is unused.")
            paths += found
            labels += [k] * len(found)
        if not paths:
            raise ValueError(f"No images ({', '.join(IMG_EXTENSIONS)}) found under {root!r}; check --data-path.")
        self.class_to_idx, self.num_classes = {c: k for k, c in enumerate(self.classes)}, len(self.classes)
        # one bytes array, not a list of str: DataLoader workers forked from the trainer share it without copy-on-read
        # of a million refcounted objects. os.fsencode keeps a file name that is not valid UTF-8 as the bytes it is.
        self.paths = np.array([os.fsencode(p) for p in paths])
        self.labels, self.bad_files = np.asarray(labels, dtype=np.int64), set()

    def __len__(self):
        return len(self.paths)

    def path(self, i):
        return os.path.join(self.root, os.fsdecode(self.paths[i]))

    def __getitem__(self, i):
        ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must raise, not come back half grey
        for j in ((int(i) + k) % len(self) for k in range(len(self))):
            if j in self.bad_files:
                continue
            try:
                with Image.open(self.path(j)) as im:
                    arr = center_crop_arr(im.convert("RGB"), self.image_size)  # convert loads the whole image
                break
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
                self.bad_files.add(j)
                warnings.warn(f"Skipping unreadable image {self.path(j)} ({type(e).__name__}: {e}).")
                if len(self.bad_files) > self.max_bad:
                    raise DataError(f"More than max_bad={self.max_bad} unreadable images under {self.root}; fix or "
                                    f"remove them, or raise --max-bad.") from None
        else:
            raise DataError(f"None of the {len(self)} images under {self.root} can be read; check --data-path.")
        if self.flip_prob > 0 and torch.rand(()).item() < self.flip_prob:
            arr = arr[:, ::-1]
        x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float() / 127.5 - 1.0  # (3, S, S)
        return x, torch.tensor(self.labels[j], dtype=torch.int64)


# -----------------------------------------------------------------------------
# SD-VAE


def resolve_vae_name(name):
    """'ema' / 'mse' -> the Hugging Face id; a local folder -> its absolute path; anything else unchanged."""
    return VAE_ALIASES.get(str(name), os.path.abspath(name) if os.path.isdir(name) else str(name))


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


@torch.no_grad()
def encode_posterior(vae, x):
    """x (N, 3, H, W) in [-1, 1] -> posterior (mean, std), each (N, C, H/f, W/f), scaled by 0.18215."""
    dist = vae.encode(x).latent_dist
    return dist.mean * VAE_SCALE, dist.std * VAE_SCALE


def sample_posterior(mean, std, generator=None):
    """A fresh latent x = mean + std * eps, eps ~ N(0, I), drawn on mean's device (called every training step)."""
    return mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)


# -----------------------------------------------------------------------------
# Latent cache

ARRAYS = ("mean", "std", "labels")
# what a cache is checked against when resuming a build; chunking and dtype too, since markers index them
_IDENTITY_KEYS = ("format_version", "vae", "image_size", "data_path", "unconditional", "num_images",
                  "classes_sha256", "files_sha256", "latent_shape", "dtype", "chunk_size")


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


def _marker(path, c):
    return os.path.join(path, "chunks", f"{c:06d}.json")


def _crc32s(arrays):
    return {name: zlib.crc32(np.ascontiguousarray(a)) for name, a in zip(ARRAYS, arrays)}


def verify_cache(path, sample=None, reread=True, progress=True):
    """Check a latent cache: each array file's header and size against config.json, then every chunk (or `sample`
    chunks: the first, the last, evenly in between) against the crc32s in its done-marker (reread=False: only that
    the marker exists) and, when all are checked, the markers against complete.json. Raises DataError naming the
    damaged file; returns the totals complete.json holds."""
    cfg = _read_json(os.path.join(path, "config.json"))
    K, N, n = cfg["chunk_size"], cfg["num_images"], cfg["num_chunks"]
    shape, arrays, sums, crcs = (N, 2, *cfg["latent_shape"]), [], np.zeros(3), []
    for name, shp, dtype in zip(ARRAYS, (shape, shape, shape[:1]), (cfg["dtype"], cfg["dtype"], "int64")):
        file = os.path.join(path, f"{name}.npy")
        try:  # np.load says only "mmap length is greater than file size" for a short file, and maps a long one
            a = np.load(file, mmap_mode="r")
            if a.shape != shp or a.dtype != dtype or os.path.getsize(file) != a.offset + a.nbytes:
                raise ValueError(file)
        except Exception:  # missing, truncated, too long, or a damaged header
            raise DataError(f"Latent cache file {file} is damaged (its header or size disagrees with config.json); "
                            f"delete {path} and rerun `python data.py cache` to rebuild it.") from None
        arrays.append(a)
    chunks = range(n) if sample is None else sorted({k * (n - 1) // max(sample - 1, 1) for k in range(sample)})
    bar = Progress(len(chunks), "verify chunks", enabled=progress)
    for c in chunks:
        marker, rows = _marker(path, c), slice(c * K, min(c * K + K, N))
        if not os.path.exists(marker):
            raise DataError(f"Latent cache {path} misses the marker {marker}; delete its complete.json if there is one "
                            f"and rerun `python data.py cache` to encode that chunk.")
        m = _read_json(marker)
        for name, crc in (_crc32s([a[rows] for a in arrays]) if reread else {}).items():
            if crc != m["crc32"][name]:
                raise DataError(f"Latent cache file {os.path.join(path, name)}.npy is damaged in chunk {c} (images "
                                f"{rows.start}..{rows.stop - 1}: crc32 differs from {marker}); delete that marker "
                                f"and complete.json, then rerun `python data.py cache` to re-encode the chunk.")
        sums += [m["sum_mean"], m["sumsq_mean"], m["sum_std"]]
        crcs.append("".join(f"{m['crc32'][name]:08x}" for name in ARRAYS))
        bar.update()
    bar.close()
    s1, s2, s_std = sums / (N * 2 * np.prod(cfg["latent_shape"]))
    stats = {"num_chunks": n, "num_images": N, "latent_mean": float(s1),
             "checksum": hashlib.sha256("".join(crcs).encode()).hexdigest(), "posterior_std_mean": float(s_std),
             "latent_std": float(np.sqrt(max(s2 - s1 * s1, 0.0)))}
    done = os.path.join(path, "complete.json")
    if len(chunks) == n and os.path.exists(done) and _read_json(done)["checksum"] != stats["checksum"]:
        raise DataError(f"Latent cache {path}: its chunk markers changed after it was completed; rebuild it.")
    return stats


class LatentCache(Dataset):
    """A finished latent cache as a Dataset of (mean float32 (C, h, w), std float32 (C, h, w), y int64), one entry
    per image; flip=True picks the stored unflipped or flipped posterior at random (torch RNG), the random
    horizontal flip of pixel training. expect={"vae": "ema", "image_size": 256, ...} refuses a cache built with
    other settings (ValueError). Opening checks the file sizes and the crc32s of 4 chunks (DataError);
    verify_cache(path) checks every chunk. The trainer draws x = sample_posterior(mean, std) on its device each step."""

    def __init__(self, path, flip=True, expect=None):
        self.path = os.path.abspath(path)
        if not os.path.exists(os.path.join(self.path, "config.json")):
            raise ValueError(f"{path!r} is not a latent cache (no config.json); build one with `python data.py cache`.")
        self.config = cfg = _read_json(os.path.join(self.path, "config.json"))
        if cfg.get("format_version") != CACHE_FORMAT_VERSION:
            raise ValueError(f"Latent cache {path!r} has format version {cfg.get('format_version')}, this code reads "
                             f"{CACHE_FORMAT_VERSION}; rebuild it with `python data.py cache`.")
        for key, want in (expect or {}).items():
            norm = {"vae": resolve_vae_name, "data_path": os.path.abspath, "latent_shape": list}.get(key, lambda v: v)
            if norm(cfg[key]) != norm(want):
                raise ValueError(f"Latent cache {path!r} was built with {key}={cfg[key]!r}, not {want!r}; point to a "
                                 f"cache built with {key}={want!r} or build one (python data.py cache).")
        if not os.path.exists(os.path.join(self.path, "complete.json")):
            raise ValueError(f"Latent cache {path!r} is incomplete; rerun the `python data.py cache` command that "
                             f"builds it to finish it (it resumes).")
        verify_cache(self.path, sample=4, progress=False)  # cheap: file sizes, and the crc32s of 4 chunks
        self.flip, self.num_classes, self.classes = flip, cfg["num_classes"], cfg["classes"]
        self.latent_shape, self.labels = tuple(cfg["latent_shape"]), np.load(os.path.join(self.path, "labels.npy"))
        self._mean = self._std = None  # mapped on first access, so each DataLoader worker maps the files itself

    def __len__(self):
        return len(self.labels)

    def __getstate__(self):
        return {**self.__dict__, "_mean": None, "_std": None}

    def __getitem__(self, i):
        if self._mean is None:
            self._mean, self._std = (np.load(os.path.join(self.path, f"{n}.npy"), mmap_mode="r") for n in ARRAYS[:2])
        f = int(torch.randint(2, ()).item()) if self.flip else 0
        return (torch.from_numpy(self._mean[i, f].astype(np.float32)),
                torch.from_numpy(self._std[i, f].astype(np.float32)), torch.tensor(self.labels[i], dtype=torch.int64))


def build_cache(data_path, out, image_size=256, vae="ema", batch_size=64, num_workers=8, dtype="float16",
                chunk_size=1024, max_chunks=None, unconditional=False, max_bad=100, device=None, verify=True,
                log=print):
    """Encode every image of `data_path` (unflipped and flipped) into the cache `out` (layout: module docstring).
    Under torch.distributed each rank encodes its share of the unfinished chunks. Resumes from the chunks already
    done; refuses a folder holding a cache built with other settings. `max_chunks` stops each rank after that many
    chunks. verify=True re-reads every chunk at the end. Returns {"encoded_chunks": [...], "complete": bool}."""
    dist = torch.distributed
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    barrier, log = (dist.barrier if world > 1 else lambda: None), (log if rank == 0 else lambda *a, **k: None)
    device, out, K = torch.device(device or default_device()), os.path.abspath(out), chunk_size
    model = load_vae(vae, device)
    f = 2 ** (len(model.config.block_out_channels) - 1)  # each down block but the last halves: 8 for the SD-VAE
    if image_size % f:
        raise ValueError(f"--image-size {image_size} must be a multiple of the VAE's downsampling factor {f}.")
    ds = ImageFolder(data_path, image_size, flip=False, unconditional=unconditional, max_bad=max_bad)
    N, latent_shape = len(ds), [model.config.latent_channels, image_size // f, image_size // f]
    config = {"format_version": CACHE_FORMAT_VERSION, "vae": resolve_vae_name(vae), "image_size": image_size,
              "data_path": ds.root, "unconditional": ds.num_classes == 0, "num_images": N, "dtype": dtype,
              "num_classes": ds.num_classes, "classes": ds.classes, "latent_shape": latent_shape,
              "classes_sha256": hashlib.sha256(os.fsencode("\n".join(ds.classes))).hexdigest(),
              "files_sha256": hashlib.sha256(b"\n".join(ds.paths.tolist())).hexdigest(), "downsample_factor": f,
              "scale": VAE_SCALE, "flips": ["none", "horizontal"], "chunk_size": K, "num_chunks": (N + K - 1) // K}
    cfg_path = os.path.join(out, "config.json")
    if os.path.exists(cfg_path):  # every rank checks, so a mismatch stops all of them, not just rank 0
        old = _read_json(cfg_path)
        for key in (k for k in _IDENTITY_KEYS if old.get(k) != config[k]):
            raise SystemExit(f"{out} holds a latent cache built with {key}={old.get(key)!r}, not {config[key]!r}; "
                             f"pass another --out or delete {out} to rebuild.")
        if os.path.exists(os.path.join(out, "complete.json")):
            log(f"latent cache {out} is already complete")
            return {"encoded_chunks": [], "complete": True}
    elif rank == 0:  # arrays (sparse files, filled chunk by chunk) before config.json, which means they exist
        os.makedirs(os.path.join(out, "chunks"), exist_ok=True)
        for name, shape, dt in zip(ARRAYS, ((N, 2, *latent_shape),) * 2 + ((N,),), (dtype, dtype, "int64")):
            np.lib.format.open_memmap(os.path.join(out, f"{name}.npy"), mode="w+", dtype=dt, shape=shape)
        _write_json(cfg_path, config)
    barrier()
    todo = [c for c in range(config["num_chunks"]) if not os.path.exists(_marker(out, c))]
    barrier()  # every rank has listed the done chunks before any rank writes a new marker
    mine = todo[rank::world][:max_chunks]
    log(f"latent cache {out}: {N} images, {config['num_chunks']} chunks of {K}, {config['num_chunks'] - len(todo)} "
        f"done, {len(todo)} to encode on {world} process(es), latents {latent_shape} {dtype}")
    offsets = [np.load(os.path.join(out, f"{n}.npy"), mmap_mode="r").offset for n in ARRAYS]
    # batches never straddle chunks, so every chunk is encoded the same way whichever rank or run does it
    bounds = [(c * K, min(c * K + K, N)) for c in mine]
    batches = [list(range(s, min(s + batch_size, b))) for a, b in bounds for s in range(a, b, batch_size)]
    loader = DataLoader(ds, batch_sampler=batches, num_workers=num_workers, pin_memory=device.type == "cuda")
    bar, encoded, parts = Progress(len(mine), "chunks (rank 0)", enabled=rank == 0), [], []
    for idx, (x, y) in zip(batches, loader):  # y as loaded: a bad image is replaced by the next one, label too
        x = x.to(device, non_blocking=True)
        parts.append([torch.stack(t.chunk(2), 1).float().cpu().numpy().astype(dtype)  # (B, 2, C, h, w)
                      for t in encode_posterior(model, torch.cat([x, x.flip(3)]))] + [y.numpy()])
        c = idx[0] // K
        if idx[-1] + 1 == min(c * K + K, N):  # chunk finished: its data on disk first, then its marker
            arrays, parts = [np.ascontiguousarray(np.concatenate(p)) for p in zip(*parts)], []
            for name, offset, arr in zip(ARRAYS, offsets, arrays):
                with open(os.path.join(out, f"{name}.npy"), "r+b", buffering=0) as fh:
                    assert os.pwrite(fh.fileno(), arr, offset + c * K * arr[0].nbytes) == arr.nbytes
                    os.fsync(fh.fileno())
            m64, s64 = arrays[0].astype(np.float64), arrays[1].astype(np.float64)
            _write_json(_marker(out, c), {"crc32": _crc32s(arrays), "sum_mean": float(m64.sum()),
                                          "sumsq_mean": float((m64 * m64).sum()), "sum_std": float(s64.sum())})
            encoded.append(c)
            bar.update()
    bar.close()
    barrier()
    finished = sum(n.endswith(".json") for n in os.listdir(os.path.join(out, "chunks")))
    if finished < config["num_chunks"]:
        log(f"stopped with {finished}/{config['num_chunks']} chunks done; rerun the same command to finish.")
    elif rank == 0:
        stats = verify_cache(out, reread=verify)
        _write_json(os.path.join(out, "complete.json"), stats)
        log(f"latent cache complete: {json.dumps(stats)}")
    barrier()
    return {"encoded_chunks": encoded, "complete": finished == config["num_chunks"]}


# -----------------------------------------------------------------------------
# Loaders


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way: after set_epoch(epoch), skip_batches(k) makes the next
    pass yield exactly the batches an uninterrupted pass would have yielded after its first k, without loading the
    skipped ones. set_epoch starts from the beginning again."""

    batch_size, start_index = 1, 0

    def set_epoch(self, epoch):
        super().set_epoch(epoch)
        self.start_index = 0

    def skip_batches(self, k):
        assert 0 <= k * self.batch_size <= self.num_samples, (k, self.num_samples)
        self.start_index = k * self.batch_size

    def __iter__(self):
        return iter(list(super().__iter__())[self.start_index:])

    def __len__(self):
        return self.num_samples - self.start_index


def make_loader(dataset, batch_size, rank, world_size, seed, num_workers, shuffle=True, drop_last=True):
    """(loader, sampler) with a per-rank batch of `batch_size` (global batch = batch_size * world_size). The sampler
    is seeded with the global seed and pads the last uneven share like DiT's; the loader drops the last partial
    batch. Resume mid-epoch: sampler.set_epoch(epoch); sampler.skip_batches(steps_done_in_epoch)."""
    sampler = ResumableDistributedSampler(dataset, world_size, rank, shuffle=shuffle, seed=seed)
    sampler.batch_size = batch_size
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        pin_memory=torch.cuda.is_available(), drop_last=drop_last, persistent_workers=num_workers > 0,
                        worker_init_fn=_leave_stop_signals_to_the_main_process)
    return loader, sampler


def _leave_stop_signals_to_the_main_process(worker_id):
    # Ctrl-C and SLURM signal the whole process group: a worker that died of it would fail the step the trainer is
    # finishing before it saves; the main process stops its workers itself
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


class EpochBatches:
    """Endless micro-batches (x, y) on `device` from make_loader's (loader, sampler), remembering (epoch,
    batch_in_epoch) so that a resumed run sees exactly the batches of an uninterrupted one. A latent cache's
    (mean, std, y) become a fresh posterior sample x = mean + std * eps at every call."""

    def __init__(self, loader, sampler, device, epoch=0, batch_in_epoch=0):
        self.loader, self.sampler, self.device, self.it = loader, sampler, device, None
        self.epoch, self.batch_in_epoch = epoch, batch_in_epoch
        sampler.set_epoch(epoch)
        sampler.skip_batches(batch_in_epoch)

    def __call__(self):
        while True:
            if self.it is None:
                # important! a DataLoader iterator draws a seed from torch's global RNG: keep that RNG untouched, so
                # that a resumed run (which makes its iterator at another time) draws the same noise
                with torch.random.fork_rng(devices=[]):
                    self.it = iter(self.loader)
            batch = next(self.it, None)
            if batch is not None:
                break
            self.epoch, self.batch_in_epoch, self.it = self.epoch + 1, 0, None
            self.sampler.set_epoch(self.epoch)
        self.batch_in_epoch += 1
        batch = [b.to(self.device, non_blocking=True) for b in batch]
        return (sample_posterior(batch[0], batch[1]), batch[2]) if len(batch) == 3 else tuple(batch)


# -----------------------------------------------------------------------------
# Command line


def _int_from(low):
    return checked(int, lambda v: v >= low, f"an integer >= {low}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Build the SD-VAE latent cache, or preview the built-in dataset.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("cache", help="encode an image folder with the SD-VAE into a resumable latent cache")
    p.add_argument("--data-path", required=True, help="image folder: root/<class>/<image> (ImageNet train)")
    p.add_argument("--image-size", type=_int_from(8), default=256, help="center-crop size (latents: size/8)")
    p.add_argument("--vae", default="ema", help="'ema', 'mse' (stabilityai/sd-vae-ft-*) or a local diffusers folder")
    p.add_argument("--out", required=True, help="cache folder; rerun with the same folder to resume a build")
    p.add_argument("--batch-size", type=_int_from(1), default=64, help="images per VAE forward (x2 with the flips)")
    p.add_argument("--num-workers", type=_int_from(0), default=8, help="image-decoding DataLoader workers per process")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="storage (float16 halves it)")
    p.add_argument("--chunk-size", type=_int_from(1), default=1024, help="images per done-marker, the unit of resume")
    p.add_argument("--max-chunks", type=_int_from(1), default=None, help="stop each process after this many chunks")
    p.add_argument("--unconditional", action="store_true", help="ignore class folders: all labels 0")
    p.add_argument("--max-bad", type=_int_from(0), default=100, help="unreadable images tolerated per process")
    p.add_argument("--device", default=None, help="cuda / mps / cpu (default: autodetect, cuda:LOCAL_RANK)")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip re-reading all chunks at the end")
    q = sub.add_parser("shapes", help="save a grid of ShapesDataset samples (rows = classes) as a PNG")
    q.add_argument("--out", default="shapes.png", help="output PNG path")
    q.add_argument("--image-size", type=_int_from(8), default=32, help="image size in pixels")
    q.add_argument("--per-class", type=_int_from(1), default=10, help="samples per class (columns)")
    q.add_argument("--seed", type=int, default=0, help="dataset seed")
    args = parser.parse_args(argv)
    print(vars(args))

    if args.command == "shapes":
        from sample import save_grid  # the one grid writer
        K, M = len(SHAPES), args.per_class
        index = np.arange(K * M).reshape(M, K).T.reshape(-1)                   # row k: class k (index % K)
        imgs, _ = render_shapes(index, K, args.image_size, args.seed)
        print(f"wrote {save_grid(imgs.transpose(0, 2, 3, 1), args.out, M)}: rows {', '.join(SHAPES)}")
        return
    with distributed(args.device):
        try:
            build_cache(**{k: v for k, v in vars(args).items() if k != "command"})
        except (ValueError, DataError) as e:  # one sentence, not a traceback (a worker's DataError carries one)
            raise SystemExit(f"error: {e.sentence if isinstance(e, DataError) else e}")


if __name__ == "__main__":
    main()
