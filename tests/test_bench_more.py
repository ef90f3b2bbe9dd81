"""Learner, weight-sync, end-to-end, scaling and quality benchmarks: each runs in --quick mode.

Checks the JSON keys and that the measured figures are positive; no timing
assertions (the machine is shared). The Ray benchmarks reuse the session's
cluster (conftest.ray_cluster, 4 CPUs) instead of starting their own.
"""

import json
import math

import pytest
import torch

from bench import (bench_driver_scale, bench_e2e, bench_gpu, bench_learner, bench_quality, bench_scaling, bench_weight_sync,
                   common)
from dgrpo.errors import ConfigError


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _run(module, tmp_path, capsys, *extra):
    out = tmp_path / f"{module.__name__.rsplit('.', 1)[-1]}.json"
    report = module.main(["--quick", "--out", str(out), *extra])
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(report))
    m = data["machine"]
    assert m["cpu"] and m["torch"] and m["date"] and _positive(m["threads"])
    return data, printed


def test_common_table_and_json(tmp_path, capsys):
    text = common.print_table([{"a": 1, "b": 0.5}, {"a": 22}], [("a", "A"), ("b", "B", ".2f"), ("c", "C")])
    assert "0.50" in text and text.splitlines()[-1].split() == ["22", "-", "-"]
    path = common.write_json({"x": 1, "p": tmp_path}, tmp_path / "sub" / "r.json")
    assert json.loads(path.read_text()) == {"x": 1, "p": str(tmp_path)}
    assert "wrote" in capsys.readouterr().out


def test_bench_learner(tmp_path, capsys):
    data, printed = _run(bench_learner, tmp_path, capsys)
    assert data["bench"] == "learner" and _positive(data["roofline_gflops"])
    rows = data["results"]
    assert {(r["steps"], r["replay"]) for r in rows} == {(4, "all"), (8, "all"), (4, "2"), (8, "2")}
    for r in rows:
        for key in ("seconds", "samples_per_s", "replay_tokens_per_s", "trained_tokens_per_s", "gflops",
                    "roofline_fraction", "gflop_per_step", "replay_rows", "params", "ref_share"):
            assert _positive(r[key]), key
        assert r["passes_per_row"] == 4  # reference fwd + policy fwd/bwd, behaviour log-probs
        expected_rows = r["samples"] * (r["steps"] if r["replay"] == "all" else 2)
        assert r["replay_rows"] == expected_rows  # block 32 >= S: every step reveals tokens
    assert len(data["ratios"]) == 2 and all(_positive(x["speedup"]) for x in data["ratios"])
    assert "GFLOP/s" in printed and "roofline" in printed


def test_bench_learner_passes():
    assert bench_learner.passes_per_row(1, "behaviour") == 4
    assert bench_learner.passes_per_row(2, "recompute") == 8
    assert bench_learner.passes_per_row(1, "behaviour", "rollout") == 3
    assert bench_learner.passes_per_row(1, "recompute", "rollout") == 4
    assert bench_learner.passes_per_row(1, "recompute", "rollout", one_minibatch=True) == 3


def test_bench_learner_reference_on_rollout(tmp_path, capsys):
    """--reference-on learner,rollout: both sides per configuration, their ratio, and the workers' cost."""
    data, printed = _run(bench_learner, tmp_path, capsys, "--reference-on", "learner,rollout")
    rows = data["results"]
    assert sorted(r["reference_on"] for r in rows) == ["learner"] * 4 + ["rollout"] * 4
    for r in rows:
        assert (r["ref_share"] == 0) == (r["reference_on"] == "rollout")
        assert r["passes_per_row"] == (3 if r["reference_on"] == "rollout" else 4)
    sides = [x for x in data["ratios"] if "reference on rollout vs learner" in x["compare"]]
    assert len(sides) == 4 and all(_positive(x["speedup"]) for x in sides)
    assert {(w["steps"], w["replay"]) for w in data["workers"]} == {(4, "all"), (8, "all"), (4, "2"), (8, "2")}
    for w in data["workers"]:
        for key in ("sample_s_per_sample", "reference_s_per_sample", "added_fraction"):
            assert _positive(w[key]), key
    assert "reference s/sample" in printed


