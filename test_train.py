"""Tests of train.py on the CPU: exact resume, DDP against a single-process reference, every family with the
dispersive term, the contrastive baseline, where the regulariser's gradient goes, faults, bad flags and bad data, run
folders that never lose a run, official checkpoints, and training on an SD-VAE latent cache. Tiny models (T/4 at 16x16
pixels: 16 tokens) and a few steps each."""

import argparse
import copy
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

import data
import dit
import sample
import train
from dispersive import DispersiveConfig, dispersive_loss
from test_support import spawn


def make_folder(root, n=24, classes=3, size=16, seed=0):
    """n random size x size PNGs in `classes` class folders."""
    rng = np.random.RandomState(seed)
    for k in range(n):
        os.makedirs(os.path.join(root, f"c{k % classes}"), exist_ok=True)
        Image.fromarray(rng.randint(0, 256, (size, size, 3)).astype(np.uint8)).save(
            os.path.join(root, f"c{k % classes}", f"{k}.png"))
    return str(root)


def base(folder):
    # 24 images, micro-batch 4, accumulation 2: 3 steps per epoch, so 4 steps cross an epoch boundary
    return ["--model", "SiT-T/4", "--image-size", "16", "--data-path", folder, "--global-batch-size", "8",
            "--micro-batch-size", "4", "--log-every", "1", "--sample-every", "0", "--num-workers", "0"]


def load(run_dir):
    return torch.load(os.path.join(run_dir, "checkpoint.pt"), map_location="cpu", weights_only=True)


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_identical(a, b, where="checkpoint"):
    """Bit-exact equality of nested dicts/lists of tensors and numbers."""
    if isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    else:
        assert a == b, f"{where}: {a} != {b}"


STATE_KEYS = ("model", "ema", "opt", "step", "epoch", "batch_in_epoch")


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        train.main([str(a) for a in argv])
    return f"{e.value.code} {capsys.readouterr().err}"


# ---------------------------------------------------------------------------------------------------------------------
# Exact resume, non-finite stop, SIGTERM
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    folder = make_folder(tmp / "imgs")

    def run(name, *extra):
        return train.main([*base(folder), "--results-dir", str(tmp), "--run-name", name, *map(str, extra)])

    a = run("a", "--steps", 2)["run_dir"]
    a2 = load(a)
    b = run("b", "--steps", 4)["run_dir"]
    train.main(["--resume", a, "--steps", "4"])  # continues in folder a
    return dict(tmp=tmp, run=run, folder=folder, a=a, a2=a2, b=b, b4=load(b), resumed=load(a))


def test_resume_is_bit_exact(runs):
    assert runs["a2"]["step"] == 2 and runs["a2"]["batch_in_epoch"] == 4 and runs["a2"]["epoch"] == 0
    assert runs["b4"]["step"] == 4 and runs["b4"]["epoch"] == 1 and runs["b4"]["batch_in_epoch"] == 2
    for key in STATE_KEYS:
        assert_identical(runs["resumed"][key], runs["b4"][key], key)
    key = "blocks.0.attn.qkv.weight"
    assert not torch.equal(runs["a2"]["model"][key], runs["b4"]["model"][key])  # steps 3 and 4 did change it
    # metrics of the resumed folder: each step once, the resumed steps' numbers as the uninterrupted run's
    ra, rb = metrics(runs["a"]), metrics(runs["b"])
    assert [r["step"] for r in ra] == [1, 2, 3, 4]
    for x, y in zip(ra, rb):
        assert x["loss"] == y["loss"] and x["gnorm"] == y["gnorm"] and x["lr"] == y["lr"]
    # the tiny size's recipe: lr 4e-3 after a linear warmup of 50 steps
    assert [r["lr"] for r in rb] == pytest.approx([4e-3 * s / 50 for s in (1, 2, 3, 4)])


def test_resume_from_a_checkpoint_of_an_unfused_optimizer_and_old_config(runs, tmp_path):
    # checkpoints of earlier versions: AdamW unfused (fused None), numpy/python RNG states, flags since renamed
    ck = copy.deepcopy(runs["a2"])  # the state after 2 steps
    for group in ck["opt"]["param_groups"]:
        group["fused"] = None
    ck["rng"] = dict(world_size=1, states=[dict(torch=torch.get_rng_state(), numpy=torch.zeros(624, dtype=torch.int64))])
    ck["config"].update(no_flip=False, sample_per_class=1, warmup_steps=50)
    old = tmp_path / "old"
    old.mkdir()
    torch.save(ck, old / "checkpoint.pt")
    out = train.main(["--resume", str(old), "--steps", "4"])
    for key in ("model", "ema", "opt", "step", "epoch", "batch_in_epoch"):
        assert_identical(load(out["run_dir"])[key], runs["b4"][key], key)


