"""
DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers"): the network with the official state-dict layout
(the released checkpoints load strictly), its Gaussian diffusion (ADM/IDDPM) and DDPM/DDIM samplers, then the
checkpoint reader and the few helpers every script shares.

    model = DiT_models["DiT-XL/2"](input_size=32)                 # 256x256 images -> 32x32x4 SD-VAE latents
    load_checkpoint(model, "DiT-XL-2-256x256.pt")                 # fetched once into torch.hub's cache
    terms = create_diffusion().training_losses(model, x, y, return_features=7)   # {"loss", "mse", "vb", "feats"}
    x = sample(model.eval(), torch.randn(8, 4, 32, 32), y, num_steps=250, cfg_scale=4.0)

Convention (official): integer t in 0..999, t = 0 is data; the network predicts eps in its first C output channels
and, with learn_sigma, the variance in the other C. Departures: attention through F.scaled_dot_product_attention,
no timm, and return_features=k returns block k's tokens from the same pass (for the dispersive loss).
"""

import argparse
import contextlib
import datetime
import math
import os
import re
import sys
import time
from collections import OrderedDict
from functools import partial
from urllib.parse import urlparse

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


# ---------------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------------

def modulate(x, shift, scale):
    # adaLN: per-sample affine from the conditioning vector, broadcast over tokens
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, T, D) with a p x p stride-p conv (timm's PatchEmbed, same keys: `proj.*`)."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)                           # (N, T, D)


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal features of (possibly fractional) timesteps: cos first, then sin (as the official code)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)                 # (N, dim), dim even


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: 256 sinusoidal frequencies, then Linear-SiLU-Linear."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size, bias=True), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size, bias=True))
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors; with dropout > 0 an extra last row is the null class used for CFG."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + (dropout_prob > 0), hidden_size)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, labels, train):
        # important! label dropout (classifier-free guidance training) happens only in train mode
        if train and self.dropout_prob > 0:
            drop = torch.rand(len(labels), device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention with timm's keys (`qkv`, `proj`). fused=True: F.scaled_dot_product_attention;
    fused=False: the explicit softmax(QK^T/sqrt(d))V, which forward-mode AD (MeanFlow's JVP) can go through."""

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        assert dim % num_heads == 0, f"hidden size {dim} is not divisible by {num_heads} heads"
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.fused = True

    def forward(self, x):
        N, T, D = x.shape
        q, k, v = self.qkv(x).reshape(N, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (N, H, T, hd)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            x = ((q * self.head_dim ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v  # softmax of (N, H, T, T)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class DiTBlock(nn.Module):
    """Transformer block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        width = int(hidden_size * mlp_ratio)  # timm's Mlp (its keys fc1, fc2), with DiT's tanh-approximated GELU
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(hidden_size, width), act=nn.GELU(approximate="tanh"),
                                             fc2=nn.Linear(width, hidden_size)))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear map from each token to its p x p x C_out patch."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)                   # (N, D) each
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone: the official constructor, initialisation and state dict."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True):
        super().__init__()
        assert input_size % patch_size == 0, f"input size {input_size} is not a multiple of patch size {patch_size}"
        self.in_channels, self.learn_sigma = in_channels, learn_sigma
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.input_size, self.patch_size, self.num_classes = input_size, patch_size, num_classes
        self.depth, self.hidden_size, self.num_heads = depth, hidden_size, num_heads
        self.grad_checkpointing = False  # recompute each block in backward: less memory, more compute

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # fixed sin-cos table; a frozen Parameter (not a buffer) because the released checkpoints store it so
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():                                                  # every Linear here has a bias
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.constant_(m.bias, 0)
        grid = int(self.x_embedder.num_patches ** 0.5)
        self.pos_embed.data.copy_(get_2d_sincos_pos_embed(self.hidden_size, grid)[None])
        w = self.x_embedder.proj.weight.data                                      # the patch conv as a Linear
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity and the output as zero
        zero = [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1]]
        for layer in zero + [self.final_layer.linear]:
            nn.init.constant_(layer.weight, 0)
            nn.init.constant_(layer.bias, 0)

    def set_fused_attention(self, fused=True):
        """Switch every block between SDPA kernels (fused=True) and explicit math attention."""
        for block in self.blocks:
            block.attn.fused = fused
        return self

    def unpatchify(self, x):
        c, p, h = self.out_channels, self.patch_size, int(x.shape[1] ** 0.5)
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, h, p, p, c))   # (N, C, h, p, w, p)
        return x.reshape(x.shape[0], c, h * p, h * p)                              # (N, C, H, W)

    def forward(self, x, t, y, return_features=None):
        """x: (N, C, H, W), t: (N,) timesteps, y: (N,) labels (num_classes = null). return_features=k (1-based,
        k = depth is the last block) also returns block k's (N, T, D) output: (out, feats)."""
        c = self.t_embedder(t) + self.y_embedder(y, self.training)                # (N, D)
        return self.forward_tokens(x, c, return_features)

    def forward_tokens(self, x, c, return_features=None):
        """The transformer body given the conditioning vector c; shared with SiT and MeanFlow."""
        if return_features is not None and not 1 <= return_features <= self.depth:
            raise ValueError(f"return_features={return_features} is out of range: blocks are numbered 1..{self.depth}")
        x = self.x_embedder(x) + self.pos_embed                                   # (N, T, D)
        feats, ckpt = None, self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks, start=1):
            x = torch.utils.checkpoint.checkpoint(block, x, c, use_reentrant=False) if ckpt else block(x, c)
            feats = x if i == return_features else feats
        x = self.unpatchify(self.final_layer(x, c))                               # (N, C_out, H, W)
        return x if return_features is None else (x, feats)

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_channels=None):
        """The official batched CFG: t, y hold [cond; uncond] halves (only x's first half is used); both halves get
        eps = uncond + cfg_scale (cond - uncond) on the first guide_channels channels (None: all; 3: the official
        code's slip, with which the published DiT-XL/2 FID 2.27 was computed), the rest as the network gives it."""
        half = x[: len(x) // 2]
        out = self(torch.cat([half, half]), t, y)
        g = self.in_channels if guide_channels is None else guide_channels
        cond, uncond = out[:, :g].chunk(2)
        eps = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([eps, eps]), out[:, g:]], dim=1)


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """(grid_size**2, embed_dim) float32 MAE table: [sin, cos] of one grid axis, then of the other; float64 inside
    like the numpy original."""
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4.0))  # (D/4,)
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")                # official order: w first
    w, h = (g.reshape(-1)[:, None] * omega[None] for g in (grid_w, grid_h))       # (M, D/4) each
    return torch.cat([torch.sin(w), torch.cos(w), torch.sin(h), torch.cos(h)], dim=1).float()


