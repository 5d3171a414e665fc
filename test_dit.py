"""Tests of dit.py: network and diffusion against the official implementation's outputs (testdata/, made by
facebookresearch/DiT with random weights), checkpoint layout of the released DiT-XL/2, closed-form parameter
counts, and the samplers against the exact reverse process of Gaussian data."""

import math
import os
import warnings

import numpy as np
import pytest
import torch

import dit
from dit import (DiT, DiT_models, LabelEmbedder, classifier_free_guidance, create_diffusion, load_checkpoint,
                 sample, space_timesteps, timestep_embedding)

TESTDATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata")


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def assert_close(a, b, rtol=1e-6, atol=1e-6):
    # torch.testing.assert_close would import torch.distributed on first use (seconds on a busy machine)
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    assert torch.allclose(a, b, rtol=rtol, atol=atol), f"max abs difference {(a - b).abs().max().item():.3g}"


def golden(name):
    return torch.load(os.path.join(TESTDATA, name), weights_only=True)


def official_model(g, **overrides):
    model = DiT(**{**g["config"], **overrides})
    model.load_state_dict(g["state_dict"], strict=True)
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the tensors here are tiny: on a busy machine, waking a second intra-op thread per op costs more than it saves
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def net_golden():
    return golden("dit_golden.pt")


@pytest.fixture(scope="module")
def diff_golden():
    return golden("dit_diffusion_golden.pt")


# ---------------------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------------------

def test_network_matches_official(net_golden):
    g = net_golden
    torch.manual_seed(0)
    assert rel(DiT(**g["config"]).pos_embed, g["fresh_pos_embed"]) <= 1e-5
    assert rel(timestep_embedding(g["t"], 256), g["t_freq"]) <= 1e-5
    model = official_model(g)
    with torch.no_grad():
        assert rel(model(g["x"], g["t"], g["y"]), g["out"]) <= 1e-5
        out_cfg = model.forward_with_cfg(g["x_cfg"], g["t_cfg"], g["y_cfg"], g["cfg_scale"], guide_channels=3)
    assert rel(out_cfg, g["out_cfg"]) <= 1e-5