def test_checkpoint_format(runs):
    ck = runs["b4"]  # loaded with weights_only=True
    cfg = ck["config"]
    assert cfg["model"] == "SiT-T/4" and cfg["image_size"] == 16 and cfg["num_classes"] == 3
    assert cfg["latent"] is False and cfg["class_dropout_prob"] == 0.1 and cfg["family"] == "sit"
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ck["model"])
    assert "rng" not in ck  # each step seeds itself from (seed, rank, step): no random state to save
    model, family = sample.build_model(cfg["model"], cfg["image_size"], cfg["num_classes"], cfg["latent"])
    dit.load_checkpoint(model, ck)  # strict: the EMA weights fit the model that build_model makes
    with open(os.path.join(runs["b"], "config.json")) as f:
        assert json.load(f)["steps"] == 4


def _inject(monkeypatch, at_call, action):
    """Run action(total) on the total loss of the at_call-th TrainLoss forward (1-based)."""
    orig, calls = train.TrainLoss.forward, []

    def forward(self, x, y):
        total, terms = orig(self, x, y)
        calls.append(1)
        return (action(total), terms) if len(calls) == at_call else (total, terms)
    monkeypatch.setattr(train.TrainLoss, "forward", forward)


def test_nonfinite_step_is_skipped_on_the_device_and_stops(runs, monkeypatch):
    _inject(monkeypatch, 5, lambda total: total * float("nan"))  # step 3, first micro-batch
    with pytest.raises(SystemExit, match="at step 3; its update was skipped and the run stopped at step 3"):
        runs["run"]("nan", "--steps", 3)
    ck = load(os.path.join(runs["tmp"], "nan"))
    assert ck["step"] == 3
    for key in ("model", "ema"):  # weights, EMA, AdamW moments and step count: all as after step 2 (the lr of the
        assert_identical(ck[key], runs["a2"][key], key)  # warmup schedule is set anew every step)
    assert_identical(ck["opt"]["state"], runs["a2"]["opt"]["state"], "opt")


def test_flags_are_read_one_step_late_between_log_lines(runs, monkeypatch):
    # the host reads step 2's flags after queueing step 3: the run stops there, step 3's update applied
    _inject(monkeypatch, 3, lambda total: total * float("inf"))  # step 2, first micro-batch
    with pytest.raises(SystemExit, match="at step 2; its update was skipped and the run stopped at step 3"):
        runs["run"]("inf", "--steps", 4, "--log-every", 10)
    ck = load(os.path.join(runs["tmp"], "inf"))
    assert ck["step"] == 3
    assert {float(v["step"]) for v in ck["opt"]["state"].values()} == {2.0}  # steps 1 and 3 applied, 2 not
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    assert not torch.equal(ck["model"]["blocks.0.attn.qkv.weight"], runs["a2"]["model"]["blocks.0.attn.qkv.weight"])


def _sigterm(total):
    os.kill(os.getpid(), signal.SIGTERM)
    return total


def test_sigterm_saves_after_the_current_step(runs, monkeypatch):
    _inject(monkeypatch, 3, _sigterm)  # during step 2
    before = signal.getsignal(signal.SIGTERM)
    out = runs["run"]("term", "--steps", 4)
    assert out["stopped"] == "SIGTERM" and out["step"] == 2 and out["exit_code"] == 128 + signal.SIGTERM
    ck = load(out["run_dir"])
    for key in STATE_KEYS:
        assert_identical(ck[key], runs["a2"][key], key)
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back


def test_sigterm_between_log_lines_stops_one_step_later_and_resumes_exactly(runs, monkeypatch):
    _inject(monkeypatch, 3, _sigterm)  # during step 2; read on the host after step 3 is queued
    out = runs["run"]("term-late", "--steps", 4, "--log-every", 10)
    assert out["stopped"] == "SIGTERM" and out["step"] == 3
    monkeypatch.undo()
    train.main(["--resume", out["run_dir"], "--steps", "4"])
    ck = load(out["run_dir"])
    for key in STATE_KEYS:
        assert_identical(ck[key], runs["b4"][key], key)


