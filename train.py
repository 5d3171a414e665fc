"""
Train DiT, SiT or MeanFlow with the Dispersive Loss (Wang & He 2025, "Diffuse and Disperse"):
L = mean_i L_diff(x_i) + λ · L_disp(Z), Z the output of one transformer block on the same batch.

    python train.py                     # CPU demo: SiT-T/4 on the built-in shapes (10 classes, 32x32), ~5 min

The demo leaves runs/<time>/ with config.json, metrics.jsonl, checkpoint.pt and sample grids (one row per class,
fixed noise, EMA weights): samples_000000.png before training, periodic ones, samples_final.png at the end.

ImageNet 256 on SD-VAE latents (build the cache once: `python data.py cache ...`, see data.py):

    # one node, 8 GPUs: SiT-XL/2 with the paper's dispersive setting (InfoNCE-L2, λ 0.5, τ 0.5, block depth//4)
    torchrun --standalone --nproc_per_node=8 train.py --model SiT-XL/2 --image-size 256 \
        --latent-cache cache/in256_ema --global-batch-size 256 --run-name sit-xl2-disp
    # several nodes (same command on every node, NODE_RANK = 0, 1, ...; MASTER_ADDR = node 0's address)
    torchrun --nnodes=4 --node_rank=$NODE_RANK --nproc_per_node=8 --master_addr=$MASTER_ADDR --master_port=29500 \
        train.py --model SiT-XL/2 --image-size 256 --latent-cache /shared/in256_ema --global-batch-size 256 \
        --results-dir /shared/runs --run-name sit-xl2-disp
    # the baseline without the dispersive term, the official PyTorch code's setting, a DiT, a MeanFlow
    torchrun --standalone --nproc_per_node=8 train.py --model SiT-B/2 --image-size 256 --latent-cache ... --disp none
    torchrun --standalone --nproc_per_node=8 train.py ... --disp-preset official     # λ 0.25, τ 1, last block
    torchrun --standalone --nproc_per_node=8 train.py --model DiT-XL/2 --image-size 256 --latent-cache ...
    torchrun --standalone --nproc_per_node=8 train.py --model MeanFlow-XL/2 --image-size 256 --latent-cache ...
    # continue after a crash or preemption (SIGTERM saves a checkpoint within a step or two)
    torchrun --standalone --nproc_per_node=8 train.py --resume runs/sit-xl2-disp

One code path for CPU, one GPU, many GPUs and many nodes: under torchrun (RANK, WORLD_SIZE, LOCAL_RANK in the
environment) every process trains on its shard with DDP (NCCL on CUDA, gloo on CPU). The global batch is fixed;
global = micro-batch × world size × gradient-accumulation steps. DDP wraps `TrainLoss` (network + objective +
regulariser), not the network, so MeanFlow's forward-mode JVP runs on the plain network inside DDP's forward and
gradients are synchronised exactly once per optimizer step. The dispersive term is computed on each device's
local micro-batch, as in the paper.
"""

import argparse
import contextlib
import copy
import datetime
import difflib
import json
import math
import os
import random
import signal
import threading
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import dit
import meanflow
import sit
from dispersive import VARIANTS, DispersiveConfig, contrastive_loss

# ---------------------------------------------------------------------------------------------------------
# Models: the paper's registries plus tiny sizes for CPU runs and tests
# ---------------------------------------------------------------------------------------------------------

# "T" (tiny) is not a paper size: depth 6, width 128, 2 heads of 64, 1.9M parameters, for CPU runs and tests. It is
# compute-bound on a CPU (~6 steps/s of 16 images at 32x32 on 2 cores); width 192 halves the steps per second and
# patch 2 quarters them, for samples that are no better within the demo's 4 minutes. The paper preset's dispersive
# block is depth // 4 = 1.
TINY_SIZES = {"T": (6, 128, 2)}
TINY_PATCHES = (2, 4)
# ω, κ, guidance interval of the tiny MeanFlow: those of MeanFlow-B/2
TINY_MEANFLOW_DEFAULTS = dict(meanflow.MeanFlow_defaults["MeanFlow-B/2"])

MODELS = {}          # name -> builder(**kwargs)
MODEL_FAMILIES = {}  # name -> "dit" | "sit" | "meanflow"
for _family, _registry in (
    ("dit", {**dit.DiT_models, **dit._make_registry(dit.DiT, "DiT", TINY_SIZES, TINY_PATCHES)}),
    ("sit", {**sit.SiT_models, **dit._make_registry(sit.SiT, "SiT", TINY_SIZES, TINY_PATCHES)}),
    ("meanflow", {**meanflow.MeanFlow_models,
                  **dit._make_registry(meanflow.MeanFlowDiT, "MeanFlow", TINY_SIZES, TINY_PATCHES)}),
):
    MODELS.update(_registry)
    MODEL_FAMILIES.update({name: _family for name in _registry})
TINY_MODELS = tuple(name for name in MODELS if name.split("-")[1].startswith(tuple(f"{s}/" for s in TINY_SIZES)))

LATENT_FACTOR = 8    # SD-VAE: 8x downsampling, 4 channels
VAE_SCALE = data.VAE_SCALE


def check_model_name(name, image_size, latent):
    """Raise ValueError with one clear sentence when the model is unknown or its patch does not divide the input."""
    if name not in MODELS:
        close = difflib.get_close_matches(name, list(MODELS), n=4, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}?" if close else f"known models: {', '.join(MODELS)}"
        raise ValueError(f"unknown model {name!r}: {hint}")
    patch = int(name.rsplit("/", 1)[1])
    multiple = patch * (LATENT_FACTOR if latent else 1)
    if image_size % multiple:
        why = (f"{multiple} (the VAE's downsampling {LATENT_FACTOR} × the patch size {patch} of {name})" if latent
               else f"the patch size {patch} of {name}")
        raise ValueError(f"image size {image_size} is not divisible by {why}: use e.g. "
                         f"{max(1, round(image_size / multiple)) * multiple}")
    return MODEL_FAMILIES[name]


