"""
FID, sFID, Inception Score and precision/recall of generated images, in one file (torch, numpy, scipy, pillow).

The network is the "FID Inception" (the TensorFlow 2015-12-05 graph as ported by pytorch-fid), written out
below with pytorch-fid's exact state-dict layout, so its released weights load as they are:
pt_inception-2015-12-05-6726825d.pth, downloaded once into ~/.cache/dispersive/ (or $XDG_CACHE_HOME) and
checked against the sha256 prefix in its name; pass --weights to use a local copy instead.

Two preprocessings (--mode), which give different numbers; only compare numbers of the same mode:
    pytorch-fid  (default) uint8 -> [0, 1] -> bilinear resize to 299 (align_corners=False, no antialias) -> 2x - 1,
                 as `python -m pytorch_fid`.
    tf           the ADM evaluator's TF graph (guided-diffusion/evaluations/evaluator.py, which the DiT and SiT
                 papers report): float [0, 255] -> TF1 bilinear resize (no half-pixel centres) ->
                 (x - 128) / 128. Use it against ADM's reference batches such as VIRTUAL_imagenet256_labeled.npz.

Metrics, as ADM's evaluator defines them: FID on pool3 (2048-d), sFID on the first 7 channels of
Mixed_6d.branch1x1 (17x17x7 = 2023-d), Inception Score from softmax(pool3 @ fc.weight^T) (no bias) over 10
splits, precision/recall with k = 3 nearest-neighbour balls on pool3.

    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz --mode tf     # IS, FID, sFID, precision, recall
    python fid.py samples/ ref_stats.npz --metrics fid --json               # a folder of images vs saved statistics
    python fid.py ref_images.npz --save-stats ref_stats.npz                 # statistics for later runs
    python fid.py samples.npz ref.npz --weights /data/pt_inception-2015-12-05-6726825d.pth   # no download

Inputs: an .npz with `arr_0` uint8 (N, H, W, 3) (ADM's format; read in batches, never whole), a folder of
images (searched recursively), or a statistics .npz with `mu, sigma` (and `mu_s, sigma_s`); a statistics file
that also holds `arr_0` images (ADM's reference batches) uses its stored statistics for FID/sFID and its
images for precision/recall, as ADM does.

Python API (bench.py and notebooks):
    model = load_inception(weights=None, device="cuda")
    feats = extract_features(images_uint8_nhwc, model, mode="tf")     # dict: pool3, logits, logits_unbiased, spatial
    mu, sigma = compute_statistics(feats["pool3"])
    frechet_distance(mu, sigma, mu_ref, sigma_ref)     # eigenvalue form; frechet_distance_sqrtm is the reference
    inception_score(feats["logits_unbiased"]); precision_recall(ref_feats["pool3"], feats["pool3"])
"""

import argparse
import hashlib
import json
import os
import queue
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import scipy.linalg
import scipy.special
import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_SHA256_PREFIX = "6726825d"  # torch.hub convention: the file name carries the first 8 hex digits of its sha256
OFFICIAL_NETWORK_ID = "pt_inception-2015-12-05-6726825d"
CACHE_FOLDER = "dispersive"
MODES = ("pytorch-fid", "tf")
METRICS = ("fid", "sfid", "is", "pr")
FEATURES = ("pool3", "logits", "logits_unbiased", "spatial")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
RESOLUTION = 299
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]: 17 * 17 * 7 = 2023 sFID features


class FIDError(ValueError):
    """A problem the user can fix (a path, a file, an input format); main() prints its one sentence."""


# ----------------------------------------------------------------------------- the FID Inception network

class BasicConv2d(nn.Module):
    def __init__(self, in_channels, out_channels, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)  # important! TF's epsilon, not PyTorch's 1e-5

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x):
    # TF's 3x3 average pool divides by the number of real (unpadded) pixels; torchvision's counts the zeros
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # Mixed_5b, 5c, 5d
    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):  # Mixed_6a: 35x35 -> 17x17
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], 1)


class InceptionC(nn.Module):  # Mixed_6b..6e
    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x, return_branch1x1=False):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(bd))))
        bp = self.branch_pool(_avg_pool_tf(x))
        out = torch.cat([b1, b7, bd, bp], 1)
        return (out, b1) if return_branch1x1 else out


class InceptionD(nn.Module):  # Mixed_7a: 17x17 -> 8x8
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class InceptionE(nn.Module):  # Mixed_7b (avg pool), Mixed_7c (max pool)
    def __init__(self, in_channels, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.pool == "max":
            # important! the TF graph has a max pool in its last block (mixed_10), unlike the Inception paper
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _avg_pool_tf(x)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, bd, bp], 1)


