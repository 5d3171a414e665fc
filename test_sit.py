"""Tests of sit.py: golden parity with the official SiT network, the released checkpoint layout, the training
objective against a hand recomputation, and the samplers against the closed-form flow of Gaussian data.
Run: python -m pytest -q test_sit.py"""

import math
import os
import re
from unittest import mock

import pytest
import torch

import dit
from dit import DiT
from sit import SAMPLERS, SiT, SiT_models, Transport, load_checkpoint, sample
from test_support import one_thread  # noqa: F401  (autouse: one intra-op thread in this module)

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = torch.load(os.path.join(HERE, "testdata", "sit_golden.pt"), weights_only=True)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()



def tiny_sit():
    model = SiT(**GOLDEN["config"])
    model.load_state_dict(GOLDEN["state_dict"])
    return model.eval()


# ----------------------------------------------------------------------------- Gaussian data: closed forms
# x1 ~ N(μ, diag s²), x0 ~ N(0, I), x_t = α x1 + σ x0 is Gaussian, so the optimal velocity
# E[α̇ x1 + σ̇ x0 | x_t] is affine: v*(x, t) = α̇ μ + (α̇ α s² + σ̇ σ) / (α² s² + σ²) · (x − α μ), and its flow
# maps z to α μ + sqrt(α² s² + σ²) z, i.e. noise z to data μ + s z at t = 1.

MU = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64).view(1, 4, 1, 1)
STD = torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=torch.float64).view(1, 4, 1, 1)


def path_coefficients(path, t):
    """(α, σ, α̇, σ̇) written out independently of sit.py (VP: the official β from 0.1 to 20)."""
    if path == "linear":
        return t, 1 - t, torch.ones_like(t), -torch.ones_like(t)
    if path == "gvp":
        return (torch.sin(math.pi * t / 2), torch.cos(math.pi * t / 2),
                math.pi / 2 * torch.cos(math.pi * t / 2), -math.pi / 2 * torch.sin(math.pi * t / 2))
    log_a = -0.25 * (1 - t) ** 2 * 19.9 - 0.5 * (1 - t) * 0.1
    a = torch.exp(log_a)
    da = a * (0.5 * (1 - t) * 19.9 + 0.05)
    sig = torch.sqrt(1 - a ** 2)
    return a, sig, da, -a * da / sig


def optimal_velocity(path):
    def v(x, t, y=None):
        t = t.double().view(-1, 1, 1, 1)
        t = t[:1] if (t == t[0]).all() else t  # a shared t: coefficients once (cheap on a busy CPU)
        a, sig, da, ds = path_coefficients(path, t)
        return da * MU + (da * a * STD ** 2 + ds * sig) / (a ** 2 * STD ** 2 + sig ** 2) * (x - a * MU)
    return v


def gaussian_score(path, x, t):
    a, sig, _, _ = path_coefficients(path, t.double().view(-1, 1, 1, 1))
    return -(x - a * MU) / (a ** 2 * STD ** 2 + sig ** 2)