def test_forward_with_cfg_all_channels(net_golden):
    g = net_golden
    model = official_model(g)
    x, t, y, s = g["x_cfg"], g["t_cfg"], g["y_cfg"], 2.5
    n = len(x) // 2
    with torch.no_grad():
        got = model.forward_with_cfg(x, t, y, s, guide_channels=None)
        out = model(torch.cat([x[:n], x[:n]]), t, y)                          # second half of x is ignored
    cond, uncond = out[:n], out[n:]
    eps = uncond[:, :4] + s * (cond[:, :4] - uncond[:, :4])
    want = torch.cat([torch.cat([eps, cond[:, 4:]], 1), torch.cat([eps, uncond[:, 4:]], 1)])
    assert_close(got, want, rtol=1e-6, atol=1e-6)
    # the official variant differs exactly in the unguided 4th channel
    with torch.no_grad():
        off = model.forward_with_cfg(x, t, y, s, guide_channels=3)
    assert_close(off[:, :3], got[:, :3], rtol=1e-6, atol=1e-6)
    assert_close(off[:n, 3], cond[:, 3], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(off[:, 3], got[:, 3], atol=1e-4)


def test_return_features_is_the_block_output(net_golden):
    g = net_golden
    model = official_model(g)
    x, t, y = g["x"], g["t"], g["y"]
    with torch.no_grad():
        out = model(x, t, y)
        c = model.t_embedder(t) + model.y_embedder(y, False)
        h = model.x_embedder(x) + model.pos_embed
        for k in range(1, model.depth + 1):
            h = model.blocks[k - 1](h, c)                                          # manual block loop
            out_k, feats = model(x, t, y, return_features=k)
            assert feats.shape == (len(x), model.x_embedder.num_patches, model.hidden_size)
            assert_close(feats, h, rtol=1e-6, atol=1e-6)
            assert torch.equal(out_k, out)
    for k in (0, model.depth + 1):
        with pytest.raises(ValueError, match="out of range"):
            model(x, t, y, return_features=k)


def test_label_dropout_only_in_train_mode(net_golden):
    torch.manual_seed(0)
    emb = LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=1.0)
    y = torch.arange(10).repeat(3)
    table = emb.embedding_table.weight
    assert torch.equal(emb(y, train=False), table[y])                           # eval: never the null row
    assert torch.equal(emb(y, train=True), table[10].expand(len(y), -1))       # dropout 1.0: all null
    # through the whole network: train mode with dropout 1.0 == eval mode with the null label
    g = net_golden
    model = official_model(g, class_dropout_prob=1.0)
    x, t, y = g["x"], g["t"], g["y"]
    with torch.no_grad():
        eval_out = model(x, t, y)
        null_out = model(x, t, torch.full_like(y, model.num_classes))
        train_out = model.train()(x, t, y)
    assert_close(train_out, null_out, rtol=0, atol=0)
    assert not torch.allclose(eval_out, null_out, atol=1e-4)
    assert_close(eval_out, official_model(g)(x, t, y).detach(), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints and parameter counts (DiT-XL/2 is built once, on the meta device: no memory)
# ---------------------------------------------------------------------------------------------------------

def read_manifest():
    rows = []
    with open(os.path.join(TESTDATA, "dit_xl2_256_manifest.tsv")) as f:
        for line in f:
            key, shape = line.rstrip("\n").split("\t")
            rows.append((key, tuple(int(s) for s in shape.split(",")) if shape else ()))
    return rows


def manifest_state_dict():
    # random values broadcast to the released shapes: real tensors without 2.7 GB of memory
    return {k: torch.randn(()).expand(shape) for k, shape in read_manifest()}


@pytest.fixture(scope="module")
def xl2_meta():
    with torch.device("meta"):
        return DiT_models["DiT-XL/2"](input_size=32)


def meta_load(model, state):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*meta parameter.*no-op")
        return load_checkpoint(model, state)


def dit_param_count(depth, hidden, patch, input_size=32, in_channels=4, num_classes=1000, learn_sigma=True):
    """Closed form: patch conv + t-MLP + label table (+ null row) + pos_embed + blocks + final layer."""
    D, p, C = hidden, patch, in_channels
    c_out = 2 * C if learn_sigma else C
    tokens = (input_size // p) ** 2
    embed = (C * p * p * D + D) + (256 * D + D + D * D + D) + (num_classes + 1) * D + tokens * D
    block = (3 * D * D + 3 * D) + (D * D + D) + (4 * D * D + 4 * D) + (4 * D * D + D) + (6 * D * D + 6 * D)
    final = (2 * D * D + 2 * D) + (D * p * p * c_out + p * p * c_out)
    return embed + depth * block + final


def test_xl2_layout_and_parameter_count(xl2_meta):
    manifest = read_manifest()
    assert [(k, tuple(v.shape)) for k, v in xl2_meta.state_dict().items()] == manifest
    n = sum(p.numel() for p in xl2_meta.parameters())
    assert n == 675_129_632 == sum(math.prod(s) for _, s in manifest)
    assert dit_param_count(28, 1152, 2) == 675_129_632


def test_registry_parameter_counts(xl2_meta):
    sizes = {"XL": (28, 1152), "L": (24, 1024), "B": (12, 768), "S": (12, 384)}
    for name, build in DiT_models.items():
        if name == "DiT-XL/2":
            model = xl2_meta
        else:
            with torch.device("meta"):
                model = build(input_size=32)
        size, patch = name[len("DiT-"):].split("/")
        depth, hidden = sizes[size]
        assert sum(p.numel() for p in model.parameters()) == dit_param_count(depth, hidden, int(patch)), name


def test_xl2_checkpoint_loads_strictly(xl2_meta):
    sd = manifest_state_dict()
    meta_load(xl2_meta, sd)                                                    # released raw state dict
    ckpt = {"model": {"module." + k: v for k, v in sd.items()}, "ema": {"module." + k: v for k, v in sd.items()},
            "step": 7}
    meta_load(xl2_meta, ckpt)                                                  # our training checkpoint
    # the 256 checkpoint into a 512 model, and into another size: one clear sentence naming both
    with torch.device("meta"):
        xl2_512 = DiT_models["DiT-XL/2"](input_size=64)
        l2 = DiT_models["DiT-L/2"](input_size=32)
    with pytest.raises(ValueError, match=r"XL/2 at 256x256.*XL/2 at 512x512.*--image-size"):
        meta_load(xl2_512, sd)
    with pytest.raises(ValueError, match=r"holds XL/2 at 256x256 .* model is L/2 at 256x256"):
        meta_load(l2, sd)


def test_load_checkpoint_values_and_prefixes(net_golden, tmp_path):
    g = net_golden
    sd = g["state_dict"]
    other = {k: torch.zeros_like(v) for k, v in sd.items()}
    ckpt = {"model": {"module." + k: v for k, v in other.items()},
            "ema": {"module._orig_mod." + k: v for k, v in sd.items()}, "step": 3}
    model = load_checkpoint(DiT(**g["config"]), ckpt)                          # ema preferred
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    model = load_checkpoint(DiT(**g["config"]), ckpt, prefer="model")
    assert all(torch.equal(v, other[k]) for k, v in model.state_dict().items())
    path = tmp_path / "raw.pt"
    torch.save(sd, path)
    model = load_checkpoint(DiT(**g["config"]), str(path)).eval()
    with torch.no_grad():
        assert rel(model(g["x"], g["t"], g["y"]), g["out"]) <= 1e-5
    with pytest.raises(FileNotFoundError):
        load_checkpoint(DiT(**g["config"]), str(tmp_path / "missing.pt"))


# ---------------------------------------------------------------------------------------------------------
# Gaussian diffusion
# ---------------------------------------------------------------------------------------------------------

AC = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))                            # ᾱ_t of the official schedule


