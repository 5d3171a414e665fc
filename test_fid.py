"""
Tests of fid.py. The network is checked against pytorch-fid's own InceptionV3 outputs
(testdata/fid_inception_golden.pt, seeded random weights built from testdata/fid_inception_manifest.tsv),
the metrics against float64 brute force and closed forms, the command line end to end (with files laid out
as pytorch-fid and ADM's evaluator write them), and the errors a user can cause. Nothing touches the network:
torch.hub's downloads are monkeypatched.
"""

import email.message
import hashlib
import io
import json
import os
import re
import shutil
import urllib.error
import warnings

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial
import torch
from PIL import Image

import fid

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "testdata", "fid_inception_golden.pt")
MANIFEST = os.path.join(HERE, "testdata", "fid_inception_manifest.tsv")
FEATURE_KEYS = ("pool3", "logits", "logits_unbiased", "spatial")


def read_manifest():
    rows = []
    with open(MANIFEST) as f:
        for line in f:
            key, shape = line.rstrip("\n").split("\t")
            rows.append((key, tuple(int(s) for s in shape.split(",")) if shape else ()))
    return rows


def manifest_state_dict(seed):
    """The golden file's weights, by the recipe of testdata's README."""
    rng = np.random.default_rng(seed)
    state_dict = {}
    for key, shape in read_manifest():
        if key.endswith("num_batches_tracked"):
            state_dict[key] = torch.tensor(0, dtype=torch.long)
            continue
        if key.endswith("conv.weight"):
            a = rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[1:]))
        elif key.endswith(("bn.weight", "running_var")):
            a = 0.5 + rng.random(shape)
        elif key.endswith(("bn.bias", "running_mean")):
            a = 0.1 * rng.standard_normal(shape)
        elif key in ("fc.weight", "fc.bias"):
            a = 0.05 * rng.standard_normal(shape)
        else:
            raise KeyError(key)
        state_dict[key] = torch.from_numpy(a.astype(np.float32))
    return state_dict


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=True)


@pytest.fixture(scope="module")
def state_dict(golden):
    return manifest_state_dict(int(golden["weights_seed"]))


@pytest.fixture(scope="module")
def model(state_dict):
    return fid.load_inception(state_dict, device="cpu")


@pytest.fixture(scope="module")
def weights_file(state_dict, tmp_path_factory):
    # stored without the BatchNorm counters, as some released weight files are
    path = tmp_path_factory.mktemp("weights") / "inception_test.pth"
    torch.save({k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}, path)
    return str(path)


# ----------------------------------------------------------------------------- network and weights

def test_state_dict_layout_is_pytorch_fids():
    manifest = read_manifest()
    assert len(manifest) == 566
    ours = [(k, tuple(v.shape)) for k, v in fid.FIDInception().state_dict().items()]
    assert ours == manifest


def test_strict_load_with_and_without_num_batches_tracked(state_dict, model):
    without = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    assert len(without) == 472
    with torch.device("meta"):  # torch's own strict check of the layout, without a random init
        fid.FIDInception().load_state_dict(state_dict, strict=True, assign=True)
    m = fid.load_inception(without)
    loaded = m.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state_dict.items())
    assert m.network_id == model.network_id  # the counters do not change which network it is
    with pytest.raises(fid.FIDError, match="not the FID Inception's.*Missing key.*fc.bias"):
        fid.load_inception({k: v for k, v in state_dict.items() if k != "fc.bias"})
    with pytest.raises(fid.FIDError, match="not the FID Inception's.*size mismatch for fc.bias"):
        fid.load_inception({**state_dict, "fc.bias": torch.zeros(1000)})


@pytest.mark.parametrize("mode,prefix", [("pytorch-fid", "pt"), ("tf", "tf")])
@pytest.mark.parametrize("index", [0, 1, 2])  # 256x256, 299x299 (resize is the identity), 64x64
def test_features_match_golden(model, golden, mode, prefix, index):
    images = golden[f"images_{index}"][:2]  # two images per size keep the CPU cost down; each row is checked
    if index == 0:  # also the streaming path: batches (numpy and torch) longer than batch_size, more than `total`
        feats = fid.extract_features(iter([images[:1].numpy(), images]), model, mode, batch_size=1, total=1)
        assert all(np.array_equal(v[0], v[1]) for v in feats.values())  # the same image twice, same features
        feats = {k: v[1:] for k, v in feats.items()}
    else:
        feats = fid.extract_features(images, model, mode, batch_size=8)
    for key in FEATURE_KEYS:
        expected = golden[f"{prefix}_{key}_{index}"][:2].numpy()
        assert feats[key].shape == expected.shape
        assert rel(feats[key], expected) <= 1e-5, (key, rel(feats[key], expected))


