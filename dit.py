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