def build_model(name, image_size, num_classes, latent, class_dropout_prob=0.1, **kwargs):
    """(model, family) for a registry name; latent=True: SD-VAE latents (4 channels, image_size // 8), else
    pixels (3 channels, image_size). Extra kwargs go to the network's constructor."""
    family = check_model_name(name, image_size, latent)
    in_channels = 4 if latent else 3
    input_size = image_size // LATENT_FACTOR if latent else image_size
    model = MODELS[name](input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                         class_dropout_prob=class_dropout_prob, **kwargs)
    return model, family


def build_objective(name, family, class_dropout_prob=0.1, path="linear"):
    """The family's training objective: DiT's Gaussian diffusion, SiT's Transport, or MeanFlow with the size's
    ω, κ and guidance interval."""
    if family == "dit":
        return dit.create_diffusion(timestep_respacing="")
    if family == "sit":
        return sit.Transport(path=path, prediction="velocity")
    defaults = meanflow.MeanFlow_defaults.get(name, TINY_MEANFLOW_DEFAULTS)
    # MeanFlowDiT never drops labels itself: the objective does it (and changes the dropped rows' target)
    return meanflow.MeanFlow(**defaults, class_dropout_prob=class_dropout_prob)


# ---------------------------------------------------------------------------------------------------------
# The training loss as one module (what DDP wraps) and one optimizer step
# ---------------------------------------------------------------------------------------------------------

class TrainLoss(nn.Module):
    """L = mean_i L_diff(x_i) + λ · L_disp(z), z = output of block `disp.block` from the same forward pass.

    contrastive=True is the paper's baseline with positive pairs instead: two independently noised views of the
    same images, InfoNCE with the positives between the views (τ = disp.tau, weight λ = disp.weight), the
    denoising loss on view 1 only.
    forward(x, y) -> (total loss, {name: detached scalar}) with "diff" (the objective's loss), "disp" or
    "contrastive" (unweighted), and the objective's other terms averaged over the batch (DiT: mse, vb;
    MeanFlow: mse_uv).
    """

    def __init__(self, model, objective, disp, depth=None, contrastive=False):
        super().__init__()
        self.model = model
        self.objective = objective
        self.disp = disp
        self.contrastive = contrastive
        depth = model.depth if depth is None else depth
        self.block = disp.resolve_block(depth) if (contrastive or disp.enabled) else None

    def forward(self, x, y):
        out = self.objective.training_losses(self.model, x, y, return_features=self.block)
        reg, name = None, "disp"
        if self.contrastive:
            out2 = self.objective.training_losses(self.model, x, y, return_features=self.block)  # view 2
            reg, name = contrastive_loss(out["feats"], out2["feats"], self.disp.tau), "contrastive"
        elif self.block is not None:
            reg = self.disp.loss(out["feats"])
        diff = out["loss"].mean()
        total = diff if reg is None else diff + self.disp.weight * reg
        terms = {"diff": diff.detach()}
        terms.update({k: v.detach().float().mean() for k, v in out.items()
                      if k not in ("loss", "feats") and torch.is_tensor(v)})
        if reg is not None:
            terms[name] = reg.detach()
        return total, terms


def train_step(loss_module, optimizer, next_batch, accum_steps=1, autocast=contextlib.nullcontext, grad_clip=None,
               ema=None, ema_decay=0.9999, should_stop=None):
    """One optimizer step over `accum_steps` micro-batches from `next_batch()` -> (x, y) on the device, with no
    host synchronisation.

    Gradients are synchronised once (DDP's no_sync on all but the last micro-batch); the loss of each micro-batch
    is divided by accum_steps so the step sees the mean over the global batch. Returns (stats, flags): stats
    {"loss", terms..., "gnorm"} as 0-dim tensors (averaged over the micro-batches, local to this rank); flags a
    device tensor [non_finite, stop] (0 or 1, the same on all ranks: one tiny all-reduce). non_finite: the loss
    or the gradient was not finite on some rank, and the step changed nothing (weights, AdamW moments and step
    count, EMA). stop: `should_stop()` (asked after the backward pass) was true on some rank. Read the flags on
    the host when convenient (`LaggedFlags`), not right away, so the device never waits for the host.
    optimizer: an AdamW (or Adam) with fused=True: it skips a flagged step on the device (the found_inf protocol
    of torch.amp.GradScaler).
    ema: (ema_params, model_params) lists updated as ema ← decay·ema + (1 − decay)·param after the step.

        model, family = build_model("SiT-B/2", 256, 1000, latent=True)
        loss_fn = TrainLoss(model, build_objective("SiT-B/2", family), DispersiveConfig.preset("paper", model.depth))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        stats, flags = train_step(loss_fn, opt, lambda: (x, y))     # x: (N, 4, 32, 32) latents, y: (N,) labels
    """
    if not (optimizer.defaults.get("fused") and getattr(optimizer, "_step_supports_amp_scaling", False)):
        raise ValueError("train_step skips non-finite steps on the device and needs a fused optimizer: use "
                         "torch.optim.AdamW(..., fused=True)")
    is_ddp = isinstance(loss_module, DDP)
    stats = {}
    for i in range(accum_steps):
        x, y = next_batch()
        sync = contextlib.nullcontext() if (not is_ddp or i == accum_steps - 1) else loss_module.no_sync()
        with sync:
            with autocast():
                loss, terms = loss_module(x, y)
            (loss / accum_steps).backward()
        for k, v in {"loss": loss.detach(), **terms}.items():
            stats[k] = stats.get(k, 0) + v.float() / accum_steps
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # max_norm=inf: only measures the norm (clipping by a factor 1 is exact)
    gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip else float("inf"))
    stats["gnorm"] = gnorm
    stop = 1.0 if should_stop is not None and should_stop() else 0.0
    flags = torch.stack([(~torch.isfinite(stats["loss"]) | ~torch.isfinite(gnorm)).float(),
                         torch.full((), stop, device=gnorm.device)])    # torch.full: no host-to-device copy
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    optimizer.grad_scale, optimizer.found_inf = None, flags[0]          # found_inf = 1: the update is skipped
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale, optimizer.found_inf
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        w = (1.0 - ema_decay) * (1.0 - flags[0])                          # 0 on a skipped step
        with torch.no_grad():  # important! else the EMA joins the autograd graph and keeps every step's history
            torch._foreach_lerp_(ema[0], ema[1], [w] * len(ema[0]))
    return stats, flags


