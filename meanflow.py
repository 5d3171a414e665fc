"""
MeanFlow (Geng et al., "Mean Flows for One-step Generative Modeling"): a DiT that predicts the average
velocity u(z, t, r) = 1/(t − r) ∫_r^t v(z_τ, τ) dτ, trained with the MeanFlow identity u = v − (t − r)·du/dt
and sampled in one network call. The Dispersive Loss paper regularises MeanFlow-XL/2 (1-NFE FID 3.43 -> 3.21).

    model = MeanFlow_models["MeanFlow-XL/2"](input_size=32)       # 256x256 images -> 32x32x4 SD-VAE latents
    mf = MeanFlow(**MeanFlow_defaults["MeanFlow-XL/2"])            # ω, κ, guidance interval of that size
    terms = mf.training_losses(model, x, y, return_features=7)    # {"loss", "mse_uv", "feats"}
    x0 = sample(model.eval(), torch.randn_like(x), y)             # 1-NFE: z_0 = z_1 − u(z_1, t=1, r=0)

Convention (official): t = 0 is data, t = 1 is noise, z_t = (1 − t)·x + t·ε, v = ε − x. The network is called
model(z, t, r, y) with t ≥ r and returns u, which carries z_t to z_r = z_t − (t − r)·u. Speed tricks are at the
bottom of the file.
"""

import math
from contextlib import contextmanager
from functools import partial

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F

from dit import SIZES as DIT_SIZES
from dit import Attention, DiT, Progress, TimestepEmbedder, null_label


class MeanFlowDiT(DiT):
    """DiT conditioned on c = t_emb(t) + h_emb(t − r) + y_emb(y), predicting u (no sigma channels).

    important! the network never drops labels, in train mode either: the MeanFlow objective does, and changes the
    dropped rows' target too. class_dropout_prob > 0 only creates the null row (num_classes) of the label table.
    """

    def __init__(self, **kwargs):
        super().__init__(learn_sigma=False, **kwargs)
        self.h_embedder = TimestepEmbedder(self.hidden_size)                     # h = t − r (official: its own MLP)
        for lin in (self.h_embedder.mlp[0], self.h_embedder.mlp[2]):             # initialised as DiT's t_embedder
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.constant_(lin.bias, 0)

    def forward(self, x, t, r, y, return_features=None):
        """x: (N, C, H, W) state z_t, t: (N,) current time, r: (N,) target time (t ≥ r), y: (N,) labels."""
        c = self.t_embedder(t) + self.h_embedder(t - r) + self.y_embedder(y, False)  # (N, D); t, h raw in [0, 1]
        return self.forward_tokens(x, c, return_features)


SIZES = {**DIT_SIZES, "M": (16, 1024, 16)}                                         # name: (depth, width, heads)
MeanFlow_defaults = {  # the paper's guidance trained into the target, per size (ImageNet 256): ω, κ, interval of t
    "MeanFlow-B/4": dict(omega=3.0, kappa=0.0, t_interval=(0.0, 1.0)),           # Table 1f ablation model (80 ep)
    "MeanFlow-B/2": dict(omega=1.0, kappa=0.5, t_interval=(0.0, 1.0)),
    "MeanFlow-M/2": dict(omega=1.0, kappa=0.5, t_interval=(0.0, 1.0)),
    "MeanFlow-L/2": dict(omega=0.2, kappa=0.92, t_interval=(0.0, 0.8)),
    "MeanFlow-XL/2": dict(omega=0.2, kappa=0.92, t_interval=(0.0, 0.75)),
}
MeanFlow_defaults.update({f"MeanFlow-T/{p}": MeanFlow_defaults["MeanFlow-B/2"] for p in (2, 4)})  # tiny: B/2's
MeanFlow_models = {f"MeanFlow-{s}/{p}": partial(MeanFlowDiT, depth=d, hidden_size=w, num_heads=h, patch_size=p)
                   for s, (d, w, h) in SIZES.items() for p in (2, 4) if f"MeanFlow-{s}/{p}" in MeanFlow_defaults}


def _bcast(s, x):
    return s.reshape(-1, *([1] * (x.dim() - 1)))                                  # (N, 1, 1, 1)


def _up(a):
    # half precision -> float32; float32 / float64 stay as they are
    return a.float() if a.dtype in (torch.float16, torch.bfloat16) else a


def _call(model, z, t, r, y, return_features):
    # plain callables (analytic test models) need not accept return_features
    return (model(z, t, r, y), None) if return_features is None else model(z, t, r, y, return_features=return_features)


