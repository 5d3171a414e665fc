"""
DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers") in plain PyTorch, with the official
state-dict layout so the released checkpoints load strictly, plus its Gaussian diffusion (ADM/IDDPM) and
samplers further down in this file.

    model = DiT_models["DiT-XL/2"](input_size=32)                 # 256x256 images -> 32x32x4 SD-VAE latents
    load_checkpoint(model, "DiT-XL-2-256x256.pt")                 # raw state dict, or a training checkpoint
    out = model(x, t, y)                                          # (N, 8, 32, 32): eps and variance channels
    out, feats = model(x, t, y, return_features=7)                # feats: (N, T, D) output of block 7 (1-based)

The network's only departures from facebookresearch/DiT: attention goes through F.scaled_dot_product_attention
(flash / memory-efficient kernels on GPU; same mathematics), timm is not needed, and intermediate features can
be returned from the same forward pass for the dispersive loss.
"""

import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


def modulate(x, shift, scale):
    # adaLN: per-sample affine from the conditioning vector, broadcast over tokens
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ---------------------------------------------------------------------------------------------------------
# Embedding layers
# ---------------------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, T, D) with a p x p stride-p conv (timm's PatchEmbed, same keys: `proj.*`)."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)                           # (N, T, D)


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal features of (possibly fractional) timesteps: cos first, then sin (as the official code)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)                  # (N, dim)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: 256 sinusoidal frequencies, then Linear-SiLU-Linear."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t):
        t_freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors; with dropout > 0 an extra last row is the null class used for CFG."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels, train, force_drop_ids=None):
        # important! label dropout (classifier-free guidance training) happens only in train mode
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


# ---------------------------------------------------------------------------------------------------------
# Transformer blocks
# ---------------------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head self-attention with timm's key layout (`qkv`, `proj`).

    `fused=True` uses F.scaled_dot_product_attention (flash / memory-efficient kernels where available);
    `fused=False` is the explicit softmax(QK^T/sqrt(d))V, which forward-mode AD (MeanFlow's JVP) and
    float64 checks can always go through. Both compute the same function.
    """

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        assert dim % num_heads == 0, f"hidden size {dim} is not divisible by {num_heads} heads"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.fused = True

    def forward(self, x):
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                                   # (N, H, T, hd) each
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)             # (N, H, T, T)
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class Mlp(nn.Module):
    """timm's Mlp with the keys `fc1`, `fc2`; DiT uses the tanh approximation of GELU."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Transformer block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
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
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ---------------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------------

class DiT(nn.Module):
    """Diffusion model with a Transformer backbone. Same constructor and state dict as the official code."""

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
        learn_sigma=True,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not divisible by the patch size {patch_size}: "
                             f"pick an image/latent size that is a multiple of {patch_size}")
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.input_size = input_size
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.depth = depth
        self.hidden_size = hidden_size
        self.num_classes = num_classes
        self.grad_checkpointing = False  # recompute each block in backward: less memory, ~30% more compute

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Fixed sin-cos table; a frozen Parameter (not a buffer) because the released checkpoints store it so.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)

        grid = int(self.x_embedder.num_patches ** 0.5)
        self.pos_embed.data.copy_(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid).unsqueeze(0))

        # patch conv initialised like a Linear on its flattened kernel
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: every block starts as the identity and the output as zero
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def set_fused_attention(self, fused=True):
        """Switch every block between SDPA kernels (fused=True) and explicit math attention."""
        for block in self.blocks:
            block.attn.fused = fused
        return self

    def unpatchify(self, x):
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)                                  # (N, h, w, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)                              # (N, C, H, W)

    def forward(self, x, t, y, return_features=None):
        """x: (N, C, H, W) latents, t: (N,) timesteps, y: (N,) labels (num_classes = null class).

        return_features=k (1-based, k = depth is the last block) also returns that block's (N, T, D) output
        from the same pass.
        """
        c = self.t_embedder(t) + self.y_embedder(y, self.training)                # (N, D)
        return self.forward_tokens(x, c, return_features)

    def forward_tokens(self, x, c, return_features=None):
        """The transformer body given the conditioning vector c; shared with SiT and MeanFlow."""
        if return_features is not None and not 1 <= return_features <= self.depth:
            raise ValueError(f"return_features={return_features} is out of range: blocks are numbered 1..{self.depth}")
        x = self.x_embedder(x) + self.pos_embed                                   # (N, T, D)
        feats = None
        for i, block in enumerate(self.blocks, start=1):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
            if i == return_features:
                feats = x
        x = self.final_layer(x, c)                                                # (N, T, p*p*C_out)
        x = self.unpatchify(x)                                                    # (N, C_out, H, W)
        return x if return_features is None else (x, feats)

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_channels=None):
        """Classifier-free guidance in one batched pass: the first half of the batch carries the labels, the
        second half the null class; both halves of the output get the guided prediction.

        guide_channels=None guides every eps channel (correct). guide_channels=3 reproduces the official
        code, which guides only the first 3 of the 4 latent channels (a known slip that the published
        DiT-XL/2 FID 2.27 was computed with).
        """
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self(combined, t, y)
        g = self.in_channels if guide_channels is None else guide_channels
        eps, rest = model_out[:, :g], model_out[:, g:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)


