"""
SiT (Ma et al., "SiT: Exploring Flow and Diffusion-based Generative Models with Scalable Interpolant
Transformers"): the DiT network trained on an interpolant x_t = α_t x1 + σ_t x0 to predict the velocity, with
the ODE and SDE samplers of the official code (willisma/SiT) and its released-checkpoint layout.

    model = SiT_models["SiT-XL/2"](input_size=32)                  # same state dict as DiT-XL/2
    load_checkpoint(model, "SiT-XL-2-256x256.pt")                  # released weights, or a training checkpoint
    transport = Transport(path="linear", prediction="velocity")
    terms = transport.training_losses(model, x1, y, return_features=3)   # {"loss": (N,), "feats": (N, T, D)}
    x = sample(model.eval(), torch.randn(8, 4, 32, 32), y, sampler="sde", cfg_scale=1.5)

Time convention of the official code: t = 0 is noise, t = 1 is data; x1 is data, x0 is noise.
Network calls per sample (NFE) of each sampler, with num_steps = n (a CFG call is one batched call):
    "ode-euler"  n                 fixed grid of n steps on [0, 1]
    "ode-heun"   2n                fixed grid of n steps, 2 calls in every step (the paper's 125 steps = 250 NFE)
    "dopri5"     2 + 6·(accepted + rejected steps)     adaptive; `return_nfe=True` reports it
    "sde"        n                 n − 1 Euler–Maruyama steps on [0, 1 − 0.04], then the noise-free "Mean" step
    "sde-heun"   2(n − 1) + 1      n − 1 stochastic Heun steps, then the "Mean" step
The SDE's n counts grid points as the official code does; the fixed ODE grids count steps (the official ode()
also takes grid points, so its n = 250 is 249 steps).
"""

import math
import os
import sys
import time
from fractions import Fraction

import torch

from dit import DIT_SIZES, DiT, _make_registry
from dit import load_checkpoint as _load_dit_checkpoint


# ---------------------------------------------------------------------------------------------------------
# The network: DiT with the sigma half of the output dropped
# ---------------------------------------------------------------------------------------------------------

class SiT(DiT):
    """DiT whose forward returns only the first half of the output channels when learn_sigma=True, as the
    official SiT does: the released SiT-XL/2 keeps DiT's 2C-channel final layer (and so its state dict), but
    the velocity objective uses only the first C channels.

    t is a float in [0, 1] fed to the same timestep embedder without rescaling (the official code does so).
    forward_with_cfg is DiT's: it guides the (velocity) channels; guide_channels=3 reproduces the official
    code, which guides only the first 3 of the 4 latent channels.
    """

    def forward(self, x, t, y, return_features=None):
        out = super().forward(x, t, y, return_features)
        feats = None
        if return_features is not None:
            out, feats = out
        if self.learn_sigma:
            out, _ = out.chunk(2, dim=1)                                          # (N, C, H, W)
        return out if return_features is None else (out, feats)


SiT_models = _make_registry(SiT, "SiT", DIT_SIZES)

PRETRAINED_URLS = {  # the released SiT weights (a raw state dict in DiT-XL/2's layout, learn_sigma=True)
    "SiT-XL-2-256x256.pt": "https://www.dl.dropboxusercontent.com/scl/fi/as9oeomcbub47de5g4be0/SiT-XL-2-256.pt"
                           "?rlkey=uxzxmpicu46coq3msb17b9ofa&dl=0",
}


def load_checkpoint(model, path_or_state, prefer="ema"):
    """dit.load_checkpoint (strict, readable errors) that also downloads the released SiT-XL/2 once."""
    if isinstance(path_or_state, (str, os.PathLike)):
        name = os.path.basename(str(path_or_state))
        if not os.path.exists(path_or_state) and name in PRETRAINED_URLS:
            cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dispersive")
            os.makedirs(cache, exist_ok=True)
            path_or_state = os.path.join(cache, name)
            if not os.path.exists(path_or_state):
                print(f"downloading {name} -> {path_or_state}")
                try:
                    torch.hub.download_url_to_file(PRETRAINED_URLS[name], path_or_state + ".part", progress=True)
                except Exception as e:  # network errors come in many types
                    raise RuntimeError(f"could not download {name} ({e}): download it by hand and pass its path") from e
                os.replace(path_or_state + ".part", path_or_state)
    return _load_dit_checkpoint(model, path_or_state, prefer)


