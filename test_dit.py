"""Tests of dit.py: network and diffusion against the official implementation's outputs (testdata/, made by
facebookresearch/DiT with random weights), checkpoint layout of the released DiT-XL/2, closed-form parameter
counts, and the samplers against the exact reverse process of Gaussian data."""

import argparse
import math
import os
import re
import types
import warnings

import numpy as np
import pytest
import torch

import dit
from dit import (SIZES, DiT, DiT_models, LabelEmbedder, Progress, classifier_free_guidance, create_diffusion,
                 load_checkpoint, load_url, read_checkpoint, sample, space_timesteps, state_dict_of, timestep_embedding)
from test_support import one_thread  # noqa: F401  (autouse: one intra-op thread in this module)

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
    sizes = {"XL": (28, 1152), "L": (24, 1024), "B": (12, 768), "S": (12, 384), "T": SIZES["T"][:2]}
    assert list(DiT_models) == [f"DiT-{s}/{p}" for s in ("XL", "L", "B", "S", "T") for p in (2, 4, 8)]
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
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(DiT(**g["config"]), str(tmp_path / "missing.pt"))


def test_read_checkpoint_official_ours_and_broken_files(net_golden, tmp_path):
    g = net_golden
    sd = g["state_dict"]
    model = DiT(**g["config"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # the official DiT/SiT train.py layout: its `args` is an argparse.Namespace, which weights_only=True refuses alone
    official = {"model": {k: torch.zeros_like(v) for k, v in sd.items()}, "ema": sd, "opt": opt.state_dict(),
                "args": argparse.Namespace(model="DiT-S/2", image_size=64, num_classes=10, global_seed=0)}
    torch.save(official, tmp_path / "0000100.pt")
    obj = read_checkpoint(tmp_path / "0000100.pt")
    assert isinstance(obj["args"], argparse.Namespace) and obj["args"].image_size == 64
    loaded = load_checkpoint(DiT(**g["config"]), str(tmp_path / "0000100.pt")).eval()              # ema
    with torch.no_grad():
        assert rel(loaded(g["x"], g["t"], g["y"]), g["out"]) <= 1e-5
    # the old train.py layout (config dict, plain types) and a run folder holding checkpoint.pt
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": sd, "ema": sd, "opt": opt.state_dict(), "step": 7, "config": {"model": "DiT-S/2"}},
               run / "checkpoint.pt")
    assert read_checkpoint(run)["step"] == 7 and read_checkpoint(str(run))["config"] == {"model": "DiT-S/2"}
    load_checkpoint(DiT(**g["config"]), str(run))
    # broken files: one sentence each, never a traceback from inside torch
    (tmp_path / "empty.pt").write_bytes(b"")
    data = (tmp_path / "0000100.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    for name, match in (("empty.pt", "is empty"), ("truncated.pt", "truncated or not a checkpoint"),
                        ("notes.txt", "truncated or not a checkpoint"), ("missing.pt", "does not exist"),
                        ("", "does not exist")):                                # a folder without checkpoint.pt
        with pytest.raises(ValueError, match=match) as e:
            read_checkpoint(tmp_path / name)
        assert "\n" not in str(e.value)


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_read_checkpoint_never_runs_a_pickle(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": {}, "args": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="not a checkpoint"):
        read_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_state_dict_of():
    sd = {"a.weight": torch.ones(1)}
    assert state_dict_of(sd) == sd
    ckpt = {"model": {"module.a.weight": torch.zeros(1)}, "ema": {"_orig_mod.module.a.weight": torch.ones(1)}}
    assert state_dict_of(ckpt)["a.weight"].item() == 1 and state_dict_of(ckpt, prefer="model")["a.weight"] == 0
    assert state_dict_of({"model": {"module._orig_mod.a.weight": 2}}) == {"a.weight": 2}
    with pytest.raises(ValueError, match="not a state dict"):
        state_dict_of([1, 2])


def test_load_url_uses_the_hub_cache_and_says_what_to_do_offline(net_golden, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub = torch.hub.get_dir()
    if not hub.startswith(str(tmp_path)):
        pytest.skip("torch.hub.set_dir was called in this process: TORCH_HOME is not consulted")

    def offline(url, dst, *args, **kwargs):
        raise OSError("network unreachable")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    url = dit.PRETRAINED_URLS["DiT-XL-2-256x256.pt"]
    with pytest.raises(RuntimeError) as e:
        load_url(url)
    want = os.path.join(hub, "checkpoints", "DiT-XL-2-256x256.pt")
    assert url in str(e.value) and want in str(e.value) and "by hand" in str(e.value)
    # a file already in the cache (as pytorch-fid users have theirs) is read without the network
    g = net_golden
    torch.save(g["state_dict"], want)
    sd = load_url(url)
    assert all(torch.equal(sd[k], v) for k, v in g["state_dict"].items())
    # a release name that is not on disk goes through the same cache (here: the tiny weights under that name)
    monkeypatch.chdir(tmp_path)
    model = load_checkpoint(DiT(**g["config"]), "DiT-XL-2-256x256.pt").eval()
    with torch.no_grad():
        assert rel(model(g["x"], g["t"], g["y"]), g["out"]) <= 1e-5
    sit_url = dit.PRETRAINED_URLS["SiT-XL-2-256x256.pt"]                           # its URL ends in a query string
    with pytest.raises(RuntimeError, match=re.escape(os.path.join(hub, "checkpoints", "SiT-XL-2-256x256.pt"))):
        load_checkpoint(DiT(**g["config"]), "SiT-XL-2-256x256.pt")
    with pytest.raises(RuntimeError, match=re.escape(os.path.join(hub, "checkpoints", "SiT-XL-2-256.pt"))):
        load_url(sit_url)


def test_progress_line_format(capsys, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(dit, "time", types.SimpleNamespace(time=lambda: now[0]))   # a clock the test sets

    def at(t, call, *args, **kwargs):
        now[0] = t
        call(*args, **kwargs)
    bar = Progress(4, "ddpm", every=10.0)                                       # starts at t = 0
    at(5.0, bar.update)                                                         # too soon: silent
    at(10.0, bar.update, 1)                                                     # 2 of 4 at 0.2/s: a line
    at(15.0, bar.update, 1, note="nfe 3")                                       # 5 s after the last line: silent
    at(20.0, bar.update, 1, note="nfe 4")
    at(21.0, bar.close, "done")
    assert capsys.readouterr().err.splitlines() == [
        "ddpm 2/4 | 0.20/s | eta 0:00:10", "ddpm 4/4 | 0.20/s | eta 0:00:00 | nfe 4",
        "ddpm 4/4 | 0.19/s | eta 0:00:00 | done"]
    now[0] = 0.0
    bar = Progress(None, "dopri5", every=5.0)                                   # no total: no eta
    at(2.0, bar.update, 3)
    at(4.0, bar.close)
    now[0] = 0.0
    bar = Progress(1000, "fid", every=1.0)
    at(3.0 * 3600, bar.update, 250)                                             # 750 left at 250 per 3 h
    assert capsys.readouterr().err.splitlines() == ["dopri5 3 | 0.75/s", "fid 250/1000 | 0.02/s | eta 9:00:00"]
    bar = Progress(10, "quiet", every=0.0, enabled=False)
    at(1e4, bar.update, 5)
    bar.close()
    assert capsys.readouterr().err == ""


def test_default_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert dit.default_device() == "cpu"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert dit.default_device() == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert dit.default_device() == "cuda:3"


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
        out = diffusion.p_mean_variance(model, g["p_x_t"], g["p_t_index"], g["y"])
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
    assert_close(d.q_posterior_mean(x0, xt, t), mean, rtol=1e-10, atol=1e-12)
    assert_close(d.posterior_variance[t], var, rtol=1e-10, atol=0)
    assert_close(d.posterior_log_variance_clipped[t], var.log(), rtol=1e-10, atol=0)


def test_space_timesteps():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim250") == set(range(0, 1000, 4))
    with pytest.raises(ValueError, match="integer stride"):
        space_timesteps(1000, "ddim999")
    assert space_timesteps(1000, "1000") == set(range(1000)) and space_timesteps(1000, 1) == {0}
    steps = sorted(space_timesteps(1000, "250"))                                 # official: round(j * 999 / 249)
    assert len(steps) == 250 and steps[:4] == [0, 4, 8, 12] and steps[-1] == 999
    for bad in ("2000", "0"):
        with pytest.raises(ValueError, match="steps"):
            space_timesteps(1000, bad)
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


def with_variance(model, v):
    """eps model with learned-range output v everywhere: v = -1 is the posterior variance, v = +1 is beta_t."""
    return lambda x, t, y: torch.cat([model(x, t, y), torch.full_like(x, v)], 1)


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
    x = sample(with_variance(model, -1.0), z, y, sampler="ddpm", num_steps=100, generator=2)
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
    small = sample(with_variance(model, -1.0), z, y, num_steps=20, generator=5)
    large = sample(model, z, y, num_steps=20, generator=5)                      # eps only: fixed large = beta_t
    # learned range at its upper end, v = +1, is beta_t; at its lower end the posterior variance, narrower
    assert_close(sample(with_variance(model, 1.0), z, y, num_steps=20, generator=5), large, rtol=1e-5, atol=1e-5)
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
    model.num_classes = 3                                                       # the null label
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
        x = sample(model, z, y, num_steps=8, cfg_scale=2.0, guide_channels=g, generator=0)
        want = sample(guided_direct, z, y, num_steps=8, generator=0)
        assert_close(x, want, rtol=1e-5, atol=1e-5)
    assert set(calls) == {12}                                                    # one doubled batch per step
    # cfg_scale = 1: the plain conditional model, one undoubled pass per step
    calls.clear()
    x = sample(model, z, y, num_steps=8, cfg_scale=1.0, generator=0)
    assert set(calls) == {6}
    assert_close(x, sample(class_model([]), z, y, num_steps=8, generator=0), rtol=0, atol=0)
    # the guided callable at scale 1 is the conditional prediction
    xt, t = torch.randn(6, 4, 2, 2), torch.full((6,), 500)
    assert_close(classifier_free_guidance(model, 1.0)(xt, t, y), model(xt, t, y))
    assert not torch.allclose(model(xt, t, y)[:, :4], model(xt, t, null)[:, :4])
    plain = gaussian_eps_model()                                                 # no num_classes: no null label
    with pytest.raises(ValueError, match="null-class label"):
        sample(plain, z, y, num_steps=2, cfg_scale=1.5)
    assert_close(classifier_free_guidance(plain, 2.0, null_class=3)(xt, t, y), plain(xt, t, y))  # label-blind


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
    assert re.fullmatch(r"ddpm 5/5 \| [0-9.]+/s \| eta 0:00:00\n", capsys.readouterr().err)   # the closing line
    sample(model, z, y, num_steps=5)
    assert capsys.readouterr().err == ""
    for sampler in ("ddpm", "ddim"):                                           # a one-step process (smoke)
        assert torch.isfinite(sample(model, z, y, sampler=sampler, num_steps=1)).all()
    with pytest.raises(ValueError, match="steps"):
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
    table = dit._on(d, d.sqrt_alphas_cumprod, x.device, torch.float32)
    assert dit._on(d, d.sqrt_alphas_cumprod, x.device, torch.float32) is table               # cached
    assert dit._on(d, d.sqrt_alphas_cumprod, x.device, torch.float64) is not table           # per dtype
    assert dit._on(d, d.timestep_map, x.device, torch.long)[249] == d.timestep_map[249] == 999  # respaced
