"""
Dispersive Loss (Wang & He 2025, "Diffuse and Disperse"): InfoNCE without positive pairs, a regulariser on the
intermediate features z (B, ...) of the training batch, L = L_diff + λ · L_disp(z). With z flattened to (B, d) and
D_ij = ‖z_i − z_j‖² / d, the default infonce_l2 is log mean_ij exp(−D_ij / τ) over all B² pairs, diagonal
included (at τ = 1, the official PyTorch code's loss), so it is >= −log B: a logged value near −log B (−3.47 for
B = 32 per GPU) is expected, the regulariser works by staying there.

    out, z = model(x_t, t, y, return_features=4)     # a model that returns block 4's output (1-based), or any
    with capture(model, "blocks.3") as feats:        # nn.Module: record that submodule's output in the same pass
        out = model(x_t, t, y)                       # (a forward hook: under torch.compile use the route above)
    loss = diffusion_loss(out) + 0.5 * dispersive_loss(feats[0], tau=0.5)        # λ = 0.5, τ = 0.5 (the paper)

Torch only: copy this file into any project. Computed in float32 (also under autocast), per device by default.
"""

import dataclasses
import math
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F

VARIANTS = ("infonce_l2", "infonce_cos", "hinge", "covariance")


def dispersive_loss(z, variant="infonce_l2", tau=0.5, margin=1.0, gather=False):
    """L_disp of features z (B, ...): a 0-dim float32 tensor (float64 for float64 z). τ = tau, ε = margin (hinge).

    gather=True all-gathers z over torch.distributed (the same B on every rank) for a loss over the global batch,
    with the gradient into the local rows only; the paper computes it per device. DDP averages gradients over
    ranks: scale λ by the world size for the exact gradient of the global-batch loss.
    """
    _check_options(variant, tau, margin, VARIANTS)
    z = _features(z)  # (B, d)
    if gather and dist.is_available() and dist.is_initialized():
        parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, z.detach().contiguous())  # no autograd: the local rows go back in differentiable
        z = torch.cat([z if r == dist.get_rank() else p for r, p in enumerate(parts)])  # (world · B, d)
    B = len(z)
    with torch.autocast(z.device.type, enabled=False):
        if variant == "infonce_l2":  # the paper's Algorithm 1
            D = _sq_dists(z)  # D_ij = ‖z_i − z_j‖² / d, all B × B pairs
            return torch.exp(-D / tau).mean().log()  # stable as is: every term <= 1, the diagonal's are 1
        if variant == "hinge":  # mean_{i≠j} max(0, ε − D_ij)²: each pair i < j stands for (i, j) and (j, i)
            return 2 * (margin - _sq_dists(z)).clamp_min(0).pow(2).triu(1).sum() / (B * (B - 1))
        zn = F.normalize(z, dim=1, eps=1e-8)  # ℓ2-normalised rows; eps: a zero row stays zero instead of NaN
        if variant == "infonce_cos":  # log mean_ij exp(cos(z_i, z_j) / τ); exp(1 / τ) may overflow: logsumexp
            return torch.logsumexp(zn @ zn.T / tau, (0, 1)) - 2 * math.log(B)
        # covariance: Σ_{k≠l} C_kl², C = Zcᵀ Zc / (B − 1), Zc = the normalised rows minus their batch mean;
        # ‖ZcᵀZc‖_F = ‖ZcZcᵀ‖_F, so the (d, d) matrix is never formed (d is 295k for SiT-XL/2)
        zc = zn - zn.mean(0)
        return ((zc @ zc.T).pow(2).sum() - zc.pow(2).sum(0).pow(2).sum()) / (B - 1) ** 2


