"""
Shape probe: a sample-quality metric for the built-in shapes (data.py), as fid.py's Inception is for ImageNet.

A small CNN (three 3x3 conv-ReLU-maxpool layers of 16, 32, 32 channels, a global mean, a linear classifier) trained
here on 20,000 rendered shapes under random blur and noise, deterministically, once per image size (~20 s on 2 CPU
cores), and cached in ~/.cache/dispersive/ under a name that hashes the rendering; nothing is downloaded. It sees only
V = max(R, G, B), standardised per image: data.py draws V independently of the class, so hue cannot decide.
shape_acc: the fraction of images it assigns to the asked-for class (chance 1/10). shape_fd: the Fréchet distance of
its 32-d features to those of 5,000 held-out shapes; like FID it grows as the number of images shrinks.

    python probe.py runs/<name>            # samples a train.py checkpoint: 20 per class with its grid settings
    python probe.py shapes.npz             # arr_0 uint8 (N, H, W, 3), arr_1 labels (indices into data.SHAPES)
"""

import argparse
import functools
import hashlib
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import SHAPES, render_shapes
from dit import checked
from fid import compute_statistics, frechet_distance

TRAIN_SEED, REF_SEED, NUM_TRAIN, NUM_REF = 1000, 1001, 20_000, 5_000  # the probe's training and reference shapes


def make_probe(num_classes=len(SHAPES)):
    layer = lambda c_in, c_out: [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]  # noqa: E731
    return nn.Sequential(*layer(1, 16), *layer(16, 32), *layer(32, 32), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, num_classes))                    # model[:-1]: the (N, 32) features


def to_input(images):
    """uint8 (N, H, W, 3) or float [-1, 1] (N, 3, H, W) -> (N, 1, H, W): V = max(R, G, B), standardised per image."""
    x = images.detach().cpu() if torch.is_tensor(images) else torch.from_numpy(np.asarray(images))
    if x.dtype == torch.uint8:
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
    v = x.float().amax(1, keepdim=True)                                # hue-free
    return (v - v.mean((2, 3), keepdim=True)) / (v.std((2, 3), keepdim=True) + 1e-3)


def render(n, image_size, seed):
    """n shapes of `seed` as probe inputs, and their labels; in chunks (one big batch renders slower)."""
    images = np.concatenate([render_shapes(np.arange(i, min(i + 1000, n)), len(SHAPES), image_size, seed)[0]
                             for i in range(0, n, 1000)])
    return to_input(torch.from_numpy(images).float() / 127.5 - 1), torch.arange(n) % len(SHAPES)


@torch.no_grad()
def features(model, x, batch_size=500):
    """(float64 features (N, 32), predicted classes (N,)) of probe inputs x."""
    f = torch.cat([model[:-1](b) for b in x.split(batch_size)])
    return f.double().numpy(), model[-1](f).argmax(1)


def train_probe(image_size, steps=400, batch_size=128, lr=6e-3):
    """(model, mu, sigma): the probe trained deterministically on TRAIN_SEED shapes, and the statistics of its
    features on REF_SEED shapes."""
    x, y = render(NUM_TRAIN, image_size, TRAIN_SEED)
    with torch.random.fork_rng(devices=[]), torch.enable_grad():  # the caller's RNG and no_grad stay as they were
        torch.manual_seed(0)
        model = make_probe()
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        order = torch.randperm(steps * batch_size) % NUM_TRAIN
        for i, idx in enumerate(order.split(batch_size)):
            opt.param_groups[0]["lr"] = lr * 0.5 * (1 + np.cos(np.pi * i / steps))   # cosine decay to 0
            xb, r = x[idx], torch.rand(2, len(idx), 1, 1, 1)      # robust to what leaves a shape a shape: blur, noise
            blur = F.avg_pool2d(xb, 3, 1, 1, count_include_pad=False)
            xb = xb + r[0] * (blur - xb) + 0.5 * r[1] * torch.randn_like(xb)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), y[idx]).backward()
            opt.step()
    model.eval()
    ref = features(model, render(NUM_REF, image_size, REF_SEED)[0])[0]
    with torch.no_grad():  # unit mean variance on real shapes: ReLU, max and mean commute with a positive scale
        s = float(1 / np.sqrt(ref.var(0).mean()))
        model[6].weight.mul_(s), model[6].bias.mul_(s), model[-1].weight.div_(s)
    return (model, *compute_statistics(ref * s))