def noise(n, seed=0):
    return torch.randn(n, 4, 1, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class Counter:
    """Wraps a callable; records (t, batch size, labels) of every call. num_classes: the null label for CFG."""

    def __init__(self, fn, num_classes=None):
        self.fn, self.calls, self.num_classes = fn, [], num_classes

    def __call__(self, x, t, y):
        self.calls.append((t[0].item(), x.shape[0], None if y is None else y.clone()))
        return self.fn(x, t, y)


# ----------------------------------------------------------------------------- network and checkpoints

def test_golden_parity():
    model = tiny_sit()
    with torch.no_grad():
        out = model(GOLDEN["x"], GOLDEN["t"], GOLDEN["y"])
        out_cfg = model.forward_with_cfg(GOLDEN["x_cfg"], GOLDEN["t_cfg"], GOLDEN["y_cfg"], GOLDEN["cfg_scale"],
                                         guide_channels=3)
        # the same weights in DiT: SiT's output is exactly the first half of DiT's channels
        dit = DiT(**GOLDEN["config"]).eval()
        dit.load_state_dict(GOLDEN["state_dict"])
        dit_out = dit(GOLDEN["x"], GOLDEN["t"], GOLDEN["y"])
    assert out.shape == GOLDEN["out"].shape == (6, 4, 8, 8)
    assert rel(out, GOLDEN["out"]) <= 1e-5
    assert rel(out_cfg, GOLDEN["out_cfg"]) <= 1e-5
    assert torch.equal(out, dit_out[:, :4])
    assert torch.equal(SiT(**GOLDEN["config"]).pos_embed, GOLDEN["fresh_pos_embed"])


def test_return_features_same_pass():
    model = tiny_sit()
    x, t, y = GOLDEN["x"], GOLDEN["t"], GOLDEN["y"]
    with torch.no_grad():
        plain = model(x, t, y)
        for k in (1, 3):
            out, feats = model(x, t, y, return_features=k)
            # the block output recomputed by hand from the network's parts
            c = model.t_embedder(t) + model.y_embedder(y, False)
            h = model.x_embedder(x) + model.pos_embed
            for block in model.blocks[:k]:
                h = block(h, c)
            assert torch.equal(out, plain)
            assert feats.shape == (6, 16, 96)
            assert torch.allclose(feats, h, rtol=0, atol=1e-6)


def test_registry():
    assert list(SiT_models) == [f"SiT-{s}/{p}" for s in ("XL", "L", "B", "S", "T") for p in (2, 4, 8)]
    assert load_checkpoint is dit.load_checkpoint
    with torch.device("meta"), mock.patch("torch.nn.init.normal_", lambda t, *a, **k: t), \
            mock.patch.object(SiT, "initialize_weights", lambda self: None):
        m = SiT_models["SiT-B/4"](input_size=32)
        tiny = SiT_models["SiT-T/2"](input_size=32)
    assert (m.depth, m.hidden_size, m.num_heads, m.patch_size, m.out_channels) == (12, 768, 12, 4, 8)
    assert (tiny.depth, tiny.hidden_size, tiny.num_heads, tiny.patch_size) == (*dit.SIZES["T"], 2)


def test_released_xl2_layout_loads_strictly():
    # The released SiT-XL-2-256x256.pt has DiT-XL/2's layout. Built on the meta device: no memory; init is
    # skipped because meta-tensor normal_/arange import torch's compiler stack (seconds) and values are irrelevant.
    rows = [line.rstrip("\n").split("\t") for line in open(os.path.join(HERE, "testdata", "dit_xl2_256_manifest.tsv"))]
    sd = {k: torch.empty([int(s) for s in shape.split(",")] if shape else [], device="meta") for k, shape in rows}
    with torch.device("meta"), mock.patch("torch.nn.init.normal_", lambda t, *a, **k: t), \
            mock.patch.object(SiT, "initialize_weights", lambda self: None):
        model = SiT_models["SiT-XL/2"](input_size=32)
        no_sigma = SiT_models["SiT-XL/2"](input_size=32, learn_sigma=False)
    assert list(model.state_dict()) == [k for k, _ in rows]
    assert sum(v.numel() for v in model.state_dict().values()) == 675_129_632
    load_checkpoint(model, sd)
    load_checkpoint(model, {"ema": {"module." + k: v for k, v in sd.items()}, "step": 0})
    with pytest.raises(ValueError, match="final_layer.linear"):
        load_checkpoint(no_sigma, sd)


# ----------------------------------------------------------------------------- training objective

@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_training_losses_hand_recomputation(path):
    model = tiny_sit()
    g = torch.Generator().manual_seed(1)
    x1, x0 = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    t, y = torch.tensor([0.0, 0.1, 0.5, 0.93, 1.0]), torch.tensor([0, 3, 9, 10, 2])
    terms = Transport(path=path).training_losses(model, x1, y, t=t, x0=x0)
    # by hand, float64 where it does not touch the network
    a, sig, da, ds = path_coefficients(path, t.double().view(-1, 1, 1, 1))
    xt = a * x1.double() + sig * x0.double()
    target = da * x1.double() + ds * x0.double()
    if path == "linear":
        assert torch.allclose(target, (x1 - x0).double())
    with torch.no_grad():
        out = model(xt.float(), t, y).double()
    expected = ((out - target) ** 2).mean(dim=(1, 2, 3))
    assert terms["feats"] is None and terms["loss"].shape == (5,)
    assert torch.allclose(terms["loss"].double(), expected, rtol=1e-5, atol=0)


def test_training_losses_features_and_rng():
    model = tiny_sit()
    x1, y = GOLDEN["x"], GOLDEN["y"]
    tr = Transport()
    torch.manual_seed(3)
    a = tr.training_losses(model, x1, y, return_features=2)
    torch.manual_seed(3)
    b = tr.training_losses(model, x1, y)
    torch.manual_seed(3)
    x0 = torch.randn_like(x1)  # draws in the official order: noise, then t
    t = torch.rand(x1.shape[0])
    with torch.no_grad():
        feats = model((t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * x0), t, y, return_features=2)[1]
    assert torch.equal(a["loss"], b["loss"])
    assert torch.allclose(a["feats"], feats, atol=1e-6, rtol=0)
    c = tr.training_losses(model, x1, y)
    assert not torch.equal(c["loss"], b["loss"])  # a fresh draw of t and noise


def test_training_losses_rejects_learned_sigma_output():
    dit = DiT(**GOLDEN["config"]).eval()  # 8 output channels for 4 input channels
    with pytest.raises(ValueError, match="SiT"):
        Transport().training_losses(dit, GOLDEN["x"], GOLDEN["y"])


# ----------------------------------------------------------------------------- closed forms used below

@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_optimal_velocity_is_conditional_expectation(path):
    # Monte-Carlo check of the test's own reference: least-squares regression of the target α̇x1 + σ̇x0 on x_t
    g = torch.Generator().manual_seed(0)
    n = 100_000
    x1 = MU + STD * torch.randn(n, 4, 1, 1, generator=g, dtype=torch.float64)
    x0 = torch.randn(n, 4, 1, 1, generator=g, dtype=torch.float64)
    for tv in (0.3, 0.8):
        t = torch.full((n,), tv, dtype=torch.float64)
        a, sig, da, ds = path_coefficients(path, t.view(-1, 1, 1, 1))
        xt, u = a * x1 + sig * x0, da * x1 + ds * x0
        xc, uc = xt - xt.mean(0), u - u.mean(0)
        slope = (xc * uc).mean(0) / (xc * xc).mean(0)
        intercept = u.mean(0) - slope * xt.mean(0)
        v = optimal_velocity(path)
        ref_intercept = v(torch.zeros(1, 4, 1, 1, dtype=torch.float64), t[:1])
        ref_slope = v(torch.ones(1, 4, 1, 1, dtype=torch.float64), t[:1]) - ref_intercept
        assert torch.allclose(slope, ref_slope[0], atol=0.02)
        assert torch.allclose(intercept, ref_intercept[0], atol=0.02)


@pytest.mark.parametrize("path", ["linear", "gvp", "vp"])
def test_score_from_velocity(path):
    # On Gaussian data the score is known; the transport must turn the optimal velocity into it.
    tr = Transport(path=path)
    x = noise(64) * 2 + 0.3
    for tv in (0.05, 0.4, 0.9):
        t = torch.full((64,), tv, dtype=torch.float64)
        s = tr.score(optimal_velocity(path)(x, t), x, t)
        assert torch.allclose(s, gaussian_score(path, x, t), rtol=1e-10, atol=1e-10)
        if path == "linear":  # s = (t·v − x) / (1 − t)
            v = optimal_velocity(path)(x, t)
            assert torch.allclose(s, (tv * v - x) / (1 - tv), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- ODE samplers vs the exact flow

@pytest.mark.parametrize("path,sampler,steps,tol", [
    ("linear", "ode-heun", 50, 2e-3),
    ("gvp", "ode-heun", 50, 3e-3),
    ("linear", "ode-heun", 100, 5e-4),
    ("linear", "ode-euler", 100, 0.12),
    ("gvp", "ode-euler", 100, 0.05),
])
def test_fixed_step_ode_follows_exact_flow(path, sampler, steps, tol):
    z = noise(2000)
    x = sample(optimal_velocity(path), z, None, sampler=sampler, num_steps=steps, path=path)
    assert (x - (MU + STD * z)).abs().max().item() < tol


@pytest.mark.parametrize("sampler,order", [("ode-euler", 1), ("ode-heun", 2)])
def test_fixed_step_ode_convergence_order(sampler, order):
    z = noise(500)
    errs = [(sample(optimal_velocity("linear"), z, None, sampler=sampler, num_steps=n) - (MU + STD * z)).abs().max()
            for n in (40, 80)]
    assert 0.85 * 2 ** order < (errs[0] / errs[1]).item() < 1.15 * 2 ** order


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_dopri5_follows_exact_flow_within_tolerance(path):
    z = noise(2000)
    exact = MU + STD * z
    x = sample(optimal_velocity(path), z, None, sampler="dopri5", path=path)  # official atol 1e-6, rtol 1e-3
    assert (x - exact).abs().max().item() < 2e-2
    for rtol in (1e-5, 1e-7):
        x, nfe = sample(optimal_velocity(path), z, None, sampler="dopri5", atol=rtol * 1e-3, rtol=rtol, path=path,
                        return_nfe=True)
        assert (x - exact).abs().max().item() < 10 * rtol
    assert nfe < 400  # adaptive: far fewer calls than a fixed grid of this accuracy


def test_vp_path_ode_ends_at_one_minus_sample_eps():
    # VP starts at α_0 ≈ 0.0066 (not pure noise) and stops at t1 = 1 − 1e-3 (official sample_eps): the exact
    # flow standardises x_0 under p_0 and maps it to p_{t1}
    z = noise(500)
    t_ends = torch.tensor([0.0, 1 - 1e-3], dtype=torch.float64)
    a, sig, _, _ = path_coefficients("vp", t_ends.view(-1, 1, 1, 1))
    sd = (a ** 2 * STD ** 2 + sig ** 2).sqrt()
    exact = a[1] * MU + sd[1] * (z - a[0] * MU) / sd[0]
    x = sample(optimal_velocity("vp"), z, None, sampler="dopri5", atol=1e-9, rtol=1e-7, path="vp")
    assert (x - exact).abs().max().item() < 1e-5


def test_moments_of_ode_samples():
    z = noise(4000)
    x = sample(optimal_velocity("linear"), z, None, sampler="ode-heun", num_steps=50)
    n = z.shape[0]
    assert ((x.mean((0, 2, 3)) - MU.flatten()).abs() < 4 * STD.flatten() / math.sqrt(n)).all()
    assert ((x.std((0, 2, 3)) / STD.flatten() - 1).abs() < 4 / math.sqrt(2 * n)).all()


# ----------------------------------------------------------------------------- SDE samplers

def hand_sde(v, z, num_steps, seed, heun=False):
    """The official SDE sampler written out for the linear path: grid linspace(0, 0.96, n), w = σ = 1 − t,
    drift v + w·(t·v − x)/(1 − t), noise sqrt(2·w·dt), then x + 0.04·drift at t = 0.96."""
    g = torch.Generator().manual_seed(seed)
    ts = torch.linspace(0, 0.96, num_steps, dtype=torch.float64)
    dt = (ts[1] - ts[0]).item()
    def drift(x, t):
        vx = v(x, torch.full((x.shape[0],), t, dtype=torch.float64))
        return vx + (1 - t) * (t * vx - x) / (1 - t)
    x = z
    for t in ts[:-1].tolist():
        eps = torch.randn(z.shape, generator=g, dtype=torch.float64)
        if heun:
            xhat = x + math.sqrt(2 * (1 - t) * dt) * eps
            k1 = drift(xhat, t)
            k2 = drift(xhat + dt * k1, t + dt)
            x = xhat + 0.5 * dt * (k1 + k2)
        else:
            x = x + drift(x, t) * dt + math.sqrt(2 * (1 - t) * dt) * eps
    return x + 0.04 * drift(x, 0.96)


@pytest.mark.parametrize("sampler", ["sde", "sde-heun"])
def test_sde_matches_hand_recomputation(sampler):
    z, v = noise(16), optimal_velocity("linear")
    x = sample(v, z, None, sampler=sampler, num_steps=4, generator=torch.Generator().manual_seed(7))
    ref = hand_sde(v, z, 4, seed=7, heun=sampler == "sde-heun")
    assert torch.allclose(x, ref, rtol=1e-12, atol=1e-12)


def sde_final_moments(path, t1=0.96, h=0.04):
    """x_{t1} ~ N(α μ, α² s² + σ²) exactly; the last "Mean" step x + h·(v* + σ·score) is affine in x."""
    a, sig, da, ds = (c.item() for c in path_coefficients(path, torch.tensor(t1, dtype=torch.float64)))
    var = a ** 2 * STD ** 2 + sig ** 2
    slope = 1 + h * ((da * a * STD ** 2 + ds * sig) / var - sig / var)
    return (a * MU + h * da * MU).flatten(), (slope.abs() * var.sqrt()).flatten()


@pytest.mark.parametrize("path,sampler,steps", [("linear", "sde", 250), ("gvp", "sde", 250),
                                                ("linear", "sde-heun", 100)])
def test_sde_samples_have_the_data_distribution(path, sampler, steps):
    n = 4000
    z = noise(n, seed=1)
    x = sample(optimal_velocity(path), z, None, sampler=sampler, num_steps=steps, path=path,
               generator=torch.Generator().manual_seed(2))
    mean, std = sde_final_moments(path)
    assert ((x.mean((0, 2, 3)) - mean).abs() < 4.5 * std / math.sqrt(n)).all()
    assert ((x.std((0, 2, 3)) / std - 1).abs() < 4.5 / math.sqrt(2 * n) + 0.01).all()  # + EM discretisation
    # the samples are not the deterministic flow of z: the SDE injected fresh noise
    assert (x - (MU + STD * z)).abs().mean().item() > 0.1


def test_sde_time_grid_is_official():
    calls = Counter(optimal_velocity("linear"))
    sample(calls, noise(2), None, sampler="sde", num_steps=250)
    ts = torch.tensor([c[0] for c in calls.calls], dtype=torch.float64)
    official = torch.cat([torch.linspace(0, 0.96, 250)[:-1].double(), torch.tensor([0.96], dtype=torch.float64)])
    assert torch.allclose(ts, official, atol=1e-6, rtol=0)


def test_sde_reproducible_with_seed():
    v, z = optimal_velocity("linear"), noise(8)
    run = lambda seed: sample(v, z, None, sampler="sde", num_steps=20, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1))
    torch.manual_seed(5)
    a = sample(v, z, None, sampler="sde", num_steps=20)
    torch.manual_seed(5)
    assert torch.equal(a, sample(v, z, None, sampler="sde", num_steps=20))


# ----------------------------------------------------------------------------- NFE and CFG

@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
@pytest.mark.parametrize("sampler,stated", [
    ("ode-euler", lambda n: n), ("ode-heun", lambda n: 2 * n), ("sde", lambda n: n),
    ("sde-heun", lambda n: 2 * n - 1), ("dopri5", None),
])
def test_nfe_equals_docstring(sampler, stated, cfg_scale):
    calls = Counter(lambda x, t, y: optimal_velocity("linear")(x, t) + 0.01 * y.view(-1, 1, 1, 1), num_classes=9)
    y = torch.tensor([0, 1, 2])
    x, nfe = sample(calls, noise(3), y, sampler=sampler, num_steps=7, cfg_scale=cfg_scale,
                    return_nfe=True, generator=torch.Generator().manual_seed(0))
    assert nfe == len(calls.calls)
    if stated is None:
        assert nfe >= 8 and (nfe - 2) % 6 == 0  # 2 + 6 per attempted step
    else:
        assert nfe == stated(7)
    # one batched call per evaluation; the null half appears only when guiding
    assert all(b == (6 if cfg_scale != 1 else 3) for _, b, _ in calls.calls)
    assert all((labels == 9).any().item() == (cfg_scale != 1) for _, _, labels in calls.calls)


def test_cfg_scale_one_equals_no_guidance():
    model, y = tiny_sit(), torch.tensor([1, 2, 3])
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = sample(model, z, y, sampler="ode-euler", num_steps=3)
    assert torch.equal(sample(model, z, y, sampler="ode-euler", num_steps=3, cfg_scale=1.0), plain)
    assert not torch.allclose(sample(model, z, y, sampler="ode-euler", num_steps=3, cfg_scale=3.0), plain)


@pytest.mark.parametrize("guide_channels", [None, 3])
def test_cfg_matches_forward_with_cfg(guide_channels):
    # one Euler step from t = 0 is z + v(z, 0): the sampler's guidance must equal the golden-verified batched one
    model = tiny_sit()
    z, y = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2, 3])
    x = sample(model, z, y, sampler="ode-euler", num_steps=1, cfg_scale=4.0, guide_channels=guide_channels)
    with torch.no_grad():
        v = model.forward_with_cfg(torch.cat([z, z]), torch.zeros(6), torch.cat([y, torch.full_like(y, 10)]), 4.0,
                                   guide_channels=guide_channels)[:3]
    assert torch.allclose(x, z + v, atol=1e-6, rtol=0)


