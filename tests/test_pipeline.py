"""The pipeline: every stage built, GRPO run, the gold evaluation and its verdict; finished stages reused."""

import json
import math

import pytest

from dgrpo.config import PipelineConfig
from dgrpo.errors import ConfigError
from dgrpo.entrypoints.pipeline import (Pipeline, format_headline, headline, matched_best_of_n, run_pipeline,
                                          stage_configs)


def tiny_pipeline(tmp_path, corpus, **over) -> PipelineConfig:
    judge = {"preset": "tiny", "max_iters": 6, "batch_size": 8, "refill_pool": 16, "refill_every": 2,
             "eval_every": 6, "eval_windows": 8, "sampler": {"steps": 4}, "precision": "fp32"}
    base = {
        "out": str(tmp_path / "exp"), "corpus": {"path": corpus}, "threads": 1,
        "generator": {"preset": "tiny", "max_iters": 30, "eval_every": 30, "eval_windows": 16, "compile": False,
                      "precision": "fp32"},
        "proxy_judges": [judge], "gold_judge": judge,
        "lm": {"preset": "tiny", "max_iters": 20, "eval_every": 20, "eval_windows": 16, "precision": "fp32"},
        "grpo": {"run": {"steps": 3, "eval_every": 3, "eval_prompts": 8, "checkpoint_every": 3,
                         "metrics_export": False, "selection": "none"},  # the verdict is then about the last
                 "sampler": {"steps": 4}, "grpo": {"group_size": 4, "prompts_per_step": 2},
                 "resources": {"rollout": {"num_workers": 1}}},
        "evaluate": {"prompts": 8, "samples_per_prompt": 2, "best_of": [1, 2, 4], "precision": "fp32",
                     "samples_shown": 2},
    }
    base.update(over)
    return PipelineConfig.model_validate(base)


def test_stage_configs_fix_paths_and_keep_the_gold_judge_independent(tmp_path):
    cfg = tiny_pipeline(tmp_path, "corpus.txt")
    s = stage_configs(cfg)
    assert s.generator.out == str(tmp_path / "exp" / "generator")
    assert s.proxy_judges[0].generator == s.generator.out and s.proxy_judges[0].seed == 0
    assert s.gold_judge.seed != s.proxy_judges[0].seed
    assert s.grpo.reward.judge_checkpoint == s.proxy_judges[0].out
    assert s.grpo.generator.checkpoint == s.generator.out
    with pytest.raises(ConfigError, match="gold judge's seed 0"):
        stage_configs(tiny_pipeline(tmp_path, "c.txt", gold_judge={"seed": 0}))
    with pytest.raises(ConfigError, match="pipeline section `generator`"):
        stage_configs(tiny_pipeline(tmp_path, "c.txt", generator={"lr": -1}))


def test_pipeline_builds_trains_evaluates_then_reuses(ray_cluster, tmp_path, tiny_corpus_file):
    lines = []
    result = run_pipeline(tiny_pipeline(tmp_path, tiny_corpus_file), echo=lines.append, quiet=True)
    out = tmp_path / "exp"
    for stage in ("generator", "proxy_judge", "gold_judge", "lm", "grpo"):
        assert json.loads((out / stage / "stage.json").read_text())["fingerprint"]
    assert json.loads((out / "result.json").read_text())["policy_checkpoint"] == result["policy_checkpoint"]
    assert result["policy_checkpoint"].endswith("step_000003")
    for key in ("proxy_reward", "gold_reward", "lm_bits_per_char", "distinct_2", "repeated_word_2grams"):
        assert math.isfinite(result["before"][key]["mean"]) and math.isfinite(result["after"][key]["mean"])
    assert isinstance(result["warnings"], list)
    assert result["kl_per_sequence"]["mean"] > 0
    assert result["best_of_n_at_policy_kl"]["gold"] is not None
    assert len(result["examples_before"]) == 2 and len(result["examples_after"]) == 2
    text = "\n".join(lines)
    assert "policy: " in text and "sampled with: steps=4" in text and "gold reward" in text
    assert result["reused_stages"] == []

    again = run_pipeline(tiny_pipeline(tmp_path, tiny_corpus_file), echo=lines.append, quiet=True)
    assert again["reused_stages"] == ["generator", "proxy judge", "gold judge", "evaluation LM", "GRPO"]
    with pytest.raises(ConfigError, match="finished generator of another configuration"):
        changed = tiny_pipeline(tmp_path, tiny_corpus_file)
        changed.generator = {**changed.generator, "lr": 1e-3}
        run_pipeline(changed, echo=lines.append, quiet=True)


