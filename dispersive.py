"""
Dispersive Loss: a contrastive loss without positive pairs (Wang & He 2025, "Diffuse and Disperse").

A diffusion model is trained with L = L_diff + λ · L_disp(Z), where Z = {z_i} are intermediate features
of the *same* batch (the output of one transformer block, flattened (B, T, D) -> (B, d), d = T·D).
L_disp keeps only the "repulsive" half of InfoNCE: it pushes the B representations apart, with no
augmentation, no second view and no extra parameters. With D_ij = ‖z_i − z_j‖² / d:

    infonce_l2  (default)  log( mean_{i,j} exp(−D_ij / τ) )            all B² pairs, diagonal included
    infonce_cos            log( mean_{i,j} exp(cos(z_i, z_j) / τ) )     all B² pairs, diagonal included
    hinge                  mean_{i≠j} max(0, ε − D_ij)²                ε = margin, 1.0 by default (unverified)
    covariance             Σ_{k≠l} C_kl²,  C = Ẑcᵀ Ẑc / (B − 1)         Ẑ: rows ℓ2-normalised, Ẑc: Ẑ minus its
                                                                        batch mean (the unbiased covariance,
                                                                        as torch.cov / np.cov)

With τ = 1, infonce_l2 is exactly the official PyTorch code's loss
`log(mean(exp(−cat(D, D, zeros(B)))))` with `D = pdist(z)² / d`.

What to expect in the logs: the diagonal terms contribute exp(0) = 1 each, so infonce_l2 >= log(B/B²)
= −log B, reached when all points are far apart. A logged value that settles near −log B (−3.47 for 32
per GPU) is expected: the loss is a regulariser and does its work by staying there.

Implementation notes: distances come from the B×B Gram matrix (‖a‖² + ‖b‖² − 2a·b, O(B²d), one matmul)
instead of torch.pdist, which is slower (see bench.py) and has no half kernel; the covariance
variant uses ‖ẐcᵀẐc‖_F = ‖ẐcẐcᵀ‖_F so no d×d matrix is ever allocated (d is 295k for SiT-XL/2).
Everything runs in float32 (float64 inputs stay float64) with autocast disabled, because exp/log of
distances overflow in fp16 and bf16 keeps only ~3 significant digits.

The file depends only on torch and can be copied into another project as is.
"""

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

VARIANTS = ("infonce_l2", "infonce_cos", "hinge", "covariance")
_EPS = 1e-8  # ℓ2-normalisation guard: a zero row normalises to zero instead of NaN


def _check_tau(tau):
    if not tau > 0:
        raise ValueError(f"temperature tau must be > 0, got {tau}")


def _flatten(z, name="z"):
    if not isinstance(z, torch.Tensor) or z.dim() < 2:
        raise ValueError(f"{name} must be a tensor of shape (B, ...) with a batch dimension, "
                         f"got shape {tuple(getattr(z, 'shape', ()))}")
    if z.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 rows to disperse, got batch size {z.shape[0]}")
    if not z.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {z.dtype}")
    z = z.reshape(z.shape[0], -1)  # (B, d)
    if z.shape[1] == 0:
        raise ValueError(f"{name} has no features: shape {tuple(z.shape)}")
    # important! upcast half precision: exp(-D/τ) and the Gram cancellation need float32
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def _gather(z):
    """All-gather z over the default process group; the gradient flows into the local rows only."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z
    parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, z.detach().contiguous())  # every rank must pass the same shape
    parts[dist.get_rank()] = z  # all_gather has no autograd: put the local, differentiable copy back
    return torch.cat(parts)  # (world·B, ...)


def _sq_dists(a, b):
    """Squared Euclidean distances (Na, Nb) via the Gram matrix, clamped at 0."""
    # centring first removes the cancellation that ‖a‖² + ‖b‖² − 2a·b suffers in float32 when features
    # share a large common offset; mu is detached because distances are translation invariant (its exact
    # gradient is zero), which saves two passes over (B, d) in the backward
    same = a is b
    mu = (a.mean(0) if same else (a.mean(0) + b.mean(0)) / 2).detach()  # (d,)
    a = a - mu
    if same:
        gram = a @ a.T  # (B, B)
        sq_a = sq_b = gram.diagonal()  # the norms come free with the Gram matrix
    else:
        b = b - mu
        gram = a @ b.T  # (Na, Nb)
        sq_a, sq_b = a.pow(2).sum(1), b.pow(2).sum(1)
    return (sq_a[:, None] + sq_b[None, :] - 2 * gram).clamp_min(0)


def dispersive_loss(z, variant="infonce_l2", tau=0.5, margin=1.0, gather=False):
    """L_disp of a batch of representations z (B, ...); a 0-dim float32 tensor (float64 for float64 z).

    variant: one of VARIANTS (formulas in the module docstring). tau: τ of the InfoNCE variants.
    margin: ε of the hinge variant. gather: all-gather z over torch.distributed (when initialised, equal
    batch sizes on every rank) so the loss runs over the global batch; the gradient reaches only the local
    rows. The paper computes it per device (gather=False). Note that DDP averages gradients over ranks,
    so with gather=True the parameter update carries ∇L_disp / world_size: scale λ by the world size to
    match the exact gradient of the global-batch loss.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown dispersive variant {variant!r}, expected one of {VARIANTS}")
    _check_tau(tau)
    if variant == "hinge" and not margin >= 0:
        raise ValueError(f"hinge margin must be >= 0, got {margin}")
    _flatten(z)  # validate the local shape before any collective call
    if gather:
        z = _gather(z)
    with torch.autocast(z.device.type, enabled=False):
        z = _flatten(z)  # (B, d)
        B, d = z.shape
        if variant == "infonce_cos":
            zn = F.normalize(z, dim=1, eps=_EPS)
            logits = (zn @ zn.T) / tau  # cos(z_i, z_j) / τ
            return torch.logsumexp(logits.flatten(), 0) - 2 * math.log(B)  # log of the mean over B² pairs
        if variant == "covariance":
            zc = F.normalize(z, dim=1, eps=_EPS)
            zc = zc - zc.mean(0, keepdim=True)
            gram = zc @ zc.T  # (B, B): ‖ZcᵀZc‖_F = ‖ZcZcᵀ‖_F without the (d, d) matrix
            diag = zc.pow(2).sum(0)  # (d,) diagonal of ZcᵀZc: per-column sums of squares
            return (gram.pow(2).sum() - diag.pow(2).sum()) / (B - 1) ** 2
        eye = torch.eye(B, dtype=torch.bool, device=z.device)
        dist2 = _sq_dists(z, z).masked_fill(eye, 0) / d  # D_ij = ‖z_i − z_j‖² / d, exact 0 on the diagonal
        if variant == "infonce_l2":
            return torch.logsumexp(-dist2.flatten() / tau, 0) - 2 * math.log(B)
        hinge = (margin - dist2).clamp_min(0).pow(2)  # variant == "hinge"
        return hinge.masked_fill(eye, 0).sum() / (B * (B - 1))


