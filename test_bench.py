"""bench.py in its smoke mode: every section runs, and the numbers that are not timings are right."""

import math

import bench


def test_bench_smoke_runs_every_section_and_counts_network_calls():
    rows = bench.main(["--smoke", "--device", "cpu", "--json"])
    sections = {r["name"].split("/")[0] for r in rows}
    assert sections == set(bench.SECTIONS) | {"bench"}  # + the process's peak memory
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
