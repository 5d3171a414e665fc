"""
MeanFlow (Geng et al., "Mean Flows for One-step Generative Modeling", arXiv 2505.13447): a DiT that predicts
the average velocity u(z, r, t) = 1/(t − r) ∫_r^t v(z_τ, τ) dτ, trained with the MeanFlow identity and sampled
in one network call. The Dispersive Loss paper applies its regulariser to MeanFlow-XL/2 (1-NFE FID 3.43 -> 3.21);
the trainer adds it on the "feats" that `training_losses` returns.

    model = MeanFlow_models["MeanFlow-XL/2"](input_size=32)       # 256x256 images -> 32x32x4 SD-VAE latents
    mf = MeanFlow(**MeanFlow_defaults["MeanFlow-XL/2"])            # ω, κ, guidance interval of that size
    terms = mf.training_losses(model, x, y, return_features=7)    # {"loss", "mse_uv", "feats"}
    x0 = sample(model, torch.randn_like(x), y)                    # 1-NFE: z_0 = z_1 − u(z_1, r=0, t=1)

Convention (official code): t = 0 is data, t = 1 is noise, z_t = (1 − t)·x + t·ε, v = ε − x. The network is
called as `model(z, t, r, y)`: t is the current time, r the target time, t ≥ r; it returns u, the average
velocity that carries z_t to z_r = z_t − (t − r)·u.

Training target: u_tgt = sg(v_g − (t − r)·du/dt), du/dt the Jacobian-vector product of (z, t, r) ↦ u along
(v_g, 1, 0). The JVP's primal output is the prediction that is regressed (one pass, no second forward). Only the
rows with r ≠ t need the JVP (r = t gives u_tgt = v_g exactly), so those rows go through forward-mode AD and the
rest through a plain forward; both run on the plain network, never through a DDP wrapper. Forward-mode AD has
no torch.compile support, so with a compiled network the JVP rows run its eager module (same parameters).
Cost on CPU (small model, CPU time): a MeanFlow step is ~1.5x a plain flow-matching step of the same network,
~1.9x with a κ/ω-guided target (B/2 and XL/2 settings alike), ~2.5x if every row took the JVP. The guided target
costs one no-grad call: u(·|∅) on the guided rows and u(·|c) on the guided r ≠ t rows only, since on the r = t
rows u(z_t, t, t | c) is the prediction itself and is taken from it, detached (~2.1x when both were called on
every guided row).
"""

import math
from contextlib import contextmanager

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F

from dit import DiT, Attention, TimestepEmbedder, _make_registry


# ---------------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------------

