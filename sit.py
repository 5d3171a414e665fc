"""
SiT (Ma et al., "SiT: Exploring Flow and Diffusion-based Generative Models with Scalable Interpolant Transformers"):
DiT's network trained on the interpolant x_t = α_t·x1 + σ_t·x0 to predict the velocity, with the ODE and SDE
samplers of the official code (willisma/SiT).

    model = SiT_models["SiT-XL/2"](input_size=32)                  # same state dict as DiT-XL/2
    load_checkpoint(model, "SiT-XL-2-256x256.pt")                  # released weights, or a training checkpoint
    terms = Transport("linear").training_losses(model, x1, y, return_features=7)   # {"loss": (N,), "feats"}
    x = sample(model.eval(), torch.randn(8, 4, 32, 32), y, sampler="sde", cfg_scale=1.5)

Convention (official): t = 0 is noise, t = 1 is data; x1 is data, x0 is noise. Network calls (NFE) with num_steps
n: "sde" n (n − 1 Euler–Maruyama steps, then the noise-free "Mean" step), "sde-heun" 2n − 1, "ode-euler" n,
"ode-heun" 2n (n steps; the official ode() counts grid points), "dopri5" 2 + 6 per attempted step (adaptive).
"""

import math
from fractions import Fraction
from functools import partial

import torch

from dit import SIZES, DiT, Progress, classifier_free_guidance, noise_source
from dit import load_checkpoint  # noqa: F401  (sit.load_checkpoint is dit's: the same state-dict layout)


class SiT(DiT):
    """DiT whose forward returns the first C output channels (the velocity) when learn_sigma=True, as the official
    SiT: the released SiT-XL/2 keeps DiT's 2C-channel final layer, and so its state dict. t in [0, 1] goes to the
    timestep embedder unscaled (official)."""

    def forward(self, x, t, y, return_features=None):
        out = super().forward(x, t, y, return_features)
        out, feats = (out, None) if return_features is None else out
        if self.learn_sigma:
            out = out.chunk(2, dim=1)[0]                                          # (N, C, H, W)
        return out if return_features is None else (out, feats)


SiT_models = {f"SiT-{s}/{p}": partial(SiT, depth=d, hidden_size=w, num_heads=h, patch_size=p)
              for s, (d, w, h) in SIZES.items() for p in (2, 4, 8)}


# ---------------------------------------------------------------------------------------------------------
# Transport: the interpolant and its training objective
# ---------------------------------------------------------------------------------------------------------

PATHS = ("linear", "gvp", "vp")
SAMPLERS = ("sde", "sde-heun", "ode-euler", "ode-heun", "dopri5")


def _expand(t, x):
    return t.reshape(-1, *[1] * (x.dim() - 1))                                    # (N, 1, 1, 1)


class Transport:
    """The interpolant x_t = α_t·x1 + σ_t·x0 and its velocity α̇·x1 + σ̇·x0, which the network regresses.

    path: "linear" (α = t, σ = 1 − t; the velocity is x1 − x0), "gvp" (α = sin(πt/2), σ = cos(πt/2)) or "vp"
    (the official VP path, β from 0.1 to 20). VP stops short of t = 1, where σ = 0 divides: at 1 − 1e-5 in training
    and 1 − 1e-3 in sampling (the official defaults); linear and gvp use all of [0, 1].
    """

    def __init__(self, path="linear"):
        if path not in PATHS:
            raise ValueError(f"unknown path {path!r}: choose one of {PATHS}")
        self.path = path

    def coefficients(self, t):
        """(α_t, σ_t, dα/dt, dσ/dt), elementwise for a tensor t."""
        if self.path == "linear":
            return t, 1 - t, torch.ones_like(t), -torch.ones_like(t)
        if self.path == "gvp":
            a = t * (math.pi / 2)
            return torch.sin(a), torch.cos(a), (math.pi / 2) * torch.cos(a), -(math.pi / 2) * torch.sin(a)
        b0, b1 = 0.1, 20.0
        log_alpha = -0.25 * (1 - t) ** 2 * (b1 - b0) - 0.5 * (1 - t) * b0
        d_log_alpha = 0.5 * (1 - t) * (b1 - b0) + 0.5 * b0                      # = β_t / 2
        alpha = torch.exp(log_alpha)
        sigma = torch.sqrt(-torch.expm1(2 * log_alpha))                           # sqrt(1 − α²), exact near t = 1
        return alpha, sigma, alpha * d_log_alpha, -alpha ** 2 * d_log_alpha / sigma

    def t_end(self, train=False, sde=False, last_step_size=0.0):
        """Where training's t ~ U[0, t_end] and the samplers stop (the official check_interval; all start at 0)."""
        eps = 0.0 if self.path != "vp" else 1e-5 if train else 1e-3
        return 1.0 - (last_step_size if sde and last_step_size > 0 else eps)

    def score(self, v, x, t):
        """∇log p_t(x) from the velocity v at (x, t): (α·v − α̇·x) / (σ·(α̇·σ − α·σ̇)), which is
        (t·v − x) / (1 − t) on the linear path."""
        alpha, sigma, d_alpha, d_sigma = self.coefficients(_expand(t, x))
        return (alpha * v - d_alpha * x) / (sigma * (d_alpha * sigma - alpha * d_sigma))

    def training_losses(self, model, x1, y, t=None, x0=None, return_features=None):
        """Per-sample ‖model(x_t, t, y) − (α̇·x1 + σ̇·x0)‖² averaged over C, H, W: {"loss": (N,), "feats":
        (N, T, D) output of block `return_features` or None}. x0 ~ N(0, I), then t ~ U[0, t_end], from torch's
        global RNG (the official order) when not given."""
        x0 = torch.randn_like(x1) if x0 is None else x0
        t = (torch.rand(x1.shape[0], device=x1.device) * self.t_end(train=True)).to(x1.dtype) if t is None else t
        alpha, sigma, d_alpha, d_sigma = self.coefficients(_expand(t, x1))
        xt, ut = alpha * x1 + sigma * x0, d_alpha * x1 + d_sigma * x0               # x_t and its velocity
        out = model(xt, t, y) if return_features is None else model(xt, t, y, return_features=return_features)
        out, feats = (out, None) if return_features is None else out
        if out.shape != x1.shape:
            raise ValueError(f"the model predicts shape {tuple(out.shape)} for inputs of shape {tuple(x1.shape)}: "
                             f"use a SiT model (it drops the learned-sigma channels) or learn_sigma=False")
        err = out.float() - ut.float()  # the loss in float32 even when the network ran under autocast
        return {"loss": err.pow(2).mean(dim=tuple(range(1, x1.dim()))), "feats": feats}