class LaggedFlags:
    """train_step's flags, read on the host one step late: each step's flags are copied behind its work and
    waited for only once the next step is queued, so the device never idles on the read."""

    def __init__(self):
        self.queue = []

    def push(self, step, flags):
        cuda = flags.device.type == "cuda"
        host = flags.to("cpu", non_blocking=cuda)                 # CUDA: pinned, the copy runs behind the step
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        self.queue.append((step, host, event))

    def pop(self, keep=1):
        """[(step, non_finite, stop)] of all pushed steps but the newest `keep`."""
        out = []
        while len(self.queue) > keep:
            step, host, event = self.queue.pop(0)
            if event is not None:
                event.synchronize()
            bad, stop = host.tolist()
            out.append((step, bad > 0, stop > 0))
        return out


# ---------------------------------------------------------------------------------------------------------
# Small helpers: images, RNG states, checkpoints
# ---------------------------------------------------------------------------------------------------------

def make_grid_png(images, nrow, path, pad=2):
    """Save images in [-1, 1] (N, C, H, W) as one PNG grid of `nrow` images per row (PIL; C = 1 or 3).
    Pixels: clamp(127.5·x + 128, 0, 255) as DiT/ADM; `pad` black pixels between images."""
    x = images.detach().float().cpu()
    x = (127.5 * x + 128).clamp(0, 255).to(torch.uint8)                           # (N, C, H, W)
    N, C, H, W = x.shape
    ncol = nrow
    rows = math.ceil(N / ncol)
    grid = torch.zeros(C, rows * (H + pad) + pad, ncol * (W + pad) + pad, dtype=torch.uint8)
    for i in range(N):
        r, c = divmod(i, ncol)
        top, left = pad + r * (H + pad), pad + c * (W + pad)
        grid[:, top:top + H, left:left + W] = x[i]
    arr = grid.permute(1, 2, 0).numpy()                                           # (H', W', C)
    img = Image.fromarray(arr[..., 0] if C == 1 else arr, mode="L" if C == 1 else "RGB")
    tmp = f"{path}.tmp.png"
    img.save(tmp)
    os.replace(tmp, path)
    return path


def get_rng_state(device):
    """This process's RNG states as tensors and plain numbers (readable with weights_only=True)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]), "numpy_has_gauss": int(np_state[3]), "numpy_gauss": float(np_state[4]),
        "python": torch.tensor(py_state[1], dtype=torch.int64),
        "python_version": int(py_state[0]), "python_gauss": py_state[2],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path, obj):
    """Atomic write: a crash mid-save leaves the previous checkpoint intact."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def resolve_checkpoint_path(path):
    return os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path


class EpochBatches:
    """Endless micro-batches (x, y) on the device from a loader over epochs; remembers (epoch, batch_in_epoch)
    so a resumed run continues with exactly the batches an uninterrupted run would have seen.
    Latent caches yield (mean, std, y): the posterior sample x = mean + std·ε is drawn here, on the device."""

    def __init__(self, loader, sampler, device, epoch=0, batch_in_epoch=0):
        self.loader, self.sampler, self.device = loader, sampler, device
        self.epoch, self.batch_in_epoch = epoch, batch_in_epoch
        self.sampler.set_epoch(epoch)
        self.sampler.skip_batches(batch_in_epoch)
        self.it = None

    def __call__(self):
        if self.it is None:
            # important! creating a DataLoader iterator draws a seed from torch's global RNG; keep that RNG
            # untouched so a resumed run (which creates its iterator at another time) draws the same noise
            with torch.random.fork_rng(devices=[]):
                self.it = iter(self.loader)
        try:
            batch = next(self.it)
        except StopIteration:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            self.sampler.set_epoch(self.epoch)
            with torch.random.fork_rng(devices=[]):
                self.it = iter(self.loader)
            batch = next(self.it)
        self.batch_in_epoch += 1
        batch = [b.to(self.device, non_blocking=True) for b in batch]
        if len(batch) == 3:  # latent cache: a fresh posterior sample every step (SPEC §7)
            mean, std, y = batch
            return data.sample_posterior(mean, std), y
        return batch[0], batch[1]


class StopSignal:
    """SIGTERM / SIGINT set a flag; the loop saves after the current step and exits. A second SIGINT raises."""

    def __init__(self, log):
        self.requested, self.log, self.previous = None, log, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        self.log(f"received {self.requested}: saving a checkpoint after this step (Ctrl-C again to abort)")

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

# Defaults that depend on the model: the paper's for its sizes, a quick CPU recipe for the tiny sizes.
PAPER_DEFAULTS = dict(
    global_batch_size=256, lr=1e-4, warmup_steps=0, ema_decay=0.9999,
    steps=None,  # per family below
    log_every=100, sample_every=10_000, ckpt_every=10_000, sample_steps=None, sample_per_class=8, cfg_scale=1.0)
