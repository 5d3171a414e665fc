"""Tests of dispersive.py against closed forms, float64 loop recomputations, finite differences, the official
code's pdist formula, and `capture` on a DiT-layout network that is not ours (hand-run forward, bf16 autocast,
2-process gloo DDP). Run: python -m pytest -q test_dispersive.py"""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from dispersive import VARIANTS, DispersiveConfig, capture, contrastive_loss, dispersive_loss
from test_support import spawn

SHAPES = [(2, 1, 1), (3, 7), (5, 3, 4), (8, 16, 8), (6, 2, 3, 4)]


# ----------------------------------------------------------------------------- independent references

def naive_loss(z, variant, tau=0.5, margin=1.0):
    """Float64 recomputation with explicit loops over pairs; the covariance as an explicit d × d matrix."""
    z = z.detach().double().reshape(z.shape[0], -1)  # (B, d)
    B, d = z.shape
    if variant == "covariance":
        zn = torch.stack([row / row.norm() for row in z])
        C = torch.cov(zn.T).reshape(d, d)  # rows = variables, correction 1 -> / (B - 1)
        return (C.pow(2).sum() - C.diagonal().pow(2).sum()).item()
    terms = []
    for i in range(B):
        for j in range(B):
            D = ((z[i] - z[j]) ** 2).sum().item() / d
            if variant == "infonce_l2":
                terms.append(math.exp(-D / tau))
            elif variant == "infonce_cos":
                cos = (z[i] @ z[j]).item() / (z[i].norm() * z[j].norm()).item()
                terms.append(math.exp(cos / tau))
            elif variant == "hinge" and i != j:
                terms.append(max(0.0, margin - D) ** 2)
    mean = sum(terms) / len(terms)
    return mean if variant == "hinge" else math.log(mean)


def official_loss(z):
    """The official PyTorch code's formula (τ = 1): pdist, both halves of the B × B matrix plus the diagonal."""
    z = z.reshape(z.shape[0], -1)
    D = torch.pdist(z).pow(2) / z.shape[1]
    D = torch.cat([D, D, torch.zeros(z.shape[0], dtype=z.dtype)])
    return torch.log(torch.exp(-D).mean())


def naive_contrastive(z1, z2, tau):
    z1, z2 = (z.detach().double().reshape(z.shape[0], -1) for z in (z1, z2))
    B, d = z1.shape
    total = 0.0
    for i in range(B):
        logits = [-((z1[i] - z2[j]) ** 2).sum().item() / (d * tau) for j in range(B)]
        m = max(logits)
        total += -logits[i] + m + math.log(sum(math.exp(l - m) for l in logits))
    return total / B


# hinge needs pairs inside the margin: randn features have D ≈ 2, so margin 3 makes every pair active
KW = {"infonce_l2": dict(tau=0.5), "infonce_cos": dict(tau=0.3), "hinge": dict(margin=3.0), "covariance": {}}


# ----------------------------------------------------------------------------- closed forms

def test_two_points_closed_form():
    z = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0]])  # ‖Δ‖² = 9, D = 9 / 3 = 3
    expect = math.log((2 + 2 * math.exp(-3 / 0.5)) / 4)
    assert dispersive_loss(z, "infonce_l2", tau=0.5).item() == pytest.approx(expect, rel=1e-6)
    assert dispersive_loss(z, "hinge", margin=4.0).item() == pytest.approx(1.0, rel=1e-6)  # (4 − 3)²
    assert dispersive_loss(z, "hinge", margin=1.0).item() == 0.0  # outside the margin
    z = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # cos = 1/√2
    expect = math.log((2 * math.exp(1 / 0.5) + 2 * math.exp(2 ** -0.5 / 0.5)) / 4)
    assert dispersive_loss(z, "infonce_cos", tau=0.5).item() == pytest.approx(expect, rel=1e-6)
    # e1, e2 (any scale): centred rows ±(0.5, −0.5), C = [[.5, −.5], [−.5, .5]] / (B − 1 = 1)
    z = torch.tensor([[3.0, 0.0], [0.0, 5.0]])
    assert dispersive_loss(z, "covariance").item() == pytest.approx(0.5, rel=1e-6)


