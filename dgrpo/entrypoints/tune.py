"""Ray Tune over the GRPO loop (`dgrpo tune --config FILE --search FILE`).

Each trial is one complete GRPO run (`run_training`) whose driver is the Tune
function trainable. Tune reserves one placement group per trial, built from the
trial's own config (`trial_bundles`):

    bundle 0            the trial driver (tune.trial_driver_cpus CPUs)
    bundle 1            the learner          (resources.learner.*)
    bundles 2 .. N+1    one per rollout worker (resources.rollout.*; elastic: max_workers of them)
    then                one per judge          (resources.judge.*; elastic: max_workers)
    last                the judge trainer      (resources.judge_trainer.*, with judge_refresh.enabled)

`cluster.role_options` schedules every actor of the run into the current
placement group (with child-task capture), so a trial never creates a second
placement group and trials never compete for each other's resources. Searching
over `resources.*` keys works: the bundles follow each trial's config.

The search file is YAML. Every top-level key except `tune` is a dotted config
key mapped to one of

    {grid: [a, b, ...]}      every value, crossed with the other grids
    {choice: [a, b, ...]}    one value drawn per sample
    {uniform: [lo, hi]}      float drawn uniformly
    {loguniform: [lo, hi]}   float drawn log-uniformly (lo > 0)
    {randint: [lo, hi]}      integer in [lo, hi)
    a plain value            fixed for every trial

and the optional `tune:` mapping holds `TuneSettings` (scheduler, metric,
samples, concurrency, ...). Each step reports reward, KL, loss and the latest
evaluation reward; ASHA stops weak trials early on `tune.metric`. The table of
trials and the best config (a complete `dgrpo train` config) are printed and
written under run.out_dir.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, ValidationError

from ..config import Section, TrainConfig, format_errors, deep_merge, read_yaml_mapping, to_dict, to_yaml
from ..errors import ConfigError

SPEC_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
# config keys holding file paths: made absolute, because Tune runs each trial in its own working directory
PATH_KEYS = ("corpus.path", "corpus.cache_dir", "generator.checkpoint", "reward.judge_checkpoint",
             "reward.judge_checkpoints", "run.selection_judge", "run.out_dir")
# per-step values reported to Tune (when present in the step's record)
REPORT_KEYS = ("step", "policy_version", "reward_mean", "reward_std", "kl", "loss", "pg_loss", "clip_frac",
               "entropy", "grad_norm", "zero_std_ratio", "staleness_mean", "eval_reward_mean",
               "eval_reward_stderr", "steps_per_min", "time/step_s", "time/sync_s", "kl_seq", "kl_coef",
               "eval_kl_seq", "judge_disagreement", "eval_selection_reward_mean")


class TuneSettings(Section):
    num_samples: int = Field(1, ge=1, description="samples of the space (each grid point is repeated this often)")
    metric: str = Field("reward_mean", description="reported value ASHA and the best-trial choice use")
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1, description="ASHA: steps every trial runs before it may be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA: keep 1/reduction_factor of trials per rung")
    best_scope: Literal["last", "avg", "last-5-avg", "last-10-avg", "all"] = Field(
        "last", description="which of a trial's reported values rank it")
    max_concurrent_trials: Optional[int] = Field(None, ge=1, description="None: as many as the cluster fits")
    trial_driver_cpus: float = Field(0.5, gt=0, description="CPUs of bundle 0 (the trial's driver loop)")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    search_seed: Optional[int] = Field(0, description="seed of the random draws (None: unseeded)")
    name: str = Field("tune", description="experiment folder under run.out_dir")


@dataclass
class SearchSpec:
    space: dict  # dotted config key -> {kind: args} or a fixed value
    settings: TuneSettings


def _config_leaves(tree: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out |= _config_leaves(v, key + ".")
        else:
            out.add(key)
    return out


def _set_dotted(tree: dict, key: str, value) -> dict:
    node = tree
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return tree


def apply_params(base: dict, params: dict) -> TrainConfig:
    """The TrainConfig of one trial: `base` (a config dict) with dotted `params` applied, validated."""
    data = json.loads(json.dumps(base))
    for key, value in params.items():
        _set_dotted(data, key, value)
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"search space gives an invalid configuration {params}:\n{format_errors(e)}") from None


def load_search(path: str | Path, settings_overrides: dict | None = None, base: TrainConfig | None = None
                ) -> SearchSpec:
    """Read and check a search file: every key names a config leaf, every spec is well formed, every
    value a grid/choice can take (and both ends of a range) gives a valid config."""
    p = Path(path)
    raw = read_yaml_mapping(p, "search file")
    settings_raw = raw.pop("tune", None) or {}
    if "space" in raw and isinstance(raw["space"], dict) and len(raw) == 1:
        raw = raw["space"]  # also accept {space: {...}, tune: {...}}
    try:
        settings = TuneSettings.model_validate(deep_merge(settings_raw, settings_overrides or {}))
    except ValidationError as e:
        raise ConfigError(f"invalid `tune:` settings in {p}:\n{format_errors(e)}") from None
    reported = {k.replace("/", "_") for k in REPORT_KEYS} | {"eval_reward_before"}
    if settings.metric not in reported:
        raise ConfigError(f"search file {p}: tune.metric {settings.metric!r} is not reported; "
                          f"choose one of {', '.join(sorted(reported))}")
    base_cfg = base or TrainConfig()
    base_dict = to_dict(base_cfg)
    leaves = _config_leaves(to_dict(TrainConfig())) | _config_leaves(base_dict)
    space = {}
    for key, spec in raw.items():
        key = str(key)
        if key not in leaves:
            raise ConfigError(f"search file {p}: {key!r} is not a config key (use dotted keys such as grpo.lr; "
                              f"see `dgrpo config train`)")
        if isinstance(spec, dict):
            if len(spec) != 1 or next(iter(spec)) not in SPEC_KINDS:
                raise ConfigError(f"search file {p}: {key}: give exactly one of {', '.join(SPEC_KINDS)} "
                                  f"(got {spec!r})")
            kind, args = next(iter(spec.items()))
            if not isinstance(args, list) or not args:
                raise ConfigError(f"search file {p}: {key}: {kind} needs a non-empty list (got {args!r})")
            if kind in ("uniform", "loguniform", "randint"):
                if len(args) != 2 or not all(isinstance(a, (int, float)) for a in args) or not args[0] < args[1]:
                    raise ConfigError(f"search file {p}: {key}: {kind} needs [lo, hi] with lo < hi (got {args!r})")
                if kind == "loguniform" and args[0] <= 0:
                    raise ConfigError(f"search file {p}: {key}: loguniform needs lo > 0 (got {args!r})")
                if kind == "randint" and not all(isinstance(a, int) for a in args):
                    raise ConfigError(f"search file {p}: {key}: randint needs integers (got {args!r})")
                values = [args[0], args[1] - 1] if kind == "randint" else args
            else:
                values = args
        else:
            values = [spec]
        for v in values:
            apply_params(base_dict, {key: v})
        space[key] = spec
    if not space:
        raise ConfigError(f"search file {p} names no config key to search")
    return SearchSpec(space=space, settings=settings)


def to_param_space(space: dict) -> dict:
    from ray import tune
    out = {}
    for key, spec in space.items():
        if not isinstance(spec, dict):
            out[key] = spec
            continue
        kind, args = next(iter(spec.items()))
        out[key] = {"grid": tune.grid_search, "choice": tune.choice}[kind](list(args)) \
            if kind in ("grid", "choice") else getattr(tune, kind)(*args)
    return out


def num_grid_points(space: dict) -> int:
    n = 1
    for spec in space.values():
        if isinstance(spec, dict) and "grid" in spec:
            n *= len(spec["grid"])
    return n


def _bundle(role_cfg) -> dict:
    b = {"CPU": float(role_cfg.num_cpus), "GPU": float(role_cfg.num_gpus), **role_cfg.custom_resources}
    return {k: v for k, v in b.items() if v > 0}


def trial_bundles(cfg: TrainConfig, driver_cpus: float = 0.5) -> list[dict]:
    """Placement-group bundles of one trial: the driver, then one per actor of the run.

    An actor that asks for no resources at all gets no bundle (Ray rejects empty
    bundles); it still runs inside the trial's placement group.
    """
    r = cfg.resources
    bundles = [{"CPU": float(driver_cpus)}, _bundle(r.learner)]
    bundles += [_bundle(r.rollout) for _ in range(r.rollout.bounds[1])]
    bundles += [_bundle(r.judge) for _ in range(r.judge.bounds[1])]
    if cfg.judge_refresh.enabled:
        bundles.append(_bundle(r.judge_trainer))
    return [b for b in bundles if b]


def absolute_paths(cfg: TrainConfig) -> dict:
    data = to_dict(cfg)
    for key in PATH_KEYS:
        section, leaf = key.split(".")
        value = data[section].get(leaf)
        if isinstance(value, list):
            data[section][leaf] = [str(Path(v).expanduser().resolve()) for v in value]
        elif value:
            data[section][leaf] = str(Path(value).expanduser().resolve())
    return data


def _trial(params: dict, base: dict) -> None:
    """Tune function trainable: one GRPO run in the trial's placement group, reporting every step."""
    from ray import tune
    from ray.util.placement_group import get_current_placement_group

    from ..orchestration.driver import run_training
    from ..orchestration.metrics import read_jsonl

    ctx = tune.get_context()
    cfg = apply_params(base, params)
    out = Path(base["run"]["out_dir"]) / "trials" / ctx.get_trial_id()
    cfg.run.out_dir = str(out)
    pg = get_current_placement_group()
    trial = {"trial_id": ctx.get_trial_id(), "trial_name": ctx.get_trial_name(), "params": params,
             "placement_group_id": pg.id.hex() if pg is not None else None,
             "bundles": pg.bundle_specs if pg is not None else None}
    last_eval: dict = {}

    def report(record: dict) -> None:
        if not last_eval:  # the step-0 evaluation (before any update) is the first row of metrics.jsonl
            for row in read_jsonl(out / "metrics.jsonl"):
                if row.get("step") == 0 and "eval_reward_mean" in row:
                    last_eval["eval_reward_mean"] = row["eval_reward_mean"]
                    last_eval["eval_reward_before"] = row["eval_reward_mean"]
        if "eval_reward_mean" in record:
            last_eval["eval_reward_mean"] = record["eval_reward_mean"]
        metrics = {k.replace("/", "_"): float(record[k]) for k in REPORT_KEYS
                   if isinstance(record.get(k), (int, float)) and math.isfinite(record[k])}
        for k, v in last_eval.items():
            metrics.setdefault(k, v)
        metrics["step"] = int(record["step"])
        tune.report(metrics)

    run_training(cfg, report=report, quiet=True, run_info={"tune": trial})  # the Tune driver prints a line per result