def test_modes_give_different_features(golden):
    # the two golden preprocessings differ well above the tolerance, so the tests above tell them apart
    assert rel(golden["tf_pool3_0"], golden["pt_pool3_0"]) > 1e-3


def resize_tf1_reference(image, out_h, out_w):
    """TF1 ResizeBilinear (align_corners=False, half_pixel_centers=False), float64 loops."""
    in_h, in_w = image.shape[:2]
    out = np.zeros((out_h, out_w) + image.shape[2:])
    for i in range(out_h):
        y = i * in_h / out_h
        y0 = int(np.floor(y))
        y1, fy = min(y0 + 1, in_h - 1), y - y0
        for j in range(out_w):
            x = j * in_w / out_w
            x0 = int(np.floor(x))
            x1, fx = min(x0 + 1, in_w - 1), x - x0
            top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
            bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


@pytest.mark.parametrize("in_size,out_size", [(7, 11), (13, 4), (5, 5)])  # up, down, same
def test_tf_resize_matches_reference(in_size, out_size):
    image = np.random.default_rng(0).uniform(0, 255, (in_size, in_size, 3))
    x = torch.from_numpy(image).float().permute(2, 0, 1)[None]
    ours = fid.resize_bilinear_tf1(x, out_size)[0].permute(1, 2, 0).double().numpy()
    assert rel(ours, resize_tf1_reference(image, out_size, out_size)) <= 1e-6


# ----------------------------------------------------------------------------- metrics

def random_covariance(rng, d, n=None):
    a = rng.standard_normal((n or 2 * d, d)) @ rng.standard_normal((d, d)) / np.sqrt(d)
    return np.cov(a, rowvar=False)


def test_statistics_match_numpy():
    x = np.random.default_rng(0).standard_normal((50, 6)).astype(np.float32) + 3
    mu, sigma = fid.compute_statistics(x, chunk=7)  # several chunks
    assert rel(mu, x.astype(np.float64).mean(0)) <= 1e-12
    assert rel(sigma, np.cov(x.astype(np.float64), rowvar=False)) <= 1e-12


def test_fid_matches_sqrtm_reference():
    rng = np.random.default_rng(1)
    d = 96
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_covariance(rng, d), random_covariance(rng, d)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real  # the TTUR / pytorch-fid formula, written out here
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert abs(fid.frechet_distance(mu1, s1, mu2, s2) - expected) <= 1e-6 * abs(expected)


def test_fid_closed_form_for_commuting_covariances():
    # diagonal Σ: FD = ‖Δμ‖² + Σ (sqrt(a) − sqrt(b))²
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0.1, 3, 40), rng.uniform(0.1, 3, 40)
    mu1, mu2 = rng.standard_normal(40), rng.standard_normal(40)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert abs(fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) - expected) <= 1e-10 * expected


def test_fid_with_singular_covariance():
    # fewer images than dimensions: no Cholesky factor; the eigen fallback against eigvals of Σ1 Σ2
    rng = np.random.default_rng(3)
    x1, x2 = rng.standard_normal((20, 48)), rng.standard_normal((60, 48)) + 0.3
    with pytest.warns(UserWarning, match="singular"):
        mu1, s1 = fid.compute_statistics(x1)
    mu2, s2 = fid.compute_statistics(x2, chunk=7)
    tr = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * tr
    assert abs(fid.frechet_distance(mu1, s1, mu2, s2) - expected) <= 1e-6 * expected


def test_fid_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(4)
    mu, sigma = rng.standard_normal(64), random_covariance(rng, 64)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) <= 1e-10 * np.trace(sigma)
    with pytest.warns(UserWarning, match="singular"):  # rank 5 in 64 dimensions: the eigendecomposition path
        mu, sigma = fid.compute_statistics(rng.standard_normal((6, 64)))
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) <= 1e-10 * np.trace(sigma)


def inception_score_reference(logits, split_size):
    """ADM's evaluator in float64: softmax, then exp(mean KL(p(y|x) ‖ p(y))) over consecutive chunks."""
    logits = logits.astype(np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i:i + split_size]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return np.mean(scores)


