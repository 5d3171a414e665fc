"""Checks that need a CUDA device, skipped elsewhere: a bf16 training step with fused attention and fused AdamW
never makes the host wait for the GPU, a non-finite step is skipped on the device, the lagged flag read, and
bench.py's GPU rows (peak memory, MFU)."""

import pytest
import torch

import bench
import sample
import train
from dispersive import DispersiveConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE = "cuda"


def setup(name, B=8):
    torch.manual_seed(0)
    model, family = sample.build_model(name, 32, 10, False)
    model.to(DEVICE)
    with torch.no_grad():  # every layer active (adaLN-Zero starts as the identity)
        for p in model.parameters():
            if p.requires_grad and p.abs().sum() == 0:
                p.normal_(0, 0.02)
    objective = train.build_objective(name, family)
    if family == "meanflow":  # training-time CFG gathers its guided rows: one host read, by design
        objective.omega, objective.kappa = 1.0, 0.0
    loss = train.TrainLoss(model, objective, DispersiveConfig.preset("paper", model.depth), model.depth)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    ema = ([p.detach().clone() for p in params], params)
    x = torch.randn(B, 3, 32, 32, device=DEVICE)
    y = torch.randint(0, 10, (B,), device=DEVICE)
    return model, loss, opt, ema, x, y


def bf16():
    return torch.autocast("cuda", dtype=torch.bfloat16)


@pytest.mark.parametrize("name", ["SiT-T/4", "DiT-T/4", "MeanFlow-T/4"])
def test_training_step_never_waits_for_the_gpu(name):
    model, loss, opt, ema, x, y = setup(name)
    train.train_step(loss, opt, lambda: (x, y), autocast=bf16, ema=ema)  # first step: lazy optimizer state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
    try:
        stats, flags = train.train_step(loss, opt, lambda: (x, y), autocast=bf16, ema=ema)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert flags.tolist() == [0.0, 0.0]
    assert torch.isfinite(stats["loss"]) and stats["disp"] < 0


def test_nonfinite_step_is_skipped_on_the_gpu_and_read_one_step_late():
    model, loss, opt, ema, x, y = setup("SiT-T/4")
    lagged = train.LaggedFlags()
    _, flags = train.train_step(loss, opt, lambda: (x, y), autocast=bf16, ema=ema)
    lagged.push(1, flags)
    p0 = next(p for p in ema[1] if p.requires_grad)
    before = [t.clone() for t in ema[0]], [p.detach().clone() for p in ema[1]], \
        {k: v.clone() for k, v in opt.state[p0].items()}
    assert set(before[2]) == {"step", "exp_avg", "exp_avg_sq"}
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    _, flags = train.train_step(loss, opt, lambda: (bad, y), autocast=bf16, ema=ema)
    lagged.push(2, flags)
    assert lagged.pop(keep=1) == [(1, False, False)]
    assert lagged.pop(keep=0) == [(2, True, False)]
    assert all(torch.equal(a, b) for a, b in zip(before[0], ema[0]))           # EMA untouched
    assert all(torch.equal(a, b.detach()) for a, b in zip(before[1], ema[1]))  # weights untouched
    for k, v in opt.state[p0].items():                                         # AdamW moments and step count
        assert torch.equal(v, before[2][k]), k
    assert all(p.grad is None for p in ema[1])


def test_bench_gpu_rows():
    rows = bench.main(["--smoke", "--device", "cuda", "--json", "--only", "train"])
    peak = [r for r in rows if r["what"].startswith("peak memory")]
    assert len(peak) == 3 and all(0 < r["value"] < 80 for r in peak)