def _format_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(row) for row in cells])


def trial_progress(base: dict):
    """A Tune callback that prints one line per trial result, as `dgrpo train` prints per step."""
    from ray import tune

    from ..orchestration.progress import step_line

    class TrialProgress(tune.Callback):
        def __init__(self):
            self.limits: dict[str, tuple[int, float | None]] = {}

        def _limits(self, trial) -> tuple[int, float | None]:
            if trial.trial_id not in self.limits:
                try:  # run.steps and run.max_minutes may be searched
                    run = apply_params(base, {k: v for k, v in (trial.config or {}).items() if v is not None}).run
                except ConfigError:
                    run = TrainConfig.model_validate(base).run
                self.limits[trial.trial_id] = (run.steps, run.max_minutes)
            return self.limits[trial.trial_id]

        def on_trial_result(self, iteration, trials, trial, result, **info):
            steps, max_minutes = self._limits(trial)
            print(step_line(result, steps, result.get("time_total_s", 0.0), max_minutes,
                            prefix=f"trial {trial.trial_id}  "), flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            steps, done = self._limits(trial)[0], (trial.last_result or {}).get("step", 0)
            how = "finished" if done >= steps else "stopped"  # by the scheduler (ASHA) or the time budget
            print(f"trial {trial.trial_id}  {how} at step {done}/{steps}", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"trial {trial.trial_id}  failed (its error is in the trial's directory)", flush=True)

    return TrialProgress()


def run_tune(cfg: TrainConfig, search: SearchSpec, quiet: bool = False) -> dict:
    """Run the search; write tune_results.json/.csv, best_config.yaml and best.json under run.out_dir.
    Prints a line per trial result and Tune's status table unless quiet."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from ..orchestration.cluster import connect

    settings = search.settings
    base = absolute_paths(cfg)
    out_dir = Path(base["run"]["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    space = search.space

    def resources(params: dict):
        trial_cfg = apply_params(base, params)
        return tune.PlacementGroupFactory(trial_bundles(trial_cfg, settings.trial_driver_cpus),
                                          strategy=settings.placement_strategy)

    first = apply_params(base, {k: v for k, v in space.items() if not isinstance(v, dict)})
    per_trial_cpus = sum(b.get("CPU", 0.0) for b in trial_bundles(first, settings.trial_driver_cpus))
    started_local = connect(cfg, extra_cpus=settings.trial_driver_cpus)
    try:
        if settings.scheduler == "asha":
            # stop_last_trials=False: a trial that reaches run.steps finishes its run (final eval + checkpoint)
            scheduler = ASHAScheduler(time_attr="step", max_t=cfg.run.steps, grace_period=settings.grace_period,
                                      reduction_factor=settings.reduction_factor, stop_last_trials=False)
        else:
            scheduler = FIFOScheduler()
        from ray.tune.search import BasicVariantGenerator
        # the generator enforces the concurrency limit itself (Tune ignores max_concurrent_trials when given
        # a generator); it creates trials lazily, in grid order, when a limit is set
        search_alg = BasicVariantGenerator(random_state=settings.search_seed,
                                           max_concurrent=settings.max_concurrent_trials or 0)
        trainable = tune.with_resources(tune.with_parameters(_trial, base=base), resources)
        tuner = tune.Tuner(
            trainable, param_space=to_param_space(space),
            tune_config=tune.TuneConfig(metric=settings.metric, mode=settings.mode, scheduler=scheduler,
                                        search_alg=search_alg, num_samples=settings.num_samples),
            run_config=tune.RunConfig(name=settings.name, storage_path=str(out_dir), verbose=0 if quiet else 1,
                                      callbacks=[] if quiet else [trial_progress(base)]))
        grid = tuner.fit()
    finally:
        if started_local:
            ray.shutdown()

    param_keys = list(space)
    rows = []
    for result in grid:
        m = result.metrics or {}
        params = {k: (result.config or {}).get(k) for k in param_keys}
        steps = m.get("step")
        try:  # run.steps may itself be searched
            planned = apply_params(base, {k: v for k, v in params.items() if v is not None}).run.steps
        except ConfigError:
            planned = cfg.run.steps
        status = "error" if result.error else ("completed" if steps == planned else "stopped early")
        rows.append({"trial_id": m.get("trial_id") or "", **params, "steps": steps, "status": status,
                     **{k: m.get(k) for k in ("reward_mean", "kl", "loss", "eval_reward_mean")},
                     "path": result.path})
    rows.sort(key=lambda r: r["trial_id"])
    columns = ["trial_id", *param_keys, "status", "steps", "reward_mean", "kl", "loss", "eval_reward_mean"]
    table = _format_table(rows, columns)
    (out_dir / "tune_results.json").write_text(json.dumps(rows, indent=2, default=str))
    grid.get_dataframe().to_csv(out_dir / "tune_results.csv", index=False)

    ok = [r for r in grid if not r.error and (r.metrics or {}).get(settings.metric) is not None]
    if not ok:
        raise ConfigError(f"no trial reported {settings.metric!r}; see the trial errors above "
                          f"and {out_dir / settings.name}")
    best = grid.get_best_result(metric=settings.metric, mode=settings.mode, scope=settings.best_scope)
    best_params = {k: best.config.get(k) for k in param_keys}
    best_cfg = apply_params(base, best_params)
    best_cfg.run.out_dir = str(out_dir / "best")
    (out_dir / "best_config.yaml").write_text(to_yaml(best_cfg))
    summary = {"metric": settings.metric, "mode": settings.mode, "scope": settings.best_scope,
               "best_trial_id": best.metrics.get("trial_id"), "best_params": best_params,
               "best_value": best.metrics.get(settings.metric), "best_metrics": {
                   k: best.metrics.get(k) for k in ("step", "reward_mean", "kl", "loss", "eval_reward_mean")},
               "trials": len(rows), "per_trial_cpus": per_trial_cpus,
               "bundles_per_trial": len(trial_bundles(first, settings.trial_driver_cpus)),
               "results_dir": str(out_dir / settings.name)}
    (out_dir / "best.json").write_text(json.dumps(summary, indent=2, default=str))
    return {"table": table, "rows": rows, "best": summary, "best_config_yaml": to_yaml(best_cfg),
            "best_config_path": str(out_dir / "best_config.yaml")}


def settings_from_flags(**flags) -> dict:
    return {k: v for k, v in flags.items() if v is not None}
