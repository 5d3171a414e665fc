"""Tests of the shape probe (probe.py): it recognises shapes, not colours, and its FD orders known corruptions.
The first run trains the probe (about 20 s on 2 cores) into the user's cache; later runs read it."""

import numpy as np
import pytest
import torch

import probe
from data import SHAPES, render_shapes
from fid import frechet_distance

N = 400  # balanced: 40 per class


def real(seed, n=N):
    images, labels = render_shapes(np.arange(n), len(SHAPES), 32, seed)
    return images.transpose(0, 2, 3, 1), labels                      # uint8 NHWC as sample.py writes


def colour_blobs(seed, n=N):
    """Each class's hue (as data.py draws it) in a soft round blob on a dark background: colour without shape."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(SHAPES)
    hue = torch.tensor(labels / len(SHAPES))
    rgb = (torch.stack([hue, hue + 2 / 3, hue + 1 / 3], 1) * 2 * np.pi).cos() * 0.4 + 0.6        # (n, 3) class hue
    g = torch.linspace(-1, 1, 32)
    cx, cy = torch.from_numpy(rng.uniform(-0.4, 0.4, (2, n, 1, 1))).float()                     # blob centres
    blob = (-((g[None, None, :] - cx) ** 2 + (g[None, :, None] - cy) ** 2) / 0.15).exp()      # (n, 32, 32)
    x = 0.15 + (rgb[:, :, None, None] - 0.15) * blob[:, None]
    return x * 2 - 1, labels                                          # float NCHW in [-1, 1]


@pytest.fixture(scope="module")
def metrics_real():
    return probe.shape_metrics(*real(seed=7))


def test_recognises_held_out_real_shapes(metrics_real):
    assert metrics_real["shape_acc"] >= 0.97


def test_near_chance_on_noise_and_on_colour_without_shape():
    labels = np.arange(N) % len(SHAPES)
    noise = torch.randn(N, 3, 32, 32, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    assert probe.shape_metrics(noise, labels)["shape_acc"] <= 0.2
    assert probe.shape_metrics(*colour_blobs(seed=0))["shape_acc"] <= 0.2


def test_hue_cannot_decide():
    # any permutation of R, G, B recolours every shape (a red circle turns green or blue): the predictions stay,
    # which a probe reading luminance (0.299 R + 0.587 G + 0.114 B) or hue would not do
    images, _ = real(seed=9)
    x = probe.to_input(images)
    model, _, _ = probe.load_probe(32)
    _, pred = probe.features(model, x)
    for perm in ([1, 2, 0], [2, 0, 1], [0, 2, 1]):
        _, pred_perm = probe.features(model, probe.to_input(images[..., perm]))
        assert torch.equal(pred, pred_perm)


def test_fd_of_two_disjoint_real_sets_is_near_zero():
    model, _, _ = probe.load_probe(32)
    f1, _ = probe.features(model, probe.to_input(real(seed=11, n=2000)[0]))
    f2, _ = probe.features(model, probe.to_input(real(seed=12, n=2000)[0]))
    stats = [(f.mean(0), np.cov(f, rowvar=False)) for f in (f1, f2)]
    fd_real = frechet_distance(*stats[0], *stats[1])
    blobs, _ = probe.features(model, probe.to_input(colour_blobs(seed=1, n=2000)[0]))
    fd_blobs = frechet_distance(blobs.mean(0), np.cov(blobs, rowvar=False), *stats[0])
    assert fd_real < 0.01 * fd_blobs


def test_known_orderings(metrics_real):
    images, labels = real(seed=7)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    gen = torch.Generator().manual_seed(1)
    noisy = [probe.shape_metrics((x + s * torch.randn(x.shape, generator=gen)).clamp(-1, 1), labels)
             for s in (0.3, 1.0)]
    fds = [metrics_real["shape_fd"]] + [m["shape_fd"] for m in noisy]
    assert fds == sorted(fds) and fds[0] < 0.2 * fds[1]              # more noise, further from the real shapes
    assert metrics_real["shape_acc"] > noisy[0]["shape_acc"] > noisy[1]["shape_acc"]
    shuffled = probe.shape_metrics(images, np.roll(labels, 1))        # every image asked for another class
    assert shuffled["shape_acc"] <= 0.05
    assert shuffled["shape_fd"] == pytest.approx(metrics_real["shape_fd"])  # FD ignores the labels


def test_uint8_and_float_inputs_agree(metrics_real):
    images, labels = real(seed=7)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    m = probe.shape_metrics(x, labels)
    assert m["shape_acc"] == metrics_real["shape_acc"]
    assert m["shape_fd"] == pytest.approx(metrics_real["shape_fd"], rel=1e-6)


def test_training_keeps_the_callers_random_state_and_grad_mode():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    with torch.no_grad():  # as train.py's grids call it
        model, _, _ = probe.train_probe(8, steps=3)
        assert not torch.is_grad_enabled()
    assert torch.equal(torch.rand(3), expected)
    assert model[0].weight.grad is not None                            # it did learn under the caller's no_grad


def test_cache_round_trip():
    model, mu, sigma = probe.load_probe(32)
    probe.load_probe.cache_clear()                                    # the next load reads the file
    model2, mu2, sigma2 = probe.load_probe(32)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)


def test_cli_reads_an_npz(tmp_path, capsys):
    images, labels = real(seed=13, n=100)
    path = tmp_path / "shapes.npz"
    np.savez(path, arr_0=images, arr_1=labels)
    metrics = probe.main([str(path)])
    assert metrics["shape_acc"] >= 0.95 and "shape accuracy" in capsys.readouterr().out


def test_cli_samples_a_checkpoint(tmp_path, capsys):
    # smoke test of the plumbing (sample.load_model, sample.generate): an untrained SiT draws noise-like images
    import sample

    model, _ = sample.build_model("SiT-T/4", 32, len(SHAPES), latent=False)
    config = dict(model="SiT-T/4", image_size=32, num_classes=len(SHAPES), latent=False, grid_sampler="ode-heun",
                  grid_steps=2, grid_cfg=1.0)
    torch.save(dict(ema=model.state_dict(), config=config), tmp_path / "checkpoint.pt")
    metrics = probe.main([str(tmp_path), "--per-class", "4"])
    assert 0 <= metrics["shape_acc"] <= 1 and metrics["shape_fd"] > 0 and "40 images" in capsys.readouterr().out