def contrastive_loss(z1, z2, tau=0.5):
    """The paper's baseline WITH positive pairs: InfoNCE between two views (B, ...) of the same batch.

    Anchor z1_i, candidates all z2_j, positive j = i (one direction, as the paper's Eq. 1 reads), with the
    same similarity −‖z1_i − z2_j‖² / (d·τ) as infonce_l2:
        L = mean_i [ −log softmax_j(−‖z1_i − z2_j‖² / (d·τ))_i ].
    Float32 under autocast, like dispersive_loss.
    """
    _check_tau(tau)
    if not (isinstance(z1, torch.Tensor) and isinstance(z2, torch.Tensor)) or z1.shape != z2.shape:
        raise ValueError(f"the two views must have the same shape, got {tuple(getattr(z1, 'shape', ()))} "
                         f"and {tuple(getattr(z2, 'shape', ()))}")
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2 = _flatten(z1, "z1"), _flatten(z2, "z2")  # (B, d) each
        logits = -_sq_dists(z1, z2) / (z1.shape[1] * tau)  # (B, B): row i = anchor z1_i
        target = torch.arange(z1.shape[0], device=z1.device)
        return F.cross_entropy(logits, target)


@dataclass
class DispersiveConfig:
    """What to disperse and how much: L = L_diff + weight · loss(z), z = output of block `block`."""
    variant: str = "infonce_l2"  # one of VARIANTS, or "none" to train without the dispersive term
    weight: float = 0.5          # λ (paper 0.5; official PyTorch code 0.25)
    tau: float = 0.5             # τ (paper 0.5; official PyTorch code 1.0)
    block: int | None = None     # 1-based block whose output is z (k = depth is the last); None: depth // 4
    margin: float = 1.0          # ε of the hinge variant (unverified in the paper)
    gather: bool = False         # loss over the global batch instead of per device (an extension)

    def __post_init__(self):
        if self.variant != "none" and self.variant not in VARIANTS:
            raise ValueError(f"unknown dispersive variant {self.variant!r}, expected 'none' or one of {VARIANTS}")
        _check_tau(self.tau)

    @classmethod
    def preset(cls, name, depth, **overrides):
        """"paper": λ 0.5, τ 0.5, block depth // 4 (the JAX runs); "official": λ 0.25, τ 1, last block."""
        if name == "paper":
            # max(1, ·): tiny test models with depth < 4 use block 1 (the paper never has depth < 12)
            cfg = cls(weight=0.5, tau=0.5, block=max(1, depth // 4))
        elif name == "official":
            cfg = cls(weight=0.25, tau=1.0, block=depth)
        else:
            raise ValueError(f"unknown dispersive preset {name!r}, expected 'paper' or 'official'")
        cfg = dataclasses.replace(cfg, **overrides)  # re-runs the validation of __post_init__
        cfg.resolve_block(depth)
        return cfg

    @property
    def enabled(self):
        return self.variant != "none" and self.weight != 0

    def resolve_block(self, depth):
        """The 1-based block index for a network of `depth` blocks, validated."""
        block = max(1, depth // 4) if self.block is None else self.block
        if not 1 <= block <= depth:
            raise ValueError(f"dispersive block must be in 1..{depth} for a depth-{depth} network "
                             f"(1-based, {depth} = last block), got {block}")
        return block

    def loss(self, z):
        """Unweighted L_disp(z) (multiply by self.weight); a float32 zero when the term is disabled."""
        if self.variant == "none":
            return torch.zeros((), device=z.device)
        return dispersive_loss(z, self.variant, self.tau, self.margin, self.gather)