class MeanFlow:
    """The MeanFlow objective around any callable model(z, t, r, y[, return_features=k]).

    Guidance trained into the target: v_g = ω·v + κ·u(z_t, t, t | y) + (1 − ω − κ)·u(z_t, t, t | ∅) where t
    lies in t_interval and the label is kept, else v (ω = 1, κ = 0: none). Labels are dropped to the null class
    (model.num_classes, or null_class) with class_dropout_prob; a share r_neq_t_ratio of each batch has r ≠ t
    (paper: 25%). t, r are the larger and smaller of two sigmoid(N(logit_mean, logit_std²)) draws. Adaptive
    weight: 1 / sg(L + c)^p.
    """

    def __init__(self, omega=1.0, kappa=0.5, t_interval=(0.0, 1.0), class_dropout_prob=0.1, r_neq_t_ratio=0.25,
                 logit_mean=-0.4, logit_std=1.0, adaptive_p=1.0, adaptive_c=0.01, null_class=None):
        assert 0 <= t_interval[0] <= t_interval[1] <= 1 and 0 <= r_neq_t_ratio <= 1 and 0 <= class_dropout_prob < 1
        self.omega, self.kappa, self.t_interval = omega, kappa, tuple(t_interval)          # ω, κ
        self.class_dropout_prob, self.r_neq_t_ratio, self.null_class = class_dropout_prob, r_neq_t_ratio, null_class
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.adaptive_p, self.adaptive_c = adaptive_p, adaptive_c                                 # p, c

    def num_r_neq_t(self, batch_size):
        """Rows with r ≠ t: ⌈ratio·B⌉, the last rows of the batch (official: r = t on the first
        int(0.75·B))."""
        return batch_size - math.floor((1.0 - self.r_neq_t_ratio) * batch_size + 1e-9)

    def sample_times(self, batch_size, device=None, dtype=torch.float32):
        """(t, r) with t ≥ r, logit-normal; the first B − ⌈ratio·B⌉ rows get r = t."""
        s = torch.sigmoid(torch.randn(2, batch_size, device=device, dtype=torch.float32) * self.logit_std
                          + self.logit_mean)
        t, r = torch.maximum(s[0], s[1]), torch.minimum(s[0], s[1])
        r = torch.where(torch.arange(batch_size, device=device) < batch_size - self.num_r_neq_t(batch_size), t, r)
        return t.to(dtype), r.to(dtype)

    def guided_rows(self, t, drop=None):
        """Rows whose target is guided: t in t_interval and the label kept."""
        rows = (t >= self.t_interval[0]) & (t <= self.t_interval[1])
        return rows if drop is None else rows & ~drop

    def guided_velocity(self, model, z, t, y, v, drop=None, skip_kappa=None):
        """v_g = ω·v + κ·u(z, t, t | y) + (1 − ω − κ)·u(z, t, t | ∅) on the guided rows (t in t_interval,
        label kept), v elsewhere: one batched no-grad call on the guided rows only. The rows of the mask skip_kappa
        get no κ term (the caller adds it: see Speed, deferred κ)."""
        if self.omega == 1.0 and self.kappa == 0.0:
            return v
        rows = self.guided_rows(t, drop)
        idx = rows.nonzero().squeeze(1)                                           # one host read
        v_g = v.clone()
        v_g[idx] = self.omega * v[idx]
        calls, w_null = [], 1.0 - self.omega - self.kappa                         # (weight, rows, labels)
        if self.kappa != 0.0:
            i = (rows if skip_kappa is None else rows & ~skip_kappa).nonzero().squeeze(1)
            calls.append((self.kappa, i, y[i]))
        if w_null != 0.0:
            calls.append((w_null, idx, torch.full_like(y[idx], null_label(model, self.null_class))))
        ii = torch.cat([i for _, i, _ in calls])
        if len(ii):
            with torch.no_grad():                                                 # the target is stopped anyway
                u = model(z[ii], t[ii], t[ii], torch.cat([labels for _, _, labels in calls]))
            for (w, i, _), u_i in zip(calls, u.split([len(i) for _, i, _ in calls])):
                v_g[i] += w * u_i.to(v.dtype)
        return v_g

    def training_losses(self, model, x, y, t=None, r=None, noise=None, return_features=None):
        """Per-sample MeanFlow loss of data x (B, C, H, W) with labels y (B,); t ≥ r (B,) drawn by sample_times
        unless given (both or neither), noise ε like x. Draws on torch's global RNG: t and r, ε, label dropout.
        Returns {"loss": w·L (its mean is the objective), "mse_uv": ‖u − v‖² per sample (logging),
        "feats": block output}.

        important! `model` must be the plain network: inside DDP, wrap a module that holds model and objective and
        call this from its forward(), so that the JVP never runs through the DDP wrapper.
        """
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError("pass the plain network (ddp.module), not the DDP wrapper (see the docstring)")
        if (t is None) != (r is None):
            raise ValueError("pass both t and r (with t >= r), or neither")
        B, dtype, n_eq = x.shape[0], torch.promote_types(x.dtype, torch.float32), None
        x = x.to(dtype)
        if t is None:
            t, r = self.sample_times(B, x.device, dtype)
            n_eq = B - self.num_r_neq_t(B)                                        # r = t rows first (Speed)
        else:
            t, r = t.to(x.device, dtype), r.to(x.device, dtype)
            if (r > t).any():
                raise ValueError("MeanFlow needs t >= r (t the current time, r the target time)")
        e = torch.randn_like(x) if noise is None else noise.to(dtype)
        z = (1 - _bcast(t, x)) * x + _bcast(t, x) * e                              # z_t
        v = e - x                                                                  # conditional velocity
        drop = None
        if self.class_dropout_prob > 0:  # k ~ Binomial(B, p) labels dropped: the first k rows, as the official code
            drop = torch.arange(B, device=x.device) < (torch.rand(B, device=x.device) < self.class_dropout_prob).sum()
        reuse = self.guided_rows(t, drop) & (r == t) if self.kappa != 0.0 else None  # Speed: deferred κ
        v_g = self.guided_velocity(model, z, t, y, v, drop, skip_kappa=reuse)
        if drop is not None:
            y = torch.where(drop, null_label(model, self.null_class), y)           # dropped rows keep v_g = v
        # u_tgt = sg(v_g − (t − r)·du/dt) with du/dt from the JVP along (dz, dt, dr) = (v_g, 1, 0)
        u, u_tgt, feats = predict_and_target(model, z, t, r, y, v_g, return_features, n_eq)
        u_tgt = _add_deferred_kappa(u_tgt, u, reuse, self.kappa)
        L = (u - u_tgt).square().flatten(1).sum(1)                                 # (B,) sum over pixels
        w = 1.0 / (L.detach() + self.adaptive_c) ** self.adaptive_p               # adaptive weight, stopped
        return {"loss": w * L, "mse_uv": (u.detach() - v).square().flatten(1).sum(1), "feats": feats}