# ---------------------------------------------------------------------------------------------------------
# Transport: interpolant paths, training objective, samplers
# ---------------------------------------------------------------------------------------------------------

PATHS = ("linear", "gvp", "vp")
PREDICTIONS = ("velocity", "noise", "score")
SAMPLERS = ("sde", "sde-heun", "ode-euler", "ode-heun", "dopri5")


def _expand(t, x):
    return t.reshape(-1, *[1] * (x.dim() - 1))                                    # (N, 1, 1, 1)


class Transport:
    """The interpolant x_t = α_t x1 + σ_t x0 (t = 0 noise, t = 1 data) and what the network regresses.

    path: "linear" (α = t, σ = 1 − t), "gvp" (α = sin(πt/2), σ = cos(πt/2)) or "vp" (the official VP path,
    β from 0.1 to 20). prediction: "velocity" (target dα·x1 + dσ·x0; x1 − x0 on the linear path), "noise"
    (target x0) or "score" (σ·s = −x0), all with the official unweighted loss.
    train_eps / sample_eps keep t away from the ends where a coefficient divides by zero; None picks the
    official choice: 0 for velocity on linear/gvp (the whole [0, 1] is used), else 1e-5 / 1e-3 (the official
    flags' defaults), applied at the ends where the official code applies them.
    """

    def __init__(self, path="linear", prediction="velocity", train_eps=None, sample_eps=None,
                 vp_beta_min=0.1, vp_beta_max=20.0):
        if path not in PATHS:
            raise ValueError(f"unknown path {path!r}: choose one of {PATHS}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}: choose one of {PREDICTIONS}")
        exact = prediction == "velocity" and path != "vp"
        self.path = path
        self.prediction = prediction
        self.train_eps = (0.0 if exact else 1e-5) if train_eps is None else float(train_eps)
        self.sample_eps = (0.0 if exact else 1e-3) if sample_eps is None else float(sample_eps)
        self.vp_beta_min, self.vp_beta_max = vp_beta_min, vp_beta_max

    # --- the path ------------------------------------------------------------------------------------

    def coefficients(self, t):
        """(α_t, σ_t, dα/dt, dσ/dt), elementwise for a tensor t."""
        if self.path == "linear":
            return t, 1 - t, torch.ones_like(t), -torch.ones_like(t)
        if self.path == "gvp":
            a = t * (math.pi / 2)
            return torch.sin(a), torch.cos(a), (math.pi / 2) * torch.cos(a), -(math.pi / 2) * torch.sin(a)
        b0, b1 = self.vp_beta_min, self.vp_beta_max
        log_alpha = -0.25 * (1 - t) ** 2 * (b1 - b0) - 0.5 * (1 - t) * b0
        d_log_alpha = 0.5 * (1 - t) * (b1 - b0) + 0.5 * b0                      # = β_t / 2
        alpha = torch.exp(log_alpha)
        sigma = torch.sqrt(-torch.expm1(2 * log_alpha))                           # sqrt(1 − α²), exact near t = 1
        return alpha, sigma, alpha * d_log_alpha, -alpha ** 2 * d_log_alpha / sigma

    def interval(self, sde=False, last_step_size=0.0, train=False):
        """(t0, t1) on which training draws t or a sampler integrates (the official check_interval)."""
        eps = self.train_eps if train else self.sample_eps
        t0, t1 = 0.0, 1.0
        if self.path == "vp":
            t1 = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
        elif self.prediction != "velocity" or sde:
            # important! the score of the linear/gvp path divides by α at t = 0 (non-velocity models only)
            t0 = eps if self.prediction != "velocity" else 0.0
            t1 = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
        return t0, t1

    def plan(self, t, x0, x1):
        """x_t and the velocity target dα·x1 + dσ·x0 for per-sample times t (N,)."""
        alpha, sigma, d_alpha, d_sigma = self.coefficients(_expand(t, x1))
        return alpha * x1 + sigma * x0, d_alpha * x1 + d_sigma * x0

    def velocity_and_score(self, out, x, t):
        """Convert the network's prediction at (x, t) into the ODE velocity v and the score s = ∇log p_t(x).

        With λ = σ(dα·σ − α·dσ):  s = (α·v − dα·x) / λ  and  v = (dα·x + λ·s) / α.
        Linear path: s = (t·v − x) / (1 − t).
        """
        alpha, sigma, d_alpha, d_sigma = self.coefficients(_expand(t, x))
        lam = sigma * (d_alpha * sigma - alpha * d_sigma)
        if self.prediction == "velocity":
            return out, (alpha * out - d_alpha * x) / lam
        score = out if self.prediction == "score" else -out / sigma
        return (d_alpha * x + lam * score) / alpha, score

    # --- training ------------------------------------------------------------------------------------

    def training_losses(self, model, x1, y, t=None, x0=None, return_features=None):
        """Per-sample regression loss on x_t; x1 data, x0 noise, t (N,) uniform on the training interval.

        Returns {"loss": (N,) mean over C, H, W, "feats": (N, T, D) of block `return_features` or None}.
        Random draws (x0, then t, as the official code) use torch's global RNG on x1's device.
        """
        if x0 is None:
            x0 = torch.randn_like(x1)
        if t is None:
            t0, t1 = self.interval(train=True)
            t = (torch.rand(x1.shape[0], device=x1.device) * (t1 - t0) + t0).to(x1.dtype)
        xt, ut = self.plan(t, x0, x1)
        if return_features is None:
            out, feats = model(xt, t, y), None
        else:
            out, feats = model(xt, t, y, return_features=return_features)
        if out.shape != x1.shape:
            raise ValueError(f"the model predicts shape {tuple(out.shape)} for inputs of shape {tuple(x1.shape)}: "
                             f"use a SiT model (it drops the learned-sigma channels) or learn_sigma=False")
        out = out.float()  # the loss in float32 even when the network ran under autocast
        if self.prediction == "velocity":
            err = out - ut.float()
        elif self.prediction == "noise":
            err = out - x0.float()
        else:
            _, sigma, _, _ = self.coefficients(_expand(t, x1))
            err = out * sigma.float() + x0.float()
        return {"loss": err.pow(2).mean(dim=tuple(range(1, x1.dim()))), "feats": feats}

    # --- sampling ------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, model, z, y, sampler="sde", num_steps=250, cfg_scale=1.0, guide_channels=None,
               guidance_interval=(0.0, 1.0), atol=1e-6, rtol=1e-3, last_step_size=0.04, generator=None,
               null_class=None, return_nfe=False, progress=False, noise_fn=None):
        """Integrate from noise z (t = 0) to data (t = 1); see the module docstring for the NFE of each sampler.

        ODE: v is the prediction turned into a velocity. SDE (the official "sigma" form): diffusion w_t = σ_t,
        drift v + w_t·s, noise sqrt(2·w_t·Δt), on the grid linspace(t0, 1 − last_step_size, num_steps), then
        the noise-free "Mean" step x + last_step_size·(v + w_t·s) at t = 1 − last_step_size
        (last_step_size=0 skips it and saves one NFE). One network call per drift evaluation: the official
        code calls the network twice (once for v, once for s) with the same input, which gives the same numbers.
        CFG: with cfg_scale != 1 and t inside guidance_interval (closed, in this file's t) the network sees the
        batch [y, null] in one call and the guided prediction uncond + cfg_scale·(cond − uncond) replaces the
        first guide_channels channels (None: all); outside the interval it gets the conditional batch only.
        The official sampler carries the doubled batch [z, z] through the solver; carrying z and doubling it
        inside each call gives the first half of its result at the same network cost.
        noise_fn: instead of the generator, a callable noise_fn(x) -> standard normal noise like x for each SDE
        step (e.g. per-sample streams, so that images do not depend on the batch size).
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}: choose one of {SAMPLERS}")
        if sampler != "dopri5" and num_steps < (2 if sampler.startswith("sde") else 1):
            raise ValueError(f"num_steps={num_steps} is too small for {sampler}: use at least 2")
        if cfg_scale != 1.0 and y is None:
            raise ValueError("cfg_scale != 1 needs class labels y: pass y, or use cfg_scale=1")
        fn = _GuidedModel(model, y, cfg_scale, guide_channels, guidance_interval, null_class)
        bar = _Progress(sampler, None if sampler == "dopri5" else num_steps, progress)
        if sampler.startswith("ode"):
            x = self._ode_fixed(fn, z, num_steps, heun=sampler == "ode-heun", bar=bar)
        elif sampler == "dopri5":
            x = self._dopri5(fn, z, atol, rtol, bar=bar)
        else:
            x = self._sde(fn, z, num_steps, last_step_size, heun=sampler == "sde-heun",
                          generator=noise_fn or generator, bar=bar)
        bar.close(fn.nfe)
        return (x, fn.nfe) if return_nfe else x

    def _velocity(self, fn, x, t):
        out = fn(x, t)
        return out if self.prediction == "velocity" else self.velocity_and_score(out, x, _full(x[:1], t))[0]

    def _sde_drift(self, fn, x, t):
        v, s = self.velocity_and_score(fn(x, t), x, _full(x[:1], t))             # one t broadcasts to the batch
        w = self.coefficients(torch.tensor(t, dtype=torch.float64))[1].item()    # w_t = σ_t ("sigma" form)
        return v + w * s, w

    def _ode_fixed(self, fn, x, num_steps, heun, bar):
        # A fixed grid like torchdiffeq's "euler" / 2-stage Heun (the corrector runs in every step, the last
        # one included). important! num_steps counts steps; the official ode() counts grid points (n − 1 steps)
        t0, t1 = self.interval(sde=False)
        ts = torch.linspace(t0, t1, num_steps + 1, dtype=torch.float64).tolist()
        for i in range(num_steps):
            t, dt = ts[i], ts[i + 1] - ts[i]
            k1 = self._velocity(fn, x, t)
            if heun:
                k2 = self._velocity(fn, x + dt * k1, ts[i + 1])
                x = x + 0.5 * dt * (k1 + k2)
            else:
                x = x + dt * k1
            bar.update(i + 1, fn.nfe)
        return x

    def _sde(self, fn, x, num_steps, last_step_size, heun, generator, bar):
        t0, t1 = self.interval(sde=True, last_step_size=last_step_size)
        ts = torch.linspace(t0, t1, num_steps, dtype=torch.float64).tolist()     # the official grid
        dt = ts[1] - ts[0]
        for i, t in enumerate(ts[:-1]):
            if callable(generator):  # a noise source noise_fn(x)
                noise = generator(x)
            else:
                noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            if heun:  # the official stochastic Heun: noise first, then a Heun step of the drift
                w = self.coefficients(torch.tensor(t, dtype=torch.float64))[1].item()
                x = x + math.sqrt(2 * w * dt) * noise
                k1, _ = self._sde_drift(fn, x, t)
                k2, _ = self._sde_drift(fn, x + dt * k1, t + dt)
                x = x + 0.5 * dt * (k1 + k2)
            else:     # Euler–Maruyama
                drift, w = self._sde_drift(fn, x, t)
                x = x + drift * dt + math.sqrt(2 * w * dt) * noise
            bar.update(i + 1, fn.nfe)
        if last_step_size > 0:  # "Mean": the SDE drift without noise, so samples end noise-free
            drift, _ = self._sde_drift(fn, x, t1)
            x = x + drift * last_step_size
            bar.update(num_steps, fn.nfe)
        return x

    def _dopri5(self, fn, x, atol, rtol, bar, safety=0.9, ifactor=10.0, dfactor=0.2):
        """Dormand–Prince 5(4) with FSAL, the embedded 4th-order error estimate, torchdiffeq's error norm
        (RMS over the whole batch of err / (atol + rtol·max(|x_old|, |x_new|))) and its step-size control
        (h ← h·clamp(0.9·ratio^(−1/5), 0.2, 10), no shrinking after an accepted step).
        NFE = 2 (first slope, initial step selection) + 6 per attempted step.
        The last step is shortened to land on t1; torchdiffeq steps past the end (the network then sees t > 1)
        and interpolates back."""
        t0, t1 = self.interval(sde=False)
        span = t1 - t0
        rms = lambda v: v.float().pow(2).mean().sqrt().item()

        # initial step (Hairer, Nørsett & Wanner, as torchdiffeq)
        k1 = self._velocity(fn, x, t0)
        scale = atol + rtol * x.abs()
        d0, d1 = rms(x / scale), rms(k1 / scale)
        h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
        h0 = min(h0, span)
        d2 = rms((self._velocity(fn, x + h0 * k1, t0 + h0) - k1) / scale) / h0
        h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** 0.2
        h = min(100 * h0, h1)

        t = t0
        while t1 - t > 1e-12 * span:
            if h < 1e-10 * span:
                raise RuntimeError(f"dopri5 step size underflow at t={t:.6f}: the velocity is not finite or the "
                                   f"tolerances (atol={atol}, rtol={rtol}) are too tight; loosen them or use ode-heun")
            last = h >= t1 - t
            if last:
                h = t1 - t
            k = [k1]
            for i in range(1, 7):
                xi = x + h * sum(a * kj for a, kj in zip(_DP_A[i], k) if a != 0)
                k.append(self._velocity(fn, xi, t + _DP_C[i] * h))
            x_new = xi                                                            # row 7 of A is the 5th-order b
            err = h * sum(e * kj for e, kj in zip(_DP_E, k) if e != 0)
            ratio = rms(err / (atol + rtol * torch.maximum(x.abs(), x_new.abs())))
            if not math.isfinite(ratio):
                raise RuntimeError(f"dopri5 error estimate is not finite at t={t:.6f}: the model returned NaN/inf")
            if ratio <= 1:
                t = t1 if last else t + h
                x, k1 = x_new, k[6]                                               # FSAL: k7 is the next k1
                bar.update(t, fn.nfe)
            shrink = 1.0 if ratio <= 1 else dfactor
            factor = ifactor if ratio == 0 else min(ifactor, max(safety * ratio ** -0.2, shrink))
            h = h * factor
        return x


# Dormand–Prince 5(4) tableau; _DP_E = b5 − b4 (the embedded error weights).
_DP_C = [0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1, 1]
_DP_A_FRAC = [
    [],
    [Fraction(1, 5)],
    [Fraction(3, 40), Fraction(9, 40)],
    [Fraction(44, 45), Fraction(-56, 15), Fraction(32, 9)],
    [Fraction(19372, 6561), Fraction(-25360, 2187), Fraction(64448, 6561), Fraction(-212, 729)],
    [Fraction(9017, 3168), Fraction(-355, 33), Fraction(46732, 5247), Fraction(49, 176), Fraction(-5103, 18656)],
    [Fraction(35, 384), Fraction(0), Fraction(500, 1113), Fraction(125, 192), Fraction(-2187, 6784), Fraction(11, 84)],
]
_DP_B4_FRAC = [Fraction(5179, 57600), Fraction(0), Fraction(7571, 16695), Fraction(393, 640),
               Fraction(-92097, 339200), Fraction(187, 2100), Fraction(1, 40)]
_DP_A = [[float(a) for a in row] for row in _DP_A_FRAC]
_DP_E = [float(b5 - b4) for b5, b4 in zip(_DP_A_FRAC[6] + [Fraction(0)], _DP_B4_FRAC)]


def _full(x, t):
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)


class _GuidedModel:
    """model(x, t, y) at a scalar time with optional classifier-free guidance; counts network calls."""

    def __init__(self, model, y, cfg_scale, guide_channels, guidance_interval, null_class):
        self.model, self.y, self.cfg_scale, self.guide_channels = model, y, cfg_scale, guide_channels
        self.lo, self.hi = guidance_interval
        self.nfe = 0
        self.y_null = None
        if cfg_scale != 1.0:
            if null_class is None:
                null_class = getattr(model, "num_classes", None)
            if null_class is None:
                raise ValueError("cfg_scale != 1 needs the null class label: pass null_class= (the network's "
                                 "num_classes) or a model with a num_classes attribute")
            self.y_null = torch.full_like(y, null_class)

    def __call__(self, x, t):
        self.nfe += 1
        tt = _full(x, t)
        if self.y_null is None or not self.lo <= t <= self.hi:
            return self.model(x, tt, self.y)
        out = self.model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([self.y, self.y_null]))
        cond, uncond = out.chunk(2, dim=0)
        g = out.shape[1] if self.guide_channels is None else self.guide_channels
        guided = uncond[:, :g] + self.cfg_scale * (cond[:, :g] - uncond[:, :g])
        return torch.cat([guided, cond[:, g:]], dim=1)


class _Progress:
    """One status line on stderr: steps (or t for adaptive solvers), NFE, rate, ETA."""

    def __init__(self, name, total, enabled):
        self.name, self.total, self.enabled, self.start = name, total, enabled, time.time()

    def update(self, done, nfe):
        if not self.enabled:
            return
        elapsed = time.time() - self.start
        if self.total is None:
            msg = f"{self.name} t {done:.4f} | nfe {nfe} | {elapsed:.1f}s"
        else:
            rate = done / max(elapsed, 1e-9)
            eta = (self.total - done) / max(rate, 1e-9)
            msg = f"{self.name} step {done}/{self.total} | nfe {nfe} | {rate:.2f} it/s | eta {eta:.0f}s"
        print("\r" + msg.ljust(79), end="", file=sys.stderr, flush=True)  # pad over a longer previous line

    def close(self, nfe):
        if self.enabled:
            print(f"\r{self.name} done | nfe {nfe} | {time.time() - self.start:.1f}s".ljust(80), file=sys.stderr)


def sample(model, z, y, sampler="sde", num_steps=250, cfg_scale=1.0, guide_channels=None,
           guidance_interval=(0.0, 1.0), atol=1e-6, rtol=1e-3, generator=None, null_class=None, path="linear",
           prediction="velocity", sample_eps=None, last_step_size=0.04, return_nfe=False, progress=False,
           noise_fn=None):
    """Sample data (t = 1) from noise z (t = 0) with a SiT-style model; returns x, or (x, nfe) with return_nfe.

    sampler: "sde" (official default SDE: Euler–Maruyama, 250 steps, NFE = num_steps), "sde-heun"
    (NFE = 2·num_steps − 1), "ode-euler" (NFE = num_steps), "ode-heun" (NFE = 2·num_steps) or "dopri5"
    (the official ODE default, adaptive with atol/rtol; NFE = 2 + 6·attempted steps, num_steps unused).
    See Transport.sample for CFG, the guidance interval and the SDE details.
    """
    transport = Transport(path=path, prediction=prediction, sample_eps=sample_eps)
    return transport.sample(model, z, y, sampler=sampler, num_steps=num_steps, cfg_scale=cfg_scale,
                            guide_channels=guide_channels, guidance_interval=guidance_interval, atol=atol,
                            rtol=rtol, last_step_size=last_step_size, generator=generator, null_class=null_class,
                            return_nfe=return_nfe, progress=progress, noise_fn=noise_fn)