class FIDInception(nn.Module):
    """InceptionV3 with 1008 classes as in the TF 2015-12-05 graph; module names are pytorch-fid's (566 keys)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)
        self.network_id = "untrained"

    def forward(self, x, return_spatial=False):
        """x: preprocessed (N, 3, 299, 299). Returns pool3 (N, 2048), and (N, 192, 17, 17) sFID maps when asked."""
        x = self.Conv2d_1a_3x3(x)                      # (N, 32, 149, 149)
        x = self.Conv2d_2a_3x3(x)                      # (N, 32, 147, 147)
        x = self.Conv2d_2b_3x3(x)                      # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)   # (N, 64, 73, 73)
        x = self.Conv2d_3b_1x1(x)                      # (N, 80, 73, 73)
        x = self.Conv2d_4a_3x3(x)                      # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)   # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))  # (N, 768, 17, 17)
        x, spatial = self.Mixed_6d(x, return_branch1x1=True)  # spatial = TF's mixed_6/conv: (N, 192, 17, 17)
        x = self.Mixed_7a(self.Mixed_6e(x))            # (N, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))            # (N, 2048, 8, 8)
        pool3 = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (N, 2048)
        return (pool3, spatial) if return_spatial else pool3


# ----------------------------------------------------------------------------- weights

def default_weights_path():
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, CACHE_FOLDER, WEIGHTS_NAME)


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _by_hand(path):
    return (f"download {WEIGHTS_URL} by hand (e.g. `curl -L -o {path} {WEIGHTS_URL}`) and place it at {path}, "
            f"or pass --weights /path/to/{WEIGHTS_NAME}")


def download_weights(path=None, url=WEIGHTS_URL):
    """Path of the verified weight file, downloading it once (atomically: a temp file renamed into place)."""
    path = path or default_weights_path()
    if os.path.exists(path):
        digest = _sha256(path)
        if not digest.startswith(WEIGHTS_SHA256_PREFIX):
            raise FIDError(f"{path} is corrupt (sha256 {digest[:8]}..., expected {WEIGHTS_SHA256_PREFIX}...); "
                           f"delete it to download again, or {_by_hand(path)}")
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    print(f"fid: downloading the FID Inception weights from {url} to {path}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
    except (OSError, urllib.error.URLError) as e:  # no network, HTTP error, disk full
        if os.path.exists(tmp):
            os.remove(tmp)
        raise FIDError(f"could not download the FID Inception weights ({e}); {_by_hand(path)}") from e
    digest = _sha256(tmp)
    if not digest.startswith(WEIGHTS_SHA256_PREFIX):
        os.remove(tmp)
        raise FIDError(f"the downloaded weights are corrupt (sha256 {digest[:8]}..., expected "
                       f"{WEIGHTS_SHA256_PREFIX}...); {_by_hand(path)}")
    os.replace(tmp, path)
    return path


def _state_dict_id(state_dict):
    """Content hash of the weights, the same whether or not the file stores num_batches_tracked."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        if k.endswith("num_batches_tracked"):
            continue
        h.update(k.encode())
        h.update(state_dict[k].detach().to("cpu", torch.float32).contiguous().reshape(-1).numpy())
    return "custom-" + h.hexdigest()[:8]