PAPER_STEPS = {"dit": 400_000, "sit": 400_000, "meanflow": 1_200_000}  # 80 epochs; MeanFlow 240 epochs (SPEC §5, §7)
DEMO_DEFAULTS = dict(
    # ~6 steps/s on 2 CPU cores: 1500 steps and 4 grids take ~4.5 minutes. Batch 16 rather than 64: the number of
    # updates, not images, limits a run this short.
    global_batch_size=16, steps=1500,
    # 10x the paper's lr with a short warmup: the paper's 1e-4 is tuned for 400K steps of batch 256; 1500 steps need
    # larger ones, and the warmup keeps the first Adam updates from blowing up the adaLN-zero initialisation.
    # Expect a plateau: with the paper's λ = 0.5 the regulariser first inflates block 1's output (~10x) until L_disp
    # sits at −log B, and the diffusion loss stalls near 1.1 for ~250 steps before the later blocks catch up and it
    # drops (measured; a 400K-step run does not notice, a 4-minute demo does).
    lr=1e-3, warmup_steps=50,
    # the EMA must average over tens of steps, not the paper's ~10K, or the demo's samples show the initialisation
    ema_decay=0.99,
    log_every=50, sample_every=500, ckpt_every=500, sample_steps=None, sample_per_class=6,
    # guidance 3 for the grids: an undertrained model's classes show clearly only with CFG (sampling only)
    cfg_scale=3.0)
SAMPLE_STEPS = {"dit": 50, "sit": 50, "meanflow": 1}  # periodic grids: DDIM-50, ODE Heun-50 (100 NFE), 1-NFE
DEMO_SAMPLE_STEPS = {"dit": 25, "sit": 8, "meanflow": 1}

MODEL_KEYS = ("model", "image_size", "num_classes", "latent", "class_dropout_prob", "path")  # what a resume must keep


def make_parser():
    p = argparse.ArgumentParser(description="Train DiT / SiT / MeanFlow with the Dispersive Loss (one process, or "
                                            "many under torchrun).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="SiT-T/4",
                   help=f"registry name: DiT-{{S,B,L,XL}}/{{2,4,8}}, SiT-..., MeanFlow-{{B/4,B/2,M/2,L/2,XL/2}}, "
                        f"or a tiny CPU size {', '.join(TINY_MODELS)} (depth/width/heads {TINY_SIZES['T']})")
    g.add_argument("--image-size", type=int, default=32, help="image size in pixels (latents are size/8)")
    g.add_argument("--num-classes", type=int, default=None, help="number of classes (default: the dataset's)")
    g.add_argument("--data-path", default=None,
                   help="image folder root/<class>/<image> (ImageFolder); default: the built-in shapes dataset")
    g.add_argument("--latent-cache", default=None,
                   help="SD-VAE latent cache built by `python data.py cache` (trains in latent space)")
    g.add_argument("--vae", default=None,
                   help="VAE for decoding sample grids in latent space (default: the one the cache was built with)")
    g.add_argument("--shapes-samples", type=int, default=10_000, help="size of the built-in shapes dataset")
    g.add_argument("--no-flip", action="store_true", help="no random horizontal flips (ImageFolder, latent cache)")
    g.add_argument("--max-bad", type=int, default=100,
                   help="unreadable images skipped (with a warning each) per data process before the run stops")
    g.add_argument("--class-dropout-prob", type=float, default=0.1, help="label dropout for classifier-free guidance")
    g.add_argument("--path", default="linear", choices=["linear", "gvp"], help="SiT interpolant path")

    g = p.add_argument_group("dispersive loss")
    g.add_argument("--disp", default="infonce_l2", choices=["none", *VARIANTS, "contrastive"],
                   help="regulariser: a dispersive variant, none, or the two-view contrastive baseline")
    g.add_argument("--disp-preset", default="paper", choices=["paper", "official"],
                   help="paper: λ 0.5, τ 0.5, block depth//4; official PyTorch code: λ 0.25, τ 1, last block "
                        "(explicit --disp-* flags override)")
    g.add_argument("--disp-weight", type=float, default=None, help="λ, weight of the regulariser (preset)")
    g.add_argument("--disp-tau", type=float, default=None, help="τ, temperature of the InfoNCE variants (preset)")
    g.add_argument("--disp-block", type=int, default=None,
                   help="1-based block whose output is regularised, depth = last (preset: depth//4)")
    g.add_argument("--disp-margin", type=float, default=None, help="ε of the hinge variant (default 1.0)")

    g = p.add_argument_group("optimisation (model-dependent defaults: the paper's, or a quick recipe for tiny sizes)")
    g.add_argument("--steps", type=int, default=None,
                   help="optimizer steps (paper: 400K; MeanFlow 1.2M; tiny sizes: 1500)")
    g.add_argument("--epochs", type=float, default=None, help="train this many epochs instead of --steps")
    g.add_argument("--global-batch-size", type=int, default=None, help="images per optimizer step (paper 256)")
    g.add_argument("--micro-batch-size", type=int, default=None,
                   help="images per forward pass per process; gradient accumulation makes up the global batch "
                        "(default: global batch / number of processes)")
    g.add_argument("--lr", type=float, default=None, help="AdamW learning rate, constant (paper 1e-4)")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear learning-rate warmup (paper: none)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--beta2", type=float, default=None, help="AdamW β2 (0.999 for DiT/SiT, 0.95 for MeanFlow)")
    g.add_argument("--grad-clip", type=float, default=None, help="clip the global gradient norm (paper: none)")
    g.add_argument("--ema-decay", type=float, default=None, help="EMA decay per step (paper 0.9999)")
    g.add_argument("--global-seed", type=int, default=0, help="seed; rank r uses global_seed·world_size + r")

    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 autocast on GPUs that support it, else fp32")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the network (MeanFlow's JVP rows run the eager module: compiled forward-mode "
                        "AD is unreliable in torch 2.13)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks in backward (less memory)")
    g.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader workers per process (default: 0 for the in-memory shapes, else up to 8)")

    g = p.add_argument_group("logging, samples and checkpoints")
    g.add_argument("--results-dir", default="runs", help="parent folder of run folders")
    g.add_argument("--run-name", default=None, help="run folder name (default: the start time)")
    g.add_argument("--resume", default=None, help="checkpoint.pt or run folder to continue exactly")
    g.add_argument("--log-every", type=int, default=None, help="steps between log lines")
    g.add_argument("--sample-every", type=int, default=None, help="steps between sample grids (0: only start/end)")
    g.add_argument("--ckpt-every", type=int, default=None, help="steps between checkpoints (the end always saves)")
    g.add_argument("--keep-every", type=int, default=0,
                   help="also keep checkpoint_<step>.pt every this many steps (0: keep only the latest)")
    g.add_argument("--sample-steps", type=int, default=None,
                   help="sampler steps for the grids (DDIM for DiT, ODE Heun for SiT, MeanFlow steps)")
    g.add_argument("--sample-per-class", type=int, default=None, help="grid columns: samples per class row")
    g.add_argument("--cfg-scale", type=float, default=None,
                   help="classifier-free guidance of the grids, DiT/SiT (1; tiny sizes 3; MeanFlow always 1)")
    g.add_argument("--no-samples", action="store_true", help="write no sample grids")
    return p