def test_a_stage_cut_short_by_its_time_limit_is_reported(tmp_path):
    """Iterations define a stage, its time limit guards it: a stage that reached the limit first says so."""
    lines = []
    pipe = Pipeline(tiny_pipeline(tmp_path, "corpus.txt"), echo=lines.append)
    judge = pipe.stages.proxy_judges[0].model_copy(update={"max_iters": 850, "max_minutes": 12.0})
    pipe.stage("proxy judge", str(tmp_path / "cut"), judge, lambda resume: {"iter": 300, "auc": 0.7})
    assert lines[0].endswith("(850 iterations, at most 12.0 min)")
    assert lines[1].startswith("WARNING: proxy judge stopped at its time limit (12 min) after 300 of 850 iterations")
    assert "--overwrite" in lines[1]
    lines.clear()
    pipe.stage("gold judge", str(tmp_path / "full"), judge, lambda resume: {"iter": 850, "auc": 0.9})
    assert not any("WARNING" in line for line in lines), lines
    grpo = pipe.stages.grpo.model_copy(deep=True)
    grpo.run.steps, grpo.run.max_minutes = 300, 15.0
    pipe.stage("GRPO", str(tmp_path / "grpo"), grpo, lambda resume: {"steps": 120})
    assert lines[-1].startswith("WARNING: GRPO stopped at its time limit (15 min) after 120 of 300 steps")


def bon_row(n, kl, gold, proxy):
    return {"kind": "best_of_n", "n": n, "kl_per_sequence": {"mean": kl, "stderr": 0.0},
            "gold_reward": {"mean": gold, "stderr": 0.01}, "proxy_reward": {"mean": proxy, "stderr": 0.01}}


def test_best_of_n_is_matched_at_the_policy_kl():
    report = {"rows": [bon_row(1, 0.0, 0.5, 0.5), bon_row(4, 1.0, 0.6, 0.7), bon_row(16, 4.0, 0.7, 0.9)]}
    mid = matched_best_of_n(report, 2.25)  # sqrt: 1.5, halfway between 1 and 2
    assert mid["interpolated"] and mid["n"] == [4, 16]
    assert mid["gold"] == pytest.approx(0.65) and mid["proxy"] == pytest.approx(0.8)
    beyond = matched_best_of_n(report, 9.0)
    assert beyond["beyond_measured"] and beyond["n"] == 16 and beyond["gold"] == 0.7


def metric(m, se=0.01):
    return {"mean": m, "stderr": se}


def verdict_rows(base_over=None, policy_over=None, paired=None):
    """A report with a base row and one policy row; measures of a good policy unless overridden."""
    base = {"kind": "base", "proxy_reward": metric(0.3), "gold_reward": metric(0.4), "lm_bits_per_char": metric(3.0),
            "char_2gram_js": metric(0.1), "distinct_2": metric(0.7), "repeated_word_2grams": metric(0.05), "examples": ["a"],
            "kl_per_sequence": metric(0.0), **(base_over or {})}
    policy = {"kind": "policy", "checkpoint": "run/step_3", "proxy_reward": metric(0.5), "gold_reward": metric(0.5),
              "lm_bits_per_char": metric(2.9), "char_2gram_js": metric(0.09), "distinct_2": metric(0.69), "repeated_word_2grams": metric(0.05),
              "examples": ["b"], "kl_per_sequence": metric(20.0), **(policy_over or {}),
              "paired_vs_base": {"proxy_reward": metric(0.2), "gold_reward": metric(0.1),
                                 "lm_bits_per_char": metric(-0.1), "repeated_word_2grams": metric(0.0),
                                 **(paired or {})}}
    return {"rows": [base, bon_row(1, 0.0, 0.4, 0.3), policy],
            "sampler": {"steps": 16, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "order": "confidence",
                        "random_reveal": 0.01}}


