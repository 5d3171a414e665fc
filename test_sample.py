"""Tests of sample.py on tiny CPU checkpoints: grids and npz files against direct sampler calls, the official DiT/SiT
checkpoint layout and flag names, per-index determinism (batch size, number of processes), resumption, and the errors
a user can cause."""

import argparse
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import data
import dit
import meanflow
import sample
import sit
from test_support import one_thread, spawn  # noqa: F401  (one_thread: autouse, one intra-op thread here)

S, K = 16, 5  # image size (pixels; patch 4 -> 16 tokens) and number of classes of the tiny checkpoints


def random_states(name, image_size, num_classes, latent, seed):
    """Two random (non-zero) state dicts of a model, 'model' and 'ema', different from each other."""
    model, _ = sample.build_model(name, image_size, num_classes, latent)
    states = []
    for k in range(2):
        g = torch.Generator().manual_seed(seed * 2 + k)
        # scale 0.05: outputs of unit size, so images are neither all clamped nor chaotic in float rounding
        states.append({key: (torch.randn(v.shape, generator=g) * 0.05 if key != "pos_embed" else v)
                       for key, v in model.state_dict().items()})
    return states


def make_checkpoint(path, name, image_size=S, num_classes=K, latent=False, vae=None, seed=0):
    """A 'trained' checkpoint in train.py's format (a `config` dict), EMA different from the model."""
    model, ema = random_states(name, image_size, num_classes, latent, seed)
    config = dict(model=name, image_size=image_size, num_classes=num_classes, latent=latent, vae=vae,
                  class_dropout_prob=0.1)
    torch.save(dict(model=model, ema=ema, opt={}, step=1234, epoch=1, batch_in_epoch=0, rng={}, config=config), path)
    return path


def make_official_checkpoint(path, name, num_classes=K, seed=0, **args):
    """The layout of the official DiT/SiT train.py checkpoints: model, ema, opt and an argparse.Namespace (latent
    models; `path_type` only in SiT's args)."""
    model, ema = random_states(name, 32, num_classes, True, seed)
    ns = argparse.Namespace(**{**dict(model=name, image_size=32, num_classes=num_classes, vae="ema", global_seed=0,
                                      epochs=1, results_dir="results"), **args})
    torch.save({"model": model, "ema": ema, "opt": {}, "args": ns}, path)
    return path


def reference_model(path, weights="ema"):
    ck = dit.read_checkpoint(path)
    cfg = ck["config"] if "config" in ck else dict(model=ck["args"].model, image_size=32, latent=True,
                                                   num_classes=ck["args"].num_classes)
    model, family = sample.build_model(cfg["model"], cfg["image_size"], cfg["num_classes"], cfg["latent"])
    model.load_state_dict(ck[weights])
    return model.eval(), family


def reference_noise(seed, indices, shape):
    # the documented contract: sample i's generator is seeded with sample_seed(seed, i)
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(sample.sample_seed(seed, i)))
                        for i in indices])


def reference_streams(seed, indices, shape):
    """(z, noise): the initial noise and then every step's noise from each sample's own generator."""
    gens = [torch.Generator().manual_seed(sample.sample_seed(seed, i)) for i in indices]
    z = torch.stack([torch.randn(shape, generator=g) for g in gens])
    return z, lambda x: torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).to(x.dtype)