def test_sigterm_exit_code_and_one_hint_with_data_workers(runs, tmp_path):
    """A preempted job must tell "resume me" from "done": exit 128 + SIGTERM, the hint once (not per worker)."""
    cmd = [sys.executable, "train.py", *base(runs["folder"]), "--num-workers", "2", "--steps", "100000",
           "--results-dir", str(tmp_path), "--run-name", "sub"]
    proc = subprocess.Popen(cmd, cwd=os.path.dirname(os.path.abspath(train.__file__)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out = ""
    for line in proc.stdout:  # wait until it trains, then signal the whole process group (workers too, as SLURM does)
        out += line
        if line.startswith("step 000002"):
            os.killpg(proc.pid, signal.SIGTERM)
            break
    out += proc.stdout.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, out
    assert out.count("received SIGTERM") == 1 and out.count("continue with: python train.py --resume") == 1, out
    assert load(tmp_path / "sub")["step"] >= 2


def test_resume_command_names_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert train.resume_command("runs/x").startswith("torchrun --nnodes=2 --nproc_per_node=8")


def test_train_step_needs_a_fused_optimizer():
    model = torch.nn.Linear(2, 2)
    loss = lambda x, y: (model(x).square().mean(), {})  # noqa: E731
    with pytest.raises(ValueError, match="fused=True"):
        train.train_step(loss, torch.optim.AdamW(model.parameters(), fused=False), lambda: (torch.ones(1, 2), None))


# ---------------------------------------------------------------------------------------------------------------------
# Run folders: never lose a run
# ---------------------------------------------------------------------------------------------------------------------

def test_a_named_run_folder_is_never_reused(runs, capsys):
    before = load(runs["b"])["step"], len(metrics(runs["b"]))
    msg = _error([*base(runs["folder"]), "--results-dir", runs["tmp"], "--run-name", "b", "--steps", 1], capsys)
    assert "already holds a run: continue it with --resume" in msg
    assert (load(runs["b"])["step"], len(metrics(runs["b"]))) == before


def test_default_run_names_are_unique_within_a_second(runs, tmp_path):
    dirs = {train.main([*base(runs["folder"]), "--results-dir", str(tmp_path), "--steps", "1"])["run_dir"]
            for _ in range(3)}
    assert len(dirs) == 3 and all("-SiT-T4-" in os.path.basename(d) for d in dirs)


def test_resuming_an_older_kept_checkpoint_branches_and_keeps_the_future(runs, tmp_path):
    folder = runs["run"]("kept", "--steps", 4, "--keep-every", 2)["run_dir"]
    newest, rows = load(folder), metrics(folder)
    with open(os.path.join(folder, "metrics.jsonl"), "a") as f:
        f.write('{"step": 5, "lo')  # a torn last line, as a hard kill mid-write leaves it
    out = train.main(["--resume", os.path.join(folder, "checkpoint_0000002.pt"), "--steps", "3"])
    assert out["run_dir"] == folder + "-from2" and load(out["run_dir"])["step"] == 3
    assert_identical(load(folder), newest)  # the run's own state is untouched
    assert [r["step"] for r in metrics(out["run_dir"])] == [1, 2, 3]  # the branch: its parent's rows up to step 2
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        assert [json.loads(line) for line in f.readlines()[:4]] == rows
    train.main(["--resume", folder, "--steps", "5"])  # the torn line is dropped with a note, the run goes on
    assert [r["step"] for r in metrics(folder)] == [1, 2, 3, 4, 5]


def test_steps_on_resume_replace_an_epochs_budget(runs):
    out = runs["run"]("ep", "--epochs", 1)  # 3 steps per epoch
    assert out["step"] == 3
    assert train.main(["--resume", out["run_dir"], "--steps", "5"])["step"] == 5
    assert train.main(["--resume", out["run_dir"], "--epochs", "2"])["step"] == 6


def test_disk_full_during_a_checkpoint(runs, monkeypatch, capsys):
    folder = runs["run"]("full", "--steps", 1)["run_dir"]
    before = load(folder)
    real_save = torch.save

    def full(obj, f):
        real_save(obj, f)  # most of the bytes, then the zip writer fails as it does on a full disk
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 1024")
    monkeypatch.setattr(torch, "save", full)
    msg = _error(["--resume", folder, "--steps", "2"], capsys)
    assert "the disk is full" in msg and "previous checkpoint is intact" in msg and "--resume" in msg
    assert not [n for n in os.listdir(folder) if n.endswith(".tmp")]
    monkeypatch.undo()
    assert_identical(load(folder), before)
    assert train.main(["--resume", folder, "--steps", "2"])["step"] == 2


# ---------------------------------------------------------------------------------------------------------------------
# End to end: the samples of a short run on the built-in shapes show the asked-for shapes
# ---------------------------------------------------------------------------------------------------------------------

def test_end_to_end_samples_show_the_asked_for_shapes(tmp_path):
    # a pipeline broken where the component tests do not look (a sign, trainer and sampler disagreeing on the time
    # convention, an EMA that never moves, grids sampled from the wrong weights) draws blobs: the probe's chance is 0.1
    out = train.main(["--image-size", "16", "--steps", "500", "--sample-every", "500", "--disp", "none",
                      "--results-dir", str(tmp_path)])
    with open(os.path.join(out["run_dir"], "metrics.jsonl")) as f:
        grids = [row for row in map(json.loads, f) if "shape_acc" in row]
    assert [row["step"] for row in grids] == [0, 500]                 # the untrained grid, then the final one
    assert grids[0]["shape_acc"] <= 0.25 and grids[-1]["shape_acc"] >= 0.4
    assert grids[-1]["shape_fd"] < 0.5 * grids[0]["shape_fd"]


# ---------------------------------------------------------------------------------------------------------------------
# Bad flags, bad data, bad checkpoints: one sentence each
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag,value,need", [
    ("--grad-clip", "-1", "a number > 0"), ("--lr", "-1e-3", "a number > 0"), ("--ema-decay", "2", "in [0, 1)"),
    ("--epochs", "-1", "a number > 0"), ("--num-classes", "0", "an integer >= 1"), ("--ckpt-every", "0", ">= 1"),
    ("--steps", "1.5", "an integer >= 1"), ("--disp-tau", "0", "a number > 0"), ("--disp-weight", "-1", ">= 0"),
    ("--global-batch-size", "0", ">= 1"), ("--sample-every", "-1", ">= 0"), ("--path", "vp", "invalid choice: 'vp'")])
