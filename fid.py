"""
FID, sFID, Inception Score and precision/recall of generated images (torch, numpy, scipy, pillow).

The network is pytorch-fid's port of the TF 2015-12-05 Inception with its weights (torch.hub's cache, where
pytorch-fid keeps them too). Two preprocessings, never mixed: --mode pytorch-fid (default) as
`python -m pytorch_fid`, --mode tf as ADM's evaluator (the DiT/SiT papers' numbers). Metrics as ADM defines them.

    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz --mode tf     # IS, FID, sFID, precision, recall
    python fid.py samples/ ref_stats.npz --metrics fid --json               # a folder of images vs saved statistics
    python fid.py ref_images.npz --save-stats ref_stats.npz                 # statistics for later runs

Inputs, samples first: an .npz with arr_0 uint8 (N, H, W, 3) (ADM's format, streamed), a folder of images, or
statistics (mu, sigma: pytorch-fid's keys; + mu_s, sigma_s: ADM's reference batches).
"""

import argparse
import hashlib
import json
import os
import sys
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import cache, partial
from itertools import groupby
from pathlib import Path

import numpy as np
import scipy.linalg
import scipy.special
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import IMG_EXTENSIONS, scan_images
from dit import Progress, checked, default_device, load_url

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"  # torch.hub's convention: name ends in its sha256 prefix
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_NAME
WEIGHTS_SHA256_PREFIX = "6726825d"
OFFICIAL_NETWORK_ID = "pt_inception-2015-12-05-6726825d"
MODES = ("pytorch-fid", "tf")
# metric: (the features it needs from an input, unless that input stores these statistics)
METRICS = {"fid": ("pool3", "mu"), "sfid": ("spatial", "mu_s"), "is": ("logits_unbiased", None), "pr": ("pool3", None)}
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]: 17 * 17 * 7 = 2023 sFID features
DIMS = {"pool3": 2048, "logits": 1008, "logits_unbiased": 1008, "spatial": 17 * 17 * SPATIAL_CHANNELS}
# what the keys of a statistics file that does not state its mode suggest
SUGGESTED_BY_KEYS = {"tf": "mu, sigma, mu_s, sigma_s are ADM's reference-batch layout, made with the TF graph",
                     "pytorch-fid": "mu/sigma alone is pytorch-fid's statistics format, made with its preprocessing"}


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


# TF's 3x3 average pool divides by the number of real (unpadded) pixels; torchvision's counts the zeros
_avg_pool_tf = partial(F.avg_pool2d, kernel_size=3, stride=1, padding=1, count_include_pad=False)


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
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_tf(x))], 1)


class InceptionB(nn.Module):  # Mixed_6a: 35x35 -> 17x17
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):  # Mixed_6b..6e
    def __init__(self, in_channels, c7):  # c7: channels inside the 7x7 branches
        super().__init__()
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
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))))
        out = torch.cat([b1, b7, bd, self.branch_pool(_avg_pool_tf(x))], 1)
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
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


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
        b3 = self.branch3x3_1(x)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        # important! the TF graph has a max pool in its last block (mixed_10), unlike the Inception paper
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.pool == "max" else _avg_pool_tf(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3), self.branch3x3dbl_3a(bd),
                          self.branch3x3dbl_3b(bd), self.branch_pool(pooled)], 1)


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
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
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


def load_inception(weights=None, device="cpu"):
    """The FID Inception in eval mode on `device`.

    weights: None (pytorch-fid's release from torch.hub's cache, downloaded there once), a .pth path or a state
    dict. `model.network_id` names the weights, so statistics of other weights are refused.
    """
    state_dict, official = (weights, False) if isinstance(weights, dict) else _read_weights(weights)
    if not isinstance(state_dict, dict):
        raise FIDError(f"the weights must be a state dict, got {type(state_dict).__name__}; use {WEIGHTS_NAME}")
    with torch.device("meta"):  # no random init of 24M parameters that are overwritten right away
        model = FIDInception()
    counters = {k: torch.zeros((), dtype=torch.long) for k in model.state_dict() if k.endswith("num_batches_tracked")}
    try:  # {**counters, ...}: some weight files omit the BatchNorm counters, which eval never reads
        model.load_state_dict({**counters, **state_dict}, strict=True, assign=True)
    except RuntimeError as e:  # torch names the missing and unexpected keys and those of another shape
        raise FIDError(f"these weights are not the FID Inception's ({' '.join(str(e).split())[:400]}); use "
                       f"pytorch-fid's {WEIGHTS_NAME}") from e
    model.network_id = OFFICIAL_NETWORK_ID if official else _state_dict_id(state_dict)
    return model.float().eval().requires_grad_(False).to(device)