def jvp(model, z, t, r, y, v_g, return_features=None):
    """(u, du/dt, feats): u = model(z, t, r, y) and du/dt = ∂u/∂z·v_g + ∂u/∂t from one forward-mode AD pass,
    whose primal u is the prediction that is regressed. Float32 with autocast off: the target's cancellation
    needs it."""
    z, t, r, v_g = _up(z), _up(t), _up(r), _up(v_g)
    model = getattr(model, "_orig_mod", model)  # important! torch.compile has no forward AD: run the eager module
    with torch.autocast(device_type=z.device.type, enabled=False), _forward_ad_ready(model), fwAD.dual_level():
        # tangents (dz, dt, dr) = (v_g, 1, 0): r carries none, so it stays a plain tensor
        out, f = _call(model, fwAD.make_dual(z, v_g), fwAD.make_dual(t, torch.ones_like(t)), r, y, return_features)
        u, du_dt = fwAD.unpack_dual(out)
        f = None if f is None else fwAD.unpack_dual(f).primal
    return u, (torch.zeros_like(u) if du_dt is None else du_dt.detach()), f  # None: the model ignored z and t


@torch.no_grad()
def sample(model, z, y, num_steps=1, time_grid=None, progress=False):
    """z_r = z_t − (t − r)·u(z_t, t, r) from t = 1 (z ~ N(0, I)) to 0 in num_steps uniform steps (1: z_0 = z_1 −
    u(z_1, 1, 0); 2: 1 -> 0.5 -> 0), or on a strictly decreasing time_grid in [1, 0]. Deterministic, and without
    a CFG scale: the guidance is trained in."""
    uniform = [1.0 - i / num_steps for i in range(num_steps + 1)] if num_steps >= 1 else []
    grid = uniform if time_grid is None else [float(s) for s in time_grid]
    if len(grid) < 2 or any(a <= b for a, b in zip(grid, grid[1:])) or grid[0] > 1 or grid[-1] < 0:
        raise ValueError(f"sample needs num_steps >= 1 or a time_grid decreasing strictly within [1, 0]; got {grid}")
    bar = Progress(len(grid) - 1, "meanflow", enabled=progress)
    tdtype = z.dtype if z.dtype == torch.float64 else torch.float32
    for t, r in zip(grid, grid[1:]):
        tt, rr = (torch.full((z.shape[0],), s, device=z.device, dtype=tdtype) for s in (t, r))
        z = z - (t - r) * model(z, tt, rr, y).to(z.dtype)
        bar.update()
    bar.close()
    return z


