"""Ray Tune over the GRPO loop: search files, per-trial placement groups, ASHA, results and best config."""

import json
import re
from pathlib import Path

import pytest

from dgrpo.config import TrainConfig, load_config
from dgrpo.errors import ConfigError
from dgrpo.entrypoints.tune import (SearchSpec, TuneSettings, apply_params, load_search, num_grid_points,
                                      to_param_space, trial_bundles)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "deploy" / "configs" / "tiny.yaml"


def write(tmp_path, text, name="search.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_search_file_kinds_and_settings(tmp_path):
    path = write(tmp_path, """
grpo.lr: {loguniform: [1.0e-5, 1.0e-3]}
grpo.kl_coef: {grid: [0.0, 0.04]}
grpo.clip_eps: {uniform: [0.1, 0.3]}
grpo.group_size: {randint: [4, 9]}
sampler.order: {choice: [random, confidence]}
run.steps: 7
tune: {scheduler: fifo, metric: eval_reward_mean, num_samples: 3}
""")
    spec = load_search(path)
    assert spec.settings.scheduler == "fifo" and spec.settings.num_samples == 3
    assert num_grid_points(spec.space) == 2
    space = to_param_space(spec.space)
    assert space["run.steps"] == 7 and space["grpo.kl_coef"] == {"grid_search": [0.0, 0.04]}
    from ray.tune.search.sample import Categorical, Float, Integer
    assert isinstance(space["grpo.lr"], Float) and isinstance(space["grpo.group_size"], Integer)
    assert isinstance(space["sampler.order"], Categorical)
    cfg = apply_params(TrainConfig().model_dump(mode="json"), {"grpo.lr": 1e-4, "sampler.order": "confidence"})
    assert cfg.grpo.lr == 1e-4 and cfg.sampler.order == "confidence"
    # settings from the command line override the file
    assert load_search(path, {"scheduler": "asha"}).settings.scheduler == "asha"


@pytest.mark.parametrize("text, message", [
    ("grpo.learning_rate: {grid: [1, 2]}", "not a config key"),
    ("grpo: {grid: [1, 2]}", "not a config key"),
    ("grpo.lr: {normal: [0, 1]}", "exactly one of"),
    ("grpo.lr: {loguniform: [0.0, 1.0]}", "lo > 0"),
    ("grpo.lr: {uniform: [2.0, 1.0]}", "lo < hi"),
    ("grpo.clip_eps: {grid: [0.2, -1.0]}", "invalid configuration"),
    ("grpo.lr: {grid: []}", "non-empty list"),
    ("tune: {scheduler: pbt}", "tune"),
    ("grpo.lr: 0.001\ntune: {metric: reward}", "not reported"),
    ("{}", "names no config key"),
])
def test_search_file_errors_name_the_problem(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_search(write(tmp_path, text))


def test_trial_bundles_follow_role_resources():
    cfg = TrainConfig.model_validate({"resources": {
        "learner": {"num_cpus": 2, "num_gpus": 1, "custom_resources": {"dgrpo_learner": 0.001}},
        "rollout": {"num_workers": 3, "num_cpus": 1, "num_gpus": 0.5},
        "judge": {"num_workers": 2, "num_cpus": 0.5}}})
    b = trial_bundles(cfg, driver_cpus=0.25)
    assert b[0] == {"CPU": 0.25}
    assert b[1] == {"CPU": 2.0, "GPU": 1.0, "dgrpo_learner": 0.001}
    assert b[2:5] == [{"CPU": 1.0, "GPU": 0.5}] * 3
    assert b[5:] == [{"CPU": 0.5}] * 2
    # scaling rollout workers only adds rollout bundles
    more = cfg.model_copy(deep=True)
    more.resources.rollout.num_workers = 5
    assert trial_bundles(more, 0.25) == b[:5] + [{"CPU": 1.0, "GPU": 0.5}] * 2 + b[5:]


def test_shipped_search_files_are_valid():
    tiny = load_config(TrainConfig, TINY)
    for name in ("search_tiny.yaml", "search_example.yaml"):
        spec = load_search(REPO / "deploy" / "tune" / name, base=tiny)
        assert isinstance(spec, SearchSpec) and isinstance(spec.settings, TuneSettings)


def _dgrpo_actors() -> dict:
    """actor id -> (class name, placement group id hex) of every dgrpo actor in the GCS actor table."""
    import ray
    from ray.core.generated import gcs_pb2
    accessor = ray._private.state.state._connect_and_get_accessor()
    actors = map(gcs_pb2.ActorTableData.FromString, accessor.get_actor_table(None, None))
    return {a.actor_id: (a.class_name, a.placement_group_id.hex()) for a in actors
            if a.class_name in ("LearnerActor", "RolloutWorker", "JudgeWorker")}


def test_tune_two_trials_each_in_its_own_placement_group(ray_cluster, tiny_corpus_file, tmp_path):
    """Two 4-step trials, one after the other, ASHA on KL (mode max): KL grows with the learning rate
    deterministically (step-1 KL is 0 in both; reward this early is noise), so ASHA's rung at step 2 must
    stop the lr=1e-6 trial once the lr=1e-2 trial has set the bar. (Tune may let a trial run one more
    step while it processes the decision, hence 4 steps.)"""
    import ray
    from click.testing import CliRunner
    from ray.core.generated import gcs_pb2

    from dgrpo.entrypoints.cli import main
    search = write(tmp_path, """
grpo.lr: {grid: [0.01, 0.000001]}
tune: {scheduler: asha, grace_period: 1, reduction_factor: 2, metric: kl, mode: max,
       max_concurrent_trials: 1, trial_driver_cpus: 0.25}
""")
    out = tmp_path / "tune_run"
    pgs_before = set(ray.util.placement_group_table())
    actors_before = set(_dgrpo_actors())
    # `dgrpo tune` joins the session's cluster (ray is initialised), as it would join RAY_ADDRESS
    cli = CliRunner().invoke(main, ["tune", "--config", str(TINY), "--search", str(search),
                                    "--set", f"corpus.path={tiny_corpus_file}", "--set", f"run.out_dir={out}",
                                    "--set", "run.steps=4", "--set", "run.eval_every=4",
                                    "--set", "run.checkpoint_every=4", "--set", "run.metrics_export=false"])
    assert cli.exit_code == 0, (cli.output[-3000:], cli.exception)
    table = cli.output[cli.output.index("trial_id"):cli.output.index("\nbest (")]
    print("\n" + table)
    assert "best (kl, max, scope last): {\"grpo.lr\": 0.01}" in cli.output
    # a line per trial result, as `dgrpo train` prints per step
    assert re.search(r"^trial \w+  step 1/4  reward \d\.\d{3}  kl \d", cli.output, re.MULTILINE), cli.output[-3000:]
    result = {"rows": json.loads((out / "tune_results.json").read_text()),
              "best": json.loads((out / "best.json").read_text())}
    rows = {r["grpo.lr"]: r for r in result["rows"]}
    assert set(rows) == {0.01, 0.000001}
    assert rows[0.01]["status"] == "completed" and rows[0.01]["steps"] == 4
    assert rows[0.000001]["status"] == "stopped early" and rows[0.000001]["steps"] in (2, 3)  # ASHA, rung 2
    # placement: one new placement group per trial, shaped driver + learner + rollout + judge, holding its actors
    new_pgs = {pg_id: info for pg_id, info in ray.util.placement_group_table().items() if pg_id not in pgs_before}
    placements = [json.loads(p.read_text())["info"]["tune"] for p in sorted((out / "trials").glob("*/run.json"))]
    trial_pgs = {p["placement_group_id"] for p in placements}
    assert len(placements) == 2 and len(trial_pgs) == 2 and None not in trial_pgs
    assert set(new_pgs) == trial_pgs, "a trial created a placement group of its own"
    assert all(info["state"] == "REMOVED" for info in new_pgs.values())
    for p in placements:
        assert p["bundles"] == [{"CPU": 0.25}, {"CPU": 0.5}, {"CPU": 0.5}, {"CPU": 0.25}]
    actors = [a for actor_id, a in _dgrpo_actors().items() if actor_id not in actors_before]
    assert len(actors) == 6, actors
    for pg in trial_pgs:
        assert sorted(c for c, a_pg in actors if a_pg == pg) == ["JudgeWorker", "LearnerActor", "RolloutWorker"]
    # the stopped trial's actors went with its placement group
    accessor = ray._private.state.state._connect_and_get_accessor()
    alive = [a.class_name for a in map(gcs_pb2.ActorTableData.FromString, accessor.get_actor_table(None, None))
             if a.class_name in ("LearnerActor", "RolloutWorker", "JudgeWorker")
             and a.state != gcs_pb2.ActorTableData.DEAD]
    assert not alive
    # per-step reports: reward and KL for every step a trial ran
    trial_dirs = sorted(d for d in (out / "tune").iterdir() if (d / "result.json").is_file())
    assert len(trial_dirs) == 2
    for trial_dir in trial_dirs:
        reports = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
        assert [r["step"] for r in reports] == list(range(1, len(reports) + 1))
        assert all("reward_mean" in r and "kl" in r and "eval_reward_mean" in r for r in reports)
    # results and the best config
    assert (out / "tune_results.csv").is_file() and len(json.loads((out / "tune_results.json").read_text())) == 2
    assert result["best"]["best_params"] == {"grpo.lr": 0.01}
    best = load_config(TrainConfig, out / "best_config.yaml")
    assert best.grpo.lr == 0.01 and best.run.out_dir == str(out / "best")
    # a finished trial is a complete run: final checkpoint + summary
    trial_out = out / "trials" / rows[0.01]["trial_id"]
    assert (trial_out / "checkpoints" / "step_000004").is_dir() and (trial_out / "summary.json").is_file()