def printed(r):
    return format_headline({**r, "build_minutes": 1.0, "reused_stages": [], "total_minutes": 2.0, "out": "x"})


def test_the_verdict_is_silent_on_a_good_policy():
    r = headline(verdict_rows())
    assert r["warnings"] == [] and not r["proxy_rose_gold_fell"]
    assert r["gold_gain_in_stderr"] == pytest.approx(10.0)
    assert r["distinct_2_relative"] == pytest.approx(0.69 / 0.7)
    lines = printed(r)
    assert not any(line.startswith("WARNING") for line in lines)
    assert any(line.startswith("LM bits/char") for line in lines) and any("distinct-2" in line for line in lines)
    assert any(line.startswith("rep. word 2-grams") for line in lines)


@pytest.mark.parametrize("case, paired, policy, phrase", [
    ("proxy up, gold down", {"proxy_reward": metric(0.5), "gold_reward": metric(-0.1)}, {},
     "the proxy reward rose"),
    ("judges up, LM worse", {"lm_bits_per_char": metric(0.2)}, {}, "language model finds the text less likely"),
    ("diversity down", {}, {"distinct_2": metric(0.6)}, "diversity fell: distinct-2"),
    ("repetition up", {"repeated_word_2grams": metric(0.05)}, {}, "repetition rose"),
    ("2-grams away from real text", {}, {"char_2gram_js": metric(0.2)}, "moved away from real text"),
])
def test_the_verdict_warns_about_the_text(case, paired, policy, phrase):
    r = headline(verdict_rows(policy_over=policy, paired=paired))
    assert len(r["warnings"]) == 1 and phrase in r["warnings"][0], (case, r["warnings"])
    assert sum(line.startswith("WARNING") for line in printed(r)) == 1


def test_an_lm_that_prefers_the_base_to_real_text_is_noted_not_warned_about():
    """The LM rates held-out real text (3.5 bits/char) below the base's samples (3.0): its rise is no finding
    about the text, and the verdict says why; the same rise under an LM that ranks real text first warns."""
    rows = verdict_rows(paired={"lm_bits_per_char": metric(0.2)})
    rows["real_text"] = {"lm_bits_per_char": metric(3.5), "char_2gram_js": metric(0.0, 0.0)}
    r = headline(rows)
    assert r["warnings"] == [] and len(r["notes"]) == 1 and "held-out real text less likely" in r["notes"][0]
    lines = printed(r)
    assert any(line.startswith("note: ") for line in lines) and "held-out text" in lines[3]
    rows["real_text"]["lm_bits_per_char"] = metric(2.5)
    r = headline(rows)
    assert len(r["warnings"]) == 1 and "language model finds the text less likely" in r["warnings"][0]


def test_changes_within_noise_are_not_warned_about():
    """An LM change of one standard error, or repetition within noise, is no finding."""
    r = headline(verdict_rows(paired={"lm_bits_per_char": metric(0.01), "repeated_word_2grams": metric(0.01)}))
    assert r["warnings"] == []


def test_the_verdict_is_about_the_selected_checkpoint():
    def metric(m):
        return {"mean": m, "stderr": 0.01}
    base = {"kind": "base", "proxy_reward": metric(0.3), "gold_reward": metric(0.4), "distinct_4": metric(0.9),
            "examples": ["a"], "kl_per_sequence": metric(0.0)}

    def policy(step, gold):
        return {"kind": "policy", "checkpoint": f"run/checkpoints/step_{step}", "proxy_reward": metric(0.8),
                "gold_reward": metric(gold), "distinct_4": metric(0.9), "examples": ["b"],
                "kl_per_sequence": metric(3.0), "paired_vs_base": {"gold_reward": metric(gold - 0.4)}}
    report = {"rows": [base, policy(20, 0.6), policy(40, 0.5)],
              "sampler": {"steps": 16, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "order": "random"}}
    assert headline(report)["policy_checkpoint"] == "run/checkpoints/step_40"  # no selection: the last
    selected = headline(report, None, "run/checkpoints/step_20")
    assert selected["policy_checkpoint"] == "run/checkpoints/step_20"
    assert selected["after"]["gold_reward"]["mean"] == 0.6
