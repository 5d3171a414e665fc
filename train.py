"""
Train DiT, SiT or MeanFlow with the Dispersive Loss (Wang & He 2025): L = mean_i L_diff(x_i) + λ · L_disp(Z), with Z
the output of one transformer block on the same batch (no extra parameters, views or data).

    python train.py                  # CPU demo: SiT-T/4 on the built-in shapes, grids and shape accuracy, ~5 min
    torchrun --standalone --nproc_per_node=8 train.py --model SiT-XL/2 --image-size 256 --latent-cache cache/in256
    torchrun --nnodes=4 --node_rank=$NODE_RANK --nproc_per_node=8 --master_addr=$MASTER_ADDR --master_port=29500 \
        train.py --model SiT-XL/2 --image-size 256 --latent-cache /shared/in256 --results-dir /shared/runs
    torchrun --standalone --nproc_per_node=8 train.py --resume runs/<run>      # after a stop (exit code 128 + signal)

One code path for CPU, one GPU and many: torchrun's environment turns on DDP. Global batch = micro-batch × processes ×
accumulation steps. DDP wraps TrainLoss (network + objective + regulariser), so MeanFlow's JVP runs on the plain network
and gradients are synchronised once per step; the dispersive term sees each device's micro-batch, as in the paper.
"""

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import signal
import tempfile
import threading
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import dit
import meanflow
import sample
import sit
from dispersive import VARIANTS, DispersiveConfig, contrastive_loss
from sample import NATURAL, NONNEGATIVE, POSITIVE  # argparse types shared with sample.py


# ---------------------------------------------------------------------------------------------------------------------
# The objective: the family's loss plus λ · L_disp of one block's output, and one optimizer step
# ---------------------------------------------------------------------------------------------------------------------

def build_objective(name, family, class_dropout_prob=0.1, path="linear"):
    """DiT's Gaussian diffusion, SiT's interpolant transport, or MeanFlow with its size's ω, κ, guidance interval."""
    if family != "meanflow":
        return dit.create_diffusion() if family == "dit" else sit.Transport(path)
    # MeanFlowDiT never drops labels itself: the objective does, and changes the dropped rows' target
    return meanflow.MeanFlow(**meanflow.MeanFlow_defaults[name], class_dropout_prob=class_dropout_prob)


class TrainLoss(nn.Module):
    """L = mean_i L_diff(x_i) + λ · L_disp(z), z = output of block `disp.block` from the same forward pass.

    contrastive=True is the paper's baseline with positive pairs instead: two independently noised views of the same
    images, InfoNCE between the views (τ, λ and block of `disp`), the denoising loss on view 1 only.
    forward(x, y) -> (total, {"diff", "disp" or "contrastive" (unweighted), "feat_rms" (the RMS of z), the objective's
    other terms}).
    """

    def __init__(self, model, objective, disp, depth=None, contrastive=False):
        super().__init__()
        self.model, self.objective, self.disp, self.contrastive = model, objective, disp, contrastive
        self.block = disp.resolve_block(depth or model.depth) if (contrastive or disp.enabled) else None

    def forward(self, x, y):
        out = self.objective.training_losses(self.model, x, y, return_features=self.block)
        reg, name = None, "disp"
        if self.contrastive:
            view2 = self.objective.training_losses(self.model, x, y, return_features=self.block)
            reg, name = contrastive_loss(out["feats"], view2["feats"], self.disp.tau), "contrastive"
        elif self.block is not None:
            reg = self.disp.loss(out["feats"])
        diff = out["loss"].mean()
        total = diff if reg is None else diff + self.disp.weight * reg
        terms = {"diff": diff.detach(), **{k: v.detach().float().mean() for k, v in out.items()
                                           if k not in ("loss", "feats") and torch.is_tensor(v)}}
        if reg is not None:  # with the scale of the regularised block's output: L_disp falls as it grows
            terms[name], terms["feat_rms"] = reg.detach(), out["feats"].detach().float().pow(2).mean().sqrt()
        return total, terms