# The paper's sizes, name: (depth, hidden size, heads); "T" is a tiny size for CPU runs and tests (not a paper size).
SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6), "T": (6, 128, 2)}
DiT_models = {f"DiT-{s}/{p}": partial(DiT, depth=d, hidden_size=w, num_heads=h, patch_size=p)
              for s, (d, w, h) in SIZES.items() for p in (2, 4, 8)}


# ---------------------------------------------------------------------------------------------------------
# Gaussian diffusion (ADM/IDDPM as DiT uses it). Schedules are float64 CPU tables; a lookup casts to the data's
# dtype after the float64 arithmetic, like the official _extract_into_tensor.
# ---------------------------------------------------------------------------------------------------------

def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log-likelihood of data in [-1, 1] quantised to 256 bins under N(means, e^(2 log_scales)) (ADM's decoder)."""
    centered_x, inv_stdv = x - means, torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log = lambda p: torch.log(p.clamp(min=1e-12))  # noqa: E731
    # the edge bins extend to -inf / +inf
    return torch.where(x < -0.999, log(cdf_plus), torch.where(x > 0.999, log(1.0 - cdf_min), log(cdf_plus - cdf_min)))


class GaussianDiffusion:
    """Forward process, training loss and reverse steps of a discrete Gaussian diffusion with eps prediction.

    The model returns eps (N, C, ...) or eps and v (N, 2C, ...). With v ("learned range") the log-variance runs from
    the clipped posterior variance (v = -1) to beta_t (v = +1); without it the variance is beta_t ("fixed large", the
    official default for learn_sigma=False). Indices t run over this process's own steps; the network is given
    timestep_map[t], the step of the original process (respacing, see create_diffusion).
    """

    def __init__(self, betas, timestep_map=None):
        betas = torch.as_tensor(betas, dtype=torch.float64)                      # a 1-D schedule in (0, 1]
        self.num_timesteps, self.betas = len(betas), betas
        self.timestep_map = torch.arange(len(betas)) if timestep_map is None else timestep_map
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)                   # ᾱ_t
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1).sqrt()
        # posterior q(x_{t-1} | x_t, x_0); its variance is 0 at t = 0, so its log is clipped to the value at t = 1
        # (a 1-step process adds no noise at all, so any finite value does there)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        clip = self.posterior_variance[1:2] if self.num_timesteps > 1 else betas
        self.posterior_log_variance_clipped = torch.log(torch.cat([clip, self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * (1 - betas).sqrt() / (1.0 - self.alphas_cumprod)
        self.log_betas = torch.log(betas)
        # "fixed large" starts at the posterior variance of t = 1, for a better decoder likelihood (as official)
        self.log_betas_fixed_large = torch.log(torch.cat([clip, betas[1:]]))

    def _extract(self, arr, t, x):
        # arr[t] as an (N, 1, ..., 1) tensor in x's dtype on x's device (arr.to(dtype)[t] == arr[t].to(dtype))
        return _on(self, arr, x.device, x.dtype)[t].reshape(-1, *[1] * (x.dim() - 1))

    def q_sample(self, x_start, t, noise):
        """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) eps."""
        return (self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior_mean(self, x_start, x_t, t):
        """Mean of q(x_{t-1} | x_t, x_0); its variance is the table posterior_variance."""
        return (self._extract(self.posterior_mean_coef1, t, x_t) * x_start
                + self._extract(self.posterior_mean_coef2, t, x_t) * x_t)

    def _model(self, model, x, t, y, return_features=None):
        t = _on(self, self.timestep_map, t.device, torch.long)[t]                # the network sees original steps
        return model(x, t, y) if return_features is None else model(x, t, y, return_features=return_features)

    def _split_output(self, out, x):
        C = x.shape[1]
        if out.shape[1] not in (C, 2 * C):
            raise ValueError(f"the model returned {out.shape[1]} channels for {C}-channel data: expected {C} (eps) "
                             f"or {2 * C} (eps and learned variance)")
        return (out, None) if out.shape[1] == C else out.split(C, dim=1)         # eps, v

    def _mean_variance(self, model_output, x, t):
        eps, v = self._split_output(model_output, x)
        if v is None:  # fixed large
            log_variance = self._extract(self.log_betas_fixed_large, t, x).expand_as(x)
        else:          # learned range, interpolated in log space
            frac = (v + 1) / 2
            log_variance = (frac * self._extract(self.log_betas, t, x)
                            + (1 - frac) * self._extract(self.posterior_log_variance_clipped, t, x))
        pred_xstart = (self._extract(self.sqrt_recip_alphas_cumprod, t, x) * x
                       - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x) * eps)   # DiT never clips it
        return {"mean": self.q_posterior_mean(pred_xstart, x, t), "log_variance": log_variance,
                "pred_xstart": pred_xstart}

    def p_mean_variance(self, model, x, t, y):
        """p(x_{t-1} | x_t) as {"mean", "log_variance", "pred_xstart"}."""
        return self._mean_variance(self._model(model, x, t, y), x, t)

    def _vb_terms_bpd(self, model_output, x_start, x_t, t):
        """One term of the variational bound in bits per dimension: KL to the true posterior for t > 0, the
        discretised decoder NLL at t = 0."""
        true_mean = self.q_posterior_mean(x_start, x_t, t)
        true_log_variance = self._extract(self.posterior_log_variance_clipped, t, x_t)
        out = self._mean_variance(model_output, x_t, t)
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"]).flatten(1).mean(1) / math.log(2)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]).flatten(1).mean(1) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(self, model, x_start, y, t=None, noise=None, return_features=None):
        """Per-sample loss = MSE(eps) + VLB term (IDDPM's "hybrid" loss as DiT trains it; no 1/1000 rescale).

        t ~ U{0..T-1}, then noise ~ N(0, I), from torch's global RNG when not given. Returns {"loss", "mse", "vb",
        "feats"}, feats the (N, T, D) output of block `return_features` from the same pass (else None).
        """
        t = torch.randint(0, self.num_timesteps, (x_start.shape[0],), device=x_start.device) if t is None else t
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)
        out = self._model(model, x_t, t, y, return_features)
        out, feats = (out, None) if return_features is None else out
        eps, v = self._split_output(out, x_t)
        mse = ((noise - eps) ** 2).flatten(1).mean(1)
        vb = torch.zeros_like(mse)
        if v is not None:  # important! the mean is frozen inside the VLB: the eps channels learn from the MSE alone
            vb = self._vb_terms_bpd(torch.cat([eps.detach(), v], dim=1), x_start, x_t, t)
        return {"loss": mse + vb, "mse": mse, "vb": vb, "feats": feats}

    def p_sample(self, model, x, t, y, noise):
        """One ancestral step x_t -> x_{t-1} ~ p(x_{t-1} | x_t); noise(x) is drawn after the network call and not
        added at t = 0."""
        out = self.p_mean_variance(model, x, t, y)
        nonzero_mask = (t != 0).to(x.dtype).reshape(-1, *[1] * (x.dim() - 1))
        return out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise(x)

    def ddim_sample(self, model, x, t, y, noise, eta=0.0):
        """One DDIM step (Song et al.); eta = 0 is deterministic, eta = 1 has DDPM's posterior variance."""
        out = self.p_mean_variance(model, x, t, y)
        eps = ((self._extract(self.sqrt_recip_alphas_cumprod, t, x) * x - out["pred_xstart"])
               / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x))               # as official, from pred_xstart
        alpha_bar = self._extract(self.alphas_cumprod, t, x)
        alpha_bar_prev = self._extract(self.alphas_cumprod_prev, t, x)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
        nonzero_mask = (t != 0).to(x.dtype).reshape(-1, *[1] * (x.dim() - 1))
        return mean_pred + nonzero_mask * sigma * noise(x)


def space_timesteps(num_timesteps, section_counts):
    """The set of steps of the original process kept by respacing (official semantics): "250" evenly spaced with
    Python's rounding (half to even), ends included; "ddimN" DDIM's integer stride range(0, T, stride), N steps."""
    if str(section_counts).startswith("ddim"):
        n = int(section_counts[len("ddim"):])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == n:
                return set(range(0, num_timesteps, stride))
        raise ValueError(f"cannot take exactly {n} of {num_timesteps} steps with an integer stride: pick another "
                         f"ddim count or use plain respacing (e.g. '{n}')")
    n = int(section_counts)
    if not 1 <= n <= num_timesteps:
        raise ValueError(f"cannot take {n} of {num_timesteps} steps: use 1 to {num_timesteps} steps")
    stride = 1 if n == 1 else (num_timesteps - 1) / (n - 1)
    return {round(j * stride) for j in range(n)}


def create_diffusion(timestep_respacing="", diffusion_steps=1000):
    """The official factory with DiT's linear schedule: "" keeps all steps (training), "250" / "ddim50" respace for
    sampling (space_timesteps), with betas chosen so that ᾱ at the kept steps is unchanged."""
    scale = 1000 / diffusion_steps                     # Ho et al.'s 1e-4 -> 0.02, the same process for any T
    betas = torch.linspace(scale * 0.0001, scale * 0.02, diffusion_steps, dtype=torch.float64)
    kept = sorted(space_timesteps(diffusion_steps, timestep_respacing or str(diffusion_steps)))
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)[kept]
    last = torch.cat([betas.new_ones(1), alphas_cumprod[:-1]])
    return GaussianDiffusion(1.0 - alphas_cumprod / last, torch.tensor(kept, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample(model, z, y, sampler="ddpm", num_steps=250, cfg_scale=1.0, guide_channels=None, eta=0.0, generator=None,
           progress=False):
    """x_0 from noise z (N, C, H, W) and labels y (N,) by DDPM ancestral sampling or DDIM (eta: its noise, 0 = none).

    model: any callable model(x, t, y) -> eps and learned variance (N, 2C, H, W), or eps (N, C, H, W) ("fixed large").
    num_steps: respaced steps (the official str(num_steps) spacing; DiT samples 250) or a string such as "ddim50".
    cfg_scale: classifier-free guidance (1 = none), guide_channels as forward_with_cfg. generator: see noise_source.
    """
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"unknown sampler {sampler!r}: choose 'ddpm' or 'ddim'")
    diffusion = create_diffusion(str(num_steps))
    net = model if cfg_scale == 1.0 else classifier_free_guidance(model, cfg_scale, guide_channels=guide_channels)
    step = diffusion.p_sample if sampler == "ddpm" else partial(diffusion.ddim_sample, eta=eta)
    noise, x = noise_source(generator, z.device), z
    bar = Progress(diffusion.num_timesteps, sampler, enabled=progress)
    for i in reversed(range(diffusion.num_timesteps)):
        x = step(net, x, torch.full((x.shape[0],), i, device=x.device, dtype=torch.long), y, noise)
        bar.update()
    bar.close()
    return x


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------

PRETRAINED_URLS = {  # the released weights (raw state dicts; SiT-XL/2 in DiT-XL/2's layout)
    "DiT-XL-2-256x256.pt": "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt",
    "DiT-XL-2-512x512.pt": "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt",
    "SiT-XL-2-256x256.pt": "https://www.dl.dropboxusercontent.com/scl/fi/as9oeomcbub47de5g4be0/SiT-XL-2-256.pt"
                           "?rlkey=uxzxmpicu46coq3msb17b9ofa&dl=0",
}


def read_checkpoint(path):
    """The object in a checkpoint file (a folder means folder/checkpoint.pt), read on the CPU with weights_only=True;
    the official DiT/SiT training checkpoints' `args` (an argparse.Namespace) is allowed. ValueError with one
    sentence for a missing, empty, truncated or non-checkpoint file."""
    path = os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else str(path)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path} does not exist: check the path (a run folder must hold checkpoint.pt)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, not a torch file: each raises its own type
        raise ValueError(f"could not read {path} as a PyTorch checkpoint ({type(e).__name__}): it is empty, truncated "
                         f"or not a checkpoint; pass a checkpoint.pt written by train.py or a released DiT/SiT .pt "
                         f"file") from e