def contrastive_loss(z1, z2, tau=0.5):
    """The paper's baseline WITH positive pairs: InfoNCE between two views (B, ...) of the same batch, in float32
    like dispersive_loss: L = mean_i −log softmax_j(−‖z1_i − z2_j‖² / (d τ))_i (anchor z1_i, positive z2_i).
    """
    _check_options("infonce_l2", tau, 0.0, VARIANTS)
    z1, z2 = _features(z1, "z1"), _features(z2, "z2")  # (B, d) each
    if z1.shape != z2.shape:
        raise ValueError(f"the two views must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    with torch.autocast(z1.device.type, enabled=False):
        logits = -_sq_dists(torch.cat([z1, z2]))[:len(z1), len(z1):] / tau  # (B, B): anchors z1_i, candidates z2_j
        return F.cross_entropy(logits, torch.arange(len(z1), device=z1.device))  # the positive of z1_i is z2_i


@contextmanager
def capture(model, name):
    """Record the output of submodule `name` of any nn.Module (a key of model.named_modules(), e.g. "blocks.3") in
    the list it yields, once per call, while the `with` block runs; block k (1-based) of a DiT is "blocks.{k-1}".
    A forward hook: under torch.compile, hooks added after compiling are skipped, so use return_features there.
    """
    feats = []
    handle = model.get_submodule(name).register_forward_hook(lambda module, args, out: feats.append(out))
    try:
        yield feats
        if not feats:
            raise RuntimeError(f"{name!r} did not run in the with block (not called by forward, or torch.compile)")
    finally:
        handle.remove()


@dataclasses.dataclass
class DispersiveConfig:
    """What to disperse and how much: L = L_diff + weight · loss(z), z = output of block `block`."""
    variant: str = "infonce_l2"  # one of VARIANTS, or "none" to train without the dispersive term
    weight: float = 0.5          # λ (paper 0.5; official PyTorch code 0.25)
    tau: float = 0.5             # τ (paper 0.5; official PyTorch code 1.0)
    block: int | None = None     # 1-based block whose output is z (depth = the last); None: max(1, depth // 4)
    margin: float = 1.0          # ε of the hinge variant (not given in the paper)
    gather: bool = False         # loss over the global batch instead of per device (an extension)

    def __post_init__(self):
        _check_options(self.variant, self.tau, self.margin, VARIANTS + ("none",))

    @classmethod
    def preset(cls, name, depth, **overrides):
        """"paper": λ 0.5, τ 0.5, block depth // 4 (the JAX runs); "official": λ 0.25, τ 1, the last block."""
        presets = {"paper": dict(weight=0.5, tau=0.5), "official": dict(weight=0.25, tau=1.0, block=depth)}
        if name not in presets:
            raise ValueError(f"unknown dispersive preset {name!r}: use 'paper' or 'official'")
        cfg = cls(**{**presets[name], **overrides})
        return dataclasses.replace(cfg, block=cfg.resolve_block(depth))

    @property
    def enabled(self):
        return self.variant != "none" and self.weight != 0

    def resolve_block(self, depth):
        """The 1-based block whose output is z in a network of `depth` blocks; max(1, ·) serves tiny test nets."""
        block = max(1, depth // 4) if self.block is None else self.block
        if not 1 <= block <= depth:
            raise ValueError(f"dispersive block must be in 1..{depth} (1-based, {depth} = the last), got {block}")
        return block

    def loss(self, z):
        """Unweighted L_disp(z) (multiply by self.weight); a float32 zero when the variant is "none"."""
        return (torch.zeros((), device=z.device) if self.variant == "none"
                else dispersive_loss(z, self.variant, self.tau, self.margin, self.gather))


def _check_options(variant, tau, margin, variants):
    if variant not in variants:
        raise ValueError(f"unknown dispersive variant {variant!r}: use one of {variants}")
    if not (tau > 0 and margin >= 0):
        raise ValueError(f"tau must be > 0 and margin >= 0, got tau={tau}, margin={margin}")


def _features(z, name="z"):
    """z (B, ...) validated and flattened to (B, d), in float32 (float64 stays float64)."""
    if not (z.is_floating_point() and z.dim() >= 2 and len(z) >= 2 and z[0].numel()):
        raise ValueError(f"{name} must be a float tensor of B >= 2 rows of features, got {z.dtype} {tuple(z.shape)}")
    # important! half precision is upcast: squared norms overflow fp16 (max 65504), bf16 keeps ~3 digits of D_ij
    return z.reshape(len(z), -1).to(torch.promote_types(z.dtype, torch.float32))


# --- Speed: distances from one Gram-matrix matmul, ‖a‖² + ‖b‖² − 2a·b, instead of torch.pdist (several
# times slower forward and backward); the rows are centred first (on a detached mean: distances are translation
# invariant) so that float32 keeps the digits this subtraction loses when features share a large offset.
def _sq_dists(z):
    """D_ij = ‖z_i − z_j‖² / d of z (B, d), a (B, B) matrix clamped at 0 and exactly 0 on the diagonal."""
    z = z - z.mean(0).detach()
    gram = z @ z.T  # (B, B)
    return (gram.diagonal()[:, None] + gram.diagonal()[None, :] - 2 * gram).clamp_min(0) / z.shape[1]