def train_step(loss_module, optimizer, next_batch, accum_steps=1, autocast=contextlib.nullcontext, grad_clip=None,
               ema=None, ema_decay=0.9999, should_stop=None):
    """One optimizer step over `accum_steps` micro-batches `next_batch() -> (x, y)`, with no host synchronisation.

    Returns (stats, flags): stats {"loss", terms..., "gnorm"} as device scalars (mean over the micro-batches); flags a
    device tensor [non_finite, stop], the same on every rank. A non-finite loss or gradient on any rank changes nothing
    (fused AdamW skips the update on the device, the EMA moves by zero); stop is `should_stop()` on any rank.
    ema: (ema_params, model_params), updated as ema ← decay · ema + (1 − decay) · param.
    """
    if not (optimizer.defaults.get("fused") and getattr(optimizer, "_step_supports_amp_scaling", False)):
        raise ValueError("train_step skips non-finite steps on the device: use torch.optim.AdamW(..., fused=True)")
    stats = {}
    for i in range(accum_steps):
        x, y = next_batch()
        sync = not isinstance(loss_module, DDP) or i == accum_steps - 1  # DDP: all-reduce after the last micro-batch
        with contextlib.nullcontext() if sync else loss_module.no_sync():
            with autocast():
                loss, terms = loss_module(x, y)
            (loss / accum_steps).backward()  # DDP averages over ranks: the step sees the global-batch mean
        for k, v in {"loss": loss.detach(), **terms}.items():
            stats[k] = stats.get(k, 0) + v.float() / accum_steps
    params = [p for group in optimizer.param_groups for p in group["params"]]
    stats["gnorm"] = torch.nn.utils.clip_grad_norm_(params, grad_clip or math.inf)  # inf: only measures
    stop = float(should_stop is not None and should_stop())
    flags = torch.stack([(~torch.isfinite(stats["loss"]) | ~torch.isfinite(stats["gnorm"])).float(),
                         torch.full((), stop, device=stats["gnorm"].device)])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    optimizer.grad_scale, optimizer.found_inf = None, flags[0]  # GradScaler's protocol: found_inf = 1 skips the step
    optimizer.step()
    del optimizer.grad_scale, optimizer.found_inf
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        with torch.no_grad():  # important! else the EMA joins the autograd graph
            torch._foreach_lerp_(ema[0], ema[1], [(1.0 - ema_decay) * (1.0 - flags[0])] * len(ema[0]))
    return stats, flags


# ---------------------------------------------------------------------------------------------------------------------
# Settings: the papers' for their sizes, a quick CPU recipe for the tiny T size
# ---------------------------------------------------------------------------------------------------------------------

DEFAULTS = dict(  # (paper, tiny T). A 5-minute CPU run needs more, larger updates than the papers' 400K, an EMA over
    # tens of steps, a warmup that keeps the first large Adam steps from blowing up adaLN-Zero, and CFG in its grids
    global_batch_size=(256, 16), lr=(1e-4, 4e-3), warmup_steps=(0, 50), ema_decay=(0.9999, 0.99),
    ckpt_every=(10_000, 1000), sample_every=(10_000, 1000), steps=(None, 2400), grid_cfg=(1.0, 3.0))
STEPS = {"dit": 400_000, "sit": 400_000, "meanflow": 1_200_000}        # 80 ImageNet epochs; MeanFlow 240
GRID = {"dit": ("ddim", 50, 25), "sit": ("ode-heun", 50, 8), "meanflow": ("meanflow", 1, 1)}  # sampler, steps, tiny
SHAPES_SAMPLES = 10_000                                                # size of the built-in dataset
# what a resumed run may change; everything else is the run's own (start a new run with --init-from to change it)
RESUMABLE = {"resume", "steps", "epochs", "micro_batch_size", "log_every", "ckpt_every", "sample_every", "keep_every",
             "device", "precision", "compile", "grad_checkpointing", "num_workers", "max_bad", "results_dir",
             "run_name"}


