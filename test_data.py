"""Tests for data.py: ADM center crop, image folders, the built-in dataset, the latent cache, resumable loaders."""

import json
import os
import shutil
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torch.utils.data import TensorDataset

import data
from test_support import spawn


def _save(path, arr, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path, **kw)


# -----------------------------------------------------------------------------
# center crop


def test_center_crop_no_resize_by_hand():
    # 7 wide x 5 tall, size 5: no halving (5 < 10), scale 1 (an exact copy), crop x offset (7-5)//2 = 1
    yy, xx, cc = np.meshgrid(np.arange(5), np.arange(7), np.arange(3), indexing="ij")
    arr = (10 * yy + xx + 60 * cc).astype(np.uint8)
    out = data.center_crop_arr(Image.fromarray(arr), 5)
    np.testing.assert_array_equal(out, arr[:, 1:6])
    # portrait 5 wide x 9 tall, size 5: crop y offset (9-5)//2 = 2
    arr = np.arange(9 * 5 * 3).reshape(9, 5, 3).astype(np.uint8)
    np.testing.assert_array_equal(data.center_crop_arr(Image.fromarray(arr), 5), arr[2:7])


def test_center_crop_halving_by_hand():
    # 12 wide x 8 tall, size 4: short side 8 >= 2*4 -> BOX halve to 6x4 (2x2 block means, exact for multiples
    # of 4); 4 < 8 stops; scale 1; crop x offset (6-4)//2 = 1
    arr = (np.random.RandomState(0).randint(0, 64, (8, 12, 3)) * 4).astype(np.uint8)
    blocks = arr.reshape(4, 2, 6, 2, 3).astype(np.int64).sum((1, 3)) // 4   # (4, 6, 3)
    out = data.center_crop_arr(Image.fromarray(arr), 4)
    np.testing.assert_array_equal(out, blocks[:, 1:5])


def test_center_crop_large_step_by_step():
    # 517 wide x 300 tall, size 64: 300 >= 128 -> 258x150; 150 >= 128 -> 129x75; 75 < 128 stop;
    # scale 64/75: 129*64/75 = 110.08 -> 110, 75 -> 64; crop x (110-64)//2 = 23, y 0
    arr = np.random.RandomState(1).randint(0, 256, (300, 517, 3)).astype(np.uint8)
    im = Image.fromarray(arr)
    ref = im.resize((258, 150), Image.BOX).resize((129, 75), Image.BOX).resize((110, 64), Image.BICUBIC)
    ref = np.array(ref)[0:64, 23:87]
    out = data.center_crop_arr(im, 64)
    assert out.shape == (64, 64, 3)
    np.testing.assert_array_equal(out, ref)


# -----------------------------------------------------------------------------
# image folders


def test_imagefolder_pixels_and_flip(tmp_path):
    yy, xx, cc = np.meshgrid(np.arange(5), np.arange(7), np.arange(3), indexing="ij")
    arr = (30 * yy + 9 * xx + 70 * cc).astype(np.uint8)
    _save(tmp_path / "cls" / "a.png", arr)
    want = torch.from_numpy(arr[:, 1:6].astype(np.float64) / 127.5 - 1).permute(2, 0, 1)   # (3, 5, 5)
    x, y = data.ImageFolder(tmp_path, 5, flip=False)[0]
    assert x.dtype == torch.float32 and x.shape == (3, 5, 5) and y.dtype == torch.int64 and int(y) == 0
    torch.testing.assert_close(x.double(), want, rtol=0, atol=1e-6)
    xf, _ = data.ImageFolder(tmp_path, 5, flip=1.0)[0]
    np.testing.assert_allclose(xf.numpy(), np.flip(want.numpy(), axis=2), rtol=0, atol=1e-6)
    ds = data.ImageFolder(tmp_path, 5, flip=True)
    torch.manual_seed(0)
    flipped = []
    for _ in range(200):
        xr = ds[0][0]
        assert torch.equal(xr, x) or torch.equal(xr, xf)
        flipped.append(torch.equal(xr, xf))
    assert 0.35 < np.mean(flipped) < 0.65