def load_inception(weights=None, device="cpu"):
    """The FID Inception in eval mode on `device`.

    weights: None (pytorch-fid's release, downloaded once into the cache folder), a path to a .pth state
    dict, or a state dict. `model.network_id` names the weights, so statistics of other weights are refused.
    """
    if isinstance(weights, dict):
        state_dict, network_id = weights, None
    else:
        path = download_weights() if weights is None else os.fspath(weights)
        if not os.path.isfile(path):
            raise FIDError(f"weights file {path} not found; pass --weights with the path of {WEIGHTS_NAME} "
                           f"or leave --weights out to download it")
        official = _sha256(path).startswith(WEIGHTS_SHA256_PREFIX)
        if os.path.basename(path) == WEIGHTS_NAME and not official:
            raise FIDError(f"{path} is corrupt (its sha256 does not start with {WEIGHTS_SHA256_PREFIX}); "
                           f"{_by_hand(path)}")
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated file, HTML error page saved as .pth, pickle of another kind
            raise FIDError(f"cannot read the weights file {path} ({type(e).__name__}: {e}); {_by_hand(path)}") from e
        network_id = OFFICIAL_NETWORK_ID if official else None
    if not isinstance(state_dict, dict):
        raise FIDError(f"the weights must be a state dict of tensors, got {type(state_dict).__name__}; "
                       f"use pytorch-fid's {WEIGHTS_NAME}")
    with torch.device("meta"):  # no random init of 24M parameters that are overwritten right away
        model = FIDInception()
    expected = model.state_dict()
    state_dict = dict(state_dict)
    for k in expected:  # some weight files omit the BatchNorm counters, which eval mode never reads
        if k.endswith("num_batches_tracked") and k not in state_dict:
            state_dict[k] = torch.zeros((), dtype=torch.long)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [k for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        raise FIDError(f"these weights are not the FID Inception's ({len(missing)} missing keys, e.g. {missing[:2]}; "
                       f"{len(unexpected)} unexpected, e.g. {unexpected[:2]}; {len(wrong)} of another shape, "
                       f"e.g. {wrong[:2]}); use pytorch-fid's {WEIGHTS_NAME}")
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.network_id = network_id or _state_dict_id(state_dict)
    return model.float().eval().requires_grad_(False).to(device)


# ----------------------------------------------------------------------------- preprocessing

def _tf1_source_index(in_size, out_size, device):
    # TF1 ResizeBilinear, align_corners=False, half_pixel_centers=False: src = dst * (in / out), float32
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    src = torch.arange(out_size, dtype=torch.float32) * scale
    lo = src.floor()
    lerp = src - lo
    lo = lo.long().clamp(0, in_size - 1)
    hi = (lo + 1).clamp(max=in_size - 1)
    return lo.to(device), hi.to(device), lerp.to(device)


def resize_bilinear_tf1(x, size):
    """(N, C, H, W) float -> (N, C, size, size), TF1's bilinear resize as in the graph ADM's evaluator runs."""
    _, _, h, w = x.shape
    y0, y1, ly = _tf1_source_index(h, size, x.device)
    x0, x1, lx = _tf1_source_index(w, size, x.device)
    top, bottom = x[:, :, y0], x[:, :, y1]           # (N, C, size, W)
    tl, tr, bl, br = top[..., x0], top[..., x1], bottom[..., x0], bottom[..., x1]  # (N, C, size, size)
    # the same operation order as TF's compute_lerp, so float32 rounding agrees too
    t = tl + (tr - tl) * lx
    b = bl + (br - bl) * lx
    return t + (b - t) * ly[:, None]


def preprocess(images, mode="pytorch-fid"):
    """uint8 (N, H, W, 3) tensor -> float32 (N, 3, 299, 299) network input for the given mode."""
    x = images.permute(0, 3, 1, 2).float()  # (N, 3, H, W) in [0, 255]
    if mode == "pytorch-fid":
        x = F.interpolate(x / 255, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False,
                          antialias=False)
        return 2 * x - 1
    if mode == "tf":
        # at 299 this resize is the identity (src = dst), as in the TF graph
        return (resize_bilinear_tf1(x, RESOLUTION) - 128) / 128
    raise FIDError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")


# ----------------------------------------------------------------------------- feature extraction

def check_images(images, name="images"):
    """Refuse what is not a uint8 (N, H, W, 3) batch, naming the conversion that fixes it."""
    _check_image_format(tuple(images.shape), images.dtype, name)


def _check_image_format(shape, dtype, name):
    dtype = str(dtype).replace("torch.", "")
    if len(shape) != 4:
        raise FIDError(f"{name} must be a batch of RGB images of shape (N, H, W, 3), got shape {shape}")
    if shape[-1] != 3:
        if shape[1] == 3:
            raise FIDError(f"{name} has shape {shape}, which looks channels-first (NCHW); pass NHWC, "
                           f"e.g. x.permute(0, 2, 3, 1) or x.transpose(0, 2, 3, 1)")
        raise FIDError(f"{name} must have 3 (RGB) channels last, got shape {shape}; convert grayscale or RGBA to RGB")
    if dtype != "uint8":
        raise FIDError(f"{name} must be uint8 in [0, 255], got {dtype}; convert samples in [-1, 1] with "
                       f"clamp(127.5 * x + 128, 0, 255) then uint8")


class Progress:
    """Count, rate and ETA on stderr, one line every `every` seconds and one at the end."""

    def __init__(self, total, label, enabled=True, every=10.0):
        self.total, self.label, self.enabled, self.every = total, label, enabled, every
        self.done, self.start = 0, time.time()
        self.last = self.start

    def update(self, n):
        self.done += n
        now = time.time()
        if self.enabled and now - self.last >= self.every and self.done != self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            of, eta = "", ""
            if self.total:
                left = int((self.total - self.done) / max(rate, 1e-9))
                of, eta = f"/{self.total}", f" | eta {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"
            print(f"fid: {self.label} {self.done}{of} images | {rate:.1f} img/s{eta}", file=sys.stderr, flush=True)

    def close(self):
        if self.enabled:
            elapsed = time.time() - self.start
            rate = self.done / max(elapsed, 1e-9)
            print(f"fid: {self.label} {self.done} images in {elapsed:.1f} s ({rate:.1f} img/s)",
                  file=sys.stderr, flush=True)


@contextmanager
def full_float32():
    """TF32 convolutions move Inception features by ~1e-3 relative; parity with the references needs float32."""
    try:
        saved = ("legacy", torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    except RuntimeError:  # the process set TF32 through the newer fp32_precision API; mixing both APIs raises
        saved = ("new", torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
        torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        if saved[0] == "legacy":
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1:]
        else:
            torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved[1:]


def _prefetch(iterable, depth=2):
    """Run the producer (file decoding, npz streaming) in a thread so it overlaps with the network."""
    q, stop, end = queue.Queue(maxsize=depth), threading.Event(), object()

    def put(item):
        while not stop.is_set():
            try:
                return q.put(item, timeout=0.1)
            except queue.Full:
                pass

    def produce():
        try:
            for item in iterable:
                if stop.is_set():
                    return
                put(item)
            put(end)
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(e)

    threading.Thread(target=produce, daemon=True).start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:  # the consumer stopped (done, error or abandoned): let the producer finish too
        stop.set()


@torch.inference_mode()
def extract_features(images, model, mode="pytorch-fid", batch_size=64, device=None, features=FEATURES,
                     progress=False, total=None):
    """Inception features of uint8 NHWC images, as float32 numpy arrays.

    images: a uint8 (N, H, W, 3) array or tensor, or an iterable of such batches (streamed: only the
    features are kept). Returns a dict with the requested `features`:
      pool3 (N, 2048); logits (N, 1008) = fc(pool3) with bias; logits_unbiased (N, 1008) = pool3 @ fc.weight^T,
      the Inception Score's logits in ADM's evaluator; spatial (N, 2023) sFID features (mixed_6/conv[..., :7], NHWC).
    """
    if mode not in MODES:
        raise FIDError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    unknown = set(features) - set(FEATURES)
    if unknown:
        raise ValueError(f"unknown features {sorted(unknown)}; choose from {FEATURES}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    if isinstance(images, (np.ndarray, torch.Tensor)):
        check_images(images)
        total = len(images)
        batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
    else:
        batches = images
        total = total if total is not None else (len(images) if hasattr(images, "__len__") else None)
    dims = {"pool3": 2048, "logits": 1008, "logits_unbiased": 1008, "spatial": 17 * 17 * SPATIAL_CHANNELS}
    # preallocated when the count is known, so 50K images never hold a second copy during a concatenate
    out = {k: np.empty((total, dims[k]), np.float32) if total else [] for k in features}
    done = 0
    bar = Progress(total, f"{mode} features", enabled=progress)
    first = True
    with full_float32():
        for batch in batches:
            check_images(batch)
            for i in range(0, len(batch), batch_size):  # an iterator may yield batches larger than batch_size
                chunk = batch[i:i + batch_size]
                if isinstance(chunk, np.ndarray):
                    chunk = torch.from_numpy(chunk if chunk.flags.writeable and chunk.flags.c_contiguous
                                             else np.array(chunk))
                x = chunk.to(device, non_blocking=True)
                if first:
                    first = False
                    if x.numel() and int(x.max()) <= 1:
                        warnings.warn("every pixel of the first batch is 0 or 1: images in [0, 1] were probably cast "
                                      "to uint8 without multiplying by 255")
                pool3, spatial = model(preprocess(x, mode), return_spatial=True)
                if not torch.isfinite(pool3).all():
                    raise FIDError("the Inception network produced NaN/inf features; the weights are probably corrupt: "
                                   f"delete {default_weights_path()} (or your --weights file) and fetch it again")
                got = {"pool3": pool3}
                if "logits_unbiased" in features:
                    got["logits_unbiased"] = pool3 @ model.fc.weight.T
                if "logits" in features:
                    got["logits"] = model.fc(pool3)
                if "spatial" in features:
                    s = spatial[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)  # (N, 17, 17, 7): TF's NHWC order
                    got["spatial"] = s.reshape(len(s), -1)                 # (N, 2023)
                for k in features:
                    if isinstance(out[k], np.ndarray) and done + len(x) > len(out[k]):
                        out[k] = [out[k][:done]]  # more images than announced: fall back to a list
                    if isinstance(out[k], np.ndarray):
                        out[k][done:done + len(x)] = got[k].cpu().numpy()
                    else:
                        out[k].append(got[k].cpu().numpy())
                done += len(x)
                bar.update(len(x))
    bar.close()
    return {k: v[:done] if isinstance(v, np.ndarray) else np.concatenate(v or [np.zeros((0, dims[k]), np.float32)])
            for k, v in out.items()}


# ----------------------------------------------------------------------------- metrics

def compute_statistics(features, chunk=8192):
    """Mean and covariance (np.cov(rowvar=False) convention, divisor N - 1) in float64, in row chunks so the
    float64 copy of 50K x 2048 features is never made at once."""
    features = np.asarray(features)
    if features.ndim != 2:
        raise FIDError(f"features must be (N, D), got shape {features.shape}")
    n, d = features.shape
    if n < 2:
        raise FIDError(f"a covariance needs at least 2 images, got {n}; FID wants 50,000 (at least {d + 1})")
    if not all(np.isfinite(features[i:i + chunk]).all() for i in range(0, n, chunk)):
        raise FIDError("the features contain NaN/inf; check the images and the Inception weights")
    if n <= d:
        warnings.warn(f"{n} images for {d}-dim features: the covariance is singular, so this FID is biased and "
                      f"comparable to nothing; use at least {d + 1} images (50,000 is standard)")
    mu = sum(features[i:i + chunk].astype(np.float64).sum(0) for i in range(0, n, chunk)) / n
    sigma = np.zeros((d, d))
    for i in range(0, n, chunk):
        xc = features[i:i + chunk].astype(np.float64) - mu
        sigma += xc.T @ xc
    return mu, sigma / (n - 1)


def _check_statistics(mu1, sigma1, mu2, sigma2):
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise FIDError(f"statistics of different dimensions: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                       f"{sigma2.shape}; compute both with the same network and features")
    for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(a).all():
            raise FIDError(f"{name} contains NaN/inf; recompute the statistics")
    return mu1, sigma1, mu2, sigma2


def _drop_round_off(eigenvalues):
    # eigenvalues below d·eps·λmax are round-off of zeros; their square roots (~1e-8 each) would add up
    floor = len(eigenvalues) * np.finfo(np.float64).eps * max(eigenvalues.max(), 0)
    return np.where(eigenvalues > floor, eigenvalues, 0)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr sqrt(Σ1 Σ2) in float64.

    With Σ1 = B Bᵀ, Bᵀ Σ2 B is symmetric PSD with the eigenvalues of Σ1 Σ2, so tr sqrt(Σ1 Σ2) =
    Σ sqrt(λ(Bᵀ Σ2 B)): a Cholesky factor and one symmetric eigenvalue solve replace scipy's sqrtm (several
    times faster at 2048, no complex round-off). A singular Σ1 (fewer images than dimensions) has no Cholesky
    factor; B = V sqrt(Λ) from its eigendecomposition serves then, its zero eigenvalues adding nothing.
    """
    mu1, sigma1, mu2, sigma2 = _check_statistics(mu1, sigma1, mu2, sigma2)
    try:
        b = scipy.linalg.cholesky(sigma1, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        w, v = scipy.linalg.eigh(sigma1, check_finite=False)
        b = v * np.sqrt(_drop_round_off(w))
    m = b.T @ sigma2 @ b
    lam = scipy.linalg.eigh((m + m.T) / 2, eigvals_only=True, check_finite=False)
    tr_covmean = np.sqrt(_drop_round_off(lam)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def frechet_distance_sqrtm(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """The reference formula of TTUR / pytorch-fid / ADM's evaluator: scipy.linalg.sqrtm of Σ1 Σ2."""
    mu1, sigma1, mu2, sigma2 = _check_statistics(mu1, sigma1, mu2, sigma2)
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # singular product: the reference adds eps to both diagonals
        warnings.warn(f"sqrtm of a singular product; adding {eps} to the covariance diagonals")
        offset = np.eye(len(sigma1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has an imaginary component of {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits, splits=10):
    """exp(E_x KL(p(y|x) ‖ p(y))) per consecutive split, averaged; softmax over all 1008 classes.

    Pass `logits_unbiased` (pool3 @ fc.weightᵀ) to match ADM's evaluator. ADM slices fixed 5000-image
    chunks, which are exactly these 10 splits at the standard 50,000 samples. Computed in float64 from
    log-softmax (ADM takes log of a float32 softmax, which can underflow to log 0).
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or len(logits) < splits or splits < 1:
        raise FIDError(f"the Inception Score needs at least `splits` = {splits} images (N, classes), got shape "
                       f"{logits.shape}; lower --is-splits or use more images (50,000 is standard)")
    if not np.isfinite(logits).all():
        raise FIDError("the logits contain NaN/inf; check the images and the Inception weights")
    scores = []
    for part in np.array_split(logits, splits):
        log_p = scipy.special.log_softmax(part, axis=1)                             # log p(y|x)
        log_py = scipy.special.logsumexp(log_p, axis=0) - np.log(len(part))         # log p(y)
        kl = (np.exp(log_p) * (log_p - log_py)).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def _squared_distances(a, b):
    # ‖a‖² − 2 a·b + ‖b‖², clamped at 0, as ADM's DistanceBlock; its float16 first pass is not copied:
    # float32 throughout (ADM's own fallback) only moves points within ~1e-3 of a ball's edge
    d = (a * a).sum(1)[:, None] - 2 * (a @ b.T) + (b * b).sum(1)[None, :]
    return d.clamp_(min=0)


def knn_radii(features, k=3, batch_size=10000):
    """Squared distance of each row to its k-th nearest other row (ADM: partition index k of the row incl. self)."""
    n = len(features)
    if n <= k:
        raise FIDError(f"precision/recall with k = {k} needs more than {k} images per set, got {n}")
    batch_size = max(batch_size, k + 1)
    radii = torch.empty(n, dtype=features.dtype, device=features.device)
    for i in range(0, n, batch_size):
        rows, best = features[i:i + batch_size], None
        for j in range(0, n, batch_size):
            d = _squared_distances(rows, features[j:j + batch_size])
            if i == j:
                d.fill_diagonal_(0)  # the point itself: exactly 0, whatever the float32 round-off
            top = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values
            best = top if best is None else torch.cat([best, top], 1).topk(k + 1, dim=1, largest=False).values
        radii[i:i + batch_size] = best[:, k]
    return radii


def precision_recall(ref_features, sample_features, k=3, batch_size=10000, device=None):
    """Improved precision and recall (Kynkäänniemi et al. 2019) as ADM's evaluator computes them.

    Each set's points get a ball of radius = distance to their k-th nearest neighbour in the same set.
    precision: fraction of samples inside at least one reference ball; recall: fraction of reference points
    inside at least one sample ball. Distances in (batch_size x batch_size) blocks, never all pairs at once.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    ref = torch.as_tensor(np.asarray(ref_features), dtype=torch.float32, device=device)
    sam = torch.as_tensor(np.asarray(sample_features), dtype=torch.float32, device=device)
    if ref.ndim != 2 or sam.ndim != 2 or ref.shape[1] != sam.shape[1]:
        raise FIDError(f"reference and sample features must be (N, D) with the same D, got {tuple(ref.shape)} and "
                       f"{tuple(sam.shape)}")
    batch_size = max(batch_size, k + 1)
    with full_float32():
        r_ref, r_sam = knn_radii(ref, k, batch_size), knn_radii(sam, k, batch_size)
        sample_in = torch.zeros(len(sam), dtype=torch.bool, device=device)
        ref_in = torch.zeros(len(ref), dtype=torch.bool, device=device)
        for i in range(0, len(ref), batch_size):
            for j in range(0, len(sam), batch_size):
                d = _squared_distances(ref[i:i + batch_size], sam[j:j + batch_size])  # (refs, samples)
                sample_in[j:j + batch_size] |= (d <= r_ref[i:i + batch_size, None]).any(0)
                ref_in[i:i + batch_size] |= (d <= r_sam[None, j:j + batch_size]).any(1)
    return sample_in.double().mean().item(), ref_in.double().mean().item()


# ----------------------------------------------------------------------------- inputs and statistics files

def _list_images(folder):
    files = []
    for root, _, names in os.walk(folder, followlinks=True):
        files += [os.path.join(root, f) for f in names if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(files, key=lambda f: os.path.relpath(f, folder).split(os.sep))


def _load_rgb(path):
    from PIL import Image
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:
        raise FIDError(f"cannot read image {path} ({type(e).__name__}: {e}); remove or replace it") from e


def _folder_batches(files, batch_size, num_workers):
    """uint8 NHWC batches of the files in order; a batch is cut where the image size changes."""
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        for i in range(0, len(files), batch_size):
            images = list(pool.map(_load_rgb, files[i:i + batch_size]))
            start = 0
            for j in range(1, len(images) + 1):
                if j == len(images) or images[j].shape != images[start].shape:
                    yield np.stack(images[start:j])
                    start = j


def _npy_header(f):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    return None


def _npz_batches(path, key, batch_size, limit):
    """Stream `key` of an npz in batches (a 50K x 256 x 256 x 3 arr_0 is 9.8 GB), as ADM's evaluator does."""
    with zipfile.ZipFile(path) as z, z.open(key + ".npy") as f:
        header = _npy_header(f)
        if header is None or header[1] or header[2].hasobject:  # rare layouts: load the whole array
            arr = np.load(path)[key][:limit]
            for i in range(0, len(arr), batch_size):
                yield arr[i:i + batch_size]
            return
        shape, _, dtype = header
        for i in range(0, limit, batch_size):
            batch = np.empty((min(batch_size, limit - i), *shape[1:]), dtype)
            view, got = memoryview(batch).cast("B"), 0
            while got < len(view):
                n = f.readinto(view[got:])
                if not n:
                    raise FIDError(f"{path} is truncated ({key} ends before image {i + got // batch[0].nbytes}); "
                                   f"write it again")
                got += n
            yield batch


class Source:
    """One positional input: images (npz arr_0 or a folder) and/or stored statistics (mu, sigma, mu_s, sigma_s)."""

    def __init__(self, path, limit=None):
        self.path, self.files, self.stats, self.meta, self.num_images = path, None, {}, {}, 0
        if os.path.isdir(path):
            self.files = _list_images(path)
            if not self.files:
                raise FIDError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {path}")
            self.num_images = len(self.files)
        elif not os.path.exists(path):
            raise FIDError(f"{path} does not exist; give an .npz (arr_0 images or mu/sigma statistics) or a folder")
        elif path.endswith(".npz"):
            try:
                npz = np.load(path)
            except Exception as e:
                raise FIDError(f"cannot read {path} as .npz ({type(e).__name__}: {e})") from e
            with npz:
                keys = set(npz.files)
                for k in ("mu", "sigma", "mu_s", "sigma_s"):
                    if k in keys:
                        self.stats[k] = np.asarray(npz[k], np.float64)
                for k in ("mode", "network"):
                    if k in keys:
                        self.meta[k] = str(npz[k])
            if ("mu" in self.stats) != ("sigma" in self.stats) or ("mu_s" in self.stats) != ("sigma_s" in self.stats):
                raise FIDError(f"{path} holds only half of a statistics pair (mu/sigma, mu_s/sigma_s); write it again")
            if "arr_0" in keys:
                with zipfile.ZipFile(path) as z, z.open("arr_0.npy") as f:
                    header = _npy_header(f)
                if header is None:
                    arr = np.load(path)["arr_0"]
                    header = (arr.shape, False, arr.dtype)
                shape, _, dtype = header
                _check_image_format(tuple(shape), dtype, f"arr_0 of {path}")
                self.num_images = shape[0]
            elif not self.stats:
                raise FIDError(f"{path} holds neither images (arr_0) nor statistics (mu, sigma)")
        else:
            raise FIDError(f"{path}: expected an .npz (arr_0 uint8 NHWC images, or mu/sigma statistics) or a folder")
        if limit is not None and self.num_images:
            if limit > self.num_images:
                raise FIDError(f"{path} has {self.num_images} images, fewer than --num-samples {limit}")
            self.num_images = limit
            self.files = self.files[:limit] if self.files else None

    def batches(self, batch_size, num_workers):
        if self.files:
            return _folder_batches(self.files, batch_size, num_workers)
        return _npz_batches(self.path, "arr_0", batch_size, self.num_images)

    def describe(self):
        parts = []
        if self.stats:
            pairs = [p for p in ("mu/sigma", "mu_s/sigma_s") if p.split("/")[0] in self.stats]
            parts.append("stored " + ", ".join(pairs))
            parts.append(f"mode {self.meta.get('mode', 'unknown')}, network {self.meta.get('network', 'unknown')}")
        if self.num_images:
            parts.append(f"{self.num_images} images")
        return f"{self.path} ({'; '.join(parts)})"


def save_statistics(path, mu, sigma, mu_s=None, sigma_s=None, mode=None, network=None, num_images=None):
    """ADM's reference-batch keys (mu, sigma, mu_s, sigma_s) plus mode/network, so mismatches are caught later."""
    arrays = {"mu": mu, "sigma": sigma}
    if mu_s is not None:
        arrays.update(mu_s=mu_s, sigma_s=sigma_s)
    for k, v in (("mode", mode), ("network", network), ("num_images", num_images)):
        if v is not None:
            arrays[k] = np.array(v)  # strings as numpy unicode: no pickle needed to read them back
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:  # a file object, so numpy does not append .npz to the temp name
        np.savez(f, **arrays)
    os.replace(tmp, path)


def load_statistics(path):
    """dict with mu, sigma (and mu_s, sigma_s, mode, network when stored)."""
    src = Source(path)
    if not src.stats:
        raise FIDError(f"{path} holds no statistics (mu, sigma)")
    return {**src.stats, **src.meta}


def check_compatible(origins, warn=True):
    """origins: (label, mode, network) of every set of statistics or features compared; None = unknown."""
    known = [o for o in origins if o[1] is not None]
    for label, mode, network in known[1:]:
        if mode != known[0][1]:
            raise FIDError(f"{label} was computed with --mode {mode} but {known[0][0]} with --mode {known[0][1]}; "
                           f"use the same --mode for both (rerun with --mode {mode}, or recompute the statistics)")
    networks = [o for o in origins if o[2] is not None]
    for label, _, network in networks[1:]:
        if network != networks[0][2]:
            raise FIDError(f"{label} comes from network {network} but {networks[0][0]} from {networks[0][2]}; "
                           f"use the same Inception weights (--weights) for both")
    for label, mode, _ in origins if warn else []:
        if mode is None and any(o[1] not in (None, "tf") for o in origins):
            warnings.warn(f"{label} does not say which preprocessing made it; ADM's reference batches used the TF "
                          f"graph (--mode tf), so numbers against it in another mode are not comparable")


# ----------------------------------------------------------------------------- command line

def default_device():
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def parse_args(argv=None):
    examples = [line for line in __doc__.splitlines() if line.strip().startswith("python fid.py")]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n" + "\n".join(examples))
    p.add_argument("samples", help="generated images: .npz with arr_0 uint8 (N, H, W, 3), a folder of images, "
                                   "or a statistics .npz (mu, sigma)")
    p.add_argument("ref", nargs="?", default=None,
                   help="reference: the same kinds; ADM's reference batches hold statistics and 10K images (arr_0)")
    p.add_argument("--mode", choices=MODES, default="pytorch-fid",
                   help="preprocessing: pytorch-fid (default) or tf (ADM's evaluator, used by the DiT/SiT papers)")
    p.add_argument("--metrics", default=None,
                   help="comma-separated from fid,sfid,is,pr (default: all that the inputs allow)")
    p.add_argument("--weights", default=None,
                   help=f"local {WEIGHTS_NAME} (default: downloaded once to {default_weights_path()})")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (ADM: 64)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: autodetect cuda > mps > cpu)")
    p.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="threads decoding image files of a folder")
    p.add_argument("--num-samples", type=int, default=None,
                   help="use only the first N sample images (default: all; 50,000 is standard)")
    p.add_argument("--is-splits", type=int, default=10, help="Inception Score splits (ADM: 10 of 5,000 images)")
    p.add_argument("--pr-k", type=int, default=3, help="k of the nearest-neighbour balls of precision/recall (ADM: 3)")
    p.add_argument("--pr-batch-size", type=int, default=10000,
                   help="rows and columns of one distance block for precision/recall (memory vs speed; ADM: 10000)")
    p.add_argument("--save-stats", default=None,
                   help="write the samples' statistics (mu, sigma, mu_s, sigma_s, mode, network) to this .npz")
    p.add_argument("--json", action="store_true", help="print the settings and results as one JSON object")
    return p.parse_args(argv)


def _plan(args, samples, ref):
    """Which metrics to compute and which features each input must extract."""
    requested = None if args.metrics is None else [m.strip() for m in args.metrics.split(",") if m.strip()]
    for m in requested or []:
        if m not in METRICS:
            raise FIDError(f"unknown metric {m!r} in --metrics; choose from {','.join(METRICS)}")
    if requested is not None and any(m in requested for m in ("fid", "sfid", "pr")) and ref is None:
        raise FIDError("FID, sFID and precision/recall need a reference (second positional argument)")
    if requested is not None:
        candidates = requested
    elif ref is not None:
        candidates = list(METRICS)
    else:  # samples alone: the Inception Score, unless only statistics are being written
        candidates = [] if args.save_stats else ["is"]
    need = {"samples": set(), "ref": set()}
    metrics, skipped = [], []
    for m in candidates:
        want = {}
        if m == "fid":
            want = {"samples": set() if "mu" in samples.stats else {"pool3"},
                    "ref": set() if "mu" in ref.stats else {"pool3"}}
        elif m == "sfid":
            want = {"samples": set() if "mu_s" in samples.stats else {"spatial"},
                    "ref": set() if "mu_s" in ref.stats else {"spatial"}}
        elif m == "is":
            want = {"samples": {"logits_unbiased"}}
        elif m == "pr":
            want = {"samples": {"pool3"}, "ref": {"pool3"}}
        why = [f"{src.path} has no images" for role, src in (("samples", samples), ("ref", ref))
               if want.get(role) and not src.num_images]
        if why:
            if requested is not None:
                raise FIDError(f"cannot compute {m}: {why[0]}; give images, or drop {m} from --metrics")
            skipped.append(f"{m} ({why[0]})")
            continue
        metrics.append(m)
        for role, feats in want.items():
            need[role] |= feats
    if "is" in metrics and samples.num_images < args.is_splits:
        raise FIDError(f"the Inception Score over {args.is_splits} splits needs at least {args.is_splits} images, "
                       f"got {samples.num_images}; lower --is-splits")
    if args.save_stats:
        if not samples.num_images:
            raise FIDError(f"--save-stats needs images, but {samples.path} holds only statistics")
        need["samples"] |= {"pool3", "spatial"}
    return metrics, skipped, need


def run(args):
    for flag in ("batch_size", "is_splits", "pr_k", "pr_batch_size", "num_samples", "num_workers"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise FIDError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    samples = Source(args.samples, limit=args.num_samples)
    ref = Source(args.ref) if args.ref else None
    metrics, skipped, need = _plan(args, samples, ref)

    def origins(network):
        out = []
        for label, src, role in (("sample", samples, "samples"), ("reference", ref, "ref")):
            if src is not None and need[role]:
                out.append((f"the {label} images", args.mode, network))
            if src is not None and src.stats:
                out.append((src.path, src.meta.get("mode"), src.meta.get("network")))
        return out

    needs_model = bool(need["samples"] or need["ref"])
    check_compatible(origins(None), warn=not needs_model)  # before hours of feature extraction
    device = args.device or default_device()
    model = None
    if needs_model:
        model = load_inception(args.weights, device)
        check_compatible(origins(model.network_id))
    settings = {"mode": args.mode, "network": model.network_id if model else None, "device": str(device),
                "batch_size": args.batch_size, "samples": samples.describe(),
                "ref": ref.describe() if ref else None, "metrics": metrics, "skipped": skipped,
                "is_splits": args.is_splits, "pr_k": args.pr_k}
    if not args.json:
        shown = {k: ",".join(v) if isinstance(v, list) else v for k, v in settings.items() if v not in (None, [])}
        print("fid: " + " | ".join(f"{k} {v}" for k, v in shown.items()), flush=True)

    def features_of(src, feats):
        if not feats:
            return {}
        return extract_features(_prefetch(src.batches(args.batch_size, args.num_workers)), model, args.mode,
                                args.batch_size, device, features=sorted(feats), progress=True,
                                total=src.num_images)

    computed = {}

    def stats_of(src, feats, key):
        mu_key, sigma_key = ("mu", "sigma") if key == "pool3" else ("mu_s", "sigma_s")
        if mu_key in src.stats:
            return src.stats[mu_key], src.stats[sigma_key]
        if (id(src), key) not in computed:
            computed[id(src), key] = compute_statistics(feats[key])
        return computed[id(src), key]

    sample_feats = features_of(samples, need["samples"])
    results = {}
    if args.save_stats:
        mu, sigma = computed[id(samples), "pool3"] = compute_statistics(sample_feats["pool3"])
        mu_s, sigma_s = computed[id(samples), "spatial"] = compute_statistics(sample_feats["spatial"])
        save_statistics(args.save_stats, mu, sigma, mu_s, sigma_s, args.mode, model.network_id, samples.num_images)
        print(f"fid: saved statistics of {samples.num_images} images to {args.save_stats}", file=sys.stderr)
    if "is" in metrics:
        results["inception_score"] = inception_score(sample_feats["logits_unbiased"], args.is_splits)
    ref_feats = features_of(ref, need["ref"]) if ref is not None else {}
    if "fid" in metrics:
        results["fid"] = frechet_distance(*stats_of(samples, sample_feats, "pool3"), *stats_of(ref, ref_feats, "pool3"))
    if "sfid" in metrics:
        results["sfid"] = frechet_distance(*stats_of(samples, sample_feats, "spatial"),
                                           *stats_of(ref, ref_feats, "spatial"))
    if "pr" in metrics:
        results["precision"], results["recall"] = precision_recall(ref_feats["pool3"], sample_feats["pool3"],
                                                                   args.pr_k, args.pr_batch_size, device)
    return settings, results


def main(argv=None):
    args = parse_args(argv)
    try:
        settings, results = run(args)
    except FIDError as e:
        raise SystemExit(f"fid.py: error: {e}")
    if args.json:
        print(json.dumps({"args": vars(args), "settings": settings, **results}))
    else:
        names = {"inception_score": "Inception Score", "fid": "FID", "sfid": "sFID",
                 "precision": "Precision", "recall": "Recall"}
        for k, v in results.items():
            print(f"{names[k]}: {v:.4f}")
    return results


if __name__ == "__main__":
    main()