def test_guidance_interval():
    def model(x, t, y):  # conditional and unconditional predictions differ, depend on x and t
        return 0.3 * x + (y.double() + 1).view(-1, 1, 1, 1) * (1 + t.view(-1, 1, 1, 1))
    calls = Counter(model, num_classes=7)
    z, y, scale, lo, hi = noise(4), torch.tensor([0, 1, 2, 3]), 2.5, 0.25, 0.6
    x = sample(calls, z, y, sampler="ode-euler", num_steps=10, cfg_scale=scale, guidance_interval=(lo, hi))
    ref = z
    for i in range(10):
        t = torch.full((4,), i / 10, dtype=torch.float64)
        cond = model(ref, t, y)
        if lo <= i / 10 <= hi:
            uncond = model(ref, t, torch.full_like(y, 7))
            cond = uncond + scale * (cond - uncond)
        ref = ref + 0.1 * cond
    assert torch.allclose(x, ref, rtol=1e-12, atol=1e-12)
    guided = [t for t, b, _ in calls.calls if b == 8]
    assert guided == pytest.approx([0.3, 0.4, 0.5, 0.6])


def test_plain_callable_cfg_needs_null_class():
    with pytest.raises(ValueError, match="null-class label"):
        sample(lambda x, t, y: x, noise(2), torch.tensor([0, 1]), sampler="ode-euler", num_steps=2, cfg_scale=2.0)
    with pytest.raises(ValueError, match="sampler"):
        sample(lambda x, t, y: x, noise(2), None, sampler="euler")
    with pytest.raises(ValueError, match="path"):
        sample(lambda x, t, y: x, noise(2), None, path="cosine")
    for sampler, least in (("sde", 2), ("ode-euler", 1)):
        with pytest.raises(ValueError, match=f"at least {least}"):
            sample(lambda x, t, y: x, noise(2), None, sampler=sampler, num_steps=least - 1)
    assert set(SAMPLERS) == {"sde", "sde-heun", "ode-euler", "ode-heun", "dopri5"}