def state_dict_of(obj, prefer="ema"):
    """A raw state dict, or a training checkpoint's `ema` (preferred) / `model` entry, without the `module.` (DDP)
    and `_orig_mod.` (torch.compile) prefixes."""
    if not isinstance(obj, dict):
        raise ValueError(f"the checkpoint holds a {type(obj).__name__}, not a state dict: pass a model checkpoint")
    if isinstance(obj.get(prefer), dict):
        obj = obj[prefer]
    elif isinstance(obj.get("model"), dict):
        obj = obj["model"]
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in obj.items()}


def describe_state_dict(sd, latent_factor=8):
    """'XL/2 at 256x256 (latent 32x32)' from the shapes of a DiT-layout state dict, for mismatch messages."""
    try:
        (_, tokens, width), patch = sd["pos_embed"].shape, sd["x_embedder.proj.weight"].shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    except (KeyError, ValueError, AttributeError):
        return "an unrecognised model"
    size = next((s for s, (d, w, _) in SIZES.items() if (d, w) == (depth, width)), f"depth {depth}/width {width}")
    side = round(tokens ** 0.5) * patch
    return f"{size}/{patch} at {side * latent_factor}x{side * latent_factor} (latent {side}x{side})"


def load_checkpoint(model, path_or_state, prefer="ema"):
    """Load weights into `model` strictly and return it. path_or_state: a file or run folder (read_checkpoint), a
    release name of PRETRAINED_URLS that is not on disk (fetched once with load_url), a raw state dict or a training
    checkpoint (state_dict_of). A mismatch raises ValueError naming both models."""
    state = path_or_state
    if isinstance(state, (str, os.PathLike)):
        name = os.path.basename(str(state))
        fetch = not os.path.exists(state) and name in PRETRAINED_URLS
        state = load_url(PRETRAINED_URLS[name], file_name=name) if fetch else read_checkpoint(state)
    sd, own = state_dict_of(state, prefer), model.state_dict()
    bad = sorted(k for k in own.keys() | sd.keys() if k not in own or k not in sd or sd[k].shape != own[k].shape)
    if bad:
        factor = 8 if getattr(model, "in_channels", 4) == 4 else 1
        raise ValueError(f"checkpoint holds {describe_state_dict(sd, factor)} but the model is "
                         f"{describe_state_dict(own, factor)}: choose the matching --model and --image-size "
                         f"({len(bad)} keys missing, unexpected or of another shape, e.g. {bad[:3]})")
    model.load_state_dict(sd, strict=True)
    return model