# ---------------------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample(model, z, y, sampler="sde", num_steps=250, cfg_scale=1.0, guide_channels=None, guidance_interval=(0.0, 1.0),
           path="linear", atol=1e-6, rtol=1e-3, last_step_size=0.04, generator=None, progress=False, return_nfe=False):
    """Data (t = 1) from noise z (t = 0) with any model(x, t, y) -> velocity; returns x, or (x, NFE) with return_nfe.

    CFG (cfg_scale != 1, dit.classifier_free_guidance) at the steps whose t lies in guidance_interval (closed), the
    conditional prediction elsewhere. dopri5 adapts its steps to atol, rtol (num_steps unused). The SDE ("sigma"
    form of the official code, diffusion w_t = σ_t) is dx = (v + w·s) dt + sqrt(2w) dW on linspace(0, 1 −
    last_step_size, num_steps), s the score, then the noise-free "Mean" step (last_step_size=0 skips it).
    generator: the noise of the SDE steps, see dit.noise_source.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: choose one of {SAMPLERS}")
    least = 2 if sampler.startswith("sde") else 1                                 # dopri5 ignores num_steps
    if sampler != "dopri5" and num_steps < least:
        raise ValueError(f"num_steps={num_steps} is too small for {sampler}: use at least {least}")
    transport, nfe, (lo, hi) = Transport(path), 0, guidance_interval
    guided = model if cfg_scale == 1.0 else classifier_free_guidance(model, cfg_scale, guide_channels=guide_channels)

    def velocity(x, t):  # at a float time t; one network call (a guided one is one batched call)
        nonlocal nfe
        nfe += 1
        return (guided if lo <= t <= hi else model)(x, torch.full((len(x),), t, dtype=x.dtype, device=x.device), y)

    bar = Progress(None if sampler == "dopri5" else num_steps, sampler, enabled=progress)
    if sampler == "dopri5":
        x = dopri5(velocity, z, transport.t_end(), atol, rtol, bar)
    elif sampler.startswith("ode"):
        x = ode(velocity, z, transport.t_end(), num_steps, sampler == "ode-heun", bar)
    else:
        noise = noise_source(generator, z.device)
        x = sde(transport, velocity, z, num_steps, last_step_size, sampler == "sde-heun", noise, bar)
    bar.close(f"nfe {nfe}")
    return (x, nfe) if return_nfe else x


def ode(velocity, x, t1, num_steps, heun, bar):
    """num_steps fixed steps on [0, t1]: torchdiffeq's "euler", or 2-stage Heun with its corrector in every step."""
    ts = torch.linspace(0, t1, num_steps + 1, dtype=torch.float64).tolist()
    for t, t_next in zip(ts, ts[1:]):
        dt, k1 = t_next - t, velocity(x, t)
        if heun:
            x = x + 0.5 * dt * (k1 + velocity(x + dt * k1, t_next))
        else:
            x = x + dt * k1
        bar.update()
    return x