def test_numeric_flags_are_checked_against_their_meaning(flag, value, need, capsys):
    msg = _error([f"{flag}={value}"], capsys)
    assert msg.startswith("2 ") and f"argument {flag}" in msg and need in msg


def test_bad_flags_stop_with_one_sentence(runs, tmp_path, capsys):
    tmp = ["--results-dir", tmp_path]
    msg = _error([*tmp, "--model", "SiT-XL/3"], capsys)
    assert "did you mean" in msg and "SiT-XL/2" in msg
    assert "not divisible by the patch size 4" in _error([*tmp, "--image-size", "30"], capsys)
    assert "dispersive block must be in 1..6 (1-based, 6 = the last), got 7" in _error([*tmp, "--disp-block", 7], capsys)
    assert "multiple" in _error([*base(runs["folder"]), *tmp, "--global-batch-size", "6"], capsys)
    assert "plain folder name" in _error([*tmp, "--run-name", "../x"], capsys)
    assert "plain folder name" in _error([*tmp, "--run-name", str(tmp_path / "abs")], capsys)
    msg = _error([*tmp, "--data-path", runs["folder"], "--model", "DiT-XL/2", "--image-size", "256"], capsys)
    assert "python data.py cache --data-path" in msg and "--latent-cache" in msg and "--pixel-space" in msg
    assert train.parse_args(["--data-path", "x", "--image-size", "256", "--pixel-space"])[0].latent is False
    msg = _error(["--resume", runs["a"], "--model", "DiT-T/4"], capsys)
    assert "--model cannot change when resuming" in msg and "SiT-T/4" in msg
    msg = _error(["--resume", runs["a"], "--data-path", str(tmp_path)], capsys)  # the real difference is named
    assert "--data-path cannot change when resuming" in msg and runs["folder"] in msg
    assert "does not exist" in _error(["--resume", tmp_path / "missing"], capsys)
    (tmp_path / "empty.pt").write_bytes(b"")
    assert "empty" in _error(["--resume", tmp_path / "empty.pt"], capsys)
    with open(os.path.join(runs["a"], "checkpoint.pt"), "rb") as f:
        (tmp_path / "cut.pt").write_bytes(f.read()[:5000])
    assert "truncated" in _error(["--resume", tmp_path / "cut.pt"], capsys)
    (tmp_path / "file").write_text("")
    msg = _error([*base(runs["folder"]), "--results-dir", tmp_path / "file" / "runs", "--steps", 1], capsys)
    assert "cannot create a run folder" in msg and "writable --results-dir" in msg
    if not torch.cuda.is_available():
        assert "this PyTorch sees no CUDA GPU" in _error([*tmp, "--device", "cuda"], capsys)