def test_imagefolder_class_indexing(tmp_path):
    img = np.zeros((4, 4, 3), np.uint8)
    files = {"b/1.png": 1, "a/x.jpg": 0, "a/sub/deeper/y.PNG": 0, "c10/z.jpeg": 2, "c2/w.bmp": 3}
    for f in files:
        _save(tmp_path / f, img)
    _save(tmp_path / ".hidden" / "h.png", img)              # hidden folders are not classes
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    ds = data.ImageFolder(tmp_path, 4)
    assert ds.classes == ["a", "b", "c10", "c2"] and ds.num_classes == 4
    assert ds.class_to_idx == {"a": 0, "b": 1, "c10": 2, "c2": 3}
    got = {os.path.relpath(ds.path(i), tmp_path): int(ds.labels[i]) for i in range(len(ds))}
    assert got == files
    assert all(int(ds[i][1]) == files[os.path.relpath(ds.path(i), tmp_path)] for i in range(len(ds)))
    unc = data.ImageFolder(tmp_path, 4, unconditional=True)
    assert unc.num_classes == 0 and len(unc) == 5 and set(unc.labels.tolist()) == {0}  # .hidden skipped, nested kept
    flat = tmp_path / "a" / "sub" / "deeper"                 # images directly in root: one unconditional set
    single = data.ImageFolder(flat, 4)
    assert single.num_classes == 0 and len(single) == 1 and int(single[0][1]) == 0
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No images"):
        data.ImageFolder(tmp_path / "empty", 4)
    with pytest.raises(ValueError, match="does not exist"):
        data.ImageFolder(tmp_path / "missing", 4)


