"""bench.py: every section runs in its smoke mode with the rows the README reports, and the numbers that are not
timings are right (network calls per sampler, the eig/sqrtm and fp32/fp64 agreements, the FLOP count, the baseline)."""

import math
from types import SimpleNamespace

import pytest
import torch

import bench
from dispersive import dispersive_loss


@pytest.fixture(scope="module")
def rows():
    return bench.main(["--smoke", "--device", "cpu", "--json"])


def test_bench_smoke_runs_every_section_and_counts_network_calls(rows):
    sections = {r["name"].split("/")[0] for r in rows}
    assert sections == set(bench.SECTIONS) - {"ablation"} | {"bench"}  # + the process's peak memory; ablation: on demand
    for r in rows:
        assert r["value"] is None or math.isfinite(r["value"]), r
    nfe = {r["name"] + " " + r["what"].split(":")[0]: r["value"] for r in rows if r["unit"] == "NFE"}
    # smoke steps: sde 3, ode-heun 2 (2 calls each), ode-euler 3, ddpm 3, ddim 3, MeanFlow 1 and 2
    assert nfe == {"sample/SiT-T/4 sde": 3, "sample/SiT-T/4 ode-heun": 4, "sample/SiT-T/4 ode-euler": 3,
                   "sample/DiT-T/4 ddpm": 3, "sample/DiT-T/4 ddim": 3, "sample/MeanFlow-T/4 1-NFE": 1,
                   "sample/MeanFlow-T/4 2-NFE": 2}
    fd = next(r for r in rows if r["what"].startswith("FD relative difference"))
    assert fd["value"] < 1e-6  # eigenvalue form against scipy's sqrtm
    err = next(r for r in rows if r["what"].startswith("rel. error vs fp64"))
    assert err["value"] < 1e-5
    init = next(r for r in rows if r["what"].startswith("value at init"))
    assert init["value"] >= -math.log(8) - 1e-6  # infonce_l2 >= −log B (the diagonal's terms), B = 8


def test_bench_smoke_has_the_rows_of_the_readme_table(rows):
    want = [("dispersive/infonce_l2", "fwd+bwd", True), ("dispersive/infonce_cos", "fwd+bwd", True),
            ("dispersive/hinge", "fwd+bwd", True), ("dispersive/covariance", "fwd+bwd", False),
            ("dispersive/infonce_l2", "rel. error vs fp64", True),
            ("network/DiT-T/4", "fwd fp32", True), ("network/DiT-T/4", "fwd+bwd fp32", True),
            ("fid/inception", "features img/s (pytorch-fid", False), ("fid/inception", "features img/s (tf", False),
            ("fid/frechet", "FD of 64-d statistics", True),
            ("data/jpeg", "ImageFolder img/s", False), ("data/cache", "LatentCache img/s (", False),
            ("train/MeanFlow-T/4", "step time vs SiT-T/4, training-time CFG", True),
            ("train/MeanFlow-T/4", "step time vs SiT-T/4, no CFG", True)]
    for f in ("SiT", "MeanFlow", "DiT"):
        want += [(f"train/{f}-T/4", "step img/s, no disp", True), (f"train/{f}-T/4", "step img/s, with disp", True),
                 (f"train/{f}-T/4", "dispersive overhead", True), (f"train/{f}-T/4", "dispersive loss fwd+bwd", False)]
    want += [(f"sample/{f}-T/4", f"{s} {n} steps", True) for f, s, n in [
        ("SiT", "sde", 3), ("SiT", "ode-heun", 2), ("SiT", "ode-euler", 3), ("DiT", "ddpm", 3), ("DiT", "ddim", 3),
        ("MeanFlow", "1-NFE", 1), ("MeanFlow", "2-NFE", 2)]]
    for name, what, baseline in want:
        match = [r for r in rows if r["name"] == name and r["what"].startswith(what)]
        assert len(match) == 1 and (match[0]["baseline"] is not None) == baseline, (name, what, match)


def test_bench_ablation_smoke_reports_every_setting():
    rows = bench.main(["--only", "ablation", "--smoke", "--device", "cpu", "--json"])
    got = {(r["name"], r["what"].split(" (")[0]): r for r in rows}
    for name in ("none", "paper", "official", "contrastive"):
        for what in ("shape accuracy, step 10", "shape accuracy, final grid"):
            assert 0 <= got[f"ablation/{name}", what]["value"] <= 1
        assert got[f"ablation/{name}", "shape FD, final grid"]["value"] > 0
        assert got[f"ablation/{name}", "run time, mean"]["value"] > 0


def test_bench_table_prints_every_row(rows, capsys):
    bench.print_table(rows)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + len(rows) and lines[0].split() == ["name", "what", "value", "unit", "baseline", "ratio"]


def test_naive_baseline_is_the_same_loss():
    """The speed baseline computes what dispersive_loss computes (float64, so only the formulas differ)."""
    z = torch.randn(6, 3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for variant in ("infonce_l2", "infonce_cos", "hinge"):
        for tau in (0.5, 1.0):
            ours, base = dispersive_loss(z, variant, tau=tau, margin=2.0), bench.naive_dispersive(z, variant, tau, 2.0)
            assert torch.allclose(ours, base, rtol=1e-12, atol=1e-12), (variant, tau)


def test_dit_macs_match_the_dit_paper():
    """Gflops (multiply-adds) of DiT's Table 4 at 256² (latents 32², 4 channels, learned sigma: 8 out)."""
    for (depth, width), patch, gflops in [((28, 1152), 2, 118.6), ((12, 768), 2, 23.01), ((12, 384), 2, 6.06),
                                          ((28, 1152), 4, 29.05)]:
        model = SimpleNamespace(x_embedder=SimpleNamespace(num_patches=(32 // patch) ** 2), hidden_size=width,
                                depth=depth, patch_size=patch, in_channels=4, out_channels=8)
        assert bench.dit_macs(model) / 1e9 == pytest.approx(gflops, rel=2e-3)


def test_readme_code_line_counts_are_what_its_command_counts():
    """The README's files table states each file's code lines and the total: they are what its one-line command
    prints for the tree as it is (the command is taken from the README and run as written)."""
    import os
    import re
    import subprocess
    root = os.path.dirname(os.path.abspath(__file__))
    readme = open(os.path.join(root, "README.md"), encoding="utf-8").read()
    command = next(line for line in readme.splitlines() if line.startswith('python -c "import ast'))
    out = subprocess.run(["bash", "-c", command], cwd=root, capture_output=True, text=True, check=True).stdout
    counted = {f: int(n) for n, f in (line.split() for line in out.strip().splitlines()[:-1])}
    stated = {f: int(n) for f, n in re.findall(r"^\| `(\w+\.py)` \| (\d+) \|", readme, re.M)}
    assert stated == counted and len(counted) >= 10
    total = int(re.search(r"^\| all of the above \| \*\*(\d+)\*\* \|", readme, re.M).group(1))
    assert total == sum(counted.values()) == int(out.split()[-3])
