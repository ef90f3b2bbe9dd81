"""Gold evaluation: statistics by hand, best-of-N (KL bound, unbiased estimator), Gao fits, `dgrpo evaluate`
on tiny checkpoints (JSON keys, error bars, measured vs bound KL, bad input) and the over-optimisation plot."""

import itertools
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dgrpo.evaluation import (TextStats, best_of_n_expectation, best_of_n_weights, bon_kl_bound,
                              distinct_over_sets, fit_gao, gao_curve, jackknife_stderr, mean_stderr,
                              paired_difference, per_prompt_means)
from dgrpo.evaluation.evaluate import PER_SAMPLE
from dgrpo.evaluation.text_stats import (char_2gram_divergence, distinct_fraction, ngram_counts,
                                         repeated_fraction, words)
from dgrpo.entrypoints.cli import main

# --- text statistics ------------------------------------------------------------------------------


def test_words_and_ngrams_by_hand():
    assert words("What with with, WITH thou'rt\nhat!") == ["what", "with", "with", "with", "thou'rt", "hat"]
    assert ngram_counts("abab", 2) == Counter({"ab": 2, "ba": 1})
    assert ngram_counts(["a", "b", "a"], 2) == Counter({("a", "b"): 1, ("b", "a"): 1})
    assert ngram_counts("ab", 4) == Counter()


def test_distinct_and_repeated_by_hand():
    stats = TextStats(["with with with hat", "the king", "!!"])
    v = stats.values
    # words: with with with hat -> 1-grams 4 occurrences, 2 unique; 2-grams (w w) (w w) (w h): 2 unique of 3
    assert v["distinct_1_per_sample"].tolist() == [2 / 4, 1.0, 0.0]  # no words: 0
    assert v["distinct_2_per_sample"].tolist() == [2 / 3, 1.0, 0.0]
    assert v["distinct_4_per_sample"].tolist() == [1.0, 0.0, 0.0]  # one 4-gram; none in a 2-word text
    # repeated word 2-grams: (with with) occurs twice -> 2 of 3 occurrences are covered by repeats
    assert v["repeated_word_2grams"].tolist() == [2 / 3, 0.0, 0.0]
    # char 4-grams of "with with with hat": 15 occurrences; "with" and "ith " three times, "th w", "h wi", " wit" twice
    grams = ngram_counts("with with with hat", 4)
    assert sum(grams.values()) == 15
    repeated = sum(c for c in grams.values() if c >= 2)
    assert repeated == 3 + 3 + 2 + 2 + 2 and v["repeated_char_4grams"][0] == pytest.approx(repeated / 15)
    assert distinct_fraction(Counter()) == 0.0 and repeated_fraction(Counter()) == 0.0


def test_char_2gram_divergence_by_hand():
    """JS in bits: 0 for the reference's own 2-gram rates, 1 for text sharing no pair with it, and in between
    for a text using half of the reference's pairs at its rates ("ab" against "abcd": pairs {ab} vs {ab, bc, cd})."""
    assert char_2gram_divergence(["abcd", "abcd"], ["abcd"])["mean"] == pytest.approx(0.0)
    assert char_2gram_divergence(["xyz"], ["abcd"])["mean"] == pytest.approx(1.0)
    p, q = torch.tensor([1 / 3, 1 / 3, 1 / 3]), torch.tensor([1.0, 0.0, 0.0])
    m = (p + q) / 2
    kl = lambda a, b: float(sum(x * math.log2(x / y) for x, y in zip(a.tolist(), b.tolist()) if x > 0))
    assert char_2gram_divergence(["ab"], ["abcd"])["mean"] == pytest.approx(0.5 * kl(p, m) + 0.5 * kl(q, m))
    mixed = char_2gram_divergence(["abcd", "xyz"] * 8, ["abcd"])
    assert 0 < mixed["mean"] < 1 and mixed["stderr"] > 0  # the bootstrap over texts sees the spread