class MeanFlowDiT(DiT):
    """DiT body conditioned on c = t_emb(t) + h_emb(t − r) + y_emb(y); predicts u (no sigma channels).

    Label dropout for classifier-free guidance is done by the MeanFlow objective, not here: the objective
    replaces dropped labels by the null class *and* changes their target (v_g = v), so the network never drops
    labels itself, in train mode either. `class_dropout_prob > 0` only creates the null row (index
    num_classes) of the label table.
    """

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=False,
    ):
        if learn_sigma:
            raise ValueError("MeanFlow predicts only the average velocity: build it with learn_sigma=False")
        super().__init__(input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio,
                         class_dropout_prob, num_classes, learn_sigma=False)
        # second timestep MLP for the interval length h = t − r (official: separate t and h embedders)
        self.h_embedder = TimestepEmbedder(hidden_size)
        self._init_h_embedder()

    def initialize_weights(self):
        super().initialize_weights()
        if hasattr(self, "h_embedder"):  # absent while DiT.__init__ runs; initialised right after creation
            self._init_h_embedder()

    def _init_h_embedder(self):
        # as DiT's t_embedder: N(0, 0.02) weights, zero biases
        for lin in (self.h_embedder.mlp[0], self.h_embedder.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.constant_(lin.bias, 0)

    def forward(self, x, t, r, y, return_features=None):
        """x: (N, C, H, W) state z_t; t: (N,) current time; r: (N,) target time (t ≥ r), both in [0, 1];
        y: (N,) labels (num_classes = null). Returns u, the average velocity over [r, t]; with
        return_features=k also the (N, T, D) output of block k (1-based) from the same pass.
        """
        # t and h fed raw in [0, 1] (official MeanFlow; DiT/SiT-style ×1000 scaling is not used)
        c = self.t_embedder(t) + self.h_embedder(t - r) + self.y_embedder(y, False)  # (N, D); never drops
        return self.forward_tokens(x, c, return_features)

    def forward_with_cfg(self, *args, **kwargs):
        raise ValueError("MeanFlow learns its guidance during training: call model(z, t, r, y) or "
                         "meanflow.sample(...) without a CFG scale")


MEANFLOW_SIZES = {  # name: (depth, hidden_size, num_heads)
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "M": (16, 1024, 16),
    "B": (12, 768, 12),
}

# Per-size training defaults of the paper (ω, κ, guidance interval on t; ImageNet 256, SD-VAE latents).
MeanFlow_defaults = {
    # B/4 is the paper's ablation model (Table 1f: ω = 3.0, no κ term, 80 epochs, FID 15.53); unverified
    # against the official config files, which list only the /2 models.
    "MeanFlow-B/4": dict(omega=3.0, kappa=0.0, t_interval=(0.0, 1.0)),
    "MeanFlow-B/2": dict(omega=1.0, kappa=0.5, t_interval=(0.0, 1.0)),
    "MeanFlow-M/2": dict(omega=1.0, kappa=0.5, t_interval=(0.0, 1.0)),
    "MeanFlow-L/2": dict(omega=0.2, kappa=0.92, t_interval=(0.0, 0.8)),
    "MeanFlow-XL/2": dict(omega=0.2, kappa=0.92, t_interval=(0.0, 0.75)),
}

MeanFlow_models = {name: build for name, build in _make_registry(MeanFlowDiT, "MeanFlow", MEANFLOW_SIZES).items()
                   if name in MeanFlow_defaults}


# ---------------------------------------------------------------------------------------------------------
# Training objective
# ---------------------------------------------------------------------------------------------------------

def _bcast(s, x):
    return s.reshape(-1, *([1] * (x.dim() - 1)))                                  # (N, 1, 1, 1)


def _up(a):
    # half precision -> float32; float32 / float64 stay as they are
    return a.float() if a.dtype in (torch.float16, torch.bfloat16) else a


def _call(model, z, t, r, y, return_features):
    # plain callables (analytic test models) need not accept return_features
    if return_features is None:
        return model(z, t, r, y), None
    return model(z, t, r, y, return_features=return_features)


class _Linear(torch.autograd.Function):
    """F.linear whose forward-mode derivative is x_t·Wᵀ alone. Inside the JVP the parameters carry no tangent,
    yet torch's own formula for linear also multiplies x by the weight's zero tangent: a full extra matrix
    product, which made the tangent cost twice the forward instead of once."""

    @staticmethod
    def forward(x, weight, bias):
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.save_for_forward(weight)
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)  # else every call fills a zero tangent of the weight's shape

    @staticmethod
    def backward(ctx, g):
        if g is None:
            return None, None, None
        x, weight = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        gx = g @ weight if ctx.needs_input_grad[0] else None
        gw = g2.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        gb = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t):
        weight, = ctx.saved_tensors
        return None if x_t is None else F.linear(x_t, weight)


def _linear_forward(self, x):
    return _Linear.apply(x, self.weight, self.bias)


@contextmanager
def _forward_ad_ready(model):
    """Inside forward-mode AD: explicit math attention (SDPA's flash / memory-efficient kernels have no forward
    AD), no activation checkpointing (its recomputation in backward cannot replay dual tensors), and linear
    layers whose tangent is one matrix product (`_Linear`). The JVP rows therefore keep their activations;
    they are a quarter of the batch."""
    modules = list(model.modules()) if isinstance(model, nn.Module) else []
    attn = [m for m in modules if isinstance(m, Attention)]
    linears = [m for m in modules if type(m) is nn.Linear and "forward" not in vars(m)]
    fused = [m.fused for m in attn]
    ckpt = getattr(model, "grad_checkpointing", None)
    try:
        for m in attn:
            m.fused = False
        for m in linears:
            m.forward = _linear_forward.__get__(m)
        if ckpt is not None:
            model.grad_checkpointing = False
        yield
    finally:
        for m, f in zip(attn, fused):
            m.fused = f
        for m in linears:
            del m.forward
        if ckpt is not None:
            model.grad_checkpointing = ckpt