def test_inception_score_matches_bruteforce():
    logits = 3 * np.random.default_rng(5).standard_normal((40, 1008)).astype(np.float32)
    expected = inception_score_reference(logits, split_size=10)
    assert abs(fid.inception_score(logits, splits=4) - expected) <= 1e-10 * expected
    # closed forms: one prediction for all images gives 1; c confident distinct classes per split give c
    assert abs(fid.inception_score(np.tile(logits[:1], (20, 1)), splits=2) - 1) <= 1e-12
    confident = np.full((30, 1008), -100.0)
    confident[np.arange(30), np.arange(30) % 15] = 100.0
    assert abs(fid.inception_score(confident, splits=2) - 15) <= 1e-6


def test_precision_recall_match_bruteforce():
    rng = np.random.default_rng(6)
    ref = rng.standard_normal((70, 5)).astype(np.float32)
    samples = (1.3 * rng.standard_normal((55, 5)) + 0.4).astype(np.float32)
    k = 3
    d_rr = scipy.spatial.distance.cdist(ref, ref)
    d_ss = scipy.spatial.distance.cdist(samples, samples)
    d_rs = scipy.spatial.distance.cdist(ref, samples)
    r_ref = np.sort(d_rr, axis=1)[:, k]  # index 0 is the point itself
    r_sam = np.sort(d_ss, axis=1)[:, k]
    precision = np.mean([(d_rs[:, j] <= r_ref).any() for j in range(len(samples))])
    recall = np.mean([(d_rs[i] <= r_sam).any() for i in range(len(ref))])
    assert 0 < precision < 1 and 0 < recall < 1
    radii = fid.knn_radii(torch.from_numpy(ref), k, batch_size=16).double().numpy()
    assert rel(np.sqrt(radii), r_ref) <= 1e-5  # radii are squared distances, as in ADM
    p, r = fid.precision_recall(ref, samples, k=k, batch_size=16, device="cpu")  # blocks smaller than both sets
    assert (p, r) == (precision, recall)


# ----------------------------------------------------------------------------- inputs

def test_npz_is_streamed_in_batches(tmp_path):
    images = np.random.default_rng(7).integers(0, 256, (7, 5, 4, 3), dtype=np.uint8)
    for save in (np.savez, np.savez_compressed):
        path = str(tmp_path / f"{save.__name__}.npz")
        save(path, arr_0=images)
        src = fid.Source(path)
        batches = list(src.batches(batch_size=3, num_workers=1))
        assert [len(b) for b in batches] == [3, 3, 1]
        assert np.array_equal(np.concatenate(batches), images)
        src.take(5)
        assert np.array_equal(np.concatenate(list(src.batches(2, 1))), images[:5])


def test_folder_is_read_recursively_in_order(tmp_path):
    rng = np.random.default_rng(8)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(6, 5, 3)] * 3 + [(4, 4, 3)] * 2]
    names = ["a/0.png", "a/1.PNG", "b/c/2.png", "b/c/3.bmp", "d.png"]
    for name, image in zip(names, images):
        os.makedirs(tmp_path / os.path.dirname(name), exist_ok=True)
        Image.fromarray(image).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    src = fid.Source(str(tmp_path))
    assert src.num_images == 5
    batches = list(src.batches(batch_size=4, num_workers=2))
    assert [b.shape for b in batches] == [(3, 6, 5, 3), (1, 4, 4, 3), (1, 4, 4, 3)]  # cut where the size changes
    assert all(np.array_equal(a, b) for a, b in zip(np.concatenate(batches[:1]), images[:3]))
    assert np.array_equal(batches[1][0], images[3]) and np.array_equal(batches[2][0], images[4])


def test_folder_with_a_link_loop_counts_each_image_once(tmp_path):
    for name in ["x.png", "sub/y.png"]:
        os.makedirs(tmp_path / os.path.dirname(name), exist_ok=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / name)
    os.symlink(".", tmp_path / "self")        # os.walk(followlinks=True) would go round this loop until paths get too long
    os.symlink("..", tmp_path / "sub" / "up")
    src = fid.Source(str(tmp_path))
    assert src.num_images == 2 and [os.path.relpath(f, tmp_path) for f in src.files] == ["sub/y.png", "x.png"]


# ----------------------------------------------------------------------------- command line