def test_help_names_each_default_once(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    out = capsys.readouterr().out
    assert "(default: None)" not in out and "--path-type" in out and "--ckpt" in out


def test_bad_images_stop_with_a_sentence_and_a_checkpoint(runs, tmp_path, capsys):
    folder = make_folder(tmp_path / "imgs", n=12)
    for name in sorted(os.listdir(os.path.join(folder, "c0")))[:3]:
        with open(os.path.join(folder, "c0", name), "wb") as f:
            f.write(b"not an image")
    args = [*base(folder), "--results-dir", tmp_path, "--max-bad", "1", "--steps", "20"]
    with pytest.warns(UserWarning, match="unreadable"):
        msg = _error([*args, "--run-name", "bad"], capsys)
    assert "error:" in msg and "--max-bad" in msg and "Traceback" not in msg
    assert os.path.exists(tmp_path / "bad" / "checkpoint.pt")
    none = make_folder(tmp_path / "none", n=4, classes=1)
    for name in os.listdir(os.path.join(none, "c0")):
        with open(os.path.join(none, "c0", name), "wb") as f:
            f.write(b"x")
    with pytest.warns(UserWarning):
        msg = _error([*base(none), "--results-dir", tmp_path, "--global-batch-size", "2", "--micro-batch-size", "2",
                      "--steps", "1"], capsys)
    assert "can be read" in msg and "Traceback" not in msg


# ---------------------------------------------------------------------------------------------------------------------
# Families, sample grids, the contrastive option, where the gradient goes
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,terms", [("DiT-T/4", ["mse", "vb"]), ("SiT-T/4", []), ("MeanFlow-T/4", ["mse_uv"])])
def test_each_family_trains_with_the_dispersive_term(runs, tmp_path, name, terms):
    out = train.main([*base(runs["folder"]), "--model", name, "--steps", "2", "--sample-every", "1",
                      "--results-dir", str(tmp_path), "--run-name", "r"])
    rows = [r for r in metrics(out["run_dir"]) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for k in ["loss", "diff", "disp", "feat_rms", "gnorm", *terms]:
            assert math.isfinite(r[k]), (k, r)
        assert r["loss"] == pytest.approx(r["diff"] + 0.5 * r["disp"], abs=1e-5)  # λ = 0.5 (paper preset)
        assert -math.log(4) - 1e-5 <= r["disp"] <= 0  # InfoNCE-L2 on 4 samples lies in [−log B, 0]
        if name.startswith("DiT"):
            assert r["diff"] == pytest.approx(r["mse"] + r["vb"], abs=1e-5)
    assert all(not p.requires_grad and p.grad_fn is None for p in out["ema"].parameters())  # outside autograd
    ck = load(out["run_dir"])
    assert ck["config"]["family"] == sample.family_of(name) and ck["config"]["disp_block"] == 1
    model, _ = sample.build_model(name, 16, 3, False)
    dit.load_checkpoint(model, ck)
    for tag in ("000000", "000001", "final"):  # 3 class rows of 8 samples, 16px + 2px padding
        img = Image.open(os.path.join(out["run_dir"], f"samples_{tag}.png"))
        assert img.size == (2 + 8 * 18, 2 + 3 * 18) and img.mode == "RGB"


def test_grid_writer_layout_and_pixels(tmp_path):
    x = torch.linspace(-1.2, 1.2, 5 * 3 * 2 * 3).reshape(5, 3, 2, 3)
    path = sample.save_grid(sample.to_uint8(x), str(tmp_path / "g.png"), 2, padding=1)
    got = np.asarray(Image.open(path))
    assert got.shape == (1 + 3 * 3, 1 + 2 * 4, 3)
    want = np.zeros_like(got)
    pix = np.clip(127.5 * x.numpy() + np.float32(128), 0, 255).astype(np.uint8)  # float32, truncated
    for i in range(5):
        r, c = divmod(i, 2)
        want[1 + 3 * r:1 + 3 * r + 2, 1 + 4 * c:1 + 4 * c + 3] = pix[i].transpose(1, 2, 0)
    np.testing.assert_array_equal(got, want)


def test_feat_rms_is_the_rms_of_the_regularised_blocks_output():
    torch.manual_seed(0)
    model, family = sample.build_model("SiT-T/4", 16, 3, False)
    objective, disp = train.build_objective("SiT-T/4", family), DispersiveConfig.preset("paper", model.depth)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    torch.manual_seed(1)
    _, terms = train.TrainLoss(model, objective, disp, model.depth)(x, y)
    torch.manual_seed(1)  # the same draws: the block output of the same forward pass
    feats = objective.training_losses(model, x, y, return_features=disp.block)["feats"].double()
    assert terms["feat_rms"].item() == pytest.approx(feats.pow(2).mean().sqrt().item(), rel=1e-6)


def test_contrastive_matches_two_view_reference():
    torch.manual_seed(0)
    model, _ = sample.build_model("SiT-T/4", 16, 10, False)
    model.double()
    objective = train.build_objective("SiT-T/4", "sit")
    disp = DispersiveConfig.preset("paper", 6)
    x, y = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(1)
    total, terms = train.TrainLoss(model, objective, disp, 6, contrastive=True)(x, y)
    torch.manual_seed(1)  # the same draws: view 1, then view 2
    v1 = objective.training_losses(model, x, y, return_features=1)
    v2 = objective.training_losses(model, x, y, return_features=1)
    z1, z2 = v1["feats"].flatten(1), v2["feats"].flatten(1)
    d = z1.shape[1]
    logits = -((z1[:, None] - z2[None]) ** 2).sum(-1) / (d * disp.tau)  # (B, B), positives on the diagonal
    ref = (-(logits.diagonal() - logits.logsumexp(1))).mean()
    assert terms["contrastive"].item() == pytest.approx(ref.item(), rel=1e-10)
    assert terms["diff"].item() == pytest.approx(v1["loss"].mean().item(), rel=1e-12)  # denoising on view 1 only
    assert v1["loss"].mean().item() != pytest.approx(v2["loss"].mean().item(), rel=1e-3)
    assert total.item() == pytest.approx((v1["loss"].mean() + 0.5 * ref).item(), rel=1e-10)


def test_contrastive_option_trains(runs):
    r = metrics(runs["run"]("c", "--disp", "contrastive", "--steps", 1)["run_dir"])[0]
    assert "disp" not in r and math.isfinite(r["contrastive"]) and r["contrastive"] >= 0
    assert r["loss"] == pytest.approx(r["diff"] + 0.5 * r["contrastive"], abs=1e-5)


def test_dispersive_gradient_reaches_exactly_the_blocks_up_to_the_chosen_one():
    torch.manual_seed(0)
    model, _ = sample.build_model("SiT-T/4", 16, 10, False)
    with torch.no_grad():  # leave the adaLN-zero start, where every block is the identity
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.normal_(0, 0.02)
    model.double()
    objective = train.build_objective("SiT-T/4", "sit")
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    x, y = torch.randn(6, 3, 16, 16, dtype=torch.float64), torch.arange(6)
    k = 3

    def grads(weight):
        torch.manual_seed(1)
        loss_fn = train.TrainLoss(model, objective, DispersiveConfig(weight=weight, tau=0.5, block=k), 6)
        return torch.autograd.grad(loss_fn(x, y)[0], params)

    with_disp, without = grads(0.5), grads(0.0)
    torch.manual_seed(1)
    feats = objective.training_losses(model, x, y, return_features=k)["feats"]
    g_disp = torch.autograd.grad(dispersive_loss(feats, tau=0.5), params, allow_unused=True)
    for n, a, b, g in zip(names, with_disp, without, g_disp):
        later = n.startswith("final_layer") or (n.startswith("blocks.") and int(n.split(".")[1]) >= k)
        assert (g is None) == later, n  # L_disp depends on blocks 1..k and the embedders, nothing after
        expected = torch.zeros_like(a) if g is None else 0.5 * g
        assert torch.allclose(a - b, expected, rtol=1e-7, atol=1e-12), n
    moved = [n for n, g in zip(names, g_disp) if g is not None and g.abs().max() > 1e-8]
    assert any(n.startswith(f"blocks.{k - 1}.") for n in moved) and any(n.startswith("blocks.0.") for n in moved)


def test_defaults_follow_the_paper_and_presets():
    cfg, _, disp = train.parse_args(["--model", "SiT-XL/2", "--image-size", "256", "--latent-cache", "c"])
    assert (cfg.lr, cfg.global_batch_size, cfg.ema_decay, cfg.beta2, cfg.steps, cfg.warmup_steps) == \
        (1e-4, 256, 0.9999, 0.999, 400_000, 0)
    assert (disp.variant, disp.weight, disp.tau, disp.block) == ("infonce_l2", 0.5, 0.5, 7)  # block 28 // 4
    assert cfg.latent and cfg.grid_cfg == 1.0 and cfg.flip
    _, _, disp = train.parse_args(["--model", "SiT-B/2", "--image-size", "256", "--latent-cache", "c",
                                   "--disp-preset", "official", "--disp-tau", "0.7"])
    assert (disp.weight, disp.tau, disp.block) == (0.25, 0.7, 12)  # official: last block; explicit τ wins
    cfg, _, disp = train.parse_args(["--model", "MeanFlow-XL/2", "--image-size", "256", "--latent-cache", "c",
                                     "--disp", "hinge"])
    assert (cfg.beta2, cfg.steps, cfg.flip, disp.variant, disp.margin) == (0.95, 1_200_000, False, "hinge", 1.0)
    obj = train.build_objective("MeanFlow-XL/2", "meanflow")
    assert (obj.omega, obj.kappa, obj.t_interval) == (0.2, 0.92, (0.0, 0.75))  # the MeanFlow paper's XL/2
    cfg, _, disp = train.parse_args(["--model", "DiT-S/2", "--image-size", "256", "--latent-cache", "c",
                                     "--disp", "none", "--path-type", "GVP"])
    assert not disp.enabled and cfg.disp_weight == 0.0 and cfg.path == "gvp"


# ---------------------------------------------------------------------------------------------------------------------
# Official checkpoints: --init-from (SiT's --ckpt)
# ---------------------------------------------------------------------------------------------------------------------

def test_init_from_an_official_training_checkpoint(runs, tmp_path):
    # the official DiT/SiT train.py layout: model, ema, opt (unfused AdamW) and args as an argparse.Namespace
    torch.manual_seed(5)
    model, _ = sample.build_model("SiT-T/4", 16, 3, False)
    ema, _ = sample.build_model("SiT-T/4", 16, 3, False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    model(torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 1])).square().mean().backward()
    opt.step()
    args = argparse.Namespace(model="SiT-T/4", image_size=16, num_classes=3, path_type="Linear", global_seed=0)
    path = tmp_path / "0000100.pt"
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "args": args}, path)
    out = runs["run"]("init", "--init-from", path, "--steps", 1)
    ck = load(out["run_dir"])
    assert ck["step"] == 1 and ck["config"]["init_from"] == str(path)
    assert {float(s["step"]) for s in ck["opt"]["state"].values()} == {2.0}  # the official optimizer went on
    out = runs["run"]("init0", "--init-from", path, "--steps", 1, "--lr", 1e-12)  # (almost) no update: the weights
    assert rel(out["model"].state_dict()["blocks.0.mlp.fc1.weight"], model.state_dict()["blocks.0.mlp.fc1.weight"]) < 1e-6
    released = tmp_path / "released.pt"  # a raw state dict: weights only, a fresh optimizer
    torch.save(model.state_dict(), released)
    ck = load(runs["run"]("init1", "--ckpt", released, "--steps", 1)["run_dir"])
    assert {float(s["step"]) for s in ck["opt"]["state"].values()} == {1.0}