RATE = dit.checked(float, lambda v: 0 < v < math.inf, "a number > 0")
DECAY = dit.checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def get_parser():
    p = argparse.ArgumentParser(description="Train DiT / SiT / MeanFlow with the Dispersive Loss (torchrun: many GPUs)")
    g = p.add_argument_group("model and data").add_argument
    g("--model", help="DiT-/SiT-{S,B,L,XL,T}/{2,4,8}, MeanFlow-{B/4,B/2,M/2,L/2,XL/2,T/2,T/4} (default SiT-T/4)")
    g("--image-size", type=POSITIVE, help="pixels; latents are size/8 (default 32)")
    g("--num-classes", type=POSITIVE, help="must match the dataset's (the default)")
    g("--data-path", help="image folder root/<class>/<image> (default: the built-in shapes)")
    g("--latent-cache", help="SD-VAE latent cache made by `python data.py cache` (latent space)")
    g("--pixel-space", action="store_true", default=None, help="train on the pixels of --data-path at >= 256 px")
    g("--path", "--path-type", type=str.lower, choices=["linear", "gvp"], help="SiT interpolant (default linear)")
    g("--max-bad", type=NATURAL, help="unreadable images skipped per data process before the run stops (default 100)")
    g = p.add_argument_group("dispersive loss").add_argument
    g("--disp", choices=["none", *VARIANTS, "contrastive"], help="default infonce_l2; contrastive: the 2-view baseline")
    g("--disp-preset", choices=["paper", "official"], help="paper: λ .5, τ .5, block depth//4; official .25, 1, last")
    g("--disp-weight", type=NONNEGATIVE, help="λ (overrides the preset)")
    g("--disp-tau", type=RATE, help="τ of the InfoNCE variants (overrides the preset)")
    g("--disp-block", type=POSITIVE, help="1-based block whose output is regularised (overrides the preset)")
    g("--disp-margin", type=NONNEGATIVE, help="ε of the hinge variant (default 1.0)")
    g = p.add_argument_group("optimisation").add_argument
    g("--steps", type=POSITIVE, help="optimizer steps (DiT/SiT 400K, MeanFlow 1.2M; T: 2400)")
    g("--epochs", type=RATE, help="train this many epochs instead of --steps")
    g("--global-batch-size", type=POSITIVE, help="images per optimizer step (256; T: 16)")
    g("--micro-batch-size", type=POSITIVE, help="images per forward pass and process (default: global / processes)")
    g("--lr", type=RATE, help="AdamW learning rate, constant after warmup (1e-4; T: 4e-3 after 50 steps)")
    g("--grad-clip", type=RATE, help="clip the global gradient norm (default: none, as the papers)")
    g("--ema-decay", type=DECAY, help="EMA decay per step (0.9999; T: 0.99)")
    g("--global-seed", type=NATURAL, help="seed; rank r draws with global_seed · world_size + r (default 0)")
    g = p.add_argument_group("system").add_argument
    g("--device", choices=["auto", "cpu", "cuda", "mps"], help="default auto: cuda > mps > cpu")
    g("--precision", choices=["auto", "fp32", "bf16"], help="default auto: bf16 autocast on capable GPUs")
    g("--compile", action="store_true", default=None, help="torch.compile the network (MeanFlow's JVP rows stay eager)")
    g("--grad-checkpointing", action="store_true", default=None, help="recompute blocks in backward: less memory")
    g("--num-workers", type=NATURAL, help="DataLoader workers per process (default: 0 for the shapes, else <= 8)")
    g = p.add_argument_group("run folder, logs, checkpoints, sample grids").add_argument
    g("--results-dir", help="parent of the run folders (default runs)")
    g("--run-name", help="a new run folder's name (default: start time and model)")
    g("--resume", help="run folder or checkpoint to continue exactly (an older kept checkpoint branches off)")
    g("--init-from", "--ckpt", help="a new run from weights (+ AdamW state): ours, official DiT/SiT, released ones")
    g("--log-every", type=POSITIVE, help="steps between log lines (default 100)")
    g("--ckpt-every", type=POSITIVE, help="steps between checkpoints (10K; T: 1000); a stop always saves")
    g("--keep-every", type=NATURAL, help="also keep checkpoint_<step>.pt every this many steps (default 0: never)")
    g("--sample-every", type=NATURAL, help="steps between sample grids, also at start and end; 0: none (10K; T: 1000)")
    return p