def test_bench_weight_sync(ray_cluster, tmp_path, capsys):
    data, printed = _run(bench_weight_sync, tmp_path, capsys)
    assert data["bench"] == "weight_sync" and data["ray_cluster"] == "existing"
    rows = data["results"]
    assert [(r["preset"], r["workers"], r["path"]) for r in rows] == [
        ("tiny", n, path) for n in (1, 2) for path in ("object_store", "collective")]
    for r in rows:
        for key in ("mb", "params", "sync_s", "first_s", "worker_load_s_max", "delivered_mb_per_s", "vs_object_store"):
            assert _positive(r[key]), key
    assert "vs object store" in printed


def test_bench_driver_scale(ray_cluster, tmp_path, capsys):
    data, printed = _run(bench_driver_scale, tmp_path, capsys)
    assert data["bench"] == "driver_scale" and data["machine"]["cpu_flags"] is not None
    assert [r["workers"] for r in data["overhead"]] == [r["placed"] for r in data["overhead"]] == [1, 2]
    for r in data["overhead"]:
        assert r["steps_measured"] == 2
        assert r["step_s"] >= data["delay_s"]  # every step waited for its premade requests
        for key in ("driver_cpu_s", "driver_cpu_pct", "sync_s", "learn_s", "actors_pss_mb"):
            assert _positive(r[key]), key
    assert [r["workers"] for r in data["broadcast"]] == [1, 2]
    assert all(_positive(r["broadcast_s"]) and r["broadcast_s"] >= r["worker_load_s_max"] for r in data["broadcast"])
    assert "driver CPU % of step" in printed
    assert [r["workers"] for r in data["ray_floor"]] == [1, 2]
    assert all(_positive(r["cpu_ms_per_worker_step"]) for r in data["ray_floor"])


def test_bench_scaling(ray_cluster, tmp_path, capsys):
    # the shared cluster has 4 CPUs: 1 CPU per group keeps all groups placeable
    data, printed = _run(bench_scaling, tmp_path, capsys, "--cpus", "1")
    assert data["bench"] == "scaling"
    rows = data["results"]
    assert [(r["workers"], r["torch_threads"]) for r in rows] == [(1, 1), (2, 1)]
    for r in rows:
        for key in ("samples_per_s", "chars_per_s", "wall_s", "speedup", "efficiency", "busy_share"):
            assert _positive(r[key]), key
    assert rows[0]["efficiency"] == pytest.approx(1.0)
    assert set(data["efficiency"]) == {"1", "2"}
    assert "efficiency" in printed


def test_bench_e2e(ray_cluster, tmp_path, capsys):
    data, printed = _run(bench_e2e, tmp_path, capsys)
    assert data["bench"] == "e2e"
    assert [m["mode"] for m in data["modes"]] == ["sync", "async"]
    for m in data["modes"]:
        for key in ("steps_per_min", "share_generation", "share_scoring", "share_learning", "share_sync",
                    "share_learner_idle", "share_rollout_idle", "step_s_mean", "learn_s_per_step"):
            assert _positive(m[key]), (m["mode"], key)
        assert m["share_learning"] + m["share_learner_idle"] == pytest.approx(1.0)
    assert len(data["runs"]) == 2
    assert "steps/min" in printed and "learner idle" in printed


def test_bench_e2e_reference_on_both_sides(ray_cluster, tmp_path, capsys):
    """--reference-on learner,rollout: one row per (mode, side), the ratio between the sides, peak memory."""
    data, printed = _run(bench_e2e, tmp_path, capsys, "--modes", "sync", "--reference-on", "learner,rollout")
    assert [(m["mode"], m["reference_on"]) for m in data["modes"]] == [("sync", "learner"), ("sync", "rollout")]
    learner_side, rollout_side = data["modes"]
    assert learner_side["speedup_vs_reference_on_learner"] == pytest.approx(1.0)
    assert _positive(rollout_side["speedup_vs_reference_on_learner"]) and _positive(rollout_side["samples_per_min"])
    assert _positive(learner_side["ref_replay_s_per_step"]) and rollout_side["ref_replay_s_per_step"] == 0
    for m in data["modes"]:
        assert _positive(m["learner_peak_rss_mib"]) and _positive(m["rollout_peak_rss_mib"])
    assert "vs ref on learner" in printed