def test_training_losses_match_official(diff_golden):
    g = diff_golden
    model = official_model(g)
    diffusion = create_diffusion("")
    assert rel(diffusion.q_sample(g["x0"], g["t"], g["noise"]), g["x_t"]) <= 1e-5
    with torch.no_grad():
        terms = diffusion.training_losses(model, g["x0"], g["y"], t=g["t"], noise=g["noise"])
    assert 0 in g["t"]                                                           # decoder NLL branch covered
    for k in ("mse", "vb", "loss"):
        assert terms[k].shape == (6,)
        assert rel(terms[k], g[k]) <= 1e-5, k
    assert terms["feats"] is None


def test_respaced_p_mean_variance_matches_official(diff_golden):
    g = diff_golden
    model = official_model(g)
    diffusion = create_diffusion("250")
    assert torch.equal(diffusion.timestep_map, g["respaced_timesteps"])
    assert sorted(space_timesteps(1000, "250")) == g["respaced_timesteps"].tolist()
    with torch.no_grad():
        out = diffusion.p_mean_variance(model, g["p_x_t"], g["p_t_index"], g["y"], clip_denoised=False)
    assert rel(out["mean"], g["p_mean"]) <= 1e-5
    assert rel(out["log_variance"], g["p_log_variance"]) <= 1e-5
    assert rel(out["pred_xstart"], g["p_pred_xstart"]) <= 1e-5