def test_identical_points():
    z = torch.randn(1, 3, 4).repeat(6, 1, 1).requires_grad_(True)
    assert abs(dispersive_loss(z, "infonce_l2").item()) < 1e-6  # log mean exp 0 = 0
    assert dispersive_loss(z, "infonce_cos", tau=0.5).item() == pytest.approx(2.0, rel=1e-5)  # log mean e^{1/τ}
    assert dispersive_loss(z, "hinge", margin=1.5).item() == pytest.approx(2.25, rel=1e-5)  # ε²
    assert abs(dispersive_loss(z, "covariance").item()) < 1e-6
    for v in VARIANTS:  # no NaN from sqrt-like or 0/0 terms
        z.grad = None
        dispersive_loss(z, v).backward()
        assert torch.isfinite(z.grad).all(), v
    zero = torch.zeros(4, 5, requires_grad=True)  # cosine and ℓ2-normalisation of zero rows
    for v in VARIANTS:
        loss = dispersive_loss(zero, v)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(zero.grad).all(), v


def test_far_apart_reaches_minus_log_b():
    B = 7
    z = (1e4 * torch.eye(B)).requires_grad_(True)  # every pair at distance² 2e8
    loss = dispersive_loss(z, "infonce_l2", tau=0.5)
    assert loss.item() == pytest.approx(-math.log(B), rel=1e-6)
    loss.backward()
    assert torch.isfinite(z.grad).all()
    # orthogonal rows: cos = 1 on the diagonal, 0 elsewhere
    expect = math.log((B * math.exp(1 / 0.5) + B * (B - 1)) / B ** 2)
    assert dispersive_loss(z, "infonce_cos", tau=0.5).item() == pytest.approx(expect, rel=1e-6)
    assert dispersive_loss(z, "hinge").item() == 0.0
    z = torch.randn(16, 8) * 1e3  # random distant rows also approach the bound
    assert dispersive_loss(z, "infonce_l2").item() == pytest.approx(-math.log(16), abs=1e-5)


# ----------------------------------------------------------------------------- float64 recomputation

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_naive_reference(variant, shape):
    torch.manual_seed(10 * VARIANTS.index(variant) + SHAPES.index(shape))
    z = torch.randn(shape, dtype=torch.float64)
    kw = KW[variant]
    ref = naive_loss(z, variant, **kw)
    assert dispersive_loss(z, variant, **kw).item() == pytest.approx(ref, rel=1e-10, abs=1e-12)
    out32 = dispersive_loss(z.float(), variant, **kw)
    assert out32.dtype == torch.float32 and out32.dim() == 0
    assert out32.item() == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_large_common_offset_float32():
    # transformer features often share a large offset; ‖a‖² + ‖b‖² − 2a·b would lose every digit of
    # the distances in float32 without centring (‖z‖² ≈ 6e7 vs distances ≈ 128)
    torch.manual_seed(0)
    z = 1000 + torch.randn(8, 64, dtype=torch.float64)
    for v in ("infonce_l2", "hinge"):
        ref = naive_loss(z, v, tau=0.5, margin=3.0)
        assert dispersive_loss(z.float(), v, tau=0.5, margin=3.0).item() == pytest.approx(ref, rel=1e-4)