def _read_weights(path=None):
    """(state dict, is it pytorch-fid's release?) of a .pth file; None: torch.hub's copy, downloaded there once."""
    cached = path is None
    path = os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_NAME) if cached else os.fspath(path)
    if not os.path.isfile(path):
        if not cached:
            raise FIDError(f"weights file {path} not found; pass --weights /path/to/{WEIGHTS_NAME}, or drop --weights")
        try:  # torch.hub checks the sha256 prefix of what it downloads
            return load_url(WEIGHTS_URL, check_hash=True), True
        except RuntimeError as e:  # offline, or a download that is not the weights; load_url says where to put them
            raise FIDError(f"{e}; or pass --weights /path/to/{WEIGHTS_NAME}") from e
    # torch.hub does not check a file already in its cache: a damaged download is caught here
    official = hashlib.sha256(Path(path).read_bytes()).hexdigest().startswith(WEIGHTS_SHA256_PREFIX)
    if os.path.basename(path) == WEIGHTS_NAME and not official:
        raise FIDError(f"{path} is corrupt (its sha256 does not start with {WEIGHTS_SHA256_PREFIX}); delete it and "
                       f"download {WEIGHTS_URL} again, or pass --weights /path/to/{WEIGHTS_NAME}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True), official
    except Exception as e:  # a truncated file, an HTML error page saved as .pth, a pickle of another kind
        raise FIDError(f"cannot read the weights file {path} ({type(e).__name__}: {e}); download {WEIGHTS_URL} "
                       f"and pass --weights /path/to/{WEIGHTS_NAME}") from e


def _state_dict_id(state_dict):
    """Content hash of other weights, the same whether or not the file stores num_batches_tracked."""
    h = hashlib.sha256()
    for k in sorted(k for k in state_dict if not k.endswith("num_batches_tracked")):
        h.update(k.encode())
        h.update(state_dict[k].detach().to("cpu", torch.float32).contiguous().reshape(-1).numpy())
    return "custom-" + h.hexdigest()[:8]


# ----------------------------------------------------------------------------- preprocessing

def resize_bilinear_tf1(x, size):
    """(N, C, H, W) float -> (N, C, size, size), TF1's bilinear resize as in the graph ADM's evaluator runs."""
    def source_index(n):  # align_corners=False, half_pixel_centers=False: src = dst * (in / out), in float32
        src = torch.arange(size, dtype=torch.float32) * torch.tensor(n / size, dtype=torch.float32)
        lo = src.floor().long().clamp(0, n - 1)
        return lo.to(x.device), (lo + 1).clamp(max=n - 1).to(x.device), (src - src.floor()).to(x.device)

    (y0, y1, ly), (x0, x1, lx) = source_index(x.shape[2]), source_index(x.shape[3])
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
        return 2 * F.interpolate(x / 255, size=(299, 299), mode="bilinear", align_corners=False, antialias=False) - 1
    return (resize_bilinear_tf1(x, 299) - 128) / 128  # mode "tf"; at 299 the TF1 resize is the identity


# ----------------------------------------------------------------------------- features

def check_images(shape, dtype, name="images"):
    """Refuse what is not a uint8 (N, H, W, 3) batch, naming the conversion that fixes it."""
    shape, dtype = tuple(shape), str(dtype).replace("torch.", "")
    if len(shape) != 4 or shape[-1] != 3:
        fix = "pass NHWC, e.g. x.permute(0, 2, 3, 1)" if len(shape) == 4 and shape[1] == 3 else "convert to that"
        raise FIDError(f"{name} must be a batch of RGB images of shape (N, H, W, 3), got shape {shape}; {fix}")
    if dtype != "uint8":
        raise FIDError(f"{name} must be uint8 in [0, 255], got {dtype}; convert samples in [-1, 1] with "
                       f"clamp(127.5 * x + 128, 0, 255) then uint8")


@torch.inference_mode()
def extract_features(images, model, mode="pytorch-fid", batch_size=64, device=None, features=tuple(DIMS),
                     progress=False, total=None):
    """Inception features of uint8 NHWC images, as float32 numpy arrays.

    images: a uint8 (N, H, W, 3) array or tensor, or an iterable of such batches (streamed: only the
    features are kept). Returns a dict with the requested `features`:
      pool3 (N, 2048); logits (N, 1008) = fc(pool3) with bias; logits_unbiased (N, 1008) = pool3 @ fc.weight^T,
      the Inception Score's logits in ADM's evaluator; spatial (N, 2023) sFID features (mixed_6/conv[..., :7], NHWC).
    """
    if mode not in MODES or set(features) - set(DIMS):
        raise FIDError(f"mode must be one of {MODES} and features from {tuple(DIMS)}; got {mode!r}, {list(features)}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    if isinstance(images, (np.ndarray, torch.Tensor)):
        total, images = len(images), [images]
    out, bar = {k: [] for k in features}, Progress(total, f"fid: {mode} features", enabled=progress)
    with full_float32():
        for n, batch in enumerate(images):
            check_images(batch.shape, batch.dtype)
            if n == 0 and len(batch) and int(batch[:batch_size].max()) <= 1:
                warnings.warn("every pixel of the first batch is 0 or 1: images in [0, 1] were probably cast "
                              "to uint8 without multiplying by 255")
            for i in range(0, len(batch), batch_size):  # an iterator may yield batches larger than batch_size
                chunk = batch[i:i + batch_size]
                x = torch.as_tensor(np.array(chunk) if isinstance(chunk, np.ndarray) else chunk).to(device)
                pool3, spatial = model(preprocess(x, mode), return_spatial=True)
                if not torch.isfinite(pool3).all():
                    raise FIDError("the Inception network produced NaN/inf features, so its weights are corrupt: "
                                   "delete them (torch.hub's cache or your --weights file) and fetch them again")
                spatial = spatial[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)  # (N, 17, 17, 7): TF's NHWC order
                got = {"pool3": pool3, "logits": model.fc(pool3), "logits_unbiased": pool3 @ model.fc.weight.T,
                       "spatial": spatial.reshape(len(x), -1)}         # (N, 2023)
                for k in features:
                    out[k].append(got[k].cpu().numpy())
                bar.update(len(x))
    bar.close()
    return {k: np.concatenate(v) if v else np.zeros((0, DIMS[k]), np.float32) for k, v in out.items()}


@contextmanager
def full_float32():
    """TF32 moves Inception features by ~1e-3 relative; parity with the references needs full float32."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    # torch >= 2.9 has a newer API, and its legacy flags raise once that one was used
    flags = ([(matmul, "fp32_precision", "ieee"), (cudnn.conv, "fp32_precision", "ieee")]
             if hasattr(matmul, "fp32_precision") else [(matmul, "allow_tf32", False), (cudnn, "allow_tf32", False)])
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in flags]
    try:
        for obj, name, value in flags:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


# ----------------------------------------------------------------------------- metrics

def compute_statistics(features, chunk=8192):
    """Mean and covariance (np.cov(rowvar=False) convention, divisor N - 1) in float64, in row chunks so the
    float64 copy of 50K x 2048 features is never made at once."""
    features = np.asarray(features)
    if features.ndim != 2 or len(features) < 2:
        raise FIDError(f"a covariance needs (N, D) features of at least 2 images, got shape {features.shape}")
    n, d = features.shape
    mu = sum(features[i:i + chunk].astype(np.float64).sum(0) for i in range(0, n, chunk)) / n
    if not np.isfinite(mu).all():  # a NaN or inf anywhere makes its column's mean one
        raise FIDError("the features contain NaN/inf; check the images and the Inception weights")
    if n <= d:
        warnings.warn(f"{n} images for {d}-dim features: the covariance is singular, so this FID is biased and "
                      f"comparable to nothing; use at least {d + 1} images (50,000 is standard)")
    sigma = np.zeros((d, d))
    for i in range(0, n, chunk):
        xc = features[i:i + chunk].astype(np.float64) - mu
        sigma += xc.T @ xc
    return mu, sigma / (n - 1)


def check_covariance(sigma, name="sigma"):
    """sigma in float64 if it is a covariance: square, finite, symmetric and positive-semidefinite up to round-off."""
    s = np.atleast_2d(np.asarray(sigma, np.float64))
    why = ("not square" if s.ndim != 2 or s.shape[0] != s.shape[1] else "NaN/inf" if not np.isfinite(s).all()
           else "not symmetric" if np.abs(s - s.T).max() > 1e-6 * np.abs(s).max() else None)
    shift = (1e-6 * max(np.trace(s), 0) + 1e-300) * np.eye(len(s))  # forgives round-off below zero
    if why is None and torch.linalg.cholesky_ex(torch.from_numpy(s + shift)).info:  # fails iff not positive definite
        why = "not positive-semidefinite"
    if why:
        raise FIDError(f"{name} is not a covariance matrix ({why}); recompute the statistics")
    return s


def _check_statistics(mu1, sigma1, mu2, sigma2):
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    if not (np.isfinite(mu1).all() and np.isfinite(mu2).all()):
        raise FIDError("mu1 or mu2 contains NaN/inf; recompute the statistics")
    sigma1, sigma2 = check_covariance(sigma1, "sigma1"), check_covariance(sigma2, "sigma2")
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise FIDError(f"statistics of different dimensions: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                       f"{sigma2.shape}; compute both with the same network and features")
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
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(logits, splits=10):
    """exp(E_x KL(p(y|x) ‖ p(y))) per consecutive split, averaged; softmax over all 1008 classes.

    Pass `logits_unbiased` (pool3 @ fc.weightᵀ) to match ADM's evaluator. ADM slices fixed 5000-image
    chunks, which are exactly these 10 splits at the standard 50,000 samples. Computed in float64 from
    log-softmax (ADM takes log of a float32 softmax, which can underflow to log 0).
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or len(logits) < splits or splits < 1:
        raise FIDError(f"the Inception Score needs (N, classes) logits with N >= splits = {splits}, got {logits.shape}")
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
    return ((a * a).sum(1)[:, None] - 2 * (a @ b.T) + (b * b).sum(1)[None, :]).clamp_(min=0)


def knn_radii(features, k=3, batch_size=10000):
    """Squared distance of each row to its k-th nearest other row (ADM: partition index k of the row incl. self)."""
    n = len(features)
    if n <= k:
        raise FIDError(f"precision/recall with k = {k} needs more than {k} images per set, got {n}")
    radii = []
    for i in range(0, n, batch_size):
        nearest = []  # the k + 1 nearest of each block of columns, then the k + 1 nearest of those
        for j in range(0, n, batch_size):
            d = _squared_distances(features[i:i + batch_size], features[j:j + batch_size])
            if i == j:
                d.fill_diagonal_(0)  # the point itself: exactly 0, whatever the float32 round-off
            nearest.append(d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values)
        radii.append(torch.cat(nearest, 1).topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def precision_recall(ref_features, sample_features, k=3, batch_size=10000, device=None):
    """Improved precision and recall (Kynkäänniemi et al. 2019) as ADM's evaluator computes them.

    Each set's points get a ball of radius = distance to their k-th nearest neighbour in the same set.
    precision: fraction of samples inside at least one reference ball; recall: fraction of reference points
    inside at least one sample ball. Distances in (batch_size x batch_size) blocks, never all pairs at once.
    """
    device = device or default_device()
    ref, sam = (torch.as_tensor(np.asarray(f, np.float32), device=device) for f in (ref_features, sample_features))
    if ref.ndim != 2 or sam.ndim != 2 or ref.shape[1] != sam.shape[1]:
        raise FIDError(f"features must be (N, D) with the same D, got {tuple(ref.shape)} and {tuple(sam.shape)}")
    with full_float32():
        r_ref, r_sam = knn_radii(ref, k, batch_size), knn_radii(sam, k, batch_size)
        sample_in, ref_in = (torch.zeros(len(x), dtype=torch.bool, device=device) for x in (sam, ref))
        for i in range(0, len(ref), batch_size):
            for j in range(0, len(sam), batch_size):
                d = _squared_distances(ref[i:i + batch_size], sam[j:j + batch_size])  # (refs, samples)
                sample_in[j:j + batch_size] |= (d <= r_ref[i:i + batch_size, None]).any(0)
                ref_in[i:i + batch_size] |= (d <= r_sam[None, j:j + batch_size]).any(1)
    return sample_in.double().mean().item(), ref_in.double().mean().item()


# ----------------------------------------------------------------------------- inputs and statistics files

class Source:
    """One positional input: images (an npz's arr_0 or a folder) and/or statistics (mu, sigma, mu_s, sigma_s)."""

    def __init__(self, path):
        self.path, self.files, self.stats, self.meta, self.num_images = path, [], {}, {}, 0
        if os.path.isdir(path):
            # every image once (a link loop neither hangs the scan nor repeats images), ordered by path components
            self.files = [os.path.join(path, r) for r in sorted(scan_images(path), key=lambda r: r.split(os.sep))]
            if not self.files:
                raise FIDError(f"no images ({', '.join(IMG_EXTENSIONS)}) found under {path}")
            self.num_images = len(self.files)
            return
        if not (os.path.isfile(path) and path.endswith(".npz")):
            raise FIDError(f"{path} {'is not an .npz' if os.path.exists(path) else 'does not exist'}; give an .npz "
                           f"(arr_0 uint8 NHWC images, or mu/sigma statistics) or a folder of images")
        try:
            with np.load(path) as npz:
                keys = npz.files
                self.stats = {k: npz[k].astype(np.float64) for k in ("mu", "sigma", "mu_s", "sigma_s") if k in keys}
                self.meta = {k: str(npz[k]) for k in ("mode", "network") if k in keys}
        except Exception as e:
            raise FIDError(f"cannot read {path} as .npz ({type(e).__name__}: {e})") from e
        for mu, sigma in (("mu", "sigma"), ("mu_s", "sigma_s")):
            if (mu in self.stats) != (sigma in self.stats):
                raise FIDError(f"{path} holds only half of a statistics pair ({mu}/{sigma}); write it again")
            if sigma in self.stats:
                check_covariance(self.stats[sigma], f"{sigma} of {path}")
        if "arr_0" in keys:  # only its header is read here: ADM's arr_0 is 9.8 GB
            with zipfile.ZipFile(path) as z, z.open("arr_0.npy") as f:
                shape, _, dtype = _npy_header(f)
            check_images(shape, dtype, f"arr_0 of {path}")
            self.num_images = shape[0]
        elif not self.stats:
            raise FIDError(f"{path} holds neither images (arr_0) nor statistics (mu, sigma)")

    def take(self, limit):
        """Keep the first `limit` images only."""
        if self.num_images and limit > self.num_images:
            raise FIDError(f"{self.path} has {self.num_images} images, fewer than --num-samples {limit}")
        self.num_images, self.files = min(limit, self.num_images), self.files[:limit]

    def batches(self, batch_size, num_workers):
        return (_folder_batches(self.files, batch_size, num_workers) if self.files else
                _npz_batches(self.path, batch_size, self.num_images))

    def origin(self):
        """(path, mode, network, stated) for check_compatible; a mode the file does not state is read from its keys."""
        keys_say = "tf" if "mu_s" in self.stats else "pytorch-fid"
        return self.path, self.meta.get("mode", keys_say), self.meta.get("network"), "mode" in self.meta

    def describe(self):
        parts = [f"{self.num_images} images"] if self.num_images else []
        parts += [f"stored {k}" for k in self.stats if "mu" in k] + [f"{k} {v}" for k, v in self.meta.items()]
        return f"{self.path} ({', '.join(parts)})"


def _npy_header(f):
    """(shape, fortran_order, dtype) of the .npy stream f (format 3.0 has 2.0's header layout)."""
    major, _ = np.lib.format.read_magic(f)
    return (np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0)(f)


def _npz_batches(path, batch_size, limit):
    """Stream the arr_0 of an npz in batches (a 50K x 256 x 256 x 3 arr_0 is 9.8 GB), as ADM's evaluator does."""
    with zipfile.ZipFile(path) as z, z.open("arr_0.npy") as f:
        shape, fortran_order, dtype = _npy_header(f)
        if fortran_order:  # rare: one batch of the whole array, which extract_features splits
            yield np.load(path)["arr_0"][:limit]
            return
        image_bytes = np.dtype(dtype).itemsize * int(np.prod(shape[1:]))
        for i in range(0, limit, batch_size):
            n = min(batch_size, limit - i)
            data = f.read(n * image_bytes)  # fewer bytes only at the end of the file
            if len(data) < n * image_bytes:
                raise FIDError(f"{path} is truncated (it ends in image {i + len(data) // image_bytes}); rewrite it")
            yield np.frombuffer(data, dtype).reshape(n, *shape[1:])


def _load_rgb(path):
    from PIL import Image
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:
        raise FIDError(f"cannot read image {path} ({type(e).__name__}: {e}); remove or replace it") from e


def _folder_batches(files, batch_size, num_workers):
    """uint8 NHWC batches of the files in order, decoded by num_workers threads; cut where the image size changes."""
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        for i in range(0, len(files), batch_size):
            for _, same_size in groupby(pool.map(_load_rgb, files[i:i + batch_size]), key=lambda image: image.shape):
                yield np.stack(list(same_size))


def save_statistics(path, mu, sigma, mu_s=None, sigma_s=None, mode=None, network=None, num_images=None):
    """ADM's reference-batch keys (mu, sigma, mu_s, sigma_s) plus mode/network, so mismatches are caught later.
    Returns the path written: ".npz" is appended when missing, as numpy (and so pytorch-fid) does."""
    path = path if path.endswith(".npz") else path + ".npz"
    arrays = dict(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, mode=mode, network=network, num_images=num_images)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(f"{path}.{os.getpid()}.tmp", "wb") as f:  # a file object, so numpy does not append .npz to its name
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items() if v is not None})  # strings: no pickle needed
    os.replace(f.name, path)
    return path


def check_compatible(origins):
    """origins: (label, mode, network, stated) of each set compared (network None: unknown; stated False: the mode
    is only suggested by a statistics file's keys). Stated modes (images, files that say theirs) and known networks
    must agree; a suggested mode that differs gets a warning."""
    stated = [(label, mode) for label, mode, _, said in origins if said]
    networks = [(label, network) for label, _, network, _ in origins if network is not None]
    for what, known in (("--mode", stated), ("Inception weights (--weights)", networks)):
        for label, value in known[1:]:
            if value != known[0][1]:
                raise FIDError(f"{label} was computed with {what} {value} but {known[0][0]} with {known[0][1]}; use "
                               f"the same {what} for both (rerun, or recompute the statistics)")
    mode = stated[0][1] if stated else (origins[0][1] if origins else None)
    for label, guess, _, said in origins:
        if not said and guess != mode:
            warnings.warn(f"{label} does not say its mode; {SUGGESTED_BY_KEYS[guess]} (--mode {guess}), so numbers "
                          f"against it in --mode {mode} are not comparable")


# ----------------------------------------------------------------------------- command line

_count = checked(int, lambda v: v >= 1, "an integer >= 1")
_dims = checked(int, lambda v: v == 2048, "2048, pool3 (only 2048 is supported; drop the flag)")
_metrics = checked(lambda text: [m.strip() for m in text.split(",") if m.strip()],
                   lambda names: names and set(names) <= set(METRICS), f"names from {','.join(METRICS)}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", nargs="?", help="generated images: an .npz (arr_0 uint8 NHWC), a folder, or statistics")
    p.add_argument("ref", nargs="?", help="reference: the same kinds (ADM's order, reference first, is swapped)")
    p.add_argument("--mode", choices=MODES, default="pytorch-fid", help="pytorch-fid, or tf: ADM's evaluator (papers)")
    p.add_argument("--metrics", type=_metrics, help="comma-separated from fid,sfid,is,pr (default: all that apply)")
    p.add_argument("--weights", help=f"local {WEIGHTS_NAME} (default: torch.hub's cache, downloaded once)")
    p.add_argument("--dims", type=_dims, default=2048, help="pytorch-fid's flag; 2048 (pool3) is the only choice")
    p.add_argument("--batch-size", type=_count, default=64, help="images per forward pass (ADM: 64)")
    p.add_argument("--device", help="cuda, mps or cpu (default: autodetect cuda > mps > cpu)")
    p.add_argument("--num-workers", type=_count, default=min(8, os.cpu_count() or 1), help="image decoding threads")
    p.add_argument("--num-samples", type=_count, help="use the first N sample images only (default: all)")
    p.add_argument("--is-splits", type=_count, default=10, help="Inception Score splits (ADM: 10 of 5,000 images)")
    p.add_argument("--pr-k", type=_count, default=3, help="k of the precision/recall neighbour balls (ADM: 3)")
    p.add_argument("--pr-batch-size", type=_count, default=10000, help="precision/recall distance block (ADM: 10000)")
    p.add_argument("--save-stats", nargs="+", metavar="PATH", help="OUT: write the samples' statistics there (.npz); "
                                                                    "IN OUT: pytorch-fid's form")
    p.add_argument("--json", action="store_true", help="print the settings and results as one JSON object")
    args = p.parse_args(argv)
    if args.save_stats and len(args.save_stats) == 2 and not args.samples:  # pytorch-fid: --save-stats IN OUT
        args.samples = args.save_stats.pop(0)
        if os.path.exists(args.save_stats[0]) or os.path.exists(args.save_stats[0] + ".npz"):
            p.error(f"{args.save_stats[0]} exists, and pytorch-fid's --save-stats IN OUT never overwrites; delete it, "
                    f"or write `python fid.py IMAGES --save-stats OUT`")
    if args.save_stats and len(args.save_stats) != 1:
        p.error("--save-stats takes OUT (with the images as first argument), or IN OUT as in pytorch-fid")
    args.save_stats = args.save_stats and args.save_stats[0]
    if not args.samples:
        p.error("give the samples: an .npz, a folder of images or a statistics .npz")
    return args


def _adm_order(samples, ref):
    """ADM's evaluator takes `ref_batch sample_batch`: statistics (ADM's arr_0 + mu_s batches too) first and plain
    images second are swapped, with a notice."""
    if ref is None or not samples.stats or ref.stats or not ref.num_images:
        return samples, ref
    print(f"fid: {samples.path} holds reference statistics and {ref.path} images only, ADM's order (ref_batch "
          f"sample_batch); evaluating as `python fid.py {ref.path} {samples.path}`", file=sys.stderr)
    return ref, samples


def _plan(args, samples, ref):
    """(metrics, skipped metrics with why, {source: features to extract})."""
    if ref is None and set(args.metrics or []) & {"fid", "sfid", "pr"}:
        raise FIDError("FID, sFID and precision/recall need a reference (second positional argument)")
    metrics, skipped, need = [], [], {samples: set(), ref: set()}
    # by default every metric that applies; without a reference only IS, and nothing when statistics are being saved
    for m in args.metrics or (list(METRICS) if ref else [] if args.save_stats else ["is"]):
        feature, stored = METRICS[m]  # the feature it needs from each input without these stored statistics
        want = [samples] if m == "is" else [src for src in (samples, ref) if stored not in src.stats]
        lacking = next((f"{src.path} has no images" for src in want if not src.num_images), None)
        if lacking and args.metrics:
            raise FIDError(f"cannot compute {m}: {lacking}; give images, or drop {m} from --metrics")
        if lacking:
            skipped.append(f"{m} ({lacking})")
            continue
        metrics.append(m)
        for src in want:
            need[src].add(feature)
    if "is" in metrics and samples.num_images < args.is_splits:
        raise FIDError(f"--is-splits {args.is_splits} needs as many images, got {samples.num_images}; lower it")
    if args.save_stats and not samples.num_images:
        raise FIDError(f"--save-stats needs images, but {samples.path} holds only statistics")
    need[samples] |= {"pool3", "spatial"} if args.save_stats else set()
    return metrics, skipped, need


def run(args):
    samples, ref = _adm_order(Source(args.samples), Source(args.ref) if args.ref else None)
    samples.take(args.num_samples or samples.num_images)
    metrics, skipped, need = _plan(args, samples, ref)
    device = args.device or default_device()
    model = load_inception(args.weights, device) if any(need.values()) else None
    network = model.network_id if model else None
    # before any feature is extracted: statistics of another mode or network would give a meaningless number
    check_compatible([(f"the images of {src.path}", args.mode, network, True) for src in need if need[src]] +
                     [src.origin() for src in (samples, ref) if src is not None and src.stats])
    settings = {"mode": args.mode, "network": network, "device": str(device), "batch_size": args.batch_size,
                "samples": samples.describe(), "ref": ref.describe() if ref else None, "metrics": metrics,
                "skipped": skipped, "is_splits": args.is_splits, "pr_k": args.pr_k}
    if not args.json:
        print("fid: " + " | ".join(f"{k} {','.join(v) if isinstance(v, list) else v}" for k, v in settings.items()
                                   if v not in (None, [])), flush=True)
    feats = {src: extract_features(_prefetch(src.batches(args.batch_size, args.num_workers)), model, args.mode,
                                   args.batch_size, device, sorted(features), progress=True, total=src.num_images)
             for src, features in need.items() if features}

    @cache
    def computed(src, key):
        return compute_statistics(feats[src][key])

    def stats(src, key):
        mu, sigma = ("mu", "sigma") if key == "pool3" else ("mu_s", "sigma_s")
        return (src.stats[mu], src.stats[sigma]) if mu in src.stats else computed(src, key)

    results = {}
    if args.save_stats:
        out = save_statistics(args.save_stats, *computed(samples, "pool3"), *computed(samples, "spatial"), args.mode,
                              network, samples.num_images)
        print(f"fid: saved statistics of {samples.num_images} images to {out}", file=sys.stderr)
    if "is" in metrics:
        results["inception_score"] = inception_score(feats[samples]["logits_unbiased"], args.is_splits)
    for m, key in (("fid", "pool3"), ("sfid", "spatial")):
        if m in metrics:
            results[m] = frechet_distance(*stats(samples, key), *stats(ref, key))
    if "pr" in metrics:
        results["precision"], results["recall"] = precision_recall(feats[ref]["pool3"], feats[samples]["pool3"],
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
        names = {"inception_score": "Inception Score", "fid": "FID", "sfid": "sFID", "precision": "Precision",
                 "recall": "Recall"}
        for k, v in results.items():
            print(f"{names[k]}: {v:.4f}")
    return results


# --- Speed: reading and decoding the next batch overlaps with the network on this one --------------------------

def _prefetch(iterable):
    """Yield the items of `iterable`, producing the next one in a thread meanwhile."""
    items = iter(iterable)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(next, items, StopIteration)
        while (item := future.result()) is not StopIteration:
            future = pool.submit(next, items, StopIteration)
            yield item


if __name__ == "__main__":
    main()