def test_schedule_and_posterior_closed_form():
    d = create_diffusion("")
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), AC, rtol=1e-12)
    # q(x_{t-1} | x_t, x_0) by Gaussian conditioning, in float64
    t = torch.tensor([1, 5, 300, 999])
    x0, xt = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    a, ap = torch.tensor(AC[t]), torch.tensor(AC[t - 1])
    alpha = a / ap
    var = 1.0 / (alpha / (1 - alpha) + 1.0 / (1 - ap))
    mean = var[:, None] * (alpha.sqrt()[:, None] * xt / (1 - alpha)[:, None]
                           + ap.sqrt()[:, None] * x0 / (1 - ap)[:, None])
    got_mean, got_var, got_logvar = d.q_posterior_mean_variance(x0, xt, t)
    assert_close(got_mean, mean, rtol=1e-10, atol=1e-12)
    assert_close(got_var[:, 0], var, rtol=1e-10, atol=0)
    assert_close(got_logvar[:, 0], var.log(), rtol=1e-10, atol=0)


def test_space_timesteps():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim250") == set(range(0, 1000, 4))
    with pytest.raises(ValueError, match="integer stride"):
        space_timesteps(1000, "ddim999")
    steps = sorted(space_timesteps(1000, "10,20"))
    assert len(steps) == 30 and steps[0] == 0 and steps[9] == 499 and steps[10] == 500 and steps[-1] == 999
    assert space_timesteps(1000, "1000") == set(range(1000))
    with pytest.raises(ValueError):
        space_timesteps(1000, "600,600")
    # respacing keeps ᾱ at the kept steps, and the model is given the original steps
    d = create_diffusion("ddim50")
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), AC[::20], rtol=1e-12)
    seen = []
    x = torch.zeros(3, 2, 1, 1)
    d.p_mean_variance(lambda x, t, y: seen.append(t.clone()) or torch.zeros_like(x), x, torch.tensor([0, 7, 49]), None)
    assert seen[0].tolist() == [0, 140, 980]


def test_vb_trains_only_the_variance_channels():
    d = create_diffusion("")
    torch.manual_seed(0)
    out = torch.randn(4, 6, 3, 3, requires_grad=True)
    x0 = torch.randn(4, 3, 3, 3).clamp(-1, 1)
    terms = d.training_losses(lambda x, t, y: out, x0, None, t=torch.tensor([0, 3, 500, 999]))
    (g_vb,) = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)
    assert g_vb[:, :3].abs().max() == 0 and g_vb[:, 3:].abs().min(dim=1).values.sum() > 0
    (g_mse,) = torch.autograd.grad(terms["mse"].sum(), out)
    assert g_mse[:, 3:].abs().max() == 0 and g_mse[:, :3].abs().max() > 0
    assert_close(terms["loss"], terms["mse"] + terms["vb"])
    # an eps-only model has no variance term
    terms = d.training_losses(lambda x, t, y: out[:, :3], x0, None, t=torch.tensor([0, 3, 500, 999]))
    assert torch.equal(terms["vb"], torch.zeros(4)) and torch.equal(terms["loss"], terms["mse"])
    with pytest.raises(ValueError, match="channels"):
        d.training_losses(lambda x, t, y: out[:, :4], x0, None)


