"""Each benchmark's main runs in --quick mode and writes a JSON with positive figures."""

import json
import math

import pytest

from bench import bench_kl_drift, bench_pretrain, bench_sampler, roofline


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _run(module, tmp_path, name, capsys):
    out = tmp_path / f"{name}.json"
    report = module.main(["--quick", "--threads", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(report))
    assert data["threads"] == 1 and data["machine"]["cpu"]
    return data, printed


def test_roofline(tmp_path, capsys):
    data, printed = _run(roofline, tmp_path, "roofline", capsys)
    assert data["bench"] == "roofline" and data["n"] == 256
    assert set(data["gflops"]) == {"fp32", "bf16"}
    assert all(_positive(v) for v in data["gflops"].values())
    assert "fp32" in printed and "bf16" in printed


def test_measure_matmul_gflops():
    assert _positive(roofline.measure_matmul_gflops("fp32", n=64, threads=1, min_time=0.0))
    with pytest.raises(ValueError, match="dtype"):
        roofline.measure_matmul_gflops("fp8", n=64)


def test_bench_sampler(tmp_path, capsys):
    data, printed = _run(bench_sampler, tmp_path, "sampler", capsys)
    assert data["bench"] == "sampler" and data["precision"] in ("fp32", "bf16")
    assert _positive(data["roofline_gflops"])
    rows = data["results"]
    assert {(r["order"], r["steps"]) for r in rows} == {(o, s) for o in ("random", "confidence") for s in (4, 8)}
    for r in rows:
        for key in ("samples_per_s", "chars_per_s", "gflops", "roofline_fraction", "seconds_best", "params"):
            assert _positive(r[key]), key
        assert r["preset"] == "tiny" and r["batch_size"] == 4
        assert r["forwards_per_sample_run"] == r["steps"]  # block 32 >= steps: every step reveals
        assert r["chars_per_s"] == pytest.approx(r["samples_per_s"] * r["block_size"])
    assert "GFLOP/s" in printed and "roofline" in printed


def test_bench_pretrain(tmp_path, capsys):
    data, printed = _run(bench_pretrain, tmp_path, "pretrain", capsys)
    assert data["bench"] == "pretrain" and _positive(data["roofline_gflops"])
    (r,) = data["results"]
    for key in ("tokens_per_s", "gflops", "roofline_fraction", "ms_per_iter", "params", "iters"):
        assert _positive(r[key]), key
    assert r["preset"] == "tiny" and r["batch_size"] == 8
    assert "tokens/s" in printed


def test_bench_pretrain_muon_rows(tmp_path):
    out = tmp_path / "p.json"
    report = bench_pretrain.main(["--quick", "--threads", "1", "--optimizers", "adamw,muon", "--out", str(out)])
    rows = report["results"]
    assert [(r["optimizer"], r["compile"]) for r in rows] == [("adamw", False), ("muon", False)]
    assert all(_positive(r[k]) for r in rows for k in ("tokens_per_s", "warmup_s", "optimizer_ms"))
    assert all(r["optimizer_ms"] < r["ms_per_iter"] for r in rows)


def test_bench_sampler_with_checkpoint(tmp_path, tiny_generator):
    out = tmp_path / "ck.json"
    report = bench_sampler.main(["--quick", "--threads", "1", "--orders", "confidence", "--checkpoint",
                                 tiny_generator, "--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert len(rows) == 2 and rows == report["results"]
    assert all(r["preset"].startswith("checkpoint:") and _positive(r["gflops"]) for r in rows)


def test_compare_compile(tmp_path, capsys):
    from bench import compare_compile
    out = tmp_path / "cc.json"
    report = compare_compile.main(["--preset", "tiny", "--batch", "4", "--rounds", "2", "--steps", "1",
                                   "--threads", "1", "--out", str(out)])
    assert f"wrote {out}" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(report))
    assert all(len(v) == 2 and all(_positive(x) for x in v) for v in data["ms_per_step"].values())
    assert _positive(data["speedup"]) and data["threads"] == 1


def test_compare_forward_against_a_baseline_file(tmp_path):
    """A/B of the trunk against a transformer.py (here this one): with --masked-rows the current
    model returns half of the positions, the baseline all; both timings and the ratios land in the JSON."""
    from bench import compare_forward
    from dgrpo.models import transformer
    out = tmp_path / "cf.json"
    report = compare_forward.main(["--baseline", transformer.__file__, "--preset", "tiny", "--batch", "4",
                                   "--rounds", "1", "--masked-rows", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(report)) and data["masked_rows"] is True
    assert all(_positive(data[name][k]) for name in ("baseline", "current") for k in ("forward_s", "train_s"))
    assert _positive(data["forward_speedup"]) and _positive(data["train_speedup"])


@pytest.mark.parametrize("order", ["random", "confidence"])
def test_bench_kl_drift(tmp_path, tiny_generator, tiny_judge, order):
    """Judge and shuffled rewards from the same start: KL 0 there, then measured at every evaluation; under random
    order the revealed tokens' log-ratio estimates the same KL."""
    out = tmp_path / "drift.json"
    report = bench_kl_drift.main(["--generator", tiny_generator, "--judge", tiny_judge, "--steps", "2",
                                  "--eval-every", "1", "--eval-samples", "32", "--sampler-steps", "4", "--order", order,
                                  "--threads", "1", "--out", str(out)])
    assert json.loads(out.read_text())["table"] == json.loads(json.dumps(report["table"]))
    rows = report["rows"]
    assert [(r["reward_kind"], r["step"]) for r in rows] == [(k, s) for k in ("judge", "shuffled") for s in (0, 1, 2)]
    assert all(r["kl_seq"] == 0 for r in rows if r["step"] == 0)
    assert all(_positive(r["kl_seq"]) for r in rows if r["step"] > 0)
    assert [(t["step"], t["kl_shuffled"]) for t in report["table"]] == [(s, r["kl_seq"]) for r in rows
                                                                        if r["reward_kind"] == "shuffled" and r["step"]
                                                                        for s in [r["step"]]]
    if order == "random":
        for r in rows[1:3]:
            assert abs(r["revealed_log_ratio"] - r["kl_seq"]) < 4 * r["revealed_log_ratio_se"] + 0.05