# ---------------------------------------------------------------------------------------------------------
# Helpers every script shares (one of each)
# ---------------------------------------------------------------------------------------------------------

def default_device():
    """"cuda:LOCAL_RANK" if CUDA is available, else "mps" if available, else "cpu"."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "mps" if torch.backends.mps.is_available() else "cpu"


@contextlib.contextmanager
def distributed(device=None):
    """(rank, world_size, device) for the block of a script's main: under torchrun (WORLD_SIZE > 1) in a process group,
    NCCL on CUDA and gloo elsewhere, with a long timeout (ranks wait at barriers while others finish their share)."""
    device, world = torch.device(device or default_device()), int(os.environ.get("WORLD_SIZE", 1))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but this PyTorch sees no CUDA GPU (a CPU build, or no GPU visible): "
                         "use --device cpu, or install a CUDA build of torch")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if device.index is None else device.index)
        torch.cuda.set_device(device)
    if own := world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=3))
    try:
        yield int(os.environ.get("RANK", 0)), world, device
        if own:  # important! gloo's threads need the GIL to free finished collectives: let them before the group dies
            dist.barrier()  # (a rank that frees its group at once can deadlock in ~ProcessGroupGloo's thread join)
    finally:
        if own:
            dist.destroy_process_group()


def checked(cast, ok, what):
    """An argparse type that checks what the value means: cast(text), then ok(value), else one sentence."""
    def parse(text):
        try:
            if ok(value := cast(text)):  # NaN fails every comparison
                return value
        except ValueError:
            pass
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return parse


def load_url(url, file_name=None, check_hash=False):
    """A state dict from `url`, downloaded once into torch.hub's cache (torch.hub.get_dir()/checkpoints, where
    pytorch-fid keeps its Inception weights too) and read from there; RuntimeError with one sentence on failure."""
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True, check_hash=check_hash,
                                                  file_name=file_name, weights_only=True)
    except Exception as e:  # network and file errors come in many types
        dst = os.path.join(torch.hub.get_dir(), "checkpoints", file_name or os.path.basename(urlparse(url).path))
        raise RuntimeError(f"could not fetch {url} ({type(e).__name__}: {e}): download it by hand to {dst}") from e


class Progress:
    """The one progress printer: "label done/total | rate/s | eta h:mm:ss [| note]" on stderr, at most every `every`
    seconds and once at close (total None: no total, no eta)."""

    def __init__(self, total, label, every=10.0, enabled=True):
        self.total, self.label, self.every, self.enabled, self.done = total, label, every, enabled, 0
        self.start = self.last = time.time()

    def update(self, n=1, note=""):
        self.done += n
        if time.time() - self.last >= self.every:
            self.close(note)

    def close(self, note=""):  # also prints update's periodic line
        if not self.enabled:
            return
        self.last = now = time.time()
        rate = self.done / max(now - self.start, 1e-9)
        parts = [f"{self.label} {self.done}" + ("" if self.total is None else f"/{self.total}"), f"{rate:.2f}/s"]
        if self.total is not None:
            parts.append(f"eta {datetime.timedelta(seconds=int(max(self.total - self.done, 0) / max(rate, 1e-9)))}")
        print(" | ".join(parts + ([note] if note else [])), file=sys.stderr, flush=True)


def noise_source(generator, device):
    """The one noise argument of the stochastic samplers as a callable noise(x) -> N(0, I) like x: None (torch's
    global RNG), an int seed (a generator on `device`), a torch.Generator (it may live on another device than x),
    or such a callable itself (e.g. per-sample streams, so that images do not depend on the batch size)."""
    if generator is None or callable(generator):
        return torch.randn_like if generator is None else generator
    if isinstance(generator, int):
        generator = torch.Generator(device=device).manual_seed(generator)
    return lambda x: torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


def null_label(model, null_class=None):
    """The unconditional label of classifier-free guidance: null_class, else model.num_classes (the extra row that
    label dropout adds to the label table); ValueError when the model has no such row."""
    null = getattr(model, "num_classes", None) if null_class is None else null_class
    table = getattr(getattr(model, "y_embedder", None), "embedding_table", None)
    if null is None or (table is not None and table.num_embeddings <= null):
        raise ValueError("guidance needs a null-class label, which this model lacks (no num_classes, or built with "
                         "class_dropout_prob=0): use cfg_scale=1.0 (MeanFlow: omega=1, kappa=0, no label dropout)")
    return null


def classifier_free_guidance(model, cfg_scale, null_class=None, guide_channels=None):
    """model(x, t, y) guided: one batched pass over [x, x] with labels [y, null] (null_label), eps (or velocity) =
    uncond + cfg_scale (cond - uncond) on the first guide_channels channels (None: all; 3 reproduces the official DiT
    sampler), the other channels (a learned variance) from the conditional half."""
    null = null_label(model, null_class)

    def guided(x, t, y):
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)]))
        cond, uncond = out.chunk(2, dim=0)
        g = x.shape[1] if guide_channels is None else guide_channels
        eps = uncond[:, :g] + cfg_scale * (cond[:, :g] - uncond[:, :g])
        return torch.cat([eps, cond[:, g:]], dim=1)
    return guided


# ---------------------------------------------------------------------------------------------------------
# Speed: schedule tables cached per device and dtype
# ---------------------------------------------------------------------------------------------------------

def _on(diffusion, arr, device, dtype):
    """A schedule table cast to dtype on device, once per diffusion: no host-to-device copy, and so no wait for the
    GPU, inside a training or sampling step."""
    copies = diffusion.__dict__.setdefault("_copies", {})
    key = (id(arr), torch.device(device), dtype)
    if key not in copies:
        copies[key] = arr.to(dtype).to(device)  # cast before the move: MPS has no float64
    return copies[key]