def explicit_flags(argv):
    """The dests given on the command line (so a resumed run keeps the checkpoint's values for the others)."""
    p = make_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


def parse_args(argv=None):
    """(args, checkpoint or None). Resolves model-dependent defaults, validates, and on --resume takes every
    flag not given on the command line from the checkpoint's config."""
    parser = make_parser()
    args = parser.parse_args(argv)
    ckpt = None
    if args.resume:
        path = resolve_checkpoint_path(args.resume)
        if not os.path.isfile(path):
            parser.error(f"--resume {args.resume}: no checkpoint there; pass a checkpoint.pt or a run folder that "
                         f"holds one")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or "config" not in ckpt or "opt" not in ckpt:
            parser.error(f"--resume {path} is not a training checkpoint of train.py (no config/optimizer state); "
                         f"start a new run (sample.py reads released weights)")
        given = explicit_flags(argv)
        cfg = ckpt["config"]
        for key in MODEL_KEYS:
            if key in given and getattr(args, key) != cfg.get(key):
                parser.error(f"--resume {path} holds a {cfg.get('model')} at {cfg.get('image_size')}px "
                             f"({key}={cfg.get(key)!r}), but --{key.replace('_', '-')} is {getattr(args, key)!r}: "
                             f"drop the flag to continue that run, or start a new run without --resume")
        dests = {a.dest for a in parser._actions}
        for key, value in cfg.items():
            if key in dests and key not in given and key != "resume":
                setattr(args, key, value)
        world = int(os.environ.get("WORLD_SIZE", 1))
        if "micro_batch_size" not in given and args.micro_batch_size and args.global_batch_size % (
                args.micro_batch_size * world):
            args.micro_batch_size = None  # another number of processes: derive the micro-batch again
        args.resume = path
        # continue in the checkpoint's folder unless a new one is named
        args.run_dir = None if {"results_dir", "run_name"} & given else os.path.dirname(os.path.abspath(path))
    else:
        args.run_dir = None

    args.latent = args.latent_cache is not None
    if ckpt is not None and args.latent != bool(ckpt["config"].get("latent")):
        parser.error(f"--resume {args.resume} was trained in {'latent' if ckpt['config'].get('latent') else 'pixel'} "
                     f"space: keep its --latent-cache / --data-path setting")
    if args.data_path and args.latent_cache:
        parser.error("give either --data-path (pixel space) or --latent-cache (latent space), not both")
    try:
        family = check_model_name(args.model, args.image_size, args.latent)
    except ValueError as e:
        parser.error(str(e))
    args.family = family
    tiny = args.model in TINY_MODELS
    defaults = DEMO_DEFAULTS if tiny else PAPER_DEFAULTS
    if family == "meanflow" and args.cfg_scale is None:
        args.cfg_scale = 1.0  # the guidance is trained in
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps is None:
        args.steps = PAPER_STEPS[family]  # replaced by --epochs once the dataset size is known
    if args.sample_steps is None:
        args.sample_steps = (DEMO_SAMPLE_STEPS if tiny else SAMPLE_STEPS)[family]
    if args.beta2 is None:
        args.beta2 = 0.95 if family == "meanflow" else 0.999  # SPEC §5 / §7
    if family == "meanflow" and args.cfg_scale != 1.0:
        parser.error("MeanFlow learns its guidance in training: sample grids need --cfg-scale 1")

    depth = _depth_of(args.model)
    if args.disp_block is not None and not 1 <= args.disp_block <= depth:
        parser.error(f"--disp-block {args.disp_block} is out of range: {args.model} has blocks 1..{depth} "
                     f"(1-based, {depth} = the last)")
    if args.disp_weight is not None and args.disp_weight < 0:
        parser.error(f"--disp-weight (λ) must be >= 0, got {args.disp_weight}")
    overrides = {k: v for k, v in (("weight", args.disp_weight), ("tau", args.disp_tau), ("block", args.disp_block),
                                   ("margin", args.disp_margin)) if v is not None}
    variant = args.disp if args.disp in VARIANTS else "infonce_l2"  # contrastive uses only λ, τ and the block
    try:
        disp = DispersiveConfig.preset(args.disp_preset, depth, variant=variant, **overrides)
    except ValueError as e:
        parser.error(f"{e} (--disp-tau, --disp-margin)")
    if args.disp == "none":
        disp = DispersiveConfig(variant="none", weight=0.0, tau=disp.tau, block=disp.block, margin=disp.margin)
    # the resolved values go into config.json and the checkpoint
    args.disp_weight, args.disp_tau, args.disp_block, args.disp_margin = disp.weight, disp.tau, disp.block, disp.margin

    for key in ("global_batch_size", "steps", "log_every"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.micro_batch_size is not None and args.micro_batch_size < 1:
        parser.error("--micro-batch-size must be >= 1")
    return args, ckpt, disp


def _depth_of(name):
    size = name.split("-", 1)[1].split("/")[0]
    sizes = {**dit.DIT_SIZES, **meanflow.MEANFLOW_SIZES, **TINY_SIZES}
    return sizes[size][0]


# ---------------------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------------------

def setup_distributed(device_arg):
    """(rank, world_size, local_rank, device). Under torchrun: init the process group (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device_arg == "auto":
        if torch.cuda.is_available():
            device_arg = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available() and world == 1:
            device_arg = "mps"
        else:
            device_arg = "cpu"
    device = torch.device(f"cuda:{local}" if device_arg == "cuda" else device_arg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, local, device


def build_data(args, rank, world, log):
    """(dataset, num_classes, vae name or None) for the chosen data source; errors as one sentence."""
    if args.latent_cache:
        expect = {"image_size": args.image_size}
        try:
            ds = data.LatentCache(args.latent_cache, flip=not args.no_flip, expect=expect)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        want = [4, args.image_size // LATENT_FACTOR, args.image_size // LATENT_FACTOR]
        if list(ds.latent_shape) != want:
            raise SystemExit(f"error: latent cache {args.latent_cache} holds latents of shape {list(ds.latent_shape)}, "
                             f"but {args.model} at {args.image_size}px trains on {want}: use a cache built by the "
                             f"SD-VAE at --image-size {args.image_size}")
        return ds, ds.num_classes, ds.config["vae"]
    if args.data_path:
        try:
            ds = data.ImageFolder(args.data_path, args.image_size, flip=not args.no_flip, max_bad=args.max_bad)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        return ds, ds.num_classes, None
    try:
        ds = data.ShapesDataset(num_classes=args.num_classes or 10, image_size=args.image_size,
                                num_samples=args.shapes_samples, seed=args.global_seed)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    return ds, ds.num_classes, None


def autocast_context(precision, device):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16":
        return precision, lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return precision, contextlib.nullcontext


def grid_labels(num_classes, per_class, device):
    """One row per class (at most 10 rows, spread over the classes); unconditional models get one row of 0."""
    rows = max(1, min(num_classes, 10))
    classes = torch.linspace(0, max(num_classes - 1, 0), rows).round().long()
    return classes.repeat_interleave(per_class).to(device)


@torch.no_grad()
def sample_images(family, model, z, y, args, vae=None):
    """Grid samples in [-1, 1] with the family's sampler (fixed noise z, labels y); decodes latents with the VAE."""
    if family == "dit":
        x = dit.sample(model, z, y, sampler="ddim", num_steps=args.sample_steps, cfg_scale=args.cfg_scale)
    elif family == "sit":
        x = sit.sample(model, z, y, sampler="ode-heun", num_steps=args.sample_steps, cfg_scale=args.cfg_scale,
                       path=args.path)
    else:
        x = meanflow.sample(model, z, y, num_steps=args.sample_steps)
    if vae is not None:
        x = torch.cat([vae.decode(b.float() / VAE_SCALE).sample for b in x.split(32)])
    return x.clamp(-1, 1)


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------

def main(argv=None):
    args, ckpt, disp = parse_args(argv)
    rank, world, local_rank, device = setup_distributed(args.device)
    owns_group = world > 1
    log = print if rank == 0 else (lambda *a, **k: None)
    try:
        return _train(args, ckpt, disp, rank, world, device, log)
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(args, ckpt, disp, rank, world, device, log):
    # --- batch arithmetic: global = micro × world × accumulation ---
    if args.micro_batch_size is None:
        if args.global_batch_size % world:
            raise SystemExit(f"error: --global-batch-size {args.global_batch_size} is not divisible by the "
                             f"{world} processes: pick a multiple of {world}")
        args.micro_batch_size = args.global_batch_size // world
    per_step = args.micro_batch_size * world
    if args.global_batch_size % per_step:
        raise SystemExit(f"error: --global-batch-size {args.global_batch_size} is not a multiple of micro-batch "
                         f"{args.micro_batch_size} × {world} processes: choose sizes with global = micro × "
                         f"processes × accumulation steps")
    accum = args.global_batch_size // per_step
    if disp.enabled or args.disp == "contrastive":
        if args.micro_batch_size < 2:
            raise SystemExit("error: the dispersive/contrastive loss needs at least 2 samples per micro-batch: raise "
                             "--micro-batch-size")

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls and convolutions (fp32 runs on Ampere+)
        torch.backends.cudnn.allow_tf32 = True
    precision, autocast = autocast_context(args.precision, device)

    # --- data ---
    dataset, data_classes, cache_vae = build_data(args, rank, world, log)
    if args.num_classes is None:
        args.num_classes = data_classes
    elif args.num_classes != data_classes and (args.latent_cache or args.data_path):
        raise SystemExit(f"error: --num-classes {args.num_classes} but the dataset has {data_classes} classes: "
                         f"drop --num-classes")
    if args.latent and args.vae is None:
        args.vae = cache_vae
    if args.num_workers is None:
        in_memory = not (args.data_path or args.latent_cache)
        args.num_workers = 0 if in_memory else min(8, (os.cpu_count() or 1) // max(1, int(os.environ.get(
            "LOCAL_WORLD_SIZE", 1))))
    loader, sampler = data.make_loader(dataset, args.micro_batch_size, rank, world, args.global_seed,
                                       args.num_workers)
    if len(loader) == 0:
        raise SystemExit(f"error: the dataset has {len(dataset)} samples, fewer than one micro-batch of "
                         f"{args.micro_batch_size} per process: lower --global-batch-size or add data")
    steps_per_epoch = len(loader) / accum
    if args.epochs is not None:
        args.steps = max(1, round(args.epochs * steps_per_epoch))

    # --- model (identical initialisation on every rank: seeded with the global seed) ---
    torch.manual_seed(args.global_seed)
    model, family = build_model(args.model, args.image_size, args.num_classes, args.latent, args.class_dropout_prob)
    model.to(device)
    if args.grad_checkpointing:
        model.grad_checkpointing = True
    ema = copy.deepcopy(model).eval().requires_grad_(False)  # exact copy at step 0
    objective = build_objective(args.model, family, args.class_dropout_prob, args.path)
    # fused: one kernel for all tensors, and a non-finite step is skipped on the device (train_step)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, args.beta2), weight_decay=args.weight_decay,
                            fused=True)

    # per-rank randomness (timesteps, noise, label dropout, flips): SPEC §7
    seed = args.global_seed * world + rank
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)

    step, epoch, batch_in_epoch = 0, 0, 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        for group in opt.param_groups:  # flags given on resume win over the saved hyper-parameters
            group["betas"], group["weight_decay"] = (0.9, args.beta2), args.weight_decay
            group["fused"] = True  # a checkpoint of an older run may say otherwise
        for p, state in opt.state.items():  # fused AdamW keeps its step counts as float32 on the parameter's device
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(p.device, torch.float32)
        step, epoch, batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
        old = ckpt["config"]
        old_per_step = old.get("micro_batch_size", args.micro_batch_size) * old.get("world_size", world)
        rng = ckpt.get("rng") or {}
        if old_per_step == per_step and rng.get("world_size") == world:
            set_rng_state(rng["states"][rank], device)
        else:
            # another number of processes or micro-batch: continue at the same sample of the epoch with fresh noise
            batch_in_epoch = batch_in_epoch * old_per_step // per_step
            torch.manual_seed(seed + 1_000_003 * step)
            log(f"resuming with {world} processes × micro-batch {args.micro_batch_size} instead of "
                f"{old.get('world_size')} × {old.get('micro_batch_size')}: data order kept, random draws not "
                f"bit-identical to an uninterrupted run")

    # --- run folder (every rank agrees on its name) ---
    if args.run_dir is None:
        name = args.run_name or datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.run_dir = os.path.abspath(os.path.join(args.results_dir, name))
    if world > 1:
        holder = [args.run_dir]
        dist.broadcast_object_list(holder, src=0)
        args.run_dir = holder[0]
    args.world_size, args.accum_steps = world, accum
    config = {k: v for k, v in vars(args).items()}
    config["precision_resolved"] = precision
    n_params = sum(p.numel() for p in model.parameters())
    if rank == 0:
        os.makedirs(args.run_dir, exist_ok=True)
        with open(os.path.join(args.run_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
        metrics_path = os.path.join(args.run_dir, "metrics.jsonl")
        if ckpt is not None and os.path.exists(metrics_path):  # drop rows logged after the checkpoint
            with open(metrics_path) as f:
                rows = [r for r in f if r.strip() and json.loads(r).get("step", 0) <= step]
            with open(metrics_path + ".tmp", "w") as f:
                f.writelines(rows)
            os.replace(metrics_path + ".tmp", metrics_path)
    log(vars(args))
    log(f"{args.model} ({family}, {n_params / 1e6:.2f}M parameters) | {len(dataset)} training samples, "
        f"{args.num_classes} classes | {world} process(es) on {device} | global batch {args.global_batch_size} = "
        f"{args.micro_batch_size} × {world} × {accum} accumulation | {precision} | "
        f"regulariser: {_describe_reg(args, disp, model.depth)}")
    log(f"run folder: {args.run_dir}" + (f" (resuming at step {step})" if ckpt is not None else ""))

    # --- the module DDP wraps; the compiled network sits inside it ---
    net = torch.compile(model) if args.compile else model
    loss_module = TrainLoss(net, objective, disp, model.depth, contrastive=args.disp == "contrastive")
    if world > 1:
        loss_module = DDP(loss_module, device_ids=[device.index] if device.type == "cuda" else None,
                          gradient_as_bucket_view=True)
    model.train()
    ema_params, model_params = list(ema.parameters()), list(model.parameters())
    batches = EpochBatches(loader, sampler, device, epoch, batch_in_epoch)

    # --- sample grids: fixed noise and labels, EMA weights, rank 0 ---
    vae = None
    grid_gen = torch.Generator().manual_seed(args.global_seed)
    y_grid = grid_labels(args.num_classes, args.sample_per_class, device)
    C, S = model.in_channels, model.input_size
    z_grid = torch.randn(len(y_grid), C, S, S, generator=grid_gen).to(device)
    want_samples = rank == 0 and not args.no_samples

    def write_samples(tag):
        nonlocal vae
        if not want_samples:
            return
        t0 = time.time()
        if args.latent and vae is None:
            try:
                vae = data.load_vae(args.vae, device)
            except Exception as e:  # no network, missing diffusers: training goes on without grids
                log(f"no sample grids: {e}")
                args.no_samples = True
                return
        # fork_rng: sampling must not move the training RNG (bit-exact resume)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast():
            images = sample_images(family, ema, z_grid, y_grid, args, vae)
        path = make_grid_png(images, args.sample_per_class, os.path.join(args.run_dir, f"samples_{tag}.png"))
        log(f"wrote {path} ({time.time() - t0:.1f}s)")

    def checkpoint(at_step):
        """All ranks call this (RNG states are gathered); rank 0 writes."""
        pos, rng_state = (batches.epoch, batches.batch_in_epoch), get_rng_state(device)
        states = [rng_state]
        if world > 1:
            states = [None] * world
            dist.all_gather_object(states, rng_state)
        if rank == 0:
            obj = dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=at_step,
                       epoch=pos[0], batch_in_epoch=pos[1], rng=dict(world_size=world, states=states), config=config)
            path = os.path.join(args.run_dir, "checkpoint.pt")
            save_checkpoint(path, obj)
            if args.keep_every and at_step % args.keep_every == 0:
                save_checkpoint(os.path.join(args.run_dir, f"checkpoint_{at_step:07d}.pt"), obj)
            log(f"saved {path} at step {at_step}")

    if ckpt is None:
        write_samples(f"{0:06d}")
    del ckpt

    # --- the loop ---
    metrics_file = open(os.path.join(args.run_dir, "metrics.jsonl"), "a") if rank == 0 else None
    sums, n_sum = {}, 0
    t_last, step_last = time.time(), step
    stop_reason = None
    lagged = LaggedFlags()
    try:
        with StopSignal(log) as stop_signal:
            while step < args.steps:
                lr = args.lr * min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else args.lr
                for group in opt.param_groups:
                    group["lr"] = lr
                stats, flags = train_step(loss_module, opt, batches, accum, autocast, args.grad_clip,
                                          (ema_params, model_params), args.ema_decay,
                                          should_stop=lambda: stop_signal.requested is not None)
                step += 1
                for k, v in stats.items():  # accumulated on the device; synchronised only when logging
                    sums[k] = sums.get(k, 0) + v
                n_sum += 1
                lagged.push(step, flags)
                log_now = step % args.log_every == 0 or step == args.steps
                ready = lagged.pop(keep=0 if log_now else 1)  # this step's flags too when the host syncs anyway
                bad_at = next((s for s, bad, _ in ready if bad), None)
                stop = any(stop for _, _, stop in ready)

                if log_now or stop or bad_at is not None:
                    keys = list(sums)
                    vec = torch.stack([sums[k] for k in keys]) / n_sum
                    if world > 1:
                        dist.all_reduce(vec)
                        vec /= world
                    values = dict(zip(keys, vec.tolist()))
                    elapsed = time.time() - t_last
                    it_s = (step - step_last) / max(elapsed, 1e-9)
                    row = dict(step=step, epoch=round(step / steps_per_epoch, 3), **values, lr=lr, it_s=it_s,
                               img_s=it_s * args.global_batch_size, mem_gb=_memory_gb(device))
                    log(_format_log(row, args.steps))
                    if metrics_file:
                        metrics_file.write(json.dumps(row) + "\n")
                        metrics_file.flush()
                    sums, n_sum = {}, 0
                    t_last, step_last = time.time(), step

                if bad_at is not None:
                    checkpoint(step)  # skipped updates never reached the weights: resumable as is
                    raise SystemExit(f"error: non-finite loss or gradient at step {bad_at}; its update was skipped "
                                     f"and the run stopped at step {step}, saved in {args.run_dir}: lower --lr, set "
                                     f"--grad-clip or use --precision fp32, then --resume")
                if stop:
                    stop_reason = stop_signal.requested or "a signal on another rank"
                    break
                t_pause = time.time()
                if step % args.ckpt_every == 0 and step < args.steps:
                    checkpoint(step)
                if args.sample_every and step % args.sample_every == 0 and step < args.steps:
                    write_samples(f"{step:06d}")
                t_last += time.time() - t_pause  # the log line's it/s counts training time only
            checkpoint(step)
            if stop_reason is None:
                write_samples("final")
    finally:
        if metrics_file:
            metrics_file.close()
    if stop_reason is not None:
        log(f"stopped by {stop_reason} at step {step}; continue with: python train.py --resume {args.run_dir}")
    else:
        log(f"done: {step} steps; run folder {args.run_dir}")
    return dict(run_dir=args.run_dir, step=step, model=model, ema=ema, stopped=stop_reason)


def _describe_reg(args, disp, depth):
    if args.disp == "none":
        return "none"
    if args.disp == "contrastive":
        return f"contrastive (two views), λ {disp.weight}, τ {disp.tau}, block {disp.block}/{depth}"
    return f"{disp.variant}, λ {disp.weight}, τ {disp.tau}, block {disp.block}/{depth}"


def _memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # peak RSS (Linux: KiB)
    except (ImportError, AttributeError):
        return 0.0


def _format_log(row, total_steps):
    parts = [f"step {row['step']:06d}"]
    skip = {"step", "epoch", "lr", "it_s", "img_s", "mem_gb"}
    for k, v in row.items():
        if k not in skip:
            parts.append(f"{k} {v:.4g}")
    eta = (total_steps - row["step"]) / max(row["it_s"], 1e-9)
    parts += [f"{row['it_s']:.2f} it/s", f"{row['img_s']:.0f} img/s",
              f"eta {datetime.timedelta(seconds=int(eta))}", f"{row['mem_gb']:.1f} GB"]
    return " | ".join(parts)


if __name__ == "__main__":
    main()