def test_official_code_equality_tau_1():
    torch.manual_seed(0)
    for shape in [(2, 4, 3), (8, 16, 8), (32, 4, 16)]:
        z = torch.randn(shape)
        for scale in (0.1, 1.0, 3.0):  # from the flat to the saturated regime
            ours = dispersive_loss(scale * z, "infonce_l2", tau=1.0)
            assert ours.item() == pytest.approx(official_loss(scale * z).item(), rel=1e-5, abs=1e-6)
    z = torch.randn(6, 5, dtype=torch.float64)
    assert dispersive_loss(z, tau=1.0).item() == pytest.approx(official_loss(z).item(), rel=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradcheck(variant):
    torch.manual_seed(1)
    z = (0.5 * torch.randn(4, 2, 3, dtype=torch.float64)).requires_grad_(True)  # D ≈ 0.5: hinge active
    assert torch.autograd.gradcheck(lambda x: dispersive_loss(x, variant, tau=0.7, margin=1.0), (z,))


def test_permutation_invariance():
    torch.manual_seed(2)
    z = torch.randn(9, 3, 5, dtype=torch.float64, requires_grad=True)
    perm = torch.randperm(9)
    for v in VARIANTS:
        z.grad = None
        a = dispersive_loss(z, v, **KW[v])
        a.backward()
        g = z.grad.clone()
        zp = z.detach()[perm].requires_grad_(True)
        b = dispersive_loss(zp, v, **KW[v])
        b.backward()
        assert a.item() == pytest.approx(b.item(), rel=1e-12, abs=1e-14), v
        torch.testing.assert_close(zp.grad, g[perm], rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- precision

def test_half_inputs_compute_in_float32():
    torch.manual_seed(3)
    z32 = torch.randn(8, 4, 16)
    zb = z32.bfloat16().requires_grad_(True)
    for v in VARIANTS:
        out = dispersive_loss(zb, v, **KW[v])
        assert out.dtype == torch.float32
        # upcasting bf16 is exact, so the result is that of the float32 copy of the same values
        assert out.item() == dispersive_loss(zb.detach().float(), v, **KW[v]).item()
        assert out.item() == pytest.approx(dispersive_loss(z32, v, **KW[v]).item(), rel=2e-2, abs=1e-3)
        zb.grad = None
        out.backward()
        assert zb.grad.dtype == torch.bfloat16 and torch.isfinite(zb.grad).all()
    # fp16 values whose squared norm (≈ 2.6e6) overflows fp16 (max 65504)
    zh = (200 * torch.randn(4, 64)).half()
    for v in VARIANTS:
        out = dispersive_loss(zh, v, **KW[v])
        ref = naive_loss(zh.double(), v, **KW[v])
        assert torch.isfinite(out) and out.item() == pytest.approx(ref, rel=1e-4, abs=1e-6), v


def test_autocast_cpu_bf16_stays_float32():
    torch.manual_seed(4)
    z = torch.randn(8, 4, 16)
    lin = torch.nn.Linear(16, 16)
    for v in VARIANTS:
        ref = dispersive_loss(z, v, **KW[v])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = dispersive_loss(z, v, **KW[v])
            feats = lin(z)  # bf16 under autocast, as a network's block output would be
            out_feats = dispersive_loss(feats, v, **KW[v])
        assert feats.dtype == torch.bfloat16
        assert out.dtype == torch.float32 and out_feats.dtype == torch.float32
        # a bf16 Gram matrix would be off by ~1e-2 relative
        assert out.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-7), v
        assert out_feats.item() == pytest.approx(dispersive_loss(feats.float(), v, **KW[v]).item(), rel=1e-6), v
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c = contrastive_loss(z, z + 0.1)
    assert c.dtype == torch.float32
    assert c.item() == pytest.approx(contrastive_loss(z, z + 0.1).item(), rel=1e-6)


# ----------------------------------------------------------------------------- capture, on a network not ours

def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Block(nn.Module):
    """A DiT block as in the official models.py (adaLN conditioning), in plain torch."""

    def __init__(self, width, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        h = modulate(self.norm1(x), shift1, scale1)
        x = x + gate1.unsqueeze(1) * self.attn(h, h, h, need_weights=False)[0]
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class TinyDiT(nn.Module):
    """The official DiT models.py layout (x_embedder, t_embedder, y_embedder, blocks, final_layer), timm-free:
    another project's network, with the plain contract model(x, t, y) and no return_features."""

    def __init__(self, size=8, patch=2, channels=4, width=32, depth=4, heads=2, classes=10):
        super().__init__()
        self.patch, self.channels = patch, channels
        self.x_embedder = nn.Conv2d(channels, width, patch, stride=patch)
        self.t_embedder = nn.Sequential(nn.Linear(16, width), nn.SiLU(), nn.Linear(width, width))
        self.y_embedder = nn.Embedding(classes + 1, width)
        self.register_buffer("pos_embed", torch.randn(1, (size // patch) ** 2, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.final_layer = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, patch * patch * channels))

    def embed(self, x, t, y):
        freqs = torch.exp(-math.log(10000) * torch.arange(8, dtype=x.dtype) / 8)
        c = self.t_embedder(torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], 1))
        return self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed, c + self.y_embedder(y)  # (N, T, D)

    def forward(self, x, t, y):
        h, c = self.embed(x, t, y)
        for block in self.blocks:
            h = block(h, c)
        n, side, p = len(x), x.shape[-1] // self.patch, self.patch
        out = self.final_layer(h).reshape(n, side, side, p, p, self.channels)
        return out.permute(0, 5, 1, 3, 2, 4).reshape(x.shape)  # unpatchify: (N, C, H, W)


def tiny_dit(dtype=torch.float32):
    torch.manual_seed(0)  # PyTorch's default init, not adaLN-Zero: every parameter gets a gradient at once
    return TinyDiT().to(dtype)


def dit_batch(dtype=torch.float32, n=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, 8, 8, generator=g, dtype=dtype), torch.rand(n, generator=g, dtype=dtype) * 1000, \
        torch.randint(0, 10, (n,), generator=g)


def block_output_by_hand(model, x, t, y, k):
    """The output of model.blocks[k - 1], computed without any hook."""
    h, c = model.embed(x, t, y)
    for block in model.blocks[:k]:
        h = block(h, c)
    return h


UP_TO_BLOCK_2 = ("x_embedder.", "t_embedder.", "y_embedder.", "blocks.0.", "blocks.1.")


def test_capture_is_the_block_output_and_its_gradient_stops_there():
    model = tiny_dit()
    x, t, y = dit_batch()
    with capture(model, "blocks.1") as feats:  # block 2 of 4 (1-based), as return_features=2 would be
        out = model(x, t, y)
        model(x.flip(0), t, y)  # a second call in the same block: a second entry
    ref = block_output_by_hand(model, x, t, y, 2)
    assert len(feats) == 2 and torch.equal(feats[0], ref) and out.shape == x.shape
    assert torch.equal(feats[1], block_output_by_hand(model, x.flip(0), t, y, 2))
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(dispersive_loss(feats[0]), params, allow_unused=True)
    ref_grads = torch.autograd.grad(dispersive_loss(ref), params, allow_unused=True)
    for name, g, r in zip(names, grads, ref_grads):
        if name.startswith(UP_TO_BLOCK_2):  # everything up to the captured block, and only that
            assert g is not None and g.abs().sum() > 0, name
            torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-9)
        else:
            assert g is None and r is None, name


def test_capture_under_bf16_autocast_cpu():
    model = tiny_dit()
    x, t, y = dit_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with capture(model, "blocks.1") as feats, capture(model, "blocks.1.mlp") as mlp:
            model(x, t, y)
        losses = dispersive_loss(feats[0]), dispersive_loss(mlp[0])
        ref = block_output_by_hand(model, x, t, y, 2)
    # the residual stream stays float32 (pos_embed is), the MLP's output is bf16, as in the official DiT
    assert torch.equal(feats[0], ref) and mlp[0].dtype == torch.bfloat16
    for loss, z in zip(losses, (feats[0], mlp[0])):
        assert loss.dtype == torch.float32
        assert loss.item() == dispersive_loss(z.float()).item()  # float32 from the same values: no bf16 matmul
    assert losses[0].item() == pytest.approx(dispersive_loss(block_output_by_hand(model, x, t, y, 2)).item(), rel=5e-2)
    names, params = zip(*model.named_parameters())
    for name, g in zip(names, torch.autograd.grad(losses[0], params, allow_unused=True)):
        assert (g is not None and torch.isfinite(g).all() and g.abs().sum() > 0) == name.startswith(UP_TO_BLOCK_2), name


def test_capture_removes_its_hook():
    model = tiny_dit()
    x, t, y = dit_batch()
    hooks = lambda: sum(len(m._forward_hooks) for m in model.modules())  # noqa: E731
    with capture(model, "blocks.3") as feats:
        model(x, t, y)
    assert hooks() == 0
    model(x, t, y)
    assert len(feats) == 1  # nothing recorded after the block
    with pytest.raises(KeyError):  # an exception inside the block still removes the hook
        with capture(model, "blocks.3"):
            model(x, t, y)
            raise KeyError("inside")
    assert hooks() == 0
    with pytest.raises(RuntimeError, match="'blocks' did not run in the with block"):  # a ModuleList is not called
        with capture(model, "blocks"):
            model(x, t, y)
    assert hooks() == 0
    with pytest.raises(AttributeError, match="no attribute `9`"):
        with capture(model, "blocks.9"):
            pass


# ----------------------------------------------------------------------------- 2 processes, gloo

def _dist_worker(rank, out_dir):
    dist.init_process_group("gloo")  # env://, as under torchrun
    world = dist.get_world_size()
    torch.manual_seed(0)
    z_global = torch.randn(8, 3, 5, dtype=torch.float64)  # the same on every rank
    local = z_global.chunk(world)[rank]
    res = {}
    for v in VARIANTS:
        z = local.clone().requires_grad_(True)
        loss = dispersive_loss(z, v, gather=True, **KW[v])
        loss.backward()
        res[v] = (loss.detach(), z.grad)
    res["local"] = dispersive_loss(local, gather=False)
    res["bf16"] = dispersive_loss(z_global.float().bfloat16().chunk(world)[rank], gather=True)
    # capture inside DDP's forward: each rank's loss on its own part of the batch, gradients averaged by DDP
    model = tiny_dit(torch.float64)
    ddp = DDP(model)
    x, t, y = (a.chunk(world)[rank] for a in dit_batch(torch.float64))
    with capture(ddp, "module.blocks.1") as feats:
        out = ddp(x, t, y)
    (F.mse_loss(out, x) + 0.5 * dispersive_loss(feats[0])).backward()
    res["ddp_grads"] = [p.grad for p in model.parameters()]
    res["ddp_hooks"] = len(model.blocks[1]._forward_hooks)
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The results of _dist_worker on each rank of one real 2-process gloo group (spawned once for both tests)."""
    out = spawn(_dist_worker, root=tmp_path_factory.mktemp("gloo"))
    return [torch.load(os.path.join(out, f"rank{rank}.pt"), weights_only=True) for rank in range(2)]


def test_gather_two_process_gloo(two_ranks):
    world = len(two_ranks)
    torch.manual_seed(0)
    z_global = torch.randn(8, 3, 5, dtype=torch.float64)
    for rank, res in enumerate(two_ranks):
        for v in VARIANTS:
            z = z_global.clone().requires_grad_(True)
            ref = dispersive_loss(z, v, **KW[v])
            ref.backward()
            loss, grad = res[v]
            assert loss.item() == pytest.approx(ref.item(), rel=1e-12), v
            assert loss.item() == pytest.approx(naive_loss(z_global, v, **KW[v]), rel=1e-10), v
            torch.testing.assert_close(grad, z.grad.chunk(world)[rank], rtol=1e-10, atol=1e-12)
        local = z_global.chunk(world)[rank]
        assert res["local"].item() == pytest.approx(naive_loss(local, "infonce_l2"), rel=1e-10)
        ref_bf16 = dispersive_loss(z_global.float().bfloat16())
        assert res["bf16"].dtype == torch.float32 and res["bf16"].item() == pytest.approx(ref_bf16.item(), rel=1e-6)


def test_capture_inside_ddp_two_process_gloo(two_ranks):
    # reference: one process, each rank's loss on its own part of the batch (per-device dispersive term), averaged
    model = tiny_dit(torch.float64)
    world = len(two_ranks)
    loss = 0
    for x, t, y in zip(*(a.chunk(world) for a in dit_batch(torch.float64))):
        with capture(model, "blocks.1") as feats:
            out = model(x, t, y)
        loss = loss + (F.mse_loss(out, x) + 0.5 * dispersive_loss(feats[0])) / world
    loss.backward()
    for res in two_ranks:
        assert res["ddp_hooks"] == 0
        for (name, p), g in zip(model.named_parameters(), res["ddp_grads"]):
            torch.testing.assert_close(g, p.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_gather_without_process_group_is_local():
    z = torch.randn(5, 6)
    assert dispersive_loss(z, gather=True).item() == dispersive_loss(z).item()


# ----------------------------------------------------------------------------- contrastive baseline

def test_contrastive_matches_naive_reference():
    torch.manual_seed(5)
    for shape in [(2, 3), (5, 3, 4), (8, 16, 8)]:
        z1 = torch.randn(shape, dtype=torch.float64)
        z2 = z1 + 0.5 * torch.randn(shape, dtype=torch.float64)
        for tau in (0.1, 0.5, 1.0):
            ref = naive_contrastive(z1, z2, tau)
            assert contrastive_loss(z1, z2, tau).item() == pytest.approx(ref, rel=1e-10)
            out32 = contrastive_loss(z1.float(), z2.float(), tau)
            assert out32.dtype == torch.float32 and out32.item() == pytest.approx(ref, rel=1e-5, abs=1e-6)
    # positives identical, negatives far away: every anchor classifies its positive with certainty
    z = 1e3 * torch.eye(6)
    assert contrastive_loss(z, z).item() == pytest.approx(0.0, abs=1e-6)
    # permuting the rows of both views together (pairs kept) leaves the loss unchanged
    z1, z2 = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    perm = torch.randperm(5)
    assert contrastive_loss(z1[perm], z2[perm]).item() == pytest.approx(contrastive_loss(z1, z2).item(), rel=1e-12)


def test_contrastive_gradcheck():
    z1 = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: contrastive_loss(a, b, tau=0.5), (z1, z2))


# ----------------------------------------------------------------------------- config

def test_presets():
    cfg = DispersiveConfig.preset("paper", depth=12)
    assert (cfg.variant, cfg.weight, cfg.tau, cfg.block) == ("infonce_l2", 0.5, 0.5, 3)  # block 3 of 12
    assert DispersiveConfig.preset("paper", depth=28).block == 7
    assert DispersiveConfig.preset("paper", depth=2).block == 1
    cfg = DispersiveConfig.preset("official", depth=28)
    assert (cfg.variant, cfg.weight, cfg.tau, cfg.block) == ("infonce_l2", 0.25, 1.0, 28)
    assert cfg.resolve_block(28) == 28
    cfg = DispersiveConfig.preset("paper", depth=12, variant="hinge", margin=2.0)
    assert (cfg.variant, cfg.margin, cfg.block) == ("hinge", 2.0, 3)
    # the defaults are the paper's
    cfg = DispersiveConfig()
    assert (cfg.variant, cfg.weight, cfg.tau, cfg.resolve_block(12)) == ("infonce_l2", 0.5, 0.5, 3)
    assert cfg.enabled


def test_config_loss():
    torch.manual_seed(6)
    z = torch.randn(6, 4, 3)
    for v in VARIANTS:
        cfg = DispersiveConfig(variant=v, tau=0.3, margin=3.0)
        assert cfg.loss(z).item() == dispersive_loss(z, v, tau=0.3, margin=3.0).item()
    assert DispersiveConfig.preset("official", 12).loss(z).item() == pytest.approx(official_loss(z).item(), rel=1e-5)
    off = DispersiveConfig(variant="none")
    assert not off.enabled
    out = off.loss(z)
    assert out.item() == 0.0 and out.dtype == torch.float32


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("call, match", [
    (lambda: dispersive_loss(torch.randn(5)), r"z must be a float tensor of B >= 2 rows of features, got .* \(5,\)"),
    (lambda: dispersive_loss(torch.randn(1, 4)), r"B >= 2 rows .* \(1, 4\)"),
    (lambda: dispersive_loss(torch.randn(4, 0)), r"rows of features, got torch.float32 \(4, 0\)"),
    (lambda: dispersive_loss(torch.ones(4, 3, dtype=torch.long)), "float tensor .* got torch.int64"),
    (lambda: dispersive_loss(torch.randn(4, 3), "l2"), "unknown dispersive variant"),
    (lambda: dispersive_loss(torch.randn(4, 3), tau=0.0), "tau must be > 0"),
    (lambda: dispersive_loss(torch.randn(4, 3), tau=-1.0), "tau must be > 0"),
    (lambda: dispersive_loss(torch.randn(4, 3), "hinge", margin=-1.0), "margin"),
    (lambda: contrastive_loss(torch.randn(4, 3), torch.randn(5, 3)), "same shape"),
    (lambda: contrastive_loss(torch.randn(4, 3), torch.randn(4, 2)), "same shape"),
    (lambda: contrastive_loss(torch.randn(1, 3), torch.randn(1, 3)), "z1 must be a float tensor of B >= 2 rows"),
    (lambda: contrastive_loss(torch.randn(4, 3), torch.randn(4, 3), tau=0), "tau must be > 0"),
    (lambda: DispersiveConfig(variant="cos"), "unknown dispersive variant"),
    (lambda: DispersiveConfig(tau=0), "tau must be > 0"),
    (lambda: DispersiveConfig.preset("jax", 12), "unknown dispersive preset"),
    (lambda: DispersiveConfig.preset("paper", 12, variant="bad"), "unknown dispersive variant"),
    (lambda: DispersiveConfig(block=0).resolve_block(12), "1..12"),
    (lambda: DispersiveConfig(block=13).resolve_block(12), "1..12"),
    (lambda: DispersiveConfig(block=5).resolve_block(3), "1..3"),
])
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