class MeanFlow:
    """The MeanFlow training objective around any callable `model(z, t, r, y[, return_features=k])`.

    omega (ω), kappa (κ), t_interval: CFG trained into the target, v_g = ω(ε − x) + κ·u(z_t, t, t | c)
        + (1 − ω − κ)·u(z_t, t, t | ∅), applied where t lies in t_interval (else v_g = v). ω = 1, κ = 0: none.
    class_dropout_prob: labels replaced by the null class (their target uses v_g = v).
    r_neq_t_ratio: fraction of each batch with r ≠ t (paper: 25%; 0% -> FID 329, 100% -> 67 in its ablation).
    logit_mean, logit_std: t and r i.i.d. sigmoid(N(mean, std²)), then t = max, r = min.
    adaptive_p, adaptive_c: per-sample weight w = 1 / sg(L_i + c)^p on L_i = Σ_pixels (u − u_tgt)².
    null_class: label of the unconditional row; None = model.num_classes.
    """

    def __init__(
        self,
        omega=1.0,                  # ω
        kappa=0.5,                  # κ
        t_interval=(0.0, 1.0),      # guidance applied for t in [lo, hi]
        class_dropout_prob=0.1,
        r_neq_t_ratio=0.25,
        logit_mean=-0.4,
        logit_std=1.0,
        adaptive_p=1.0,             # p
        adaptive_c=0.01,            # c
        null_class=None,
    ):
        lo, hi = t_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"t_interval must satisfy 0 <= lo <= hi <= 1, got {t_interval}")
        if not 0.0 <= r_neq_t_ratio <= 1.0:
            raise ValueError(f"r_neq_t_ratio must lie in [0, 1], got {r_neq_t_ratio}")
        if not 0.0 <= class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must lie in [0, 1), got {class_dropout_prob}")
        if not logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {logit_std}")
        self.omega, self.kappa = float(omega), float(kappa)
        self.t_interval = (float(lo), float(hi))
        self.class_dropout_prob = float(class_dropout_prob)
        self.r_neq_t_ratio = float(r_neq_t_ratio)
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)
        self.adaptive_p, self.adaptive_c = float(adaptive_p), float(adaptive_c)
        self.null_class = null_class

    # --- pieces (public so tests and tools can check each one) ---------------------------------------------

    def num_r_neq_t(self, batch_size):
        """Rows with r ≠ t: ⌈ratio·B⌉, the last rows of the batch (official: the first int(0.75·B) have r = t)."""
        return batch_size - math.floor((1.0 - self.r_neq_t_ratio) * batch_size + 1e-9)

    def sample_times(self, batch_size, device=None, dtype=torch.float32):
        """(t, r), t ≥ r: both logit-normal i.i.d., ordered; the first B − ⌈ratio·B⌉ rows get r = t."""
        n = torch.randn(2, batch_size, device=device, dtype=torch.float32) * self.logit_std + self.logit_mean
        s = torch.sigmoid(n)
        t, r = torch.maximum(s[0], s[1]), torch.minimum(s[0], s[1])
        n_eq = batch_size - self.num_r_neq_t(batch_size)
        r = torch.where(torch.arange(batch_size, device=device) < n_eq, t, r)
        return t.to(dtype), r.to(dtype)

    def drop_mask(self, batch_size, device=None):
        """Label-dropout rows: k ~ Binomial(B, p) of them, the first k of the batch (as the official code, so
        they fall among the r = t rows; order is random across batches anyway)."""
        k = (torch.rand(batch_size, device=device) < self.class_dropout_prob).sum()
        return torch.arange(batch_size, device=device) < k

    def _null(self, model):
        null = self.null_class if self.null_class is not None else getattr(model, "num_classes", None)
        if null is None:
            raise ValueError("the model has no num_classes attribute: pass MeanFlow(null_class=...) for the "
                             "unconditional label")
        table = getattr(getattr(model, "y_embedder", None), "embedding_table", None)
        if table is not None and table.num_embeddings <= null:
            raise ValueError("the network has no null-class row (built with class_dropout_prob=0): build it "
                             "with class_dropout_prob > 0, or use MeanFlow(omega=1, kappa=0, "
                             "class_dropout_prob=0)")
        return null

    def guided_velocity(self, model, z, t, y, v, drop=None):
        """v_g = ω·v + κ·u(z, t, t | y) + (1 − ω − κ)·u(z, t, t | ∅) on rows with t in the guidance interval
        and labels kept; v elsewhere. The network calls run without gradient (the target is stopped anyway)."""
        return self._guided_velocity(model, z, t, y, v, drop)[0]

    def _guided_velocity(self, model, z, t, y, v, drop=None, defer=None):
        """guided_velocity, except on the guided rows of the bool mask `defer` (the r = t rows in training): their
        κ·u(z, t, t | y) is exactly the prediction of the plain forward on those rows (same z, t, r = t, label),
        so it is left out here and added from that prediction, detached, by training_losses. Returns v_g and the
        mask of rows still missing κ·u (None when κ = 0 or nothing is deferred). One batched no-grad call holds
        u(·|y) for the guided rows outside `defer` and u(·|∅) for all guided rows."""
        w_u = 1.0 - self.omega - self.kappa                        # weight of the unconditional prediction
        if self.omega == 1.0 and self.kappa == 0.0:
            return v, None
        lo, hi = self.t_interval
        rows = (t >= lo) & (t <= hi)
        if drop is not None:
            rows = rows & ~drop
        # the guided rows are gathered (dynamic shape, one host read) rather than all rows computed and masked as
        # the official code does: with XL/2's interval [0, 0.75] and 10% label dropout, ~22% of that call is unused
        idx = rows.nonzero().squeeze(1)
        if idx.numel() == 0:
            return v, None
        pending = None
        terms = []                                                 # (weight, row indices, labels)
        if self.kappa != 0.0:
            cond = rows
            if defer is not None:
                pending, cond = rows & defer, rows & ~defer
            idx_c = cond.nonzero().squeeze(1)
            if idx_c.numel():
                terms.append((self.kappa, idx_c, y[idx_c]))
        if w_u != 0.0:
            terms.append((w_u, idx, torch.full_like(y[idx], self._null(model))))
        v_g = v.clone()
        v_g[idx] = self.omega * v[idx]
        if terms:
            ii = torch.cat([a[1] for a in terms])
            with torch.no_grad():                                  # one batched call for both label sets
                u = model(z[ii], t[ii], t[ii], torch.cat([a[2] for a in terms]))
            for (w, i, _), u_i in zip(terms, u.split([len(a[1]) for a in terms])):
                v_g[i] += w * u_i.to(v.dtype)
        return v_g, pending

    def predict_and_target(self, model, z, t, r, y, v_g, return_features=None, n_eq=None):
        """u = model(z, t, r, y) (with gradient), u_tgt = sg(v_g − (t − r)·du/dt), and feats, in batch order.

        r = t rows: plain forward, u_tgt = v_g. r ≠ t rows: forward-mode AD along (v_g, 1, 0), in float32
        with autocast off (the target's finite-difference-like cancellation needs it), whose primal output is
        the u that is regressed. n_eq: the first n_eq rows have r = t, the others r ≠ t (as `sample_times`
        draws them): a split of static shape, with no host synchronisation. None: the rows may come in any order
        and are sorted here (one host read).
        """
        if n_eq is None:
            ne = r != t
            order = torch.argsort(ne.to(torch.int32), stable=True)          # r = t rows first
            inv = torch.argsort(order)
            u, u_tgt, f = self.predict_and_target(model, z[order], t[order], r[order], y[order], v_g[order],
                                                  return_features, n_eq=int((~ne).sum()))
            return u[inv], u_tgt[inv], None if f is None else f[inv]
        parts = []                                                          # (u, u_tgt, feats)
        if n_eq > 0:
            u, f = _call(model, z[:n_eq], t[:n_eq], r[:n_eq], y[:n_eq], return_features)
            parts.append((_up(u), v_g[:n_eq], f))
        if n_eq < z.shape[0]:
            s = slice(n_eq, None)
            u, du_dt, f = self._jvp(model, z[s], t[s], r[s], y[s], v_g[s], return_features)
            parts.append((u, v_g[s] - _bcast(t[s] - r[s], du_dt) * du_dt, f))
        if len(parts) == 1:
            u, u_tgt, f = parts[0]
        else:
            u, u_tgt = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            f = None if return_features is None else torch.cat([_up(p[2]) for p in parts])
        return u, u_tgt.detach(), f

    def _jvp(self, model, z, t, r, y, v_g, return_features):
        z, t, r, v_g = _up(z), _up(t), _up(r), _up(v_g)
        # important! torch.compile'd networks have no forward AD: the JVP rows run the eager module (same weights)
        model = getattr(model, "_orig_mod", model)
        with torch.autocast(device_type=z.device.type, enabled=False), _forward_ad_ready(model), \
                fwAD.dual_level():
            # tangents (dz/dt, dt/dt, dr/dt) = (v_g, 1, 0): r carries no tangent, so it stays a plain tensor
            out, f = _call(model, fwAD.make_dual(z, v_g), fwAD.make_dual(t, torch.ones_like(t)), r, y,
                           return_features)
            u, du_dt = fwAD.unpack_dual(out)
            if f is not None:
                f = fwAD.unpack_dual(f).primal
        if du_dt is None:  # the model ignored z and t entirely
            du_dt = torch.zeros_like(u)
        return u, du_dt.detach(), f

    # --- the objective ------------------------------------------------------------------------------------

    def training_losses(self, model, x, y, t=None, r=None, noise=None, return_features=None):
        """Per-sample MeanFlow loss. x: (B, C, H, W) data, y: (B,) labels; t, r (B,) with t ≥ r (both or
        neither; drawn by `sample_times` if None), noise ε like x. Draw order on torch's global RNG: t and r,
        ε, label dropout. Returns {"loss": w·L_i (its mean is the objective), "mse_uv": ‖u − v‖² per sample
        (sum over pixels, v = ε − x the unguided conditional velocity; logging), "feats": block output or None}.

        `model` must be the plain network: inside DDP, wrap a module that holds model and objective and call
        this from its forward(), so the JVP never runs through the DDP wrapper.
        """
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError("pass the plain network (ddp.module), not the DDP wrapper: wrap a module holding "
                             "model and objective in DDP and call training_losses from its forward()")
        if (t is None) != (r is None):
            raise ValueError("pass both t and r (with t >= r), or neither")
        B = x.shape[0]
        dtype = torch.promote_types(x.dtype, torch.float32)
        x = x.to(dtype)
        n_eq = None                                                                # rows with r = t, first
        if t is None:
            t, r = self.sample_times(B, device=x.device, dtype=dtype)
            n_eq = B - self.num_r_neq_t(B)
        else:
            t, r = t.to(x.device, dtype), r.to(x.device, dtype)
            if (r > t).any():
                raise ValueError("MeanFlow needs t >= r (t the current time, r the target time)")
        eps = torch.randn_like(x) if noise is None else noise.to(dtype)
        tb = _bcast(t, x)
        z = (1 - tb) * x + tb * eps                                                # z_t
        v = eps - x                                                                # conditional velocity
        drop = self.drop_mask(B, x.device) if self.class_dropout_prob > 0 else None
        v_g, pending = self._guided_velocity(model, z, t, y, v, drop, defer=r == t)
        if drop is not None:
            y = torch.where(drop, self._null(model), y)                           # dropped rows keep v_g = v
        u, u_tgt, feats = self.predict_and_target(model, z, t, r, y, v_g, return_features, n_eq)
        if pending is not None:
            # r = t guided rows: κ·u(z_t, t, t | c) is their own prediction u (no dropout in the network), and
            # u_tgt = v_g there, so the term is added now instead of costing a no-grad forward
            u_tgt = torch.where(_bcast(pending, u), u_tgt + self.kappa * u.detach().to(u_tgt.dtype), u_tgt)
        dims = tuple(range(1, x.dim()))
        L = (u - u_tgt).square().sum(dim=dims)                                     # (B,) sum over pixels
        w = 1.0 / (L.detach() + self.adaptive_c) ** self.adaptive_p               # adaptive weight, stopped
        mse_uv = (u.detach() - v).square().sum(dim=dims)
        return {"loss": w * L, "mse_uv": mse_uv, "feats": feats}