def test_bench_e2e_overrides_reach_every_run(tmp_path):
    args = bench_e2e.parse_args(["--set", "grpo.old_logprob=recompute", "--set", "grpo.tis_cap=3"])
    cfg = bench_e2e.build_config(args, "async", tmp_path, "corpus.txt")
    assert (cfg.grpo.old_logprob, cfg.grpo.tis_cap, cfg.run.mode) == ("recompute", 3.0, "async")
    with pytest.raises(ConfigError, match="old_logprob"):
        bench_e2e.build_config(bench_e2e.parse_args(["--set", "grpo.old_logprob=both"]), "sync", tmp_path, "c.txt")


def test_e2e_summarise_shares():
    rows = [{"step": 0, "eval_reward_mean": 0.1}]
    for s in range(1, 4):
        rows.append({"step": s, "reward_mean": 0.1 * s, "time/step_s": 2.0, "time/generate_s": 2.0,
                     "time/score_s": 0.2, "time/learn_s": 1.0, "time/sync_s": 0.1, "learner_idle_ratio": 0.5,
                     "rollout_idle_ratio": 0.5, "steps_per_min": 30.0})
    s = bench_e2e.summarise(rows, skip=1, n_workers=2, n_judges=1)
    assert s["steps_measured"] == 2 and s["steps_per_min"] == pytest.approx(30.0)
    assert s["share_generation"] == pytest.approx(0.5) and s["share_learning"] == pytest.approx(0.5)
    assert s["share_scoring"] == pytest.approx(0.1) and s["share_sync"] == pytest.approx(0.05)
    assert s["share_unaccounted"] == pytest.approx(1 - 0.5 - 0.1 - 0.5 - 0.05)


def test_best_of_n_kl_and_n():
    assert bench_quality.bon_kl_bound(1) == 0.0
    for n in (2, 7, 100):
        kl = bench_quality.bon_kl_bound(n)
        assert bench_quality.n_for_kl(kl, 256)[0] == n
    assert bench_quality.n_for_kl(0.0, 256)[0] == 1
    assert bench_quality.n_for_kl(50.0, 256)[0] == 256  # clipped
    assert bench_quality.n_for_kl(bench_quality.bon_kl_bound(300), 256)[0] == 256


def test_bench_quality(tmp_path, capsys):
    data, printed = _run(bench_quality, tmp_path, capsys)
    assert data["bench"] == "quality"
    kl = data["kl"]
    assert kl["source"].startswith("metrics")  # the made-up run's metrics.jsonl two levels up
    gen_tokens = data["eval"]["generated_tokens_per_sample"]
    assert kl["kl_seq"] == pytest.approx(0.01 * gen_tokens)  # last per-token kl x generated tokens
    assert kl["n"] == bench_quality.n_for_kl(kl["kl_seq"], kl["max_n"])[0] and 1 <= kl["n"] <= kl["max_n"]
    assert _positive(kl["measured_kl_seq_se"])
    methods = [r["method"] for r in data["results"]]
    assert methods == ["generator (N=1)", f"best-of-{kl['n']}", "policy"]
    for r in data["results"]:
        assert _positive(r["reward_mean"]) and _positive(r["samples"]) and r["reward_se"] >= 0
    # best-of-N is the per-prompt max of a pool whose mean is the N=1 figure
    assert data["results"][1]["reward_mean"] >= data["results"][0]["reward_mean"]
    assert [c["n"] for c in data["best_of_n_curve"]][0] == 1
    assert "best-of" in printed


def test_bench_quality_explicit_kl(tmp_path, capsys):
    out = tmp_path / "q.json"
    report = bench_quality.main(["--quick", "--kl", "1.5", "--kl-per-sequence", "--out", str(out)])
    assert report["kl"]["kl_seq"] == 1.5 and report["kl"]["source"].startswith("--kl")
    assert report["kl"]["n"] == min(bench_quality.n_for_kl(1.5, 8)[0], 8)
    capsys.readouterr()