def test_distinct_over_sets_and_its_jackknife_by_hand():
    a, b, c = Counter({"x": 2, "y": 1}), Counter({"x": 1, "z": 1}), Counter({"w": 1})
    result = distinct_over_sets([[a, b, c]])
    assert result["mean"] == pytest.approx(4 / 6)  # x y z w over 6 occurrences
    leave_one_out = [3 / 3, 3 / 4, 3 / 5]  # without a: x z w / 3; without b: x y w / 4; without c: x y z / 5
    assert result["stderr"] == pytest.approx(jackknife_stderr(torch.tensor(leave_one_out)))
    two = distinct_over_sets([[a, b, c], [c, c, c]])
    assert two["mean"] == pytest.approx((4 / 6 + 1 / 3) / 2)


def test_mean_stderr_paired_and_per_prompt_by_hand():
    s = mean_stderr(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    assert s["mean"] == 3.0 and s["stderr"] == pytest.approx(math.sqrt(14 / 3) / 2)
    with pytest.raises(ValueError):
        mean_stderr(torch.tensor([1.0]))
    assert per_prompt_means(torch.tensor([[1.0, 3.0], [2.0, 2.0]])).tolist() == [2.0, 2.0]
    d = paired_difference(torch.tensor([2.0, 4.0, 7.0]), torch.tensor([1.0, 2.0, 3.0]))
    assert d["mean"] == pytest.approx(7 / 3) and d["stderr"] == pytest.approx(math.sqrt(7 / 3) / math.sqrt(3))
    # the jackknife of a mean is the usual standard error
    x = torch.tensor([1.0, 4.0, 2.0, 8.0, 5.0])
    loo = torch.stack([torch.cat([x[:i], x[i + 1:]]).mean() for i in range(5)])
    assert jackknife_stderr(loo) == pytest.approx(mean_stderr(x)["stderr"])


# --- best-of-N ------------------------------------------------------------------------------------


def test_best_of_n_kl_bound():
    assert bon_kl_bound(1) == 0.0
    assert bon_kl_bound(2) == pytest.approx(math.log(2) - 0.5)
    assert bon_kl_bound(64) == pytest.approx(math.log(64) - 63 / 64)
    with pytest.raises(ValueError):
        bon_kl_bound(0)


def test_unbiased_best_of_n_equals_enumeration_over_all_subsets():
    g = torch.Generator().manual_seed(0)
    P, M = 3, 7
    proxy, gold = torch.rand(P, M, generator=g), torch.randn(P, M, generator=g)
    for n in range(1, M + 1):
        brute = torch.zeros(P, dtype=torch.float64)
        subsets = list(itertools.combinations(range(M), n))
        for s in subsets:
            idx = torch.tensor(s)
            best = idx[proxy[:, idx].argmax(1)]
            brute += gold.double()[torch.arange(P), best]
        brute /= len(subsets)
        assert torch.allclose(best_of_n_expectation(proxy, gold, n), brute, atol=1e-12), n
    assert best_of_n_weights(M, 1).sum() == pytest.approx(1.0) and best_of_n_weights(M, M)[-1] == 1.0
    assert torch.allclose(best_of_n_expectation(proxy, proxy, 1), proxy.double().mean(1))
    with pytest.raises(ValueError):
        best_of_n_weights(4, 5)


# --- Gao fits -------------------------------------------------------------------------------------


@pytest.mark.parametrize("form,a,b", [("bon", 0.3, 0.05), ("rl", 0.2, 0.08)])
def test_gao_fits_recover_known_coefficients(form, a, b):
    d = torch.linspace(0.0, 6.0, 13, dtype=torch.float64)
    fit = fit_gao(form, d, gao_curve(form, a, b, d))
    assert fit["a"] == pytest.approx(a, abs=1e-9) and fit["b"] == pytest.approx(b, abs=1e-9)
    assert fit["r2"] == pytest.approx(1.0) and fit["n_points"] == 13
    noisy = gao_curve(form, a, b, d) + 0.01 * torch.randn(13, generator=torch.Generator().manual_seed(0),
                                                           dtype=torch.float64)
    fit = fit_gao(form, d, noisy)
    assert abs(fit["a"] - a) < 0.05 and 0.9 < fit["r2"] <= 1.0
    assert fit_gao(form, [0.0, 1.0], [0.0, 0.1]) is None  # one point at d > 0 cannot fix two coefficients
    assert fit_gao(form, [0.0, 1.0, 2.0], [0.0, 0.1, 0.1]) is None  # two fix them exactly: no test of the form


def test_the_levers_of_a_run_name_its_curve():
    from dgrpo.evaluation.evaluate import run_levers
    from dgrpo.evaluation.overoptimization import report_series
    config = {"reward": {"judge_checkpoints": ["a", "b", "c"], "ensemble": "mean_minus_std",
                         "ensemble_std_coef": 0.5},
              "judge_refresh": {"enabled": True, "publish_every": 5}, "grpo": {"reference_reset_every": None}}
    levers = run_levers(config)
    assert levers == ["ensemble of 3 (mean_minus_std, lambda=0.5)", "judge refresh every 5 steps"]
    assert run_levers({"reward": {"judge_checkpoint": "a", "judge_checkpoints": None}}) == []
    rows = [{"kind": "policy", "name": f"policy {step}", "run": "runs/x", "kl_coef": 0.04, "step": step,
             "levers": levers, "sqrt_kl": d, "proxy_reward": {"mean": d, "stderr": 0.0},
             "gold_reward": {"mean": d, "stderr": 0.0}} for step, d in [(1, 1.0), (2, 2.0)]]
    (series,) = report_series({"rows": rows})
    assert series["label"] == ("GRPO kl_coef=0.04, ensemble of 3 (mean_minus_std, lambda=0.5), "
                               "judge refresh every 5 steps (x)")


# --- dgrpo evaluate on tiny checkpoints -----------------------------------------------------------

SAMPLER = {"steps": 4, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "order": "random"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_generator, tiny_corpus_file):
    """Proxy and gold judges (random, own seeds), a 10-iteration LM, and two GRPO-style policy checkpoints:
    one equal to its stored reference, one with a perturbed head."""
    from dgrpo.corpus import load_corpus
    from dgrpo.training.lm import train_char_lm
    from dgrpo.models.checkpoint import save_checkpoint
    from dgrpo.models.judge import Judge, judge_config
    from dgrpo.models.diffusion import load_generator
    from dgrpo.config import LMTrainConfig, to_dict

    root = tmp_path_factory.mktemp("eval")
    gen, tok, _ = load_generator(tiny_generator)
    paths = {"generator": tiny_generator, "corpus": tiny_corpus_file}
    for name, seed in (("proxy", 1), ("gold", 2)):
        torch.manual_seed(seed)
        judge = Judge(judge_config("tiny", tok.n_chars, gen.cfg.block_size))
        paths[name] = str(root / name)
        save_checkpoint(paths[name], kind="judge", model_config=judge.cfg, vocab=tok.to_dict(), weights=judge,
                        config={"seed": seed})
    torch.manual_seed(3)
    wide = Judge(judge_config("tiny", tok.n_chars, 16))
    paths["short_judge"] = str(root / "short_judge")
    save_checkpoint(paths["short_judge"], kind="judge", model_config=wide.cfg, vocab=tok.to_dict(), weights=wide)
    other = Judge(judge_config("tiny", 5, gen.cfg.block_size))
    paths["other_vocab_judge"] = str(root / "other_vocab_judge")
    save_checkpoint(paths["other_vocab_judge"], kind="judge", model_config=other.cfg,
                    vocab={"chars": list("abcde")}, weights=other)
    lm_cfg = LMTrainConfig(preset="tiny", out=str(root / "lm"), max_iters=10, eval_every=10, eval_windows=4,
                           precision="fp32", corpus={"path": tiny_corpus_file})
    train_char_lm(lm_cfg, load_corpus(tiny_corpus_file), to_dict(lm_cfg), progress=False, log=lambda *a: None)
    paths["lm"] = lm_cfg.out
    for name, seed in (("member_a", 4), ("member_b", 5), ("gold_seed_of_a", 4)):
        torch.manual_seed(seed + (100 if name == "gold_seed_of_a" else 0))
        judge = Judge(judge_config("tiny", tok.n_chars, gen.cfg.block_size))
        paths[name] = str(root / name)
        save_checkpoint(paths[name], kind="judge", model_config=judge.cfg, vocab=tok.to_dict(), weights=judge,
                        config={"seed": seed})
    for name, noise, kl_coef in (("same", 0.0, 0.04), ("moved", 0.3, 0.01)):
        policy = type(gen)(gen.cfg)
        policy.load_state_dict(gen.state_dict())
        with torch.no_grad():
            policy.lm_head.weight.add_(noise * torch.randn_like(policy.lm_head.weight))
        run = root / f"run_{name}"
        config = {"corpus": {"path": tiny_corpus_file, "val_fraction": 0.1}, "sampler": SAMPLER,
                  "prompts": {"kind": "unconditional", "mask_fraction": 0.5, "length": None},
                  "run": {"eval_seed": 1234, "out_dir": str(run)}, "grpo": {"kl_coef": kl_coef},
                  "reward": {"kind": "judge", "judge_checkpoint": paths["proxy"]}}
        paths[name] = str(run / "checkpoints" / "step_000002")
        save_checkpoint(paths[name], kind="generator", model_config=gen.cfg, vocab=tok.to_dict(), weights=policy,
                        state={"step": 2, "version": 2}, config=config,
                        extra_tensors={"reference": gen.state_dict()})
        paths[f"run_{name}"] = str(run)
    return paths


def _evaluate(*args):
    return CliRunner().invoke(main, ["evaluate", "--prompts", "6", "--samples-per-prompt", "2", "--threads", "1",
                                     "--precision", "fp32", *args])


def _finite_bar(metric) -> bool:
    return (isinstance(metric, dict) and math.isfinite(metric["mean"]) and math.isfinite(metric["stderr"])
            and metric["stderr"] >= 0)


def test_evaluate_writes_every_measure_with_error_bars(tmp_path, checkpoints):
    c = checkpoints
    out = tmp_path / "eval.json"
    result = _evaluate("--policy", c["same"], "--run", c["run_moved"], "--generator", c["generator"],
                       "--best-of", "2,3,4", "--gold", c["gold"], "--lm", c["lm"], "--out", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    # says what it evaluated
    assert c["same"] in result.output and c["moved"] in result.output and "steps=4" in result.output
    assert {k: report["sampler"][k] for k in SAMPLER} == SAMPLER  # and the defaults of keys the run did not set
    assert report["n_prompts"] == 6 and report["precision"] == "fp32"
    assert report["checkpoints"]["gold_judge"] == c["gold"] and report["checkpoints"]["proxy_judge"] == c["proxy"]
    assert report["prompts"]["seed"] == 1234 and report["prompts"]["split"] == "validation"
    assert {"cpu", "avx2", "avx512_bf16", "amx_bf16"} <= set(report["machine"])
    assert report["timings"]["total_s"] > 0 and report["timings"]["sample_s"] > 0
    names = [r["name"] for r in report["rows"]]
    assert names == ["generator", "best-of-1", "best-of-2", "best-of-3", "best-of-4", f"policy {c['same']}",
                     f"policy {c['moved']}"]
    measured = [k for k in PER_SAMPLE if k != "proxy_disagreement"]  # one proxy judge: no spread
    keys = measured + [f"distinct_{n}" for n in (1, 2, 3, 4)] + ["kl_per_sequence", "char_2gram_js"]
    for row in report["rows"]:
        for key in keys:
            assert _finite_bar(row[key]), (row["name"], key, row[key])
        assert row["proxy_disagreement"] is None
        assert row["sqrt_kl"] >= 0 and row["examples"]
        if row["kind"] != "base":
            assert set(row["paired_vs_base"]) == set(measured)
            assert all(_finite_bar(v) for v in row["paired_vs_base"].values())
    base, bon, policies = report["rows"][0], report["rows"][1:5], report["rows"][5:]
    assert base["kl_kind"] == "base" and base["kl_per_sequence"]["mean"] == 0.0
    for row in [base] + policies:  # a model forward per step that revealed tokens: every step here
        assert row["forwards_per_sample"]["mean"] == report["sampler"]["steps"]
    for row in bon:
        assert row["kl_kind"] == "bon_bound" and row["samples_per_prompt"] == 4
        assert row["kl_per_sequence"] == {"mean": pytest.approx(bon_kl_bound(row["n"])), "stderr": 0.0}
    # best-of-N picks by the proxy: its expected proxy reward never falls with N
    proxies = [r["proxy_reward"]["mean"] for r in bon]
    assert proxies == sorted(proxies)
    same, moved = policies
    assert same["kl_kind"] == moved["kl_kind"] == "measured"
    assert abs(same["kl_per_sequence"]["mean"]) < 1e-3  # the policy is its reference
    assert moved["kl_per_sequence"]["mean"] > 0.1 and moved["kl_coef"] == 0.01 and moved["step"] == 2
    assert same["reference"] == "stored in the checkpoint"
    # the same weights sampled from the same seed as the base row: identical samples, zero paired differences
    assert same["paired_vs_base"]["proxy_reward"] == {"mean": 0.0, "stderr": 0.0}
    assert same["examples"] == base["examples"]
    assert [c_["method"] for c_ in report["curves"]] == ["bon", "rl", "rl"]
    bon_curve = report["curves"][0]
    assert bon_curve["fits"]["proxy"]["a"] is not None and bon_curve["fits"]["gold"] is not None
    assert "Δ proxy" in result.output and "(bound)" in result.output
    # the held-out text the prompts come from, measured like a row: its divergence to itself is not measured
    real = report["real_text"]
    assert {"proxy_reward", "gold_reward", "lm_bits_per_char", "distinct_2"} <= set(real)
    assert all(_finite_bar(real[k]) for k in ("proxy_reward", "gold_reward", "lm_bits_per_char"))
    assert 0 < base["char_2gram_js"]["mean"] <= 1 and same["char_2gram_js"] == base["char_2gram_js"]
    assert "held-out text" in result.output


def test_policy_alone_takes_its_stored_reference_as_the_base(tmp_path, checkpoints):
    out = tmp_path / "p.json"
    result = _evaluate("--policy", checkpoints["moved"], "--prompt-kind", "infill", "--out", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["prompts"]["kind"] == "infill" and "trajectory KL" in report["kl_definition"]
    assert report["rows"][1]["kl_per_sequence"]["mean"] > 0
    assert report["rows"][0]["checkpoint"].endswith("(its stored reference)")
    assert report["checkpoints"]["proxy_judge"] == checkpoints["proxy"]  # from the run's reward config
    assert report["rows"][0]["gold_reward"] is None and report["rows"][0]["lm_bits_per_char"] is None
    assert any("--gold" in w for w in report["warnings"])


def test_report_draws_the_overoptimization_plot(tmp_path, checkpoints):
    c = checkpoints
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for out, seed in ((a, "1"), (b, "2")):
        result = _evaluate("--policy", c["moved"], "--generator", c["generator"], "--best-of", "2,3,4",
                           "--gold", c["gold"], "--seed", seed, "--out", str(out))
        assert result.exit_code == 0, result.output
    png = tmp_path / "plots" / "overopt.png"
    result = CliRunner().invoke(main, ["report", "--overoptimization", str(a), str(b), "--out", str(png)])
    assert result.exit_code == 0, result.output
    assert png.is_file() and png.stat().st_size > 1000
    summary = json.loads(png.with_suffix(".json").read_text())
    assert [c_["method"] for c_ in summary["curves"]] == ["bon", "rl", "bon", "rl"]
    fit = summary["curves"][0]["fits"]["gold"]
    assert set(fit) == {"form", "a", "b", "r2", "n_points"} and fit["n_points"] == 4
    assert "a=" in result.output
    bad = CliRunner().invoke(main, ["report", "--overoptimization", str(tmp_path / "none.json")])
    assert bad.exit_code == 2 and "does not exist" in bad.output


@pytest.mark.parametrize("args,message", [
    (["--best-of", "0"], "N >= 1"),
    (["--best-of", "2,x"], "comma-separated list"),
    (["--best-of", "4", "--pool", "2"], "smaller than the largest N"),
    (["--judge", "{short_judge}"], "scores windows of 16 characters"),
    (["--judge", "{other_vocab_judge}"], "different corpora"),
    (["--gold", "{proxy}"], "is the proxy judge"),
    (["--judge", "{nowhere}"], "does not exist"),
    (["--prompts", "1"], "--prompts must be >= 2"),
    (["--lm", "{generator}"], "expected a lm checkpoint"),
    (["--steps", "0"], "Invalid value for '--steps': 0 is not in the range x>=1"),
])
def test_evaluate_bad_input_is_one_line_user_error(tmp_path, checkpoints, args, message):
    paths = {**checkpoints, "nowhere": str(tmp_path / "nowhere")}
    args = [a.format(**paths) for a in args]
    result = _evaluate("--generator", checkpoints["generator"], "--judge", checkpoints["proxy"], *args,
                       "--out", str(tmp_path / "x.json"))
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_evaluate_best_of_without_a_judge_and_missing_checkpoints(tmp_path, checkpoints):
    out = ["--out", str(tmp_path / "x.json")]
    result = _evaluate("--generator", checkpoints["generator"], "--best-of", "4", *out)
    assert result.exit_code == 2 and "--best-of needs it" in result.output
    result = _evaluate("--policy", str(tmp_path / "missing"), *out)
    assert result.exit_code == 2 and "does not exist" in result.output
    result = _evaluate("--judge", checkpoints["proxy"], *out)
    assert result.exit_code == 2 and "nothing to evaluate" in result.output
    result = _evaluate("--run", str(tmp_path), "--judge", checkpoints["proxy"], *out)
    assert result.exit_code == 2 and "no checkpoints" in result.output


def _base_row(tmp_path, c, name, *args):
    out = tmp_path / f"{name}.json"
    result = _evaluate("--generator", c["generator"], *args, "--out", str(out))
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


def test_evaluate_scores_the_proxy_with_an_ensemble(tmp_path, checkpoints):
    """Every measure is a mean over samples, so an ensemble's mean reward is the mean of its members' mean
    rewards, and mean - lambda * std is the mean minus lambda times the mean spread (proxy_disagreement)."""
    c = checkpoints
    members = ["--judge", c["member_a"], "--judge", c["member_b"]]
    a = _base_row(tmp_path, c, "a", "--judge", c["member_a"])["rows"][0]
    b = _base_row(tmp_path, c, "b", "--judge", c["member_b"])["rows"][0]
    mean = _base_row(tmp_path, c, "mean", *members)
    mms = _base_row(tmp_path, c, "mms", *members, "--ensemble", "mean_minus_std", "--ensemble-std-coef", "2")["rows"][0]
    low = _base_row(tmp_path, c, "min", *members, "--ensemble", "min")
    assert mean["checkpoints"]["proxy_judge"] == [c["member_a"], c["member_b"]]
    assert mean["proxy_ensemble"] == {"members": 2, "mode": "mean", "std_coef": 1.0, "std": "sample (divisor M - 1)"}
    mean_row = mean["rows"][0]
    members_mean = (a["proxy_reward"]["mean"] + b["proxy_reward"]["mean"]) / 2
    assert mean_row["proxy_reward"]["mean"] == pytest.approx(members_mean)
    assert mean_row["proxy_disagreement"]["mean"] > 0
    assert mms["proxy_reward"]["mean"] == pytest.approx(mean_row["proxy_reward"]["mean"]
                                                       - 2 * mms["proxy_disagreement"]["mean"])
    assert low["rows"][0]["proxy_reward"]["mean"] <= min(a["proxy_reward"]["mean"], b["proxy_reward"]["mean"]) + 1e-12
    assert low["proxy_ensemble"]["mode"] == "min"


@pytest.mark.parametrize("args,message", [
    (["--judge", "{member_a}", "--judge", "{member_b}", "--gold", "{member_b}"],
     "is the proxy judge (or a member of the proxy ensemble"),
    (["--judge", "{member_a}", "--judge", "{member_b}", "--gold", "{gold_seed_of_a}"],
     "was trained with the seed 4 of the proxy judge"),
    (["--judge", "{member_a}", "--ensemble", "min"], "combine two or more judges: repeat --judge"),
    (["--judge", "{member_a}", "--judge", "{member_a}"], "names a judge twice"),
    (["--judge", "{member_a}", "--best"], "--best picks the best checkpoint of each --run directory"),
])
def test_evaluate_ensemble_bad_input(tmp_path, checkpoints, args, message):
    args = [a.format(**checkpoints) for a in args]
    result = _evaluate("--generator", checkpoints["generator"], *args, "--out", str(tmp_path / "x.json"))
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def _copy_run(src: str, dst: Path, step: int, **state) -> str:
    """A copy of a GRPO-style checkpoint as step `step` of the run `dst`, with `state` merged into its state."""
    import shutil
    path = dst / "checkpoints" / f"step_{step:06d}"
    shutil.copytree(src, path)
    manifest = json.loads((path / "config.json").read_text())
    manifest["state"].update(step=step, **state)
    (path / "config.json").write_text(json.dumps(manifest))
    return str(path)


def test_evaluate_a_run_with_its_own_ensemble_and_reference_resets(tmp_path, checkpoints):
    """The run's reward ensemble is the proxy by default; a checkpoint whose run reset its reference is measured
    against the base generator, which must then be named."""
    c = checkpoints
    path = _copy_run(c["moved"], tmp_path / "run", 4, learner={"reference_resets": 2, "kl_controller": None})
    manifest = json.loads((Path(path) / "config.json").read_text())
    manifest["config"]["reward"] = {"kind": "judge", "judge_checkpoint": None, "ensemble": "min",
                                    "judge_checkpoints": [c["member_a"], c["member_b"]], "ensemble_std_coef": 1.0}
    manifest["config"].setdefault("grpo", {})["reference_reset_every"] = 2
    (Path(path) / "config.json").write_text(json.dumps(manifest))
    out = tmp_path / "r.json"
    result = _evaluate("--policy", path, "--out", str(out))
    assert result.exit_code == 2 and "reset 2 times" in result.output and "--generator" in result.output
    result = _evaluate("--policy", path, "--generator", c["generator"], "--gold", c["gold"], "--out", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["proxy_ensemble"]["mode"] == "min"
    assert report["checkpoints"]["proxy_judge"] == [c["member_a"], c["member_b"]]
    row = report["rows"][1]
    assert row["reference"] == "the base generator" and row["reference_resets"] == 2
    assert row["levers"] == ["ensemble of 2 (min)", "reference reset every 2 steps"]
    assert row["kl_per_sequence"]["mean"] > 0.1
    result = _evaluate("--policy", path, "--generator", c["generator"], "--gold", c["member_a"],
                       "--out", str(out), "--overwrite")
    assert result.exit_code == 2 and "a reward judge of an evaluated run" in result.output


def test_evaluate_best_takes_the_checkpoint_a_run_names(tmp_path, checkpoints):
    c = checkpoints
    run = tmp_path / "run"
    for step in (2, 4, 6):
        _copy_run(c["moved"], run, step)
    out = tmp_path / "b.json"
    result = _evaluate("--run", str(run), "--best", "--generator", c["generator"], "--out", str(out))
    assert result.exit_code == 2 and "names no best checkpoint" in result.output
    (run / "checkpoints" / "best.json").write_text(json.dumps({"step": 4, "checkpoint": "step_000004"}))
    result = _evaluate("--run", str(run), "--best", "--generator", c["generator"], "--out", str(out))
    assert result.exit_code == 0, result.output
    assert [r.get("step") for r in json.loads(out.read_text())["rows"]] == [None, 4]
    result = _evaluate("--run", str(run), "--generator", c["generator"], "--out", str(out), "--overwrite")
    assert [r.get("step") for r in json.loads(out.read_text())["rows"]] == [None, 2, 4, 6]