def sde(transport, velocity, x, num_steps, last_step_size, heun, noise, bar):
    """Euler–Maruyama, or the official stochastic Heun (noise first, then a Heun step of the drift), on the official
    grid linspace(0, t1, num_steps); then the "Mean" step, the drift without noise, so that samples end noise-free.
    One network call per drift: the official code calls the network twice (for v and for s) with the same input."""
    t1 = transport.t_end(sde=True, last_step_size=last_step_size)
    ts = torch.linspace(0, t1, num_steps, dtype=torch.float64).tolist()
    dt = ts[1] - ts[0]
    w = lambda t: transport.coefficients(torch.tensor(t, dtype=torch.float64))[1].item()  # noqa: E731  (w_t = σ_t)

    def drift(x, t):  # v + w·s
        v = velocity(x, t)
        return v + w(t) * transport.score(v, x, torch.full((1,), t, dtype=x.dtype, device=x.device))

    for t in ts[:-1]:
        eps = noise(x)
        if heun:
            x = x + math.sqrt(2 * w(t) * dt) * eps
            k1 = drift(x, t)
            x = x + 0.5 * dt * (k1 + drift(x + dt * k1, t + dt))
        else:
            x = x + drift(x, t) * dt + math.sqrt(2 * w(t) * dt) * eps
        bar.update()
    if last_step_size > 0:
        x = x + drift(x, t1) * last_step_size
        bar.update()
    return x


def dopri5(velocity, x, t1, atol, rtol, bar, safety=0.9, ifactor=10.0, dfactor=0.2):
    """Dormand–Prince 5(4) on [0, t1] with FSAL and torchdiffeq's initial step, error norm (RMS over the batch of
    err / (atol + rtol·max(|x_old|, |x_new|))) and step control (h·clamp(0.9·ratio^(−1/5), 0.2, 10), no shrinking
    after an accepted step). The last step is shortened to land on t1 (torchdiffeq steps past it and interpolates)."""
    rms = lambda v: v.float().pow(2).mean().sqrt().item()  # noqa: E731
    # initial step (Hairer, Nørsett & Wanner, as torchdiffeq)
    k1 = velocity(x, 0.0)
    scale = atol + rtol * x.abs()
    d0, d1 = rms(x / scale), rms(k1 / scale)
    h0 = min(1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1, t1)
    d2 = rms((velocity(x + h0 * k1, h0) - k1) / scale) / h0
    h = min(100 * h0, max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** 0.2)
    t = 0.0
    while t1 - t > 1e-12 * t1:
        if h < 1e-10 * t1:
            raise RuntimeError(f"dopri5 step size underflow at t={t:.6f}: the velocity is not finite or the "
                               f"tolerances (atol={atol}, rtol={rtol}) are too tight; loosen them or use ode-heun")
        last = h >= t1 - t
        h = t1 - t if last else h
        k = [k1]
        for i in range(1, 7):
            xi = x + h * sum(a * kj for a, kj in zip(_DP_A[i], k) if a != 0)
            k.append(velocity(xi, t + _DP_C[i] * h))
        err = h * sum(e * kj for e, kj in zip(_DP_E, k) if e != 0)               # xi: the 5th-order solution
        ratio = rms(err / (atol + rtol * torch.maximum(x.abs(), xi.abs())))
        if not math.isfinite(ratio):
            raise RuntimeError(f"dopri5 error estimate is not finite at t={t:.6f}: the model returned NaN/inf")
        if ratio <= 1:
            t, x, k1 = t1 if last else t + h, xi, k[6]                            # FSAL: k7 is the next k1
            bar.update(note=f"t {t:.4f}")
        h *= ifactor if ratio == 0 else min(ifactor, max(safety * ratio ** -0.2, 1.0 if ratio <= 1 else dfactor))
    return x


# Dormand–Prince 5(4) tableau: row 6 of A is the 5th-order solution, _DP_E = b5 − b4 the embedded error weights
_DP_C = [0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1, 1]
_DP_A = [[Fraction(a) for a in row.split()] for row in (
    "", "1/5", "3/40 9/40", "44/45 -56/15 32/9", "19372/6561 -25360/2187 64448/6561 -212/729",
    "9017/3168 -355/33 46732/5247 49/176 -5103/18656", "35/384 0 500/1113 125/192 -2187/6784 11/84")]
_DP_B4 = [Fraction(b) for b in "5179/57600 0 7571/16695 393/640 -92097/339200 187/2100 1/40".split()]
_DP_E = [float(b5 - b4) for b5, b4 in zip(_DP_A[6] + [0], _DP_B4)]
_DP_A = [[float(a) for a in row] for row in _DP_A]