def test_eval_generator(tmp_path, capsys):
    from bench import eval_generator
    data, printed = _run(eval_generator, tmp_path, capsys, "--compare-iid", "--train-split")
    assert data["bench"] == "eval_generator" and data["sets"] == 3
    (row,) = data["results"]
    assert row["gap"] == pytest.approx(row["stratified"]["mean"] - row["train"]["mean"])
    for kind in ("stratified", "iid", "train"):
        s = row[kind]
        assert len(s["values"]) == 3 and all(_positive(v) for v in s["values"])
        assert s["mean"] == pytest.approx(sum(s["values"]) / 3) and s["se"] >= 0
    assert "CE nats" in printed



def test_eval_generator_pairs_each_checkpoint_with_the_first(tmp_path, capsys):
    """Checkpoints after the first get their per-set difference to it, on the same windows and masks:
    a copy of the first differs by exactly zero, another model by the difference of the set values."""
    from bench import eval_generator
    from dgrpo.corpus import load_corpus
    from dgrpo.models.checkpoint import save_checkpoint
    from dgrpo.models.diffusion import DiffusionLM
    from dgrpo.models.transformer import preset_config
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question.\n" * 60)
    tok = load_corpus(str(corpus)).tokenizer
    paths = []
    for name, seed in (("a", 0), ("copy", 0), ("b", 1)):
        torch.manual_seed(seed)
        model = DiffusionLM(preset_config("tiny", tok.vocab_size))
        save_checkpoint(tmp_path / name, kind="generator", model_config=model.cfg, vocab=tok.to_dict(), weights=model)
        paths.append(str(tmp_path / name))
    out = tmp_path / "eg.json"
    data = eval_generator.main([*paths, "--corpus", str(corpus), "--windows", "32", "--sets", "3", "--batch", "16",
                                "--out", str(out)])
    first, copy, other = data["results"]
    assert "paired_vs_first" not in first
    assert copy["paired_vs_first"] == {"mean": 0.0, "min": 0.0, "max": 0.0}
    diffs = [b - a for a, b in zip(first["stratified"]["values"], other["stratified"]["values"])]
    assert other["paired_vs_first"]["mean"] == pytest.approx(sum(diffs) / 3)
    assert (other["paired_vs_first"]["min"], other["paired_vs_first"]["max"]) == (min(diffs), max(diffs))
    assert min(diffs) != 0.0
    assert "vs first" in capsys.readouterr().out

def test_bench_gpu_says_it_did_not_run_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the check would run")
    out = tmp_path / "gpu.json"
    report = bench_gpu.main(["--out", str(out)])
    assert report["ran"] is False and "no CUDA device" in report["reason"]
    assert json.loads(out.read_text())["device"] == {"type": "cpu"}


def test_bench_gpu_every_part_on_the_cpu(ray_cluster, tmp_path, capsys):
    """--device cpu --quick: the sampler, the learner with the reference's pass on either side, GRPO in process and
    on Ray (the cluster of the session), each with figures."""
    data, printed = _run(bench_gpu, tmp_path, capsys, "--device", "cpu", "--grpo-minutes", "0.05")
    assert data["ran"] is True and data["precision"] == "fp32" and _positive(data["roofline_gflops"]["fp32"])
    assert {(r["order"], r["batch"]) for r in data["sampler"]} == {("random", 4), ("confidence", 4)}
    assert all(_positive(r["samples_per_s"]) for r in data["sampler"] + data["learner"])
    assert {(r["replay"], r["reference_on"]) for r in data["learner"]} == {
        ("4", "learner"), ("4", "rollout"), ("all", "learner"), ("all", "rollout")}
    inproc = data["grpo_in_process"]
    assert inproc["steps"] == 3 and _positive(inproc["samples_per_min"])
    assert 0.5 < sum(inproc["shares"].values()) <= 1.0
    ray_run = data["grpo_ray"]
    assert ray_run["ran"] is True and ray_run["steps"] >= 1 and _positive(ray_run["samples_per_min"])
    assert "GRPO in process" in printed