# ---------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample(model, z, y, num_steps=1, generator=None, time_grid=None, cfg_scale=1.0, progress=False,
           return_nfe=False):
    """z_r = z_t − (t − r)·u(z_t, t, r) from t = 1 (z ~ N(0, I)) to 0 on a uniform grid of num_steps steps
    (1-NFE: z_0 = z_1 − u(z_1, t=1, r=0); 2-NFE: 1 -> 0.5 -> 0), or on a given decreasing time_grid.

    Deterministic: `generator` is accepted for the common sampler signature and unused. The guidance is
    trained in, so there is no CFG combination (cfg_scale must stay 1).
    """
    if cfg_scale != 1.0:
        raise ValueError("MeanFlow learns its guidance scale during training (MeanFlow(omega, kappa)): sample "
                         "with cfg_scale=1")
    if time_grid is None:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        grid = [1.0 - i / num_steps for i in range(num_steps + 1)]
    else:
        grid = [float(s) for s in time_grid]
        if len(grid) < 2 or any(a <= b for a, b in zip(grid, grid[1:])) or grid[0] > 1 or grid[-1] < 0:
            raise ValueError(f"time_grid must decrease strictly within [1, 0], e.g. [1.0, 0.5, 0.0]; got {grid}")
    tdtype = z.dtype if z.dtype == torch.float64 else torch.float32
    n = z.shape[0]
    for i, (t, r) in enumerate(zip(grid, grid[1:])):
        tt = torch.full((n,), t, device=z.device, dtype=tdtype)
        rr = torch.full((n,), r, device=z.device, dtype=tdtype)
        z = z - (t - r) * model(z, tt, rr, y).to(z.dtype)
        if progress:
            print(f"meanflow step {i + 1}/{len(grid) - 1}: t {t:.3f} -> r {r:.3f}")
    return (z, len(grid) - 1) if return_nfe else z