def test_training_losses_features_and_global_rng(diff_golden):
    g = diff_golden
    model = official_model(g)
    d = create_diffusion("")
    x0, y = g["x0"], g["y"]
    with torch.no_grad():
        torch.manual_seed(1)
        a = d.training_losses(model, x0, y, return_features=2)
        torch.manual_seed(1)
        t = torch.randint(0, 1000, (len(x0),))                                 # same draws, same order
        noise = torch.randn_like(x0)
        b = d.training_losses(model, x0, y, t=t, noise=noise)
        _, feats = model(d.q_sample(x0, t, noise), t, y, return_features=2)
    assert_close(a["loss"], b["loss"], rtol=0, atol=0)
    assert_close(a["feats"], feats, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# Samplers, driven by the exact eps predictor of Gaussian data
#
# For x0 ~ N(μ, s²) and x_t = a x0 + b eps (a = sqrt(ᾱ_t), b = sqrt(1 - ᾱ_t)): Cov(eps, x_t) = b and
# Var(x_t) = a² s² + b², so E[eps | x_t] = (x_t - a μ) b / (ᾱ_t s² + 1 - ᾱ_t). Every sampler step is then
# affine in x plus Gaussian noise, so the moments of its output follow exactly from a scalar recursion.
# ---------------------------------------------------------------------------------------------------------

MU = np.array([0.5, -1.0, 0.0, 2.0])
SD = np.array([0.5, 1.0, 0.8, 1.2])


def gaussian_eps_model(mu=MU, sd=SD):
    ac = torch.tensor(AC, dtype=torch.float32)
    mu, sd = torch.tensor(mu, dtype=torch.float32), torch.tensor(sd, dtype=torch.float32)

    def model(x, t, y):
        a = ac[t].view(-1, 1, 1, 1)                                             # t: original steps 0..999
        m, s = mu.view(1, -1, 1, 1), sd.view(1, -1, 1, 1)
        return (x - a.sqrt() * m) * (1 - a).sqrt() / (a * s ** 2 + 1 - a)
    return model


def predicted_moments(kept, mode, eta=0.0, mu=MU, sd=SD):
    """Exact mean and std of the sampler's output for z ~ N(0, 1), in float64."""
    a = AC[np.array(sorted(kept))]
    ap = np.append(1.0, a[:-1])
    m, v = np.zeros_like(mu), np.ones_like(mu)
    for i in reversed(range(len(a))):
        A, B, den = math.sqrt(a[i]), math.sqrt(1 - a[i]), a[i] * sd ** 2 + 1 - a[i]
        e1, e0 = B / den, -A * mu * B / den                                     # eps = e1 x + e0
        x1, x0 = (1 - B * e1) / A, -B * e0 / A                                  # x0_hat = x1 x + x0
        beta = 1 - a[i] / ap[i]
        if mode == "ddim":
            var = eta ** 2 * (1 - ap[i]) / (1 - a[i]) * beta
            c = math.sqrt(1 - ap[i] - var)
            k1, k0 = math.sqrt(ap[i]) * x1 + c * e1, math.sqrt(ap[i]) * x0 + c * e0
        else:
            c1, c2 = beta * math.sqrt(ap[i]) / (1 - a[i]), (1 - ap[i]) * math.sqrt(1 - beta) / (1 - a[i])
            k1, k0 = c1 * x1 + c2, c1 * x0
            var = beta * (1 - ap[i]) / (1 - a[i]) if mode == "small" else beta
        m, v = k1 * m + k0, k1 ** 2 * v + (var if i > 0 else 0.0)
    return m, np.sqrt(v)


def check_moments(x, mean, std, n_se=5.0):
    """Per-channel sample mean/std of x (N, C, H, W) equal mean/std within n_se standard errors."""
    xs = x.double().transpose(0, 1).reshape(x.shape[1], -1).numpy()
    count = xs.shape[1]
    np.testing.assert_array_less(np.abs(xs.mean(1) - mean), n_se * std / math.sqrt(count))
    np.testing.assert_array_less(np.abs(xs.std(1) - std), n_se * std / math.sqrt(2 * count))


def noise(n=4096, seed=0):
    return torch.randn(n, 4, 2, 2, generator=torch.Generator().manual_seed(seed))


def test_ddpm_samples_gaussian_data():
    model, z, y = gaussian_eps_model(), noise(), torch.zeros(4096, dtype=torch.long)
    # DiT's 250 steps with fixed large variance: the output is N(μ, s²) up to sampling error
    x = sample(model, z, y, sampler="ddpm", num_steps=250, generator=1)
    check_moments(x, MU, SD)
    check_moments(x, *predicted_moments(space_timesteps(1000, "250"), "large"))
    # 100 steps with the posterior variance: visibly narrower than s, exactly as the recursion predicts
    x = sample(model, z, y, sampler="ddpm", num_steps=100, generator=2, sigma_small=True)
    mean, std = predicted_moments(space_timesteps(1000, "100"), "small")
    assert (std < 0.97 * SD).all()
    check_moments(x, mean, std)


def test_ddim_samples_gaussian_data():
    model, z, y = gaussian_eps_model(), noise(), torch.zeros(4096, dtype=torch.long)
    x = sample(model, z, y, sampler="ddim", num_steps=250)
    check_moments(x, MU, SD)
    check_moments(x, *predicted_moments(space_timesteps(1000, "250"), "ddim"))
    x = sample(model, z, y, sampler="ddim", num_steps="ddim50", eta=0.5, generator=3)
    check_moments(x, *predicted_moments(space_timesteps(1000, "ddim50"), "ddim", eta=0.5))


def test_sampler_step_identities():
    model, z, y = gaussian_eps_model(), noise(64), torch.zeros(64, dtype=torch.long)
    eps = lambda v: lambda x, t, y: torch.cat([model(x, t, y), torch.full_like(x, v)], 1)  # noqa: E731
    small = sample(model, z, y, num_steps=20, generator=5, sigma_small=True)
    large = sample(model, z, y, num_steps=20, generator=5)
    # learned range at its ends: v = -1 is the posterior variance, v = +1 is beta_t
    assert_close(sample(eps(-1.0), z, y, num_steps=20, generator=5), small, rtol=1e-5, atol=1e-5)
    assert_close(sample(eps(1.0), z, y, num_steps=20, generator=5), large, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(small, large, atol=1e-2)
    # DDIM with eta = 1 is DDPM with the posterior variance
    ddim1 = sample(model, z, y, sampler="ddim", num_steps=20, eta=1.0, generator=5)
    assert_close(ddim1, small, rtol=1e-4, atol=1e-4)


def test_sampler_reproducibility():
    model, z, y = gaussian_eps_model(), noise(16), torch.zeros(16, dtype=torch.long)
    a = sample(model, z, y, num_steps=10, generator=7)
    b = sample(model, z, y, num_steps=10, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert not torch.allclose(a, sample(model, z, y, num_steps=10, generator=8))
    torch.manual_seed(3)
    c = sample(model, z, y, num_steps=10)
    torch.manual_seed(3)
    assert torch.equal(c, sample(model, z, y, num_steps=10))
    ddim = [sample(model, z, y, sampler="ddim", num_steps=10) for _ in range(2)]               # eta = 0: no noise
    assert torch.equal(ddim[0], ddim[1])


def class_model(calls):
    """Gaussian data whose mean depends on the class; the null class (3) is the unconditional mixture's
    stand-in. Learned-variance output so the variance channels' route through guidance is exercised."""
    means = torch.tensor([[0.5, -1.0, 0.0, 2.0], [1.0, 1.0, 1.0, 1.0], [-2.0, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]])

    def model(x, t, y):
        calls.append(len(x))
        out = torch.cat([gaussian_eps_model(mu=means[k].numpy())(x[i:i + 1], t[i:i + 1], None)
                         for i, k in enumerate(y.tolist())])
        v = (y.float() / 3.0 * 2 - 1).view(-1, 1, 1, 1).expand_as(x)           # a label-dependent variance
        return torch.cat([out, v], 1)
    return model


def test_classifier_free_guidance():
    calls = []
    model = class_model(calls)
    z, y = noise(6), torch.tensor([0, 1, 2, 0, 1, 2])
    null = torch.full_like(y, 3)
    for g in (None, 3):
        direct_calls = []
        direct = class_model(direct_calls)

        def guided_direct(x, t, y, g=g):
            cond, uncond = direct(x, t, y), direct(x, t, torch.full_like(y, 3))
            k = 4 if g is None else g
            return torch.cat([uncond[:, :k] + 2.0 * (cond[:, :k] - uncond[:, :k]), cond[:, k:]], 1)
        x = sample(model, z, y, num_steps=8, cfg_scale=2.0, guide_channels=g, null_class=3, generator=0)
        want = sample(guided_direct, z, y, num_steps=8, generator=0)
        assert_close(x, want, rtol=1e-5, atol=1e-5)
    assert set(calls) == {12}                                                    # one doubled batch per step
    # cfg_scale = 1: the plain conditional model, one undoubled pass per step
    calls.clear()
    x = sample(model, z, y, num_steps=8, cfg_scale=1.0, null_class=3, generator=0)
    assert set(calls) == {6}
    assert_close(x, sample(class_model([]), z, y, num_steps=8, generator=0), rtol=0, atol=0)
    # the guided callable at scale 1 is the conditional prediction
    xt, t = torch.randn(6, 4, 2, 2), torch.full((6,), 500)
    assert_close(classifier_free_guidance(model, 1.0, null_class=3)(xt, t, y), model(xt, t, y))
    assert not torch.allclose(model(xt, t, y)[:, :4], model(xt, t, null)[:, :4])
    with pytest.raises(ValueError, match="null_class"):
        sample(model, z, y, num_steps=2, cfg_scale=1.5)


def test_guidance_matches_forward_with_cfg(net_golden):
    g = net_golden
    model = official_model(g)
    x, t, y = g["x"][:3], g["t"][:3], g["y"][:3]
    null = torch.full_like(y, model.num_classes)
    with torch.no_grad():
        for channels in (None, 3):
            got = classifier_free_guidance(model, 1.5, guide_channels=channels)(x, t, y)
            want = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), 1.5, channels)
            assert_close(got, want[:3], rtol=1e-6, atol=1e-6)
    # a DiT sampled end to end: learned variance, respacing and guidance together (smoke)
    out = sample(model, torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), num_steps=3, cfg_scale=4.0, generator=0)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    no_null = DiT(**{**g["config"], "class_dropout_prob": 0.0})
    with pytest.raises(ValueError, match="cfg_scale=1.0"):
        sample(no_null, torch.randn(1, 4, 8, 8), torch.tensor([1]), num_steps=2, cfg_scale=2.0)