def run_main(argv, capsys):
    fid.main(argv + ["--json"])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_save_stats_round_trip(golden, model, weights_file, tmp_path, capsys):
    images = golden["images_2"][:2].numpy()
    samples, stats = str(tmp_path / "samples.npz"), str(tmp_path / "stats.npz")
    np.savez(samples, arr_0=images)
    common = ["--weights", weights_file, "--device", "cpu"]
    with pytest.warns(UserWarning, match="singular"):
        out = run_main([samples, "--save-stats", stats, "--metrics", "is", "--is-splits", "1"] + common, capsys)
    pool3 = golden["pt_pool3_2"][:2].double().numpy()  # pytorch-fid's own features of these images
    spatial = golden["pt_spatial_2"][:2].double().numpy()
    expected_is = inception_score_reference(golden["pt_logits_unbiased_2"][:2].numpy(), split_size=2)
    assert abs(out["inception_score"] - expected_is) <= 1e-5 * expected_is
    assert out["settings"]["network"] == model.network_id and out["settings"]["mode"] == "pytorch-fid"
    saved = np.load(stats)
    assert rel(saved["mu"], pool3.mean(0)) <= 1e-5 and rel(saved["mu_s"], spatial.mean(0)) <= 1e-5
    assert rel(saved["sigma"], np.cov(pool3, rowvar=False)) <= 1e-4
    assert rel(saved["sigma_s"], np.cov(spatial, rowvar=False)) <= 1e-4
    assert str(saved["mode"]) == "pytorch-fid" and str(saved["network"]) == model.network_id
    assert int(saved["num_images"]) == 2
    assert load_back(fid.Source(stats), saved)

    # pytorch-fid's form, `--save-stats IN OUT` (numpy appends .npz), writes the same file; it never overwrites
    with pytest.warns(UserWarning, match="singular"):
        fid.main(["--save-stats", samples, str(tmp_path / "pt_form")] + common)
    assert load_back(fid.Source(str(tmp_path / "pt_form.npz")), saved)
    for existing in (stats, stats[:-len(".npz")]):
        with pytest.raises(SystemExit):
            fid.main(["--save-stats", samples, existing] + common)
        assert "exists" in capsys.readouterr().err

    # statistics of another mode or network are refused before any feature is extracted, naming the fix
    with pytest.raises(SystemExit, match="--mode pytorch-fid"):
        fid.main([samples, stats, "--mode", "tf", "--metrics", "fid"] + common)
    other = str(tmp_path / "other_network.npz")
    np.savez(other, **{k: saved[k] for k in saved.files if k != "network"}, network=np.array("custom-00000000"))
    with pytest.raises(SystemExit, match="--weights"):
        fid.main([samples, other, "--metrics", "fid"] + common)


def load_back(source, saved):  # what fid.py reads back from a statistics file
    return all(np.array_equal(source.stats[k], saved[k]) for k in ("mu", "sigma", "mu_s", "sigma_s")) and \
        source.meta == {"mode": str(saved["mode"]), "network": str(saved["network"])}


def test_fid_of_statistics_files(tmp_path, capsys):
    # small statistics keep the linear algebra cheap; the command line treats them like 2048-d ones
    rng = np.random.default_rng(9)
    d = 12
    ours, adm = str(tmp_path / "ours.npz"), str(tmp_path / "adm_ref.npz")
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_covariance(rng, d), random_covariance(rng, d)
    fid.save_statistics(ours, mu1, s1, mu1, s1, mode="pytorch-fid", network="custom-12345678", num_images=50)
    np.savez(adm, mu=mu2, sigma=s2, mu_s=mu1, sigma_s=s1)  # ADM's reference batches carry no metadata
    with pytest.warns(UserWarning, match="--mode tf"):
        out = run_main([ours, adm, "--metrics", "fid,sfid"], capsys)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert abs(out["fid"] - expected) <= 1e-6 * expected
    assert abs(out["sfid"]) <= 1e-10 * np.trace(s1)  # identical spatial statistics
    assert out["settings"]["network"] is None  # statistics only: no network was loaded
    tf_stats = str(tmp_path / "tf.npz")
    fid.save_statistics(tf_stats, mu2, s2, mode="tf", network="custom-12345678")
    with pytest.raises(SystemExit, match="same --mode"):
        fid.main([ours, tf_stats, "--metrics", "fid"])
    with pytest.raises(SystemExit, match="has no images"):  # precision/recall needs images on both sides
        fid.main([ours, adm, "--metrics", "pr"])