# ---------------------------------------------------------------------------------------------------------------------
# DDP: 2 CPU processes (gloo) against the same step computed in one process without DDP
# ---------------------------------------------------------------------------------------------------------------------

DDP_ARGV = ["--image-size", "16", "--global-batch-size", "8", "--micro-batch-size", "2", "--steps", "1", "--lr", "1e-3",
            "--log-every", "1", "--sample-every", "0", "--global-seed", "3"]


def _ddp_worker(rank, out, argv):
    result = train.main(argv + ["--results-dir", out, "--run-name", "ddp"])
    torch.save({"model": result["model"].state_dict(), "ema": result["ema"].state_dict()},
               os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.parametrize("name", ["SiT-T/4", "MeanFlow-T/4"])  # MeanFlow: its JVP runs inside DDP's forward
def test_ddp_two_processes_match_single_process_reference(tmp_path, name):
    folder = spawn(_ddp_worker, ["--model", name, *DDP_ARGV], root=tmp_path)
    r0, r1 = (torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=True) for r in range(2))
    assert_identical(r0, r1, "rank0 vs rank1")

    # reference: each rank's loss on its own micro-batches (dispersive term per micro-batch), with the seeds the
    # trainer uses (model: global seed; step 0's draws: global_seed·world + rank), gradients averaged, one AdamW step
    seed, world, micro, accum = 3, 2, 2, 2
    torch.manual_seed(seed)
    model, family = sample.build_model(name, 16, 10, False)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    objective = train.build_objective(name, family)
    ds = data.ShapesDataset(10, 16, train.SHAPES_SAMPLES, seed=seed)
    params = [p for p in model.parameters() if p.requires_grad]  # not the frozen pos_embed
    grad_sum = [torch.zeros_like(p) for p in params]
    losses = []
    for rank in range(world):
        torch.manual_seed(seed * world + rank)
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        sampler.set_epoch(0)
        idx = list(sampler)
        for m in range(accum):
            x, y = (torch.stack(t) for t in zip(*[ds[i] for i in idx[m * micro:(m + 1) * micro]]))
            out = objective.training_losses(model, x, y, return_features=1)
            loss = out["loss"].mean() + 0.5 * dispersive_loss(out["feats"], "infonce_l2", tau=0.5)
            losses.append(loss.item())
            for g, gp in zip(grad_sum, torch.autograd.grad(loss / accum, params)):
                g += gp
    for p, g in zip(params, grad_sum):
        p.grad = g / world
    gnorm = torch.cat([p.grad.flatten() for p in params]).norm().item()
    beta2 = 0.95 if family == "meanflow" else 0.999
    torch.optim.AdamW(model.parameters(), lr=1e-3 / 50, betas=(0.9, beta2), weight_decay=0.0).step()  # warmup step 1

    delta = torch.cat([(r0["model"][k] - start[k]).flatten() for k in start])
    ref_delta = torch.cat([(p.detach() - start[k]).flatten() for k, p in model.named_parameters()])
    assert ref_delta.norm() > 0 and rel(delta, ref_delta) < 1e-5
    ema_ref = torch.cat([(0.99 * start[k] + 0.01 * p.detach()).flatten() for k, p in model.named_parameters()])
    assert rel(torch.cat([r0["ema"][k].flatten() for k in start]), ema_ref) < 1e-6  # demo EMA decay 0.99
    row = metrics(os.path.join(folder, "ddp"))[0]
    assert row["gnorm"] == pytest.approx(gnorm, rel=1e-5)  # the synchronised gradient: mean, not sum
    assert row["loss"] == pytest.approx(np.mean(losses), rel=1e-5)  # all-reduced over ranks