def test_generator_forms_give_the_same_noise_in_dit_and_sit():
    """generator= is one argument in every stochastic sampler: an int seed, a torch.Generator with that seed, and a
    callable noise(x) drawing from it give the same samples; in dit.sample as in sit.sample."""
    v, z = optimal_velocity("linear"), noise(8)
    eps = lambda x, t, y: 0.1 * x  # noqa: E731  (an eps model for dit.sample)
    y = torch.zeros(8, dtype=torch.long)
    for run in (lambda g: sample(v, z, None, sampler="sde", num_steps=10, generator=g),
                lambda g: sample(v, z, None, sampler="sde-heun", num_steps=5, generator=g),
                lambda g: dit.sample(eps, z, y, num_steps=10, generator=g)):
        a = run(3)
        assert torch.equal(a, run(torch.Generator().manual_seed(3)))
        g = torch.Generator().manual_seed(3)
        assert torch.equal(a, run(lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype)))
        assert not torch.equal(a, run(4))


def test_progress_reports_steps_and_nfe(capsys):
    sample(optimal_velocity("linear"), noise(2), None, sampler="ode-heun", num_steps=3, progress=True)
    assert re.fullmatch(r"ode-heun 3/3 \| [0-9.]+/s \| eta 0:00:00 \| nfe 6\n", capsys.readouterr().err)
    sample(optimal_velocity("linear"), noise(2), None, sampler="dopri5", progress=True)
    assert re.fullmatch(r"dopri5 \d+ \| [0-9.]+/s \| nfe \d+\n", capsys.readouterr().err)