def test_imagefolder_corrupt_files(tmp_path):
    rng = np.random.RandomState(0)
    _save(tmp_path / "c" / "bad_trunc.jpg", rng.randint(0, 256, (64, 64, 3)), quality=95)
    raw = (tmp_path / "c" / "bad_trunc.jpg").read_bytes()
    (tmp_path / "c" / "bad_trunc.jpg").write_bytes(raw[: len(raw) * 6 // 10])
    (tmp_path / "c" / "garbage.png").write_bytes(rng.bytes(500))
    _save(tmp_path / "c" / "good1.png", rng.randint(0, 256, (8, 8, 3)))
    _save(tmp_path / "c" / "good2.png", rng.randint(0, 256, (8, 8, 3)))
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True          # a global some other library may have set
    try:
        ds = data.ImageFolder(tmp_path, 8, flip=False, max_bad=5)
        assert [os.path.basename(ds.path(i)) for i in range(4)] == ["bad_trunc.jpg", "garbage.png", "good1.png",
                                                                      "good2.png"]
        with pytest.warns(UserWarning) as rec:
            x, y = ds[0]                             # both bad files skipped, good1 substituted
        msgs = " ".join(str(r.message) for r in rec)
        assert "bad_trunc.jpg" in msgs and "garbage.png" in msgs
        assert len(ds.bad_files) == 2
        ref = np.array(Image.open(ds.path(2)).convert("RGB"), np.float64).transpose(2, 0, 1) / 127.5 - 1
        np.testing.assert_allclose(x.numpy(), ref, atol=1e-6)
        with warnings.catch_warnings():
            warnings.simplefilter("error")           # known bad files are skipped silently afterwards
            torch.testing.assert_close(ds[1][0], x)
        assert len(ds.bad_files) == 2
        strict = data.ImageFolder(tmp_path, 8, max_bad=1)
        with pytest.warns(UserWarning), pytest.raises(data.DataError, match="max_bad=1"):
            strict[0]
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def test_imagefolder_nothing_readable(tmp_path):
    # every image unreadable: one sentence (DataError), also when raised in a DataLoader worker, whose re-raised
    # message is the worker's traceback; e.sentence recovers the line
    (tmp_path / "c").mkdir()
    for k in range(3):
        (tmp_path / "c" / f"{k}.png").write_bytes(b"not a png")
    ds = data.ImageFolder(tmp_path, 8)
    want = f"None of the 3 images under {tmp_path} can be read; check --data-path."
    with pytest.warns(UserWarning), pytest.raises(data.DataError) as direct:
        ds[1]
    assert str(direct.value) == direct.value.sentence == want
    loader = torch.utils.data.DataLoader(data.ImageFolder(tmp_path, 8, max_bad=0), num_workers=1)
    with warnings.catch_warnings(), pytest.raises(data.DataError) as worker:
        warnings.simplefilter("ignore")
        next(iter(loader))
    assert "Traceback" in str(worker.value)
    assert worker.value.sentence == f"More than max_bad=0 unreadable images under {tmp_path}; fix or remove them, " \
                                    f"or raise --max-bad."


def test_imagefolder_link_loops(tmp_path):
    # a link to the folder itself (`ln -s . self`) and one back to the root: every real folder is entered once, so
    # each image is counted once (os.walk(followlinks=True) counted class a 41 times, and the link to the root made
    # the scan exponential)
    img = np.zeros((4, 4, 3), np.uint8)
    for f in ("a/1.png", "a/sub/2.png", "b/3.png"):
        _save(tmp_path / f, img)
    os.symlink(".", tmp_path / "a" / "self")
    os.symlink("..", tmp_path / "a" / "sub" / "up")
    os.symlink(tmp_path / "b", tmp_path / "a" / "to_b")        # b's images belong to the folder reached first
    with pytest.warns(UserWarning, match="b holds no images"):  # b was already scanned through a/to_b
        ds = data.ImageFolder(tmp_path, 4)
    got = sorted((os.path.relpath(ds.path(i), tmp_path), int(ds.labels[i])) for i in range(len(ds)))
    assert got == [("a/1.png", 0), ("a/sub/2.png", 0), ("a/to_b/3.png", 0)]
    os.remove(tmp_path / "a" / "to_b")
    unc = data.ImageFolder(tmp_path / "a", 4, unconditional=True)
    assert sorted(os.path.relpath(unc.path(i), tmp_path / "a") for i in range(len(unc))) == ["1.png", "sub/2.png"]


def test_imagefolder_non_utf8_names(tmp_path):
    # file and folder names that are not valid UTF-8 (raw byte 0xe9, Latin-1 "é") are read like any other
    rng = np.random.RandomState(0)
    arr = rng.randint(0, 256, (6, 6, 3)).astype(np.uint8)
    _save(tmp_path / "a" / "ok.png", arr)
    folder = os.path.join(os.fsencode(tmp_path), b"caf\xe9")
    os.mkdir(folder)
    Image.fromarray(arr[::-1]).save(os.path.join(folder, b"\xe9t\xe9.png"), format="PNG")
    ds = data.ImageFolder(tmp_path, 6, flip=False)
    assert len(ds) == 2 and ds.classes == ["a", os.fsdecode(b"caf\xe9")]
    assert os.fsencode(ds.path(1)).endswith(b"caf\xe9/\xe9t\xe9.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, y = ds[1]
    assert int(y) == 1
    np.testing.assert_allclose(x.numpy(), arr[::-1].transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)


# -----------------------------------------------------------------------------
# built-in dataset


def test_shapes_dataset():
    ds = data.ShapesDataset(num_classes=10, image_size=32, num_samples=1000, seed=0)
    x, y = ds[13]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and y.dtype == torch.int64 and int(y) == 3
    X = torch.stack([ds[i][0] for i in range(len(ds))]).numpy()
    Y = np.array([int(ds[i][1]) for i in range(len(ds))])
    assert X.min() >= -1 and X.max() <= 1 and X.min() < -0.8 and X.max() > 0.8
    np.testing.assert_array_equal(Y, np.arange(1000) % 10)
    # deterministic from (seed, index): another length, lazy rendering and a re-creation give the same samples
    small = data.ShapesDataset(num_samples=50, seed=0)
    lazy = data.ShapesDataset(num_samples=1000, seed=0, max_prerender_bytes=0)
    for i in (0, 7, 49):
        assert torch.equal(small[i][0], ds[i][0]) and torch.equal(lazy[i][0], ds[i][0])
    assert torch.equal(lazy[999][0], ds[999][0])
    assert not torch.equal(data.ShapesDataset(num_samples=50, seed=1)[7][0], ds[7][0])
    assert len({X[i].tobytes() for i in range(0, 1000, 10)}) == 100      # jitter: no two samples of a class alike
    # classes are visually distinct, by colour and by shape alone: a nearest-class-mean classifier fit on the first
    # half labels the held-out half (chance is 0.1). Foreground = pixels brighter than any background can be.
    P = (X + 1) / 2                                                      # (n, 3, S, S) in [0, 1]
    fg = P.max(1) > 0.6

    def nearest_mean_accuracy(F):
        centroids = np.stack([F[:500][Y[:500] == k].mean(0) for k in range(10)])
        return (((F[500:, None] - centroids[None]) ** 2).sum(-1).argmin(1) == Y[500:]).mean()

    colour = np.stack([P[i][:, fg[i]].mean(1) for i in range(1000)])
    assert nearest_mean_accuracy(colour / colour.max(1, keepdims=True)) > 0.95
    spectrum = np.abs(np.fft.fft2(fg.astype(np.float64))).reshape(1000, -1)  # translation-invariant shape
    assert nearest_mean_accuracy(spectrum / spectrum[:, :1]) > 0.6
    with pytest.raises(ValueError, match="num_classes"):
        data.ShapesDataset(num_classes=11)


# -----------------------------------------------------------------------------
# latent cache (tiny random diffusers AutoencoderKL: 2 blocks -> downsampling factor 2)

SIZE = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("cache")
    torch.manual_seed(0)
    kw = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
              latent_channels=4, norm_num_groups=8, sample_size=32)
    AutoencoderKL(**kw).save_pretrained(root / "vae")
    torch.manual_seed(1)
    AutoencoderKL(**kw).save_pretrained(root / "vae_other")
    rng = np.random.RandomState(0)
    for k in range(10):                                   # 10 images, 2 classes, assorted sizes
        h, w = rng.randint(16, 40, 2)
        _save(root / "imgs" / f"class{k % 2}" / f"{k}.png", rng.randint(0, 256, (h, w, 3)))
    common = dict(data_path=str(root / "imgs"), image_size=SIZE, vae=str(root / "vae"), batch_size=2,
                  num_workers=0, chunk_size=3, device="cpu", log=lambda *a: None)
    res = data.build_cache(out=str(root / "c32"), dtype="float32", **common)
    assert res == {"encoded_chunks": [0, 1, 2, 3], "complete": True}
    return root, common


def _arrays(path):
    return [np.load(os.path.join(path, f"{n}.npy")) for n in ("mean", "std", "labels")]


def test_cache_matches_direct_encoding(setup):
    root, common = setup
    mean, std, labels = _arrays(root / "c32")
    assert mean.shape == std.shape == (10, 2, 4, SIZE // 2, SIZE // 2) and mean.dtype == np.float32
    vae = data.load_vae(str(root / "vae"))
    ds = data.ImageFolder(root / "imgs", SIZE, flip=False)
    np.testing.assert_array_equal(labels, ds.labels)
    pix = [data.center_crop_arr(Image.open(ds.path(i)).convert("RGB"), SIZE) for i in range(len(ds))]
    x = torch.from_numpy(np.stack([np.stack([p, p[:, ::-1]]) for p in pix]).astype(np.float32) / 127.5 - 1)
    x = x.permute(0, 1, 4, 2, 3).reshape(20, 3, SIZE, SIZE)          # (N*2, 3, S, S), flips interleaved
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    ref_mean = (dist.mean * 0.18215).reshape(10, 2, 4, SIZE // 2, SIZE // 2).numpy()
    ref_std = (torch.exp(0.5 * dist.logvar) * 0.18215).reshape(10, 2, 4, SIZE // 2, SIZE // 2).numpy()
    rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)  # noqa: E731
    assert rel(mean, ref_mean) < 1e-5 and rel(std, ref_std) < 1e-5
    assert rel(mean[:, 1], mean[:, 0]) > 0.05                        # the flipped copy is really another input
    # float16 storage: same numbers within half-precision rounding
    data.build_cache(out=str(root / "c16"), dtype="float16", **common)
    m16, s16, _ = _arrays(root / "c16")
    assert m16.dtype == np.float16
    assert rel(m16.astype(np.float32), ref_mean) < 1e-3 and rel(s16.astype(np.float32), ref_std) < 1e-3
    # the Dataset view
    cache = data.LatentCache(root / "c32", flip=False, expect={"vae": str(root / "vae"), "image_size": SIZE})
    assert len(cache) == 10 and cache.num_classes == 2 and cache.latent_shape == (4, SIZE // 2, SIZE // 2)
    m, s, y = cache[4]
    assert m.dtype == s.dtype == torch.float32 and y.dtype == torch.int64 and int(y) == labels[4]
    assert np.array_equal(m.numpy(), mean[4, 0]) and np.array_equal(s.numpy(), std[4, 0])
    flipping = data.LatentCache(root / "c32", flip=True)
    torch.manual_seed(0)
    picks = []
    for _ in range(60):
        m, s, _ = flipping[4]
        f = int(np.array_equal(m.numpy(), mean[4, 1]))
        assert np.array_equal(m.numpy(), mean[4, f]) and np.array_equal(s.numpy(), std[4, f])  # a matching pair
        picks.append(f)
    assert 10 < sum(picks) < 50


def test_load_vae_without_diffusers(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    monkeypatch.setitem(sys.modules, "diffusers.models", None)
    with pytest.raises(ImportError, match="pip install diffusers"):
        data.load_vae("ema")


def test_sample_posterior():
    mean = torch.linspace(-2, 2, 64).reshape(4, 4, 4)
    std = torch.linspace(0.01, 1.0, 64).reshape(4, 4, 4)
    g = torch.Generator().manual_seed(0)
    z = data.sample_posterior(mean.expand(20000, 4, 4, 4), std.expand(20000, 4, 4, 4), generator=g)
    se = std / 20000**0.5
    assert ((z.mean(0) - mean).abs() < 5 * se).all()
    assert ((z.std(0) / std - 1).abs() < 0.05).all()
    assert torch.equal(data.sample_posterior(mean, torch.zeros_like(std)), mean)


def test_cache_refuses_mismatch(setup):
    root, common = setup
    with pytest.raises(ValueError, match="image_size"):
        data.LatentCache(root / "c32", expect={"image_size": 32})
    with pytest.raises(ValueError, match="vae"):
        data.LatentCache(root / "c32", expect={"vae": str(root / "vae_other")})
    with pytest.raises(ValueError, match="vae"):
        data.LatentCache(root / "c32", expect={"vae": "ema"})
    with pytest.raises(SystemExit, match="image_size"):
        data.build_cache(out=str(root / "c32"), dtype="float32", **{**common, "image_size": 8})
    with pytest.raises(SystemExit, match="vae"):
        data.build_cache(out=str(root / "c32"), dtype="float32", **{**common, "vae": str(root / "vae_other")})


def test_cache_resume_and_integrity(setup, tmp_path):
    root, common = setup
    out = tmp_path / "resumed"
    # the interrupted half goes through the command line, the rest through the function
    data.main(["cache", "--data-path", common["data_path"], "--image-size", str(SIZE), "--vae", common["vae"],
               "--out", str(out), "--batch-size", "2", "--num-workers", "0", "--dtype", "float32",
               "--chunk-size", "3", "--max-chunks", "2", "--device", "cpu"])
    assert sorted(os.listdir(out / "chunks")) == ["000000.json", "000001.json"]
    assert not (out / "complete.json").exists()
    with pytest.raises(ValueError, match="incomplete"):
        data.LatentCache(out)
    markers = {c: out / "chunks" / f"{c:06d}.json" for c in (0, 1)}
    before = {c: (p.read_bytes(), p.stat().st_mtime_ns) for c, p in markers.items()}
    res = data.build_cache(out=str(out), dtype="float32", **common)
    assert res == {"encoded_chunks": [2, 3], "complete": True}      # finished chunks are not encoded again
    for c, p in markers.items():
        assert (p.read_bytes(), p.stat().st_mtime_ns) == before[c]
    for a, b in zip(_arrays(out), _arrays(root / "c32")):
        np.testing.assert_array_equal(a, b)
    # integrity: recorded statistics match a float64 recomputation; one changed value is caught by verify_cache
    cache = data.LatentCache(out)
    stats = data.verify_cache(out)
    mean = _arrays(out)[0].astype(np.float64)
    recorded = json.loads((out / "complete.json").read_text())
    assert stats["checksum"] == recorded["checksum"]
    np.testing.assert_allclose([recorded["latent_mean"], recorded["latent_std"]], [mean.mean(), mean.std()],
                               rtol=1e-9, atol=1e-12)
    m = np.load(out / "mean.npy", mmap_mode="r+")
    m[7, 1, 2, 3, 3] += 1.0
    m.flush()
    del m
    with pytest.raises(data.DataError, match="chunk 2"):
        data.verify_cache(out)


def test_cache_damage_is_found_at_open(setup, tmp_path):
    root, _ = setup
    # garbage bytes over part of a chunk of mean.npy (file size unchanged): the crc32 of the chunks checked at open
    # (all 4 of this cache) name the file, the chunk and the rebuild
    out = tmp_path / "garbage"
    shutil.copytree(root / "c32", out)
    mean = np.load(out / "mean.npy", mmap_mode="r")
    row = mean[0].nbytes
    with open(out / "mean.npy", "r+b") as f:
        f.seek(mean.offset + 7 * row + 100)
        f.write(np.random.RandomState(0).bytes(64))
    with pytest.raises(data.DataError, match=r"mean\.npy is damaged in chunk 2 \(images 6\.\.8.*chunks/000002\.json"):
        data.LatentCache(out)
    # a truncated mean.npy (np.load's own message: "mmap length is greater than file size"), and one byte too many
    out = tmp_path / "truncated"
    shutil.copytree(root / "c32", out)
    with open(out / "mean.npy", "r+b") as f:
        f.truncate(os.path.getsize(out / "mean.npy") - 10)
    with pytest.raises(data.DataError, match=r"mean\.npy is damaged .*python data\.py cache"):
        data.LatentCache(out)
    with open(out / "mean.npy", "ab") as f:
        f.write(b"\0" * 11)
    with pytest.raises(data.DataError, match=r"mean\.npy is damaged"):
        data.LatentCache(out)
    shutil.copy(root / "c32" / "mean.npy", out / "mean.npy")
    data.LatentCache(out)
    os.remove(out / "chunks" / "000003.json")
    with pytest.raises(data.DataError, match="misses the marker .*000003.json; delete its complete.json"):
        data.LatentCache(out)
    # the message's repair works: delete the marker and complete.json, rerun the build
    out = tmp_path / "garbage"
    os.remove(out / "chunks" / "000002.json")
    os.remove(out / "complete.json")
    root, common = setup
    assert data.build_cache(out=str(out), dtype="float32", **common)["encoded_chunks"] == [2]
    for a, b in zip(_arrays(out), _arrays(root / "c32")):
        np.testing.assert_array_equal(a, b)
    data.verify_cache(out)


def _gloo_worker(rank, out, common):
    torch.distributed.init_process_group("gloo")  # env://, as under torchrun
    try:
        res = data.build_cache(out=os.path.join(out, "ddp"), dtype="float32", **common)
        assert res["complete"] and res["encoded_chunks"] == [rank, rank + 2]
    finally:
        torch.distributed.destroy_process_group()


def test_cache_two_process_gloo(setup, tmp_path):
    root, common = setup
    # fork: the children reuse this process's imported torch and diffusers (a spawn re-imports them, ~10 s each)
    out = spawn(_gloo_worker, common, root=tmp_path, start_method="fork")
    assert os.path.exists(os.path.join(out, "ddp", "complete.json"))
    (mean, std, labels), (ref_mean, ref_std, ref_labels) = _arrays(os.path.join(out, "ddp")), _arrays(root / "c32")
    np.testing.assert_array_equal(labels, ref_labels)
    # not bitwise: the children run one thread each, which reorders the convolutions' float32 sums
    for a, b in ((mean, ref_mean), (std, ref_std)):
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-5


# -----------------------------------------------------------------------------
# loaders


@pytest.mark.parametrize("num_workers", [0, 1])
def test_make_loader_resume(num_workers):
    ds = TensorDataset(torch.arange(103))
    full = {}
    for rank in (0, 1):
        loader, sampler = data.make_loader(ds, 8, rank, 2, seed=5, num_workers=num_workers)
        sampler.set_epoch(3)
        full[rank] = [b[0].tolist() for b in loader]
        assert len(full[rank]) == 52 // 8                               # ceil(103 / 2) per rank, last partial dropped
        resumed, rs = data.make_loader(ds, 8, rank, 2, seed=5, num_workers=num_workers)
        rs.set_epoch(3)
        rs.skip_batches(2)
        rest = [b[0].tolist() for b in resumed]
        assert rest == full[rank][2:] and len(resumed) == len(full[rank]) - 2
        rs.set_epoch(3)                                                  # a new epoch starts from its beginning
        assert [b[0].tolist() for b in resumed] == full[rank]
        rs.set_epoch(4)
        assert [b[0].tolist() for b in resumed] != full[rank]
    assert not set(sum(full[0], [])) & set(sum(full[1], []))            # ranks see disjoint samples
    everything = data.ResumableDistributedSampler(ds, 2, 0, seed=5)
    other = data.ResumableDistributedSampler(ds, 2, 1, seed=5)
    everything.set_epoch(3)
    other.set_epoch(3)
    assert set(everything) | set(other) == set(range(103))