# ----------------------------------------------------------------------------- errors a user can cause

def test_refuses_images_of_wrong_dtype_or_layout(model):
    good = np.zeros((2, 16, 16, 3), np.uint8)
    with pytest.raises(fid.FIDError, match="uint8"):
        fid.extract_features(good.astype(np.float32) / 255, model)
    with pytest.raises(fid.FIDError, match="uint8"):
        fid.extract_features(torch.full((2, 16, 16, 3), float("nan")), model)
    with pytest.raises(fid.FIDError, match="NHWC"):
        fid.extract_features(good.transpose(0, 3, 1, 2), model)
    with pytest.raises(fid.FIDError, match=r"\(N, H, W, 3\)"):
        fid.extract_features(good[0], model)
    with pytest.raises(fid.FIDError, match="mode"):
        fid.extract_features(good, model, mode="clean-fid")


def test_refuses_npz_of_float_images(tmp_path):
    path = str(tmp_path / "float.npz")
    np.savez(path, arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(SystemExit, match="uint8"):
        fid.main([path])


def test_refuses_nan(state_dict):
    x = np.random.default_rng(10).standard_normal((10, 4))
    x[3, 1] = np.nan
    with pytest.raises(fid.FIDError, match="NaN"):
        fid.compute_statistics(x)
    with pytest.raises(fid.FIDError, match="NaN"):
        fid.frechet_distance(np.full(2, np.nan), np.eye(2), np.zeros(2), np.eye(2))
    with pytest.raises(fid.FIDError, match="NaN"):
        fid.inception_score(x, splits=2)
    broken = dict(state_dict)
    broken["Conv2d_1a_3x3.bn.running_var"] = torch.full((32,), float("nan"))
    with pytest.raises(fid.FIDError, match="NaN"):
        fid.extract_features(np.full((1, 8, 8, 3), 128, np.uint8), fid.load_inception(broken))


def test_warns_on_fewer_images_than_dimensions():
    with pytest.warns(UserWarning, match="at least 33 images"):
        fid.compute_statistics(np.random.default_rng(11).standard_normal((10, 32)))
    with pytest.raises(fid.FIDError, match="at least 2 images"):
        fid.compute_statistics(np.zeros((1, 32)))


def test_missing_files(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        fid.main([str(tmp_path / "missing.npz")])
    with pytest.raises(fid.FIDError, match="not found"):
        fid.load_inception(str(tmp_path / "missing.pth"))
    with pytest.raises(SystemExit, match="no images"):
        fid.main([str(tmp_path)])


def test_corrupt_weights_file(tmp_path):
    official = tmp_path / fid.WEIGHTS_NAME
    official.write_bytes(b"<html>rate limited</html>")
    with pytest.raises(fid.FIDError, match="corrupt") as e:
        fid.load_inception(str(official))
    assert fid.WEIGHTS_URL in str(e.value)  # says where to get the file by hand
    other = tmp_path / "my_inception.pth"
    other.write_bytes(b"\x00" * 100)
    with pytest.raises(fid.FIDError, match="cannot read"):
        fid.load_inception(str(other))


def test_npz_without_images_or_statistics(tmp_path):
    path = str(tmp_path / "labels.npz")
    np.savez(path, arr_1=np.arange(3))
    with pytest.raises(SystemExit, match="neither images"):
        fid.main([path])


# ----------------------------------------------------------------------------- habits of pytorch-fid and ADM users

@pytest.fixture
def hub_checkpoints(tmp_path, monkeypatch):
    """torch.hub's cache under a temporary TORCH_HOME (pytorch-fid keeps its weights there), offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert torch.hub.get_dir() == str(tmp_path / "torch" / "hub")  # no torch.hub.set_dir in this process

    def offline(url, dst, hash_prefix=None, progress=True):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_weights_already_in_torch_hub_cache_are_used(golden, weights_file, hub_checkpoints, tmp_path, monkeypatch,
                                                     capsys):
    hub_checkpoints.mkdir(parents=True)
    cached = hub_checkpoints / fid.WEIGHTS_NAME  # where `python -m pytorch_fid` downloaded it
    shutil.copyfile(weights_file, cached)  # random weights, pytorch-fid's key layout
    # random weights cannot have the release's sha256; their own prefix stands in for it
    monkeypatch.setattr(fid, "WEIGHTS_SHA256_PREFIX", hashlib.sha256(cached.read_bytes()).hexdigest()[:8])
    samples = str(tmp_path / "samples.npz")
    np.savez(samples, arr_0=golden["images_2"][:2].numpy())
    out = run_main([samples, "--metrics", "is", "--is-splits", "1", "--device", "cpu"], capsys)  # offline, no --weights
    expected = inception_score_reference(golden["pt_logits_unbiased_2"][:2].numpy(), split_size=2)
    assert abs(out["inception_score"] - expected) <= 1e-5 * expected
    assert out["settings"]["network"] == fid.OFFICIAL_NETWORK_ID


def test_missing_or_corrupt_weights_say_what_to_do(hub_checkpoints, monkeypatch):
    target = hub_checkpoints / fid.WEIGHTS_NAME
    with pytest.raises(fid.FIDError, match="--weights") as e:  # offline, nothing cached
        fid.load_inception()
    assert fid.WEIGHTS_URL in str(e.value) and str(target) in str(e.value)  # what to fetch, where to put it

    class Response(io.BytesIO):  # a download that is not the weights (a rate-limit page)
        def info(self):
            return email.message.Message()

    monkeypatch.undo()
    monkeypatch.setenv("TORCH_HOME", str(target.parents[2]))
    monkeypatch.setattr(torch.hub, "urlopen", lambda request: Response(b"<html>rate limited</html>"))
    with pytest.raises(fid.FIDError, match="invalid hash"):  # torch.hub checks the name's sha256 prefix
        fid.load_inception()
    assert not target.exists()  # nothing half-written is left to be mistaken for the weights
    target.write_bytes(b"<html>rate limited</html>")  # a damaged file in the cache
    with pytest.raises(fid.FIDError, match="corrupt") as e:
        fid.load_inception()
    assert str(target) in str(e.value) and "--weights" in str(e.value)


def test_adm_argument_order_is_swapped_with_a_notice(golden, weights_file, tmp_path, capsys):
    rng = np.random.default_rng(12)
    images, feats = golden["images_0"].numpy(), golden["tf_pool3_0"].double().numpy()
    samples, ref = str(tmp_path / "samples.npz"), str(tmp_path / "VIRTUAL_ref.npz")
    np.savez(samples, arr_0=images[[0, 2]], arr_1=np.arange(2))  # ADM's sample batch: images and labels
    # ADM's reference batch layout: arr_0 images and float64 pool3/spatial statistics, no mode/network keys
    np.savez(ref, arr_0=images[[0, 1]], mu=rng.standard_normal(2048), sigma=np.diag(rng.uniform(0.1, 1, 2048)),
             mu_s=rng.standard_normal(2023), sigma_s=np.diag(rng.uniform(0.1, 1, 2023)))
    assert fid._adm_order(fid.Source(samples), fid.Source(ref))[0].path == samples  # our order stays
    fid.main([ref, samples, "--mode", "tf", "--metrics", "is,pr", "--is-splits", "1", "--pr-k", "1",
              "--weights", weights_file, "--device", "cpu", "--json"])  # python evaluator.py ref_batch sample_batch
    captured = capsys.readouterr()
    out = json.loads(captured.out.strip().splitlines()[-1])
    assert "ADM's order" in captured.err and f"python fid.py {samples} {ref}" in captured.err
    assert out["settings"]["samples"].startswith(samples) and out["settings"]["ref"].startswith(ref)
    # the Inception Score of the samples, not of the reference images
    logits = golden["tf_logits_unbiased_0"].numpy()
    expected = inception_score_reference(logits[[0, 2]], split_size=2)
    assert abs(out["inception_score"] - expected) <= 1e-6 * expected
    assert abs(inception_score_reference(logits[[0, 1]], split_size=2) - expected) > 5e-5 * expected
    # precision and recall not swapped: brute force with k = 1 on the golden features gives 1.0 and 0.5
    d_rr, d_ss, d_rs = (scipy.spatial.distance.cdist(feats[a], feats[b]) for a, b in
                        (([0, 1], [0, 1]), ([0, 2], [0, 2]), ([0, 1], [0, 2])))
    r_ref, r_sam = d_rr.max(1), d_ss.max(1)  # with two points, the other one is the nearest neighbour
    precision, recall = (d_rs <= r_ref[:, None]).any(0).mean(), (d_rs <= r_sam[None, :]).any(1).mean()
    assert (out["precision"], out["recall"]) == (precision, recall) == (1.0, 0.5)

    # a statistics file first and images second is ADM's order too: IS of the images is computed, not refused
    stats = str(tmp_path / "ref_stats.npz")
    np.savez(stats, mu=np.zeros(2048), sigma=np.eye(2048))
    common = ["--is-splits", "1", "--weights", weights_file, "--device", "cpu"]
    out = run_main([stats, samples, "--metrics", "is"] + common, capsys)
    expected = inception_score_reference(golden["pt_logits_unbiased_0"].numpy()[[0, 2]], split_size=2)
    assert abs(out["inception_score"] - expected) <= 1e-6 * expected and out["settings"]["ref"].startswith(stats)


def test_pytorch_fid_statistics_file(tmp_path, capsys):
    rng = np.random.default_rng(13)
    d = 12
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_covariance(rng, d), random_covariance(rng, d)
    pt = str(tmp_path / "pytorch_fid_stats.npz")
    np.savez_compressed(pt, mu=mu2, sigma=s2)  # pytorch-fid's save_fid_stats: mu and sigma only
    ours, ours_tf = str(tmp_path / "ours.npz"), str(tmp_path / "ours_tf.npz")
    fid.save_statistics(ours, mu1, s1, mode="pytorch-fid", network="custom-12345678")
    fid.save_statistics(ours_tf, mu1, s1, mode="tf", network="custom-12345678")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same preprocessing as pytorch-fid: nothing to warn about
        out = run_main([ours, pt, "--metrics", "fid"], capsys)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert abs(out["fid"] - expected) <= 1e-6 * expected
    with pytest.warns(UserWarning, match="pytorch-fid's statistics format") as record:  # warned, not refused
        assert run_main([ours_tf, pt, "--metrics", "fid"], capsys)["fid"] == out["fid"]
    assert "ADM" not in str(record[0].message) and "--mode pytorch-fid" in str(record[0].message)


def test_refuses_statistics_that_are_not_a_covariance(tmp_path):
    d = 8
    good = str(tmp_path / "good.npz")
    fid.save_statistics(good, np.zeros(d), np.eye(d))
    indefinite = np.diag([1.0] * (d - 1) + [-0.5])
    for name, sigma, why in [("minus_identity", -np.eye(d), "positive-semidefinite"),
                             ("indefinite", indefinite, "positive-semidefinite"),
                             ("asymmetric", np.eye(d) + np.triu(np.ones((d, d)), 1), "symmetric")]:
        path = str(tmp_path / f"{name}.npz")
        np.savez(path, mu=np.zeros(d), sigma=sigma)
        with pytest.raises(SystemExit, match=re.escape(f"sigma of {path}") + f".*not {why}"):
            fid.main([good, path, "--metrics", "fid"])
    with pytest.raises(fid.FIDError, match="positive-semidefinite"):  # the library refuses it too (was FID 0.0)
        fid.frechet_distance(np.zeros(d), -np.eye(d), np.zeros(d), -np.eye(d))
    # covariances that are PSD up to round-off pass: fewer images than dimensions, stored in float64 or float32
    s = np.cov(np.random.default_rng(14).standard_normal((20, 48)), rowvar=False)
    for stored in (s, s.astype(np.float32)):
        assert np.linalg.eigvalsh(stored.astype(np.float64)).min() < 0  # round-off below zero
        fid.check_covariance(stored)


def test_pytorch_fid_flags(tmp_path, capsys):
    with pytest.raises(SystemExit):
        fid.main(["--help"])
    help_text = capsys.readouterr().out
    assert all(flag in help_text for flag in ("--dims", "--batch-size", "--num-workers", "--device", "--save-stats"))
    stats = str(tmp_path / "stats.npz")
    fid.save_statistics(stats, np.zeros(4), np.eye(4), mode="pytorch-fid")
    assert run_main([stats, stats, "--dims", "2048", "--metrics", "fid"], capsys)["fid"] == 0.0
    for flag, value, says in [("--dims", "768", "only 2048"), ("--batch-size", "0", "an integer >= 1"),
                              ("--num-workers", "-2", "an integer >= 1"), ("--metrics", "fid,kid", "fid,sfid,is,pr")]:
        with pytest.raises(SystemExit) as e:
            fid.main([stats, stats, flag, value])
        assert e.value.code == 2 and says in capsys.readouterr().err