# ---------------------------------------------------------------------------------------------------------------------
# SD-VAE latent cache (tiny random AutoencoderKL with 4 blocks: 8x downsampling like the SD-VAE)
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def latent_cache(tmp_path_factory):
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("latent")
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                  latent_channels=4, norm_num_groups=8, sample_size=32).save_pretrained(root / "vae")
    make_folder(root / "imgs", n=8, classes=2, size=32)
    data.build_cache(str(root / "imgs"), str(root / "cache"), image_size=32, vae=str(root / "vae"), batch_size=4,
                     num_workers=0, dtype="float32", chunk_size=8, device="cpu", log=lambda *a: None)
    return root


def test_latent_batches_draw_a_fresh_posterior_sample(latent_cache):
    ds = data.LatentCache(str(latent_cache / "cache"), flip=False)
    loader, sampler = data.make_loader(ds, 4, 0, 1, seed=0, num_workers=0)
    batches = data.EpochBatches(loader, sampler, torch.device("cpu"))
    torch.manual_seed(5)
    x, y = batches()
    torch.manual_seed(5)
    eps = torch.randn(4, 4, 4, 4)
    ref = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0)
    ref.set_epoch(0)
    mean, std, labels = (torch.stack(t) for t in zip(*[ds[i] for i in list(ref)[:4]]))
    assert torch.allclose(x, mean + std * eps, atol=1e-6) and torch.equal(y, labels)