def test_sampler_arguments_and_progress(capsys):
    model, z, y = gaussian_eps_model(), noise(2), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="sampler"):
        sample(model, z, y, sampler="euler")
    sample(model, z, y, num_steps=5, progress=True)
    err = capsys.readouterr().err
    assert "step 5/5" in err and "it/s" in err
    assert dit.sample(model, z, y, num_steps=4, generator=0).shape == z.shape
    for sampler in ("ddpm", "ddim"):                                           # a one-step process (smoke)
        assert torch.isfinite(sample(model, z, y, sampler=sampler, num_steps=1)).all()
    with pytest.raises(ValueError, match="fewer steps"):
        sample(model, z, y, num_steps=2000)


def test_schedule_tables_are_copied_once_per_device_and_dtype():
    """The float64 schedules are cast (and moved) once and reused, so a training or sampling step makes no
    host-to-device copy; the values are those of the float64 table cast to the input's dtype."""
    d = create_diffusion("250")
    x = torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 100, 249])
    a = d._extract(d.sqrt_alphas_cumprod, t, x)
    assert a.dtype == torch.float32 and a.shape == (3, 1, 1, 1)
    assert torch.equal(a.flatten(), d.sqrt_alphas_cumprod[t].float())
    table = d._on(d.sqrt_alphas_cumprod, x.device, torch.float32)
    assert d._on(d.sqrt_alphas_cumprod, x.device, torch.float32) is table                  # cached
    assert d._on(d.sqrt_alphas_cumprod, x.device, torch.float64) is not table              # per dtype
    assert d._on(d.timestep_map, x.device, torch.long)[249] == d.timestep_map[249] == 999  # respaced: last = 999