def new_run_config(model):
    """Every setting of a new run of `model` at its defaults (ValueError for an unknown model)."""
    family, tiny = sample.family_of(model), model.split("-", 1)[-1].startswith("T/")
    cfg = {k: v[tiny] for k, v in DEFAULTS.items()}
    return dict(cfg, model=model, family=family, image_size=32, num_classes=None, data_path=None, latent_cache=None,
                pixel_space=False, path="linear", max_bad=100, disp="infonce_l2", disp_preset="paper", disp_weight=None,
                disp_tau=None, disp_block=None, disp_margin=None, steps=cfg["steps"] or STEPS[family], epochs=None,
                micro_batch_size=None, grad_clip=None, global_seed=0, device="auto", precision="auto", compile=False,
                grad_checkpointing=False, num_workers=None, results_dir="runs", run_name=None, log_every=100,
                resume=None, init_from=None, keep_every=0, beta2=0.95 if family == "meanflow" else 0.999,
                weight_decay=0.0, class_dropout_prob=0.1, flip=family != "meanflow", shapes_samples=SHAPES_SAMPLES,
                vae=None, grid_per_class=8, grid_sampler=GRID[family][0], grid_steps=GRID[family][1 + tiny])


def parse_args(argv=None):
    """(cfg, checkpoint or None, DispersiveConfig): every setting resolved; a resumed run's are the checkpoint's, with
    the flags in RESUMABLE applied."""
    p = get_parser()
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    ckpt = None
    try:
        if "resume" in given:
            ckpt = dit.read_checkpoint(given["resume"])
            if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict) or "init_from" in given:
                raise ValueError(f"--resume continues a run of this train.py from its checkpoint: for a new run from "
                                 f"{given['resume']}'s weights use --init-from alone")
            cfg = {**new_run_config(ckpt["config"]["model"]), **ckpt["config"]}  # old checkpoints lack newer keys
            cfg.update(flip=not cfg.get("no_flip", not cfg["flip"]), run_name=None, results_dir=None)  # its folder
            changed = [k for k in given if k not in RESUMABLE and given[k] != cfg.get(k)]
            if changed:
                raise ValueError(f"--{changed[0].replace('_', '-')} cannot change when resuming (the run has "
                                 f"{cfg.get(changed[0])!r}): drop it, or start a new run with --init-from")
            if "steps" in given:
                cfg["epochs"] = None  # --steps replaces an --epochs budget
            if "micro_batch_size" not in given and cfg["global_batch_size"] % (
                    cfg["micro_batch_size"] * int(os.environ.get("WORLD_SIZE", 1))):
                cfg["micro_batch_size"] = None  # another number of processes: derive it again
        else:
            cfg = new_run_config(given.get("model", "SiT-T/4"))
        cfg = argparse.Namespace(**{**cfg, **given})
        cfg.latent = cfg.latent_cache is not None
        with torch.device("meta"):  # checks the name and the size; the depth without allocating the network
            depth = sample.build_model(cfg.model, cfg.image_size, cfg.num_classes or 1, cfg.latent)[0].depth
        overrides = {k: v for k in ("weight", "tau", "block", "margin") if (v := getattr(cfg, f"disp_{k}")) is not None}
        if cfg.disp == "none":
            overrides["weight"] = 0.0  # "none" keeps the preset's τ and block for the record
        variant = "infonce_l2" if cfg.disp == "contrastive" else cfg.disp  # the baseline uses λ, τ and block
        disp = DispersiveConfig.preset(cfg.disp_preset, depth, variant=variant, **overrides)  # checks the block
    except ValueError as e:
        p.error(str(e))
    if cfg.data_path and cfg.latent_cache:
        p.error("give either --data-path (pixels) or --latent-cache (latents), not both")
    if cfg.data_path and cfg.image_size >= 256 and not cfg.pixel_space:
        p.error(f"at {cfg.image_size} px the papers train on SD-VAE latents: encode the images once with `python "
                f"data.py cache --data-path {cfg.data_path} --image-size {cfg.image_size} --out cache/NAME`, then pass "
                f"--latent-cache cache/NAME (or add --pixel-space to train on pixels)")
    if cfg.run_name and (os.path.basename(cfg.run_name) != cfg.run_name or cfg.run_name in (".", "..")):
        p.error(f"--run-name {cfg.run_name!r} must be a plain folder name: give the parent with --results-dir")
    cfg.disp_weight, cfg.disp_tau, cfg.disp_block, cfg.disp_margin = disp.weight, disp.tau, disp.block, disp.margin
    return cfg, ckpt, disp


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------