def reference_uint8(x):
    # DiT/ADM conversion clamp(127.5 x + 128, 0, 255) -> uint8, NHWC, computed in float64 numpy
    return np.clip(127.5 * x.double().numpy() + 128.0, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def assert_images_close(a, b, max_frac=1e-3):
    """Equal up to a rare one-level rounding flip (batched kernels may round differently)."""
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert d.max() <= 1 and (d > 0).mean() <= max_frac, (d.max(), (d > 0).mean())



@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    return {name: make_checkpoint(str(d / f"{name.replace('/', '-')}.pt"), name, seed=i)
            for i, name in enumerate(["DiT-T/4", "SiT-T/4", "MeanFlow-T/4"])}


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """A tiny randomly initialised diffusers AutoencoderKL with the SD-VAE's layout (8x down, 4 latent channels)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32).eval()
    path = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(path)
    return vae, str(path)


def decode(vae, x):
    with torch.no_grad():
        return vae.decode(x / 0.18215).sample


def run(*argv):
    return sample.main([str(a) for a in argv])


# ---------------------------------------------------------------------------------------------------------
# Grids and npz files against direct sampler calls
# ---------------------------------------------------------------------------------------------------------

def test_grid_uses_ema_weights_and_matches_direct_sampling(ckpts, tmp_path):
    # A random eps-network is no denoiser, so most DiT pixels saturate at 0 or 255: a wrong noise, label, weight or
    # CFG setting still flips ~1-2% of them (the pixel conversion itself is checked on the SiT/MeanFlow outputs).
    out = tmp_path / "grid.png"
    run("--ckpt", ckpts["DiT-T/4"], "--classes", 1, 4, 2, "--seed", 3, "--sampler", "ddim", "--num-steps", 5,
        "--cfg-scale", 2.0, "--nrow", 2, "--out", out)
    assert torch.is_grad_enabled()                                                # main() leaves no global state behind
    grid = np.asarray(Image.open(out))
    pad = 2
    assert grid.shape == (2 * (S + pad) + pad, 2 * (S + pad) + pad, 3)
    tiles = [grid[pad + r * (S + pad): pad + r * (S + pad) + S, pad + c * (S + pad): pad + c * (S + pad) + S]
             for r in range(2) for c in range(2)]

    z = reference_noise(3, range(3), (3, S, S))
    y = torch.tensor([1, 4, 2])
    model, _ = reference_model(ckpts["DiT-T/4"], "ema")
    expect = reference_uint8(dit.sample(model, z, y, sampler="ddim", num_steps=5, cfg_scale=2.0))
    assert_images_close(np.stack(tiles[:3]), expect)
    assert (tiles[3] == 0).all() and (grid[:pad] == 0).all()                     # empty slot and padding
    raw, _ = reference_model(ckpts["DiT-T/4"], "model")
    other = reference_uint8(dit.sample(raw, z, y, sampler="ddim", num_steps=5, cfg_scale=2.0))
    assert np.abs(other.astype(int) - expect).mean() > 5                          # the model weights differ


def test_npz_format_labels_and_pixels(ckpts, tmp_path):
    out = tmp_path / "s.npz"
    run("--ckpt", ckpts["SiT-T/4"], "--num-samples", 12, "--shard-size", 4, "--batch-size", 4, "--sampler",
        "ode-heun", "--num-steps", 3, "--cfg-scale", 1.5, "--guide-channels", 2, "--class-mode", "balanced",
        "--seed", 7, "--out", out)
    with np.load(out) as f:
        assert sorted(f.files) == ["arr_0", "arr_1", "meta"]
        images, labels, meta = f["arr_0"], f["arr_1"], json.loads(str(f["meta"]))
    assert images.shape == (12, S, S, 3) and images.dtype == np.uint8 and labels.dtype == np.int64
    for g in range(2):                                                           # aligned groups of K: each class once
        assert sorted(labels[g * K:(g + 1) * K]) == list(range(K))
    assert np.array_equal(labels, sample.make_labels(range(12), K, 7, "balanced"))
    assert not os.path.exists(tmp_path / "s_shards")                             # shards removed after the merge
    for k, v in dict(model="SiT-T/4", sampler="ode-heun", num_steps=3, cfg_scale=1.5, guide_channels=2, seed=7,
                     num_samples=12, class_mode="balanced", precision="fp32", step=1234, weights="ema").items():
        assert meta[k] == v, k
    assert "shard_size" not in meta and "batch_size" in meta                     # (batch_size: None, not dopri5)

    model, _ = reference_model(ckpts["SiT-T/4"])
    z = reference_noise(7, range(12), (3, S, S))
    x = sit.sample(model, z, torch.from_numpy(labels), sampler="ode-heun", num_steps=3, cfg_scale=1.5,
                   guide_channels=2)
    assert_images_close(images, reference_uint8(x))
    assert 0 < images.mean() < 255 and images.std() > 10                          # not all clamped


def test_meanflow_one_step_closed_form(ckpts, tmp_path):
    out = tmp_path / "mf.npz"
    run("--ckpt", ckpts["MeanFlow-T/4"], "--num-samples", 6, "--batch-size", 4, "--out", out)
    with np.load(out) as f:
        images, labels = f["arr_0"], f["arr_1"]
    model, _ = reference_model(ckpts["MeanFlow-T/4"])
    z = reference_noise(0, range(6), (3, S, S))
    one = torch.ones(6)
    with torch.no_grad():
        x0 = z - model(z, one, torch.zeros(6), torch.from_numpy(labels))        # z_0 = z_1 − u(z_1, t=1, r=0)
    assert_images_close(images, reference_uint8(x0))


def test_generate_gives_each_family_the_options_it_takes(ckpts):
    # what train.py does: one call for every family, the options of another family ignored
    z, y = reference_noise(5, range(2), (3, S, S)), torch.tensor([0, 3])
    common = dict(path="gvp", guide_channels=2, eta=0.0, guidance_interval=(0.0, 1.0))
    for name, direct in [("DiT-T/4", lambda m: dit.sample(m, z, y, sampler="ddim", num_steps=3, guide_channels=2,
                                                           cfg_scale=1.5)),
                         ("SiT-T/4", lambda m: sit.sample(m, z, y, sampler="ode-euler", num_steps=3, guide_channels=2,
                                                           cfg_scale=1.5, path="gvp")),
                         ("MeanFlow-T/4", lambda m: meanflow.sample(m, z, y, num_steps=2))]:
        model, family = reference_model(ckpts[name])
        sampler = {"dit": "ddim", "sit": "ode-euler", "meanflow": None}[family]
        x = sample.generate(family, model, z, y, sampler, 3 if sampler else 2, 1.0 if sampler is None else 1.5,
                            **common)
        assert torch.equal(x, direct(model)), name


def test_raw_state_dict_needs_model_and_checks_its_family(ckpts, tmp_path, capsys):
    raw = tmp_path / "SiT-T-4-16x16.pt"
    torch.save(torch.load(ckpts["SiT-T/4"], weights_only=True)["ema"], raw)
    with pytest.raises(SystemExit, match="--model and --image-size"):
        run("--ckpt", raw, "--out", tmp_path / "a.png")
    with pytest.raises(SystemExit, match="looks like SiT weights but --model is DiT-T/4"):
        run("--ckpt", raw, "--model", "DiT-T/4", "--image-size", S, "--out", tmp_path / "a.png")
    out = tmp_path / "raw.png"
    run("--ckpt", raw, "--model", "SiT-T/4", "--image-size", S, "--classes", 3, "--sampler", "ode-euler",
        "--num-steps", 4, "--nrow", 1, "--out", out)
    model, _ = reference_model(ckpts["SiT-T/4"])
    x = sit.sample(model, reference_noise(0, [0], (3, S, S)), torch.tensor([3]), sampler="ode-euler", num_steps=4)
    assert_images_close(np.asarray(Image.open(out))[None, 2:2 + S, 2:2 + S], reference_uint8(x))
    # a file name that names no family: the weights cannot tell DiT from SiT, so the assumption is printed
    anon = tmp_path / "weights.pt"
    anon.write_bytes(raw.read_bytes())
    capsys.readouterr()
    run("--ckpt", anon, "--model", "DiT-T/4", "--image-size", S, "--classes", 0, "--sampler", "ddim", "--num-steps",
        2, "--out", tmp_path / "b.png")
    assert "sampled as dit because --model is DiT-T/4" in capsys.readouterr().out


def test_latent_model_decodes_with_the_vae(tmp_path, tiny_vae):
    vae, vae_dir = tiny_vae
    ck = make_checkpoint(str(tmp_path / "lat.pt"), "SiT-T/2", image_size=32, latent=True, vae=vae_dir)
    out = tmp_path / "lat.npz"
    run("--ckpt", ck, "--num-samples", 2, "--sampler", "ode-euler", "--num-steps", 2, "--out", out)
    with np.load(out) as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (2, 32, 32, 3)
    model, _ = reference_model(ck)
    x = sit.sample(model, reference_noise(0, range(2), (4, 4, 4)), torch.from_numpy(labels), sampler="ode-euler",
                   num_steps=2)
    assert_images_close(images, reference_uint8(decode(vae, x)))


# ---------------------------------------------------------------------------------------------------------
# Official DiT/SiT checkpoints and flag names
# ---------------------------------------------------------------------------------------------------------

def test_official_sit_checkpoint_takes_ema_model_path_and_vae_from_args(tmp_path, tiny_vae, monkeypatch):
    vae, _ = tiny_vae
    # named like a DiT file on purpose: an official checkpoint is told by its args (path_type: SiT), not its name
    ck = make_official_checkpoint(str(tmp_path / "DiT-XL-2-0100000.pt"), "SiT-T/2", seed=3, path_type="GVP",
                                  prediction="velocity", loss_weight=None, sample_eps=None, train_eps=None, vae="mse")
    asked = []
    monkeypatch.setattr(data, "load_vae", lambda name, device: asked.append(name) or vae)
    out = tmp_path / "o.npz"
    run("--ckpt", ck, "--num-fid-samples", 3, "--sampling-method", "Euler", "--num-sampling-steps", 3, "--out", out)
    assert asked == ["mse"]                                                      # the checkpoint's --vae
    with np.load(out) as f:
        images, labels, meta = f["arr_0"], f["arr_1"], json.loads(str(f["meta"]))
    assert (meta["model"], meta["family"], meta["path"], meta["sampler"]) == ("SiT-T/2", "sit", "gvp", "sde")
    model, _ = reference_model(ck, "ema")
    x = {}
    for path in ("gvp", "linear"):                                               # the SDE's score depends on the path
        z, noise = reference_streams(0, range(3), (4, 4, 4))
        x[path] = sit.sample(model, z, torch.from_numpy(labels), sampler="sde", num_steps=3, path=path, generator=noise)
    assert_images_close(images, reference_uint8(decode(vae, x["gvp"])))
    assert (x["gvp"] - x["linear"]).abs().mean() > 0.1
    with pytest.raises(SystemExit, match="is a SiT-T/2 checkpoint but --model is DiT-T/2"):
        run("--ckpt", ck, "--model", "DiT-T/2", "--out", tmp_path / "x.png")
    noise = make_official_checkpoint(str(tmp_path / "n.pt"), "SiT-T/2", path_type="Linear", prediction="noise")
    with pytest.raises(SystemExit, match="predicts the noise"):
        run("--ckpt", noise, "--out", tmp_path / "x.png")


def test_official_dit_checkpoint_and_run_folder(tmp_path, tiny_vae):
    vae, vae_dir = tiny_vae
    run_dir = tmp_path / "results" / "000-DiT-T-2"
    run_dir.mkdir(parents=True)
    make_official_checkpoint(str(run_dir / "checkpoint.pt"), "DiT-T/2", seed=4)   # no path_type: DiT
    out = tmp_path / "d.png"
    run("--ckpt", run_dir, "--vae", vae_dir, "--classes", 1, 3, "--sampler", "ddim", "--num-steps", 3,
        "--global-seed", 2, "--nrow", 2, "--out", out)                             # a folder means folder/checkpoint.pt
    grid = np.asarray(Image.open(out))
    model, _ = reference_model(run_dir / "checkpoint.pt", "ema")
    x = dit.sample(model, reference_noise(2, range(2), (4, 4, 4)), torch.tensor([1, 3]), sampler="ddim", num_steps=3)
    assert_images_close(np.stack([grid[2:34, 2:34], grid[2:34, 36:68]]), reference_uint8(decode(vae, x)))


def test_official_flag_names_and_sample_dir(ckpts, tmp_path):
    ours = tmp_path / "ours.npz"
    run("--ckpt", ckpts["SiT-T/4"], "--num-samples", 5, "--batch-size", 2, "--seed", 4, "--sampler", "sde-heun",
        "--num-steps", 3, "--path", "linear", "--shard-size", 2, "--out", ours)
    # SiT's sample_ddp.py habits: mode, method and path names, DiT's flag names; first "interrupted" after one shard
    sit_args = ["SDE", "--ckpt", ckpts["SiT-T/4"], "--num-fid-samples", 5, "--per-proc-batch-size", 3,
                "--global-seed", 4, "--sampling-method", "Heun", "--num-sampling-steps", 3, "--path-type", "Linear",
                "--shard-size", 2, "--out", tmp_path / "theirs.npz"]
    assert run(*sit_args, "--max-shards", 1) is None
    run(*sit_args, "--sample-dir", tmp_path / "pngs")                              # PNGs of every shard, resumed too
    a, b = np.load(ours), np.load(tmp_path / "theirs.npz")
    assert_images_close(a["arr_0"], b["arr_0"])
    assert str(a["meta"]) == str(b["meta"])
    pngs = sorted(os.listdir(tmp_path / "pngs"))
    assert pngs == [f"{i:06d}.png" for i in range(5)]
    assert np.array_equal(np.stack([np.asarray(Image.open(tmp_path / "pngs" / p)) for p in pngs]), b["arr_0"])
    assert json.loads(str(a["meta"]))["sampler"] == "sde-heun"


def test_sit_ode_mode_defaults_to_dopri5(ckpts, tmp_path):
    out = tmp_path / "ode.png"
    run("ODE", "--ckpt", ckpts["SiT-T/4"], "--classes", 2, "--nrow", 1, "--out", out)
    model, _ = reference_model(ckpts["SiT-T/4"])
    x = sit.sample(model, reference_noise(0, [0], (3, S, S)), torch.tensor([2]), sampler="dopri5")
    assert_images_close(np.asarray(Image.open(out))[None, 2:2 + S, 2:2 + S], reference_uint8(x))


# ---------------------------------------------------------------------------------------------------------
# Per-index determinism
# ---------------------------------------------------------------------------------------------------------

def test_labels_and_seeds_depend_only_on_the_index():
    for mode in ("uniform", "balanced"):
        whole = sample.make_labels(range(0, 53), 10, 5, mode)
        parts = np.concatenate([sample.make_labels(range(0, 7), 10, 5, mode),
                                sample.make_labels(range(7, 53), 10, 5, mode)])
        assert np.array_equal(whole, parts)
        assert not np.array_equal(whole, sample.make_labels(range(0, 53), 10, 6, mode))
    counts = np.bincount(sample.make_labels(range(5000), 10, 0, "uniform"), minlength=10)
    assert counts.min() > 400 and counts.max() < 600                            # 500 ± 4.5σ
    assert (np.bincount(sample.make_labels(range(5000), 10, 0, "balanced")) == 500).all()
    seeds = [sample.sample_seed(0, i) for i in range(50_000)]
    assert len(set(seeds)) == 50_000 and max(seeds) < 2**32                    # no two samples share a stream


def _toy_stochastic_generate(family, model, z, y, sampler=None, num_steps=None, generator=None, **options):
    # Langevin-like steps with the network as drift; the noise comes from the generator callable, row by row
    x = z
    for i in range(num_steps):
        t = torch.full((len(x),), i / num_steps)
        x = x + 0.1 * model(x, t, y) + 0.3 * generator(x)
    return x


def test_per_sample_noise_gives_the_same_images_for_any_batch_size(ckpts, tmp_path, monkeypatch):
    # a stochastic sampler that draws its step noise from the generator: the images must not depend on batching
    monkeypatch.setattr(sample, "generate", _toy_stochastic_generate)
    outs = []
    for b in (1, 4, 11):
        out = tmp_path / f"b{b}.npz"
        run("--ckpt", ckpts["SiT-T/4"], "--num-samples", 11, "--batch-size", b, "--shard-size", 6, "--sampler",
            "sde", "--num-steps", 3, "--out", out)
        outs.append(np.load(out)["arr_0"])
    for o in outs[1:]:
        assert_images_close(o, outs[0])
    assert np.abs(outs[0][0].astype(int) - outs[0][1]).mean() > 5               # samples differ from each other


@pytest.mark.parametrize("name,sampler", [("DiT-T/4", "ddim"), ("SiT-T/4", "ode-heun"), ("DiT-T/4", "ddpm"),
                                          ("SiT-T/4", "sde")])
def test_same_images_for_any_batch_size(ckpts, tmp_path, name, sampler):
    outs = []
    for b in (2, 7):
        out = tmp_path / f"b{b}.npz"
        run("--ckpt", ckpts[name], "--num-samples", 7, "--batch-size", b, "--sampler", sampler, "--num-steps", 4,
            "--cfg-scale", 1.5, "--out", out)
        outs.append(np.load(out)["arr_0"])
    assert_images_close(outs[0], outs[1])


def _worker(rank, out, argv):
    sample.main(argv + ["--device", "cpu", "--out", os.path.join(out, "two.npz")])  # gloo on the CPU


def test_same_file_for_one_and_two_processes(ckpts, tmp_path):
    # SDE: stochastic, so this also checks that no process's noise depends on which shards it was given
    common = ["--ckpt", str(ckpts["SiT-T/4"]), "--num-samples", "10", "--shard-size", "3", "--batch-size", "2",
              "--sampler", "sde", "--num-steps", "5", "--cfg-scale", "1.5", "--seed", "11"]
    run(*common, "--out", tmp_path / "one.npz")
    out = spawn(_worker, common, root=tmp_path)
    one, two = np.load(tmp_path / "one.npz"), np.load(os.path.join(out, "two.npz"))
    assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["arr_1"], two["arr_1"])
    assert str(one["meta"]) == str(two["meta"]) and one["arr_0"].std() > 10


def test_resume_after_interruption_gives_the_same_file(ckpts, tmp_path, capsys):
    common = ["--ckpt", ckpts["DiT-T/4"], "--num-samples", 9, "--shard-size", 4, "--batch-size", 3,
              "--sampler", "ddpm", "--num-steps", 4, "--seed", 2]
    run(*common, "--out", tmp_path / "full.npz")
    out, shards = tmp_path / "part.npz", tmp_path / "part_shards"
    assert run(*common, "--out", out, "--max-shards", 1) is None                  # "interrupted" after one shard
    assert not out.exists() and sorted(os.listdir(shards)) == ["meta.json", "shard_0000000.npz"]
    (shards / "shard_0000004.npz.tmp123").write_bytes(b"cut short")                # a write killed halfway
    first = os.stat(shards / "shard_0000000.npz").st_mtime_ns
    with pytest.raises(SystemExit, match="other settings"):
        run(*common[:-1], 3, "--out", out)                                        # another seed must not mix in
    capsys.readouterr()
    run(*common, "--out", out, "--keep-shards")
    assert "1/3 shards of 4 already" in capsys.readouterr().out
    assert os.stat(shards / "shard_0000000.npz").st_mtime_ns == first              # not sampled again
    full, part = np.load(tmp_path / "full.npz"), np.load(out)
    assert np.array_equal(full["arr_0"], part["arr_0"]) and np.array_equal(full["arr_1"], part["arr_1"])
    with pytest.raises(SystemExit, match="already exists"):
        run(*common, "--out", out)


# ---------------------------------------------------------------------------------------------------------
# Errors a user can cause: one clear sentence
# ---------------------------------------------------------------------------------------------------------

def _one_sentence(e):
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("error: ") and msg.endswith((".", ")")), msg


def test_errors(ckpts, tmp_path):
    cases = [
        (["--ckpt", tmp_path / "nope.pt"], "does not exist"),
        (["--ckpt", tmp_path], "does not exist"),                                 # a folder without checkpoint.pt
        (["--ckpt", ckpts["SiT-T/4"], "--model", "DiT-T/4"], "is a SiT-T/4 checkpoint but --model is DiT-T/4"),
        (["--ckpt", ckpts["DiT-T/4"], "--sampler", "sde"], "choose --sampler from ddpm, ddim"),
        (["--ckpt", ckpts["MeanFlow-T/4"], "--cfg-scale", 1.5], "without --cfg-scale"),
        (["--ckpt", ckpts["DiT-T/4"], "--guidance-interval", 0.2, 0.8], "without --guidance-interval"),
        (["--ckpt", ckpts["SiT-T/4"], "--guidance-interval", 0.8, 0.2], "give LO < HI"),
        (["--ckpt", ckpts["DiT-T/4"], "--classes", 7], "out of range"),
        (["--ckpt", ckpts["SiT-T/4"], "--guide-channels", 4], "out of range"),
        (["ODE", "--ckpt", ckpts["DiT-T/4"]], "choose --sampler from ddpm, ddim"),
        (["SDE", "--ckpt", ckpts["SiT-T/4"], "--num-sampling-steps", 1], "needs --num-steps >= 2"),
    ]
    empty, garbage = tmp_path / "empty.pt", tmp_path / "garbage.pt"
    empty.write_bytes(b"")
    garbage.write_text("not a checkpoint")
    cases += [(["--ckpt", empty], "is empty"), (["--ckpt", garbage], "could not read")]
    raw = tmp_path / "weights.pt"
    torch.save(torch.load(ckpts["DiT-T/4"], weights_only=True)["ema"], raw)
    cases.append((["--ckpt", raw, "--model", "DiT-T/2", "--image-size", S], "choose the matching --model"))
    for argv, match in cases:
        with pytest.raises(SystemExit, match=match) as e:
            run(*argv, "--out", tmp_path / "x.png")
        _one_sentence(e)


@pytest.mark.parametrize("flag,values,need", [
    ("--num-steps", ["0"], "an integer >= 1"), ("--num-sampling-steps", ["-5"], "an integer >= 1"),
    ("--batch-size", ["0"], "an integer >= 1"), ("--shard-size", ["1.5"], "an integer >= 1"),
    ("--num-samples", ["0"], "an integer >= 1"), ("--max-shards", ["0"], "an integer >= 1"),
    ("--nrow", ["0"], "an integer >= 1"), ("--image-size", ["-256"], "an integer >= 1"),
    ("--guide-channels", ["0"], "an integer >= 1"), ("--seed", ["-1"], "integer >= 0"),
    ("--classes", ["3", "-1"], "integer >= 0"), ("--cfg-scale", ["nan"], "number >= 0"),
    ("--cfg-scale", ["-2"], "number >= 0"), ("--eta", ["1.5"], r"number in \[0, 1\]"),
    ("--guidance-interval", ["0", "2"], r"number in \[0, 1\]"), ("--atol", ["0"], r"number in \(0, 1\)"),
    ("--rtol", ["inf"], r"number in \(0, 1\)"), ("--sampling-method", ["rk4"], "invalid choice: 'rk4'"),
])
def test_numeric_flags_are_checked_against_their_meaning(ckpts, capsys, flag, values, need):
    with pytest.raises(SystemExit):
        run("--ckpt", ckpts["DiT-T/4"], flag, *values)
    err = capsys.readouterr().err
    assert f"argument {flag}" in err or f"/{flag}" in err, err
    assert re.search(need, err), err


def test_help_names_each_default_once(capsys):
    with pytest.raises(SystemExit):
        sample.main(["--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text
    for alias in ("--num-sampling-steps", "--per-proc-batch-size", "--num-fid-samples", "--global-seed",
                  "--sample-dir", "--sampling-method", "--path-type"):
        assert alias in text
    options = " ".join(text.split()).split(" --")                                # one entry per option
    assert all(o.count("(default:") <= 1 for o in options), [o for o in options if o.count("(default:") > 1]