def test_train_on_latent_cache(latent_cache, tmp_path, capsys):
    cache = str(latent_cache / "cache")
    out = train.main(["--model", "SiT-T/2", "--image-size", "32", "--latent-cache", cache, "--global-batch-size", "4",
                      "--steps", "2", "--log-every", "1", "--results-dir", str(tmp_path), "--run-name", "lat"])
    rows = [r for r in metrics(out["run_dir"]) if "loss" in r]
    assert len(rows) == 2 and all(math.isfinite(r["disp"]) and math.isfinite(r["diff"]) for r in rows)
    cfg = load(out["run_dir"])["config"]
    assert cfg["latent"] is True and cfg["vae"] == str(latent_cache / "vae") and cfg["num_classes"] == 2
    img = Image.open(os.path.join(out["run_dir"], "samples_final.png"))  # decoded by the VAE: 2 rows of 8, 32px
    assert img.size == (2 + 8 * 34, 2 + 2 * 34)
    msg = _error(["--model", "SiT-T/2", "--image-size", "64", "--latent-cache", cache, "--results-dir", tmp_path],
                 capsys)
    assert "image_size" in msg and "64" in msg


def test_train_on_image_folder(latent_cache, tmp_path, capsys):
    imgs = str(latent_cache / "imgs")  # 8 random 32x32 images in 2 class folders
    out = train.main([*base(imgs), "--image-size", "32", "--global-batch-size", "4", "--micro-batch-size", "2",
                      "--steps", "2", "--results-dir", str(tmp_path), "--run-name", "folder"])
    assert [r["step"] for r in metrics(out["run_dir"])] == [1, 2]
    assert load(out["run_dir"])["config"]["num_classes"] == 2
    msg = _error([*base(imgs), "--image-size", "32", "--num-classes", "5", "--results-dir", tmp_path], capsys)
    assert "--num-classes 5" in msg and "2 classes" in msg