@functools.cache
def load_probe(image_size):
    """(model, mu, sigma) for `image_size`: from the disk cache, or train_probe (then cached atomically)."""
    key = hashlib.sha1(render_shapes(np.arange(100), len(SHAPES), image_size, TRAIN_SEED)[0].tobytes()).hexdigest()
    folder = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dispersive")
    path = os.path.join(folder, f"shape_probe_v1_{image_size}px_{key[:12]}.pt")  # v1: bump when train_probe changes
    if os.path.exists(path):
        state = torch.load(path, map_location="cpu", weights_only=True)
        model, mu, sigma = make_probe(), state["mu"].numpy(), state["sigma"].numpy()
        model.load_state_dict(state["model"])
    else:
        model, mu, sigma = train_probe(image_size)
        os.makedirs(folder, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        torch.save(dict(model=model.state_dict(), mu=torch.from_numpy(mu), sigma=torch.from_numpy(sigma)), tmp)
        os.replace(tmp, path)                                          # concurrent runs never see half a file
    return model.eval(), mu, sigma


def shape_metrics(images, labels):
    """{"shape_acc", "shape_fd"} of images (uint8 (N, H, W, 3) or float [-1, 1] (N, 3, H, W)) asked for `labels`
    (indices into data.SHAPES), with the probe of the images' size."""
    x = to_input(images)
    model, mu, sigma = load_probe(x.shape[-1])
    f, pred = features(model, x)
    acc = (pred == torch.as_tensor(np.asarray(labels)).long()).float().mean().item()
    return {"shape_acc": acc, "shape_fd": frechet_distance(*compute_statistics(f), mu, sigma)}


def sample_checkpoint(path, per_class=20, seed=0):
    """(uint8 images, labels): per_class samples of every class from a train.py checkpoint of the built-in shapes,
    with the sampler, steps and guidance of its grids."""
    import sample  # lazily: only a checkpoint needs the models and samplers

    model, family, cfg = sample.load_model(path)
    if cfg.get("latent") or cfg.get("data_path"):
        raise ValueError(f"{path} was not trained on the built-in shapes in pixel space: measure it with fid.py")
    y = torch.arange(cfg["num_classes"]).repeat_interleave(per_class)
    z = torch.randn(len(y), 3, cfg["image_size"], cfg["image_size"], generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        x = sample.generate(family, model, z, y, cfg.get("grid_sampler"), cfg.get("grid_steps"),
                            cfg.get("grid_cfg", 1.0), generator=seed, path=cfg.get("path", "linear"))
    return sample.to_uint8(x), y.numpy()


def main(argv=None):
    p = argparse.ArgumentParser(description="Shape accuracy and shape FD of a checkpoint or an .npz of shapes.")
    p.add_argument("path", help="checkpoint.pt or run folder of train.py, or .npz with arr_0 uint8 NHWC, arr_1 labels")
    p.add_argument("--per-class", type=checked(int, lambda v: v >= 1, "an integer >= 1"), default=20,
                   help="samples per class from a checkpoint (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise (default 0)")
    args = p.parse_args(argv)
    try:
        if args.path.endswith(".npz"):
            with np.load(args.path) as f:
                images, labels = f["arr_0"], f["arr_1"]
        else:
            images, labels = sample_checkpoint(args.path, args.per_class, args.seed)
    except KeyError as e:
        raise SystemExit(f"error: {args.path} has no {e}: probe.py reads arr_0 (uint8 NHWC images) and arr_1 (labels)")
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    m = shape_metrics(images, labels)
    print(f"{args.path}: {len(labels)} images | shape accuracy {m['shape_acc']:.3f} | shape FD {m['shape_fd']:.2f}")
    return m


if __name__ == "__main__":
    main()