# ---------------------------------------------------------------------------------------------------------
# Fixed 2-D sin-cos position embedding (MAE / official DiT), computed in float64 like the numpy original
# ---------------------------------------------------------------------------------------------------------

def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega                                                   # (D/2,)
    out = pos.reshape(-1)[:, None] * omega[None]                                   # (M, D/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)                      # (M, D)


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """(grid_size**2, embed_dim) float32 table; first half encodes the row index, second half the column."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")                # official order: w first
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid_w)
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid_h)
    return torch.cat([emb_h, emb_w], dim=1).float()


# ---------------------------------------------------------------------------------------------------------
# Model registry: the paper's names
# ---------------------------------------------------------------------------------------------------------

DIT_SIZES = {  # name: (depth, hidden_size, num_heads)
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
}


def _make_registry(cls, prefix, sizes, patches=(2, 4, 8)):
    def builder(depth, hidden, heads, patch):
        def build(**kwargs):
            return cls(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch, **kwargs)
        return build
    return {f"{prefix}-{s}/{p}": builder(*sizes[s], p) for s in sizes for p in patches}


DiT_models = _make_registry(DiT, "DiT", DIT_SIZES)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------

PRETRAINED_URLS = {  # the released DiT weights (raw state dicts)
    "DiT-XL-2-256x256.pt": "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt",
    "DiT-XL-2-512x512.pt": "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt",
}


def extract_state_dict(obj, prefer="ema"):
    """A raw state dict, or a training checkpoint's `ema` (preferred) / `model` entry, without the
    `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes."""
    if isinstance(obj, dict) and prefer in obj and isinstance(obj[prefer], dict):
        obj = obj[prefer]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    out = {}
    for k, v in obj.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def describe_state_dict(sd, latent_factor=8):
    """Best-effort 'DiT-XL/2 at 256x256' description of a checkpoint from its shapes."""
    try:
        hidden = sd["pos_embed"].shape[-1]
        grid = int(round(sd["pos_embed"].shape[1] ** 0.5))
        patch = sd["x_embedder.proj.weight"].shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        size = next((s for s, (d, h, _) in DIT_SIZES.items() if d == depth and h == hidden), f"depth {depth}/width {hidden}")
        px = grid * patch * latent_factor
        return f"{size}/{patch} at {px}x{px} (latent {grid * patch}x{grid * patch})"
    except (KeyError, ValueError, IndexError):
        return "an unrecognised model"


def load_checkpoint(model, path_or_state, prefer="ema"):
    """Load released or our own weights into `model` strictly; mismatches stop with a readable message.

    Accepts a file path, a raw state dict, or a training checkpoint dict (uses `ema`, else `model`).
    Known release names (e.g. "DiT-XL-2-256x256.pt") that are not on disk are downloaded once.
    """
    if isinstance(path_or_state, (str, os.PathLike)):
        path = str(path_or_state)
        if not os.path.exists(path) and os.path.basename(path) in PRETRAINED_URLS:
            path = download_pretrained(os.path.basename(path))
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint {path} does not exist: check the path (released weights: "
                                    f"{', '.join(PRETRAINED_URLS)} download automatically)")
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        state = path_or_state
    sd = extract_state_dict(state, prefer)
    own = model.state_dict()
    bad_shape = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if bad_shape or missing or unexpected:
        factor = 8 if model.in_channels == 4 else 1
        want = describe_state_dict(own, factor)
        got = describe_state_dict(sd, factor)
        detail = (f"{len(bad_shape)} shape mismatches (e.g. {bad_shape[:2]}), {len(missing)} missing keys "
                  f"(e.g. {missing[:2]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:2]})")
        raise ValueError(f"checkpoint holds {got} but the model is {want}: choose the matching --model and "
                         f"--image-size ({detail})")
    model.load_state_dict(sd, strict=True)
    return model


def download_pretrained(name, cache_dir=None):
    """Download a released checkpoint once into the cache folder (atomic: temp file + rename)."""
    cache_dir = cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dispersive")
    os.makedirs(cache_dir, exist_ok=True)
    dst = os.path.join(cache_dir, name)
    if os.path.exists(dst):
        return dst
    url = PRETRAINED_URLS[name]
    tmp = dst + ".part"
    print(f"downloading {url} -> {dst}")
    try:
        torch.hub.download_url_to_file(url, tmp, progress=True)
    except Exception as e:  # network errors come in many types
        raise RuntimeError(f"could not download {url} ({e}): download it by hand and pass its path") from e
    os.replace(tmp, dst)
    return dst


# ---------------------------------------------------------------------------------------------------------
# Gaussian diffusion (ADM/IDDPM as used by DiT)
#
#     diffusion = create_diffusion()                                # 1000 steps, for training
#     terms = diffusion.training_losses(model, x0, y, return_features=k)   # {"loss", "mse", "vb", "feats"}
#     x0 = sample(model, z, y, sampler="ddpm", num_steps=250, cfg_scale=1.5)
#
# The network predicts eps in its first C output channels and, when it has 2C, the variance in the rest
# ("learned range"). Schedules are float64 on the CPU; each lookup casts to the data's dtype after the
# float64 arithmetic, like the official _extract_into_tensor.
# ---------------------------------------------------------------------------------------------------------

def get_named_beta_schedule(schedule_name, num_diffusion_timesteps):
    """Ho et al.'s linear schedule 1e-4 -> 0.02, stretched so that any T gives the same process as T = 1000."""
    if schedule_name != "linear":
        raise ValueError(f"unknown noise schedule {schedule_name!r}: DiT uses 'linear'")
    scale = 1000 / num_diffusion_timesteps
    return torch.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=torch.float64)


def mean_flat(x):
    return x.mean(dim=list(range(1, x.dim())))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log-likelihood of data in [-1, 1] quantised to 256 bins under N(means, e^(2 log_scales)) (ADM's decoder)."""
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    # the edge bins extend to -inf / +inf
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


class GaussianDiffusion:
    """Forward process, training loss and reverse steps of a discrete Gaussian diffusion with eps prediction.

    The model's output is eps (N, C, ...) or eps and variance (N, 2C, ...). A 2C output uses the learned
    range: v in [-1, 1] interpolates the log-variance between the clipped posterior variance and beta_t.
    A C output uses a fixed variance: beta_t ("fixed large", the official default for learn_sigma=False)
    or, with sigma_small=True, the posterior variance ("fixed small").

    Indices t run over this process's own steps; `timestep_map[t]` is the step of the original 1000-step
    process that the network is given (the identity unless respaced, see SpacedDiffusion).
    """

    def __init__(self, betas, sigma_small=False):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.dim() != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D schedule with values in (0, 1]")
        self.num_timesteps = len(betas)
        self.timestep_map = torch.arange(self.num_timesteps)
        self.sigma_small = sigma_small
        self.betas = betas

        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)                        # ᾱ_t
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1).sqrt()

        # posterior q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # the posterior variance is 0 at t = 0: its log is clipped to the value at t = 1 (a 1-step process
        # adds no noise at all, so any finite value does there)
        clip = self.posterior_variance[1:2] if self.num_timesteps > 1 else betas
        self.posterior_log_variance_clipped = torch.log(torch.cat([clip, self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)
        self.log_betas = torch.log(betas)
        # fixed large starts at the posterior variance of t = 1 for a better decoder likelihood (as official)
        self.log_betas_fixed_large = torch.log(torch.cat([clip, betas[1:]]))

    # --- forward process ----------------------------------------------------------------------------------

    def q_sample(self, x_start, t, noise=None):
        """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) eps."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (self._extract(self.posterior_mean_coef1, t, x_t) * x_start
                + self._extract(self.posterior_mean_coef2, t, x_t) * x_t)
        return (mean, self._extract(self.posterior_variance, t, x_t),
                self._extract(self.posterior_log_variance_clipped, t, x_t))

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return ((self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart)
                / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t))

    # --- the model's reverse step -------------------------------------------------------------------------

    def _model(self, model, x, t, y, **kwargs):
        # the network always sees steps of the original process
        return model(x, self._on(self.timestep_map, t.device, torch.long)[t], y, **kwargs)

    def _split_output(self, model_output, x):
        C = x.shape[1]
        if model_output.shape[1] == 2 * C:
            return torch.split(model_output, C, dim=1)                            # eps, v
        if model_output.shape[1] == C:
            return model_output, None
        raise ValueError(f"the model returned {model_output.shape[1]} channels for {C}-channel data: "
                         f"expected {C} (eps) or {2 * C} (eps and learned variance)")

    def _p_mean_variance_from_output(self, model_output, x, t, clip_denoised=False):
        eps, v = self._split_output(model_output, x)
        if v is not None:
            # learned range: v = -1 -> posterior variance, v = +1 -> beta_t (interpolated in log space)
            min_log = self._extract(self.posterior_log_variance_clipped, t, x)
            max_log = self._extract(self.log_betas, t, x)
            frac = (v + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
        elif self.sigma_small:
            log_variance = self._extract(self.posterior_log_variance_clipped, t, x).expand_as(x)
        else:
            log_variance = self._extract(self.log_betas_fixed_large, t, x).expand_as(x)
        pred_xstart = self._predict_xstart_from_eps(x, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": torch.exp(log_variance), "log_variance": log_variance,
                "pred_xstart": pred_xstart}

    def p_mean_variance(self, model, x, t, y, clip_denoised=False):
        """p(x_{t-1} | x_t) as {"mean", "variance", "log_variance", "pred_xstart"}; DiT samples with
        clip_denoised=False."""
        return self._p_mean_variance_from_output(self._model(model, x, t, y), x, t, clip_denoised)

    def _on(self, arr, device, dtype):
        """A schedule array in dtype on device, copied once and kept: no host-to-device copy (and so no wait for
        the GPU) inside a training or sampling step."""
        copies = self.__dict__.setdefault("_copies", {})
        key = (id(arr), torch.device(device), dtype)
        if key not in copies:
            # cast before the move: float64 does not exist on every accelerator (MPS)
            copies[key] = arr.to(dtype).to(device)
        return copies[key]

    def _extract(self, arr, t, x):
        """arr[t] from a float64 CPU schedule as an (N, 1, ..., 1) tensor in x's dtype on x's device
        (arr.to(dtype)[t] == arr[t].to(dtype))."""
        return self._on(arr, x.device, x.dtype)[t].reshape(-1, *[1] * (x.dim() - 1))

    # --- training -----------------------------------------------------------------------------------------

    def _vb_terms_bpd(self, model_output, x_start, x_t, t):
        """One term of the variational bound in bits per dimension: KL to the true posterior for t > 0,
        the discretised decoder NLL at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self._p_mean_variance_from_output(model_output, x_t, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(self, model, x_start, y, t=None, noise=None, return_features=None):
        """Per-sample loss = MSE(eps) + VLB term ("hybrid" loss of IDDPM as DiT trains it; no 1/1000 rescale).

        t ~ U{0, ..., T-1} and noise ~ N(0, I) come from torch's global RNG when not given. The VLB sees the
        predicted mean detached, so it trains only the variance channels. Returns {"loss", "mse", "vb", "feats"}
        with feats the (N, T, D) output of block `return_features` from the same forward pass (else None).
        """
        if t is None:
            t = torch.randint(0, self.num_timesteps, (x_start.shape[0],), device=x_start.device)
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        feats = None
        if return_features is None:
            model_output = self._model(model, x_t, t, y)
        else:
            model_output, feats = self._model(model, x_t, t, y, return_features=return_features)
        eps, v = self._split_output(model_output, x_t)
        mse = mean_flat((noise - eps) ** 2)
        if v is not None:
            # important! the mean is frozen inside the VLB: the eps channels learn from the MSE alone
            frozen_out = torch.cat([eps.detach(), v], dim=1)
            vb = self._vb_terms_bpd(frozen_out, x_start, x_t, t)
        else:
            vb = torch.zeros_like(mse)
        return {"loss": mse + vb, "mse": mse, "vb": vb, "feats": feats}

    # --- sampling steps -----------------------------------------------------------------------------------

    def p_sample(self, model, x, t, y, clip_denoised=False, generator=None):
        """One ancestral step x_t -> x_{t-1} ~ p(x_{t-1} | x_t); no noise is added at t = 0."""
        out = self.p_mean_variance(model, x, t, y, clip_denoised)
        noise = _randn_like(x, generator)
        nonzero_mask = (t != 0).to(x.dtype).reshape(-1, *[1] * (x.dim() - 1))
        return out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise

    def ddim_sample(self, model, x, t, y, clip_denoised=False, eta=0.0, generator=None):
        """One DDIM step (Song et al.); eta = 0 is deterministic, eta = 1 has DDPM's posterior variance."""
        out = self.p_mean_variance(model, x, t, y, clip_denoised)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract(self.alphas_cumprod, t, x)
        alpha_bar_prev = self._extract(self.alphas_cumprod_prev, t, x)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
        noise = _randn_like(x, generator)
        nonzero_mask = (t != 0).to(x.dtype).reshape(-1, *[1] * (x.dim() - 1))
        return mean_pred + nonzero_mask * sigma * noise


def space_timesteps(num_timesteps, section_counts):
    """The steps of the original process kept by respacing (official semantics).

    section_counts: "250" (evenly spaced with rounding, ends included), "10,15,20" (the process cut into
    equal sections, each strided to its count), a list of ints, or "ddimN" (the integer stride of the DDIM
    paper, range(0, T, stride) with exactly N steps). Returns a set.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired_count:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {desired_count} of {num_timesteps} steps with an integer "
                             f"stride: pick another ddim count or use plain respacing (e.g. '{desired_count}')")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot take {section_count} steps from a section of {size}: use fewer steps")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        # Python's round (half to even) as the official code, so the kept steps match exactly
        all_steps += [start_idx + round(j * frac_stride) for j in range(section_count)]
        start_idx += size
    return set(all_steps)


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion over a subset of the original steps: betas chosen so that ᾱ at the kept steps is unchanged,
    and the model is given the original step numbers (timestep_map)."""

    def __init__(self, use_timesteps, betas, sigma_small=False):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        self.original_num_steps = len(betas)
        kept = sorted(use_timesteps)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)[kept]
        last = torch.cat([betas.new_ones(1), alphas_cumprod[:-1]])
        super().__init__(1.0 - alphas_cumprod / last, sigma_small=sigma_small)
        self.timestep_map = torch.tensor(kept, dtype=torch.long)


def create_diffusion(timestep_respacing="", noise_schedule="linear", sigma_small=False, diffusion_steps=1000):
    """The official factory: "" keeps all steps (training), "250" / "ddim50" respace for sampling.

    Eps-only networks (learn_sigma=False) sample with beta_t, or the posterior variance with sigma_small=True.
    """
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    return SpacedDiffusion(space_timesteps(diffusion_steps, timestep_respacing), betas, sigma_small=sigma_small)


# ---------------------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------------------

def _randn_like(x, generator=None):
    if generator is None:
        return torch.randn_like(x)
    if callable(generator):  # a noise source noise_fn(x) -> tensor like x (per-sample streams, see sample.py)
        return generator(x)
    # a generator may live on another device than x (e.g. a CPU generator for device-independent noise)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


def classifier_free_guidance(model, cfg_scale, null_class=None, guide_channels=None):
    """A callable model(x, t, y) whose eps is uncond + cfg_scale * (cond - uncond), from one pass over [x, x]
    with labels [y, null]; the learned variance (and unguided channels) come from the conditional half.

    guide_channels=None guides every eps channel; 3 reproduces the official DiT sampler (first 3 of 4).
    """
    if null_class is None:
        null_class = getattr(model, "num_classes", None)
    if null_class is None:
        raise ValueError("classifier-free guidance needs the null class label: pass null_class= (for DiT it is "
                         "model.num_classes)")
    table = getattr(getattr(model, "y_embedder", None), "embedding_table", None)
    if table is not None and table.num_embeddings <= null_class:
        raise ValueError("this model has no null-class embedding (trained with class_dropout_prob=0): "
                         "sample with cfg_scale=1.0")

    def guided(x, t, y):
        y_null = torch.full_like(y, null_class)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]))
        cond, uncond = out.chunk(2, dim=0)
        g = x.shape[1] if guide_channels is None else guide_channels
        eps = uncond[:, :g] + cfg_scale * (cond[:, :g] - uncond[:, :g])
        return torch.cat([eps, cond[:, g:]], dim=1)
    return guided


@torch.no_grad()
def sample(model, z, y, sampler="ddpm", num_steps=250, cfg_scale=1.0, guide_channels=None, generator=None,
           eta=0.0, null_class=None, progress=False, sigma_small=False, noise_fn=None):
    """Draw x_0 from noise z (N, C, H, W) with labels y (N,) by DDPM ancestral sampling or DDIM.

    model: any callable model(x, t, y) -> (N, 2C, H, W) eps and learned variance, or (N, C, H, W) eps
           (then fixed variance: beta_t, or the posterior variance with sigma_small=True).
    num_steps: number of respaced steps (official `str(num_steps)` spacing; 250 in DiT) or a respacing
               string such as "ddim50".
    cfg_scale: classifier-free guidance scale (1.0 = none); the null label is model.num_classes or null_class.
    generator: a torch.Generator or an int seed for the per-step noise (z is given, so the result is then
               reproducible); None uses torch's global RNG.
    noise_fn: instead of the generator, a callable noise_fn(x) -> standard normal noise like x (N rows, never
              the CFG-doubled batch), e.g. per-sample streams so that images do not depend on the batch size.
    eta: DDIM noise (0 = deterministic).
    """
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"unknown sampler {sampler!r}: choose 'ddpm' or 'ddim'")
    diffusion = create_diffusion(str(num_steps), sigma_small=sigma_small)
    net = model if cfg_scale == 1.0 else classifier_free_guidance(model, cfg_scale, null_class, guide_channels)
    if isinstance(generator, int):
        generator = torch.Generator(device=z.device).manual_seed(generator)
    if noise_fn is not None:
        generator = noise_fn
    x = z
    n = diffusion.num_timesteps
    start = time.time()
    for k, i in enumerate(reversed(range(n)), start=1):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        if sampler == "ddpm":
            x = diffusion.p_sample(net, x, t, y, clip_denoised=False, generator=generator)
        else:
            x = diffusion.ddim_sample(net, x, t, y, clip_denoised=False, eta=eta, generator=generator)
        if progress and (k % max(1, n // 10) == 0 or k == n):
            rate = k / max(time.time() - start, 1e-9)
            print(f"{sampler} step {k}/{n} | {rate:.2f} it/s | eta {(n - k) / rate:.0f}s", file=sys.stderr, flush=True)
    return x