# ---------------------------------------------------------------------------------------------------------
# Speed: the same objective with less work
# ---------------------------------------------------------------------------------------------------------

def predict_and_target(model, z, t, r, y, v_g, return_features=None, n_eq=None):
    """(u, u_tgt = sg(v_g − (t − r)·du/dt), feats) in batch order. Only the r ≠ t rows take the JVP (on r = t
    rows the target is v_g exactly), the others a plain forward: forward-mode AD is paid on a quarter of the batch.
    n_eq: the first n_eq rows have r = t (as sample_times draws them), a split by position with no host read; None
    sorts the rows first (one host read)."""
    if n_eq is None:
        order = torch.argsort((r != t).to(torch.int32), stable=True)              # r = t rows first
        inv = torch.argsort(order)
        u, u_tgt, f = predict_and_target(model, z[order], t[order], r[order], y[order], v_g[order], return_features,
                                         n_eq=int((r == t).sum()))
        return u[inv], u_tgt[inv], None if f is None else f[inv]
    eq, ne, parts = slice(None, n_eq), slice(n_eq, None), []                      # parts: (u, u_tgt, feats)
    if n_eq > 0:
        u, f = _call(model, z[eq], t[eq], r[eq], y[eq], return_features)
        parts.append((_up(u), v_g[eq], f))
    if n_eq < z.shape[0]:
        u, du_dt, f = jvp(model, z[ne], t[ne], r[ne], y[ne], v_g[ne], return_features)
        parts.append((u, v_g[ne] - _bcast(t[ne] - r[ne], du_dt) * du_dt, f))
    u, u_tgt = (torch.cat([p[k] for p in parts]) for k in (0, 1))
    f = None if return_features is None else torch.cat([_up(p[2]) for p in parts])
    return u, u_tgt.detach(), f


def _add_deferred_kappa(u_tgt, u, rows, kappa):
    """Deferred κ: on a guided r = t row, κ·u(z_t, t, t | y) is that row's own prediction u (same input; the network
    never drops labels), so guided_velocity skips it and it is added here, detached: the no-grad guidance call
    shrinks by those rows."""
    return u_tgt if rows is None else torch.where(_bcast(rows, u), u_tgt + kappa * u.detach().to(u_tgt.dtype), u_tgt)


class _Linear(torch.autograd.Function):
    """F.linear whose forward-mode derivative is x_t·Wᵀ alone: the parameters carry no tangent inside the JVP, yet
    torch's own formula also multiplies x by the weight's zero tangent, a second full matrix product per layer."""

    @staticmethod
    def forward(x, weight, bias):
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.save_for_forward(weight)
        ctx.set_materialize_grads(False)  # else every call fills a zero tangent of the weight's shape

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        g2, need = g.flatten(0, -2), ctx.needs_input_grad                          # (N·T, out)
        return (g @ weight if need[0] else None, g2.t() @ x.flatten(0, -2) if need[1] else None,
                g2.sum(0) if need[2] else None)

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t):
        weight, = ctx.saved_tensors
        return None if x_t is None else F.linear(x_t, weight)


@contextmanager
def _forward_ad_ready(model):
    """The network ready for forward-mode AD: explicit math attention (SDPA's flash / memory-efficient kernels have
    no forward AD), no activation checkpointing (its recomputation cannot replay dual tensors; the JVP rows keep
    their activations), and linear layers whose tangent costs one matrix product (_Linear) instead of two."""
    modules = list(model.modules()) if isinstance(model, nn.Module) else []
    flags = [(m, "fused") for m in modules if isinstance(m, Attention)]            # (module, attribute) set False
    flags += [(model, "grad_checkpointing")] if hasattr(model, "grad_checkpointing") else []
    saved = [getattr(m, name) for m, name in flags]
    linears = [m for m in modules if type(m) is nn.Linear and "forward" not in vars(m)]
    try:
        for m, name in flags:
            setattr(m, name, False)
        for m in linears:
            m.forward = lambda x, m=m: _Linear.apply(x, m.weight, m.bias)
        yield
    finally:
        for (m, name), value in zip(flags, saved):
            setattr(m, name, value)
        for m in linears:
            del m.forward