def main(argv=None):
    # 1. settings, processes, device, precision
    cfg, ckpt, disp = parse_args(argv)
    with dit.distributed(None if cfg.device == "auto" else cfg.device) as (rank, world, device):
        log = print if rank == 0 else (lambda *a, **k: None)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # TF32 on GPUs that have it
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"
                                           and torch.cuda.is_bf16_supported())
        autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

        # 2. data; global batch = micro-batch × processes × accumulation steps
        dataset = build_dataset(cfg)
        cfg.micro_batch_size = cfg.micro_batch_size or max(1, cfg.global_batch_size // world)
        accum = cfg.global_batch_size // (cfg.micro_batch_size * world)
        if accum * cfg.micro_batch_size * world != cfg.global_batch_size:
            raise SystemExit(f"error: --global-batch-size {cfg.global_batch_size} is not a multiple of micro-batch "
                             f"{cfg.micro_batch_size} × {world} process(es): choose global = micro × processes × "
                             f"accumulation steps")
        if (disp.enabled or cfg.disp == "contrastive") and cfg.micro_batch_size < 2:
            raise SystemExit("error: the dispersive loss needs 2+ samples per micro-batch: raise --micro-batch-size")
        if cfg.num_workers is None:  # the shapes live in memory; decoding images wants workers (the node's CPUs)
            cpus = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
            cfg.num_workers = 0 if isinstance(dataset, data.ShapesDataset) else min(8, cpus)
        loader, sampler = data.make_loader(dataset, cfg.micro_batch_size, rank, world, cfg.global_seed, cfg.num_workers)
        if len(loader) == 0:
            raise SystemExit(f"error: {len(dataset)} samples make no micro-batch of {cfg.micro_batch_size} per "
                             f"process: lower --global-batch-size or add data")
        steps_per_epoch = len(loader) / accum
        cfg.steps = max(1, round(cfg.epochs * steps_per_epoch)) if cfg.epochs else cfg.steps

        # 3. model, EMA (an exact copy), optimizer: the same on every rank (seeded with the global seed); then resume
        torch.manual_seed(cfg.global_seed)
        model, family = sample.build_model(cfg.model, cfg.image_size, cfg.num_classes, cfg.latent,
                                           cfg.class_dropout_prob)
        model.to(device).grad_checkpointing = bool(cfg.grad_checkpointing)
        ema = copy.deepcopy(model).eval().requires_grad_(False)
        objective = build_objective(cfg.model, family, cfg.class_dropout_prob, cfg.path)
        # fused: one kernel for all tensors, and a non-finite step is skipped on the device (train_step)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, cfg.beta2), weight_decay=cfg.weight_decay,
                                fused=True)
        step, position = load_state(cfg, ckpt, model, ema, opt, world, log)
        del ckpt

        # 4. the run folder: a new one, the resumed run's, or a branch of it; then the module DDP wraps
        cfg.world_size, cfg.accum_steps, cfg.precision_resolved = world, accum, "bf16" if bf16 else "fp32"
        box = [run_folder(cfg, step) if rank == 0 else None]  # a refusal on rank 0 makes torchrun stop every rank
        if world > 1:
            dist.broadcast_object_list(box, src=0)
        cfg.run_dir = box[0]
        log(vars(cfg))
        log(f"{cfg.model} ({family}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters) | "
            f"{len(dataset)} samples, {cfg.num_classes} classes | {world} process(es) on {device} | global batch "
            f"{cfg.global_batch_size} = {cfg.micro_batch_size} × {world} × {accum} | {cfg.precision_resolved} | "
            f"regulariser: {cfg.disp}, λ {disp.weight}, τ {disp.tau}, block {disp.block}/{model.depth}\nrun folder: "
            f"{cfg.run_dir}" + (f" (resuming at step {step})" if step else ""))
        net = torch.compile(model) if cfg.compile else model  # a compiled network sits inside what DDP wraps
        loss_module = TrainLoss(net, objective, disp, model.depth, contrastive=cfg.disp == "contrastive")
        if world > 1:
            loss_module = DDP(loss_module, device_ids=[device.index] if device.type == "cuda" else None,
                              gradient_as_bucket_view=True)
        model.train()
        ema_pair = (list(ema.parameters()), list(model.parameters()))
        batches = data.EpochBatches(loader, sampler, device, *position)
        grids = sample.Grids(cfg, family, ema, device, autocast, log) if rank == 0 and cfg.sample_every else None

        def save(at_step):
            if rank == 0:
                save_checkpoint(cfg, dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                                          step=at_step, epoch=position[0], batch_in_epoch=position[1]), log)

        def write(row):
            if rank == 0:
                with open(os.path.join(cfg.run_dir, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(row) + "\n")

        if grids and step == 0:
            write(grids(0))

        # 5. the loop; the host reads each step's flags one step late, so the device never waits for it
        sums, n_sum, t_last, step_last, stop, lagged = {}, 0, time.time(), step, None, LaggedFlags()
        with StopSignal(log) as signals:
            while step < cfg.steps:
                # each step's draws (timesteps, noise, label dropout, flips) are a function of (seed, rank, step): a
                # resumed run needs no saved random state to continue bit-exactly
                torch.manual_seed((cfg.global_seed + 1_000_003 * step) * world + rank)
                lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
                for group in opt.param_groups:
                    group["lr"] = lr
                try:
                    stats, flags = train_step(loss_module, opt, batches, accum, autocast, cfg.grad_clip, ema_pair,
                                              cfg.ema_decay, lambda: signals.requested is not None)
                except data.DataError as e:
                    save(step)  # the last finished step, at its data position
                    raise SystemExit(f"error: {e.sentence} (stopped at step {step}: once the data is fixed, "
                                     f"{resume_command(cfg.run_dir)})")
                step, position = step + 1, (batches.epoch, batches.batch_in_epoch)
                for k, v in stats.items():  # summed on the device; read at log lines only
                    sums[k] = sums.get(k, 0) + v
                n_sum += 1
                log_now = step % cfg.log_every == 0 or step == cfg.steps
                lagged.push(step, flags)
                ready = lagged.pop(keep=0 if log_now else 1)  # this step's too when the host reads anyway
                bad_at = next((s for s, bad, _ in ready if bad), None)
                stop = stop or next((signals.requested or "a signal on another rank" for *_, s in ready if s), None)
                if log_now or stop or bad_at:
                    vec = torch.stack(list(sums.values())) / n_sum
                    if world > 1:
                        dist.all_reduce(vec)
                        vec /= world
                    it_s = (step - step_last) / max(time.time() - t_last, 1e-9)
                    row = dict(step=step, epoch=round(step / steps_per_epoch, 3), **dict(zip(sums, vec.tolist())),
                               lr=lr, it_s=it_s, img_s=it_s * cfg.global_batch_size,
                               mem_gb=torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else 0.0)
                    log(format_row(row, cfg.steps))
                    write(row)
                    sums, n_sum, t_last, step_last = {}, 0, time.time(), step
                if bad_at:
                    save(step)  # skipped updates never reached the weights: resumable as is
                    raise SystemExit(f"error: non-finite loss or gradient at step {bad_at}; its update was skipped and "
                                     f"the run stopped at step {step}, saved in {cfg.run_dir}: lower --lr, set "
                                     f"--grad-clip or use --precision fp32, then --resume")
                if stop:
                    break
                t_pause = time.time()
                if step < cfg.steps and (step % cfg.ckpt_every == 0 or cfg.keep_every and step % cfg.keep_every == 0):
                    save(step)
                if grids and step % cfg.sample_every == 0 and step < cfg.steps:
                    write(grids(step))
                t_last += time.time() - t_pause  # it/s counts training time only
            save(step)
            if grids and not stop:
                write(grids(step, "final"))
        log(f"stopped by {stop} at step {step}; continue with: {resume_command(cfg.run_dir)}" if stop else
            f"done: {step} steps; run folder {cfg.run_dir}")
        return dict(run_dir=cfg.run_dir, step=step, model=model, ema=ema, stopped=stop,
                    exit_code=128 + getattr(signal, stop, signal.SIGTERM).value if stop else 0)


# ---------------------------------------------------------------------------------------------------------------------
# Setup: processes, data, state, run folders
# ---------------------------------------------------------------------------------------------------------------------

def build_dataset(cfg):
    """The built-in shapes, an image folder (pixels) or a latent cache; fills in num_classes (and the cache's VAE)."""
    try:
        if cfg.latent_cache:
            ds = data.LatentCache(cfg.latent_cache, flip=cfg.flip, expect={"image_size": cfg.image_size})
            cfg.vae = ds.config["vae"]
        elif cfg.data_path:
            ds = data.ImageFolder(cfg.data_path, cfg.image_size, flip=cfg.flip, max_bad=cfg.max_bad)
        else:
            ds = data.ShapesDataset(cfg.num_classes or 10, cfg.image_size, cfg.shapes_samples, seed=cfg.global_seed)
    except (ValueError, data.DataError) as e:
        raise SystemExit(f"error: {getattr(e, 'sentence', e)}")
    if cfg.num_classes not in (None, ds.num_classes):
        raise SystemExit(f"error: --num-classes {cfg.num_classes}, but {cfg.latent_cache or cfg.data_path} has "
                         f"{ds.num_classes} classes: drop --num-classes")
    cfg.num_classes = ds.num_classes
    return ds


def load_state(cfg, ckpt, model, ema, opt, world, log):
    """A resumed run's whole state, or --init-from's weights (and its EMA and optimizer state when stored; our step
    count and RNG stay new); returns (step, data position: (epoch, micro-batches done in it))."""
    if ckpt is None and not cfg.init_from:
        return 0, (0, 0)
    try:
        obj = ckpt if ckpt is not None else dit.read_checkpoint(cfg.init_from)
        dit.load_checkpoint(model, obj, prefer="model")
        dit.load_checkpoint(ema, obj, prefer="ema")
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if isinstance(obj.get("opt"), dict) and obj["opt"].get("state"):  # released weights have none
        opt.load_state_dict(obj["opt"])
        for group in opt.param_groups:  # an older or official checkpoint's AdamW may be unfused
            group["fused"] = True
        for p, state in opt.state.items():  # fused AdamW keeps step counts as float32 on the parameter's device
            state["step"] = state["step"].to(p.device, torch.float32)
    if ckpt is None:
        log(f"initialised from {cfg.init_from} (step count and random state start anew)")
        return 0, (0, 0)
    old = ckpt["config"].get("micro_batch_size", cfg.micro_batch_size) * ckpt["config"].get("world_size", world)
    if old != cfg.micro_batch_size * world:
        log(f"resuming with {world} process(es) × micro-batch {cfg.micro_batch_size} instead of {old} samples per "
            f"micro-step: the same data order, other random draws than an uninterrupted run")
    return ckpt["step"], (ckpt["epoch"], ckpt["batch_in_epoch"] * old // (cfg.micro_batch_size * world))


def run_folder(cfg, step):
    """A new run folder (never one that holds another run), the resumed run's own, or a new branch of it (from an older
    kept checkpoint, or with --run-name/--results-dir), which starts with the run's metrics up to the checkpoint."""
    resumed = cfg.resume and os.path.abspath(cfg.resume)
    parent = resumed and (resumed if os.path.isdir(resumed) else os.path.dirname(resumed))
    if resumed and cfg.run_name is None and cfg.results_dir is None:
        if resumed == parent or os.path.basename(resumed) == "checkpoint.pt":
            copy_metrics(parent, parent, step)  # rows logged after the checkpoint go
            return parent
        cfg.run_name = f"{os.path.basename(parent)}-from{step}"  # an older checkpoint: never overwrite the run's future
    cfg.results_dir = os.path.abspath(cfg.results_dir or os.path.dirname(parent))
    try:
        os.makedirs(cfg.results_dir, exist_ok=True)
        if cfg.run_name is None:  # a unique name, claimed atomically
            path = tempfile.mkdtemp(prefix=f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{cfg.model.replace('/', '')}-",
                                    dir=cfg.results_dir)
            os.chmod(path, 0o755)
        else:
            os.makedirs(path := os.path.join(cfg.results_dir, cfg.run_name), exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: cannot create a run folder in {cfg.results_dir} ({e.strerror}): choose a writable "
                         f"--results-dir")
    if os.listdir(path):
        raise SystemExit(f"error: {path} already holds a run: continue it with --resume {path} or a new --run-name")
    if resumed:
        copy_metrics(parent, path, step)
        print(f"branching from step {step} of {resumed} into {path}")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(vars(cfg), f, indent=1)
    return path


def copy_metrics(src, dst, step):
    """metrics.jsonl rows up to `step`, from src into dst; a torn line (a hard stop or a full disk) is dropped."""
    src, rows = os.path.join(src, "metrics.jsonl"), []
    for n, line in enumerate(open(src) if os.path.exists(src) else [], 1):
        try:
            rows += [line] if json.loads(line).get("step", 0) <= step else []
        except json.JSONDecodeError:
            print(f"note: dropped the unreadable line {n} of {src} (cut short by a hard stop?)")
    with open(os.path.join(dst, "metrics.jsonl.tmp"), "w") as f:
        f.writelines(row if row.endswith("\n") else row + "\n" for row in rows)
    os.replace(os.path.join(dst, "metrics.jsonl.tmp"), os.path.join(dst, "metrics.jsonl"))


def resume_command(run_dir):
    world, local = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    launcher = f"torchrun --nnodes={world // local} --nproc_per_node={local} ..." if world > 1 else "python"
    return f"{launcher} train.py --resume {run_dir}"


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints, logs, stop signals
# ---------------------------------------------------------------------------------------------------------------------

def save_checkpoint(cfg, state, log):
    """Written atomically (by rank 0): a crash or a full disk mid-save leaves the previous checkpoint intact and the run
    resumable."""
    obj = dict(state, config=vars(cfg))
    keep = cfg.keep_every and state["step"] % cfg.keep_every == 0
    for path in [f"{cfg.run_dir}/checkpoint.pt"] + keep * [f"{cfg.run_dir}/checkpoint_{state['step']:07d}.pt"]:
        try:
            with open(f"{path}.tmp", "wb") as f:
                torch.save(obj, f)
                os.fsync(f.fileno())
            os.replace(f"{path}.tmp", path)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as its zip writer's RuntimeError
            if os.path.exists(f"{path}.tmp"):
                os.remove(f"{path}.tmp")
            full = getattr(e, "errno", None) == 28 or "unexpected pos" in str(e)
            raise SystemExit(f"error: could not write {path} ({'the disk is full' if full else e}); the previous "
                             f"checkpoint is intact: free space, then {resume_command(cfg.run_dir)}")
    log(f"saved {cfg.run_dir}/checkpoint.pt at step {state['step']}")


class StopSignal:
    """SIGTERM / SIGINT set a flag: the loop saves after the current step and the process exits with 128 + signal; a
    second SIGINT aborts at once (DataLoader workers ignore both: data.make_loader)."""

    def __init__(self, log):
        self.requested, self.log, self.previous = None, log, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def handle(self, signum, frame):
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        self.log(f"received {self.requested}: saving a checkpoint after this step (Ctrl-C again to abort)")

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def format_row(row, total_steps):
    terms = [f"{k} {v:.4g}" for k, v in row.items() if k not in ("step", "epoch", "lr", "it_s", "img_s", "mem_gb")]
    eta = datetime.timedelta(seconds=int((total_steps - row["step"]) / max(row["it_s"], 1e-9)))
    return " | ".join([f"step {row['step']:06d}", *terms, f"{row['it_s']:.2f} it/s", f"{row['img_s']:.0f} img/s",
                       f"eta {eta}"] + [f"{row['mem_gb']:.1f} GB"] * (row["mem_gb"] > 0))


# ---------------------------------------------------------------------------------------------------------------------
# Speed: the host reads each step's flags one step late (on CUDA a pinned copy behind the step and an event), so it
# never waits for the device inside the loop
# ---------------------------------------------------------------------------------------------------------------------

class LaggedFlags(list):
    def push(self, step, flags):
        cuda = flags.device.type == "cuda"
        self.append((step, flags.to("cpu", non_blocking=cuda), torch.cuda.Event() if cuda else None))
        if cuda:
            self[-1][2].record()

    def pop(self, keep=1):
        """[(step, non_finite, stop)] of every pushed step but the newest `keep`."""
        out = []
        while len(self) > keep:
            step, host, event = super().pop(0)
            if event is not None:
                event.synchronize()
            out.append((step, *(v > 0 for v in host.tolist())))
        return out


if __name__ == "__main__":
    raise SystemExit(main()["exit_code"])
