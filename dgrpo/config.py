"""One config tree per command: YAML/JSON file + dotted CLI overrides, validated.

Every loss option, resource and schedule lives here; nothing is hidden in code.
Unknown keys and out-of-range values are errors that name the key and the
allowed range (pydantic, extra="forbid").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, model_validator

from .errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CorpusConfig(Section):
    path: Optional[str] = Field(None, description="local UTF-8 text file; None downloads tiny Shakespeare")
    cache_dir: Optional[str] = None
    val_fraction: float = Field(0.1, gt=0, lt=1)


class SamplerConfig(Section):
    steps: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0, description="0 = off")
    top_p: float = Field(1.0, gt=0, le=1)
    order: Literal["random", "confidence"] = "random"


class PretrainConfig(Section):
    preset: Literal["tiny", "small", "base"] = "small"
    out: str = "runs/pretrain"
    seed: int = 0
    max_iters: int = Field(3000, ge=1)
    batch_size: int = Field(16, ge=1)
    block_size: Optional[int] = Field(None, ge=8, description="override the preset's block size")
    lr: float = Field(6e-3, gt=0)
    min_lr: float = Field(2e-4, ge=0)
    warmup_iters: int = Field(100, ge=0)
    lr_schedule: Literal["cosine", "linear"] = Field("cosine", description="shape of the decay from lr to min_lr")
    lr_hold: float = Field(0.0, ge=0, lt=1, description=(
        "fraction of the run (iterations or max_minutes, whichever is further along) held at lr before the decay"))
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.99)
    optimizer: Literal["adamw", "muon"] = Field("muon", description=(
        "muon: Muon on the hidden weight matrices, AdamW on embeddings, head and norms"))
    muon_split_qkv: bool = Field(True, description=(
        "Muon orthogonalises the query, key and value blocks of each fused qkv matrix separately"))
    grad_clip: float = Field(1.0, gt=0)
    zero_init_residual: bool = Field(True, description="start every block as the identity (output projections zero)")
    dropout: Optional[float] = Field(None, ge=0, lt=1, description=(
        "override the preset's dropout (embeddings, attention, MLP; attention dropout takes the slow attention kernel)"))
    ema_decay: float = Field(0.995, ge=0, lt=1, description=(
        "0: off; else the checkpoint holds (and evaluation scores) an exponential moving average of the weights"))
    complementary_masks: bool = Field(True, description=(
        "each window twice per batch, once with a mask and once with its complement (batch_size must be even)"))
    elbo_weight: bool = False
    stratified_t: bool = Field(True, description="spread each batch's t evenly over (0, 1) (lower-variance loss)")
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = Field(True, description=(
        "torch.compile the model for training: more tokens/s once compiled (compiling counts against "
        "max_minutes); needs a C++ compiler"))
    eval_every: int = Field(1000, ge=1)
    eval_windows: int = Field(1024, ge=1, description="held-out validation windows per evaluation")
    max_minutes: Optional[float] = Field(None, gt=0, description="stop (and checkpoint) after this wall time")
    corpus: CorpusConfig = CorpusConfig()

    @model_validator(mode="after")
    def _complementary_pairs(self):
        if self.complementary_masks and self.batch_size % 2:
            raise ValueError(f"complementary_masks pairs each window with its complement: batch_size must be even, "
                             f"got {self.batch_size}")
        return self


class JudgeTrainConfig(Section):
    generator: str = Field(..., description="generator checkpoint directory")
    preset: Literal["tiny", "small", "base"] = "small"
    out: str = "runs/judge"
    seed: int = 0
    max_iters: int = Field(1500, ge=1)
    batch_size: int = Field(16, ge=2)
    lr: float = Field(3e-4, gt=0)
    min_lr: float = Field(3e-5, ge=0)
    warmup_iters: int = Field(30, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    p_real: float = Field(0.25, ge=0, le=1, description="share of windows with x = 0")
    p_generated: float = Field(0.25, ge=0, le=1, description="share of windows with x = 1")
    refill_pool: int = Field(256, ge=8, description="generator refills cached per refresh")
    refill_every: int = Field(16, ge=1, description=(
        "iterations between refreshing a quarter of the pool; a refill is used about "
        "4 * batch_size * (1 - p_real) * refill_every / refill_pool times (keep it near 3)"))
    eval_every: int = Field(100, ge=1)
    eval_windows: int = Field(128, ge=8)
    init_from_generator: bool = Field(True, description="start the trunk from the generator's weights "
                                                        "(when the presets match)")
    token_loss_weight: float = Field(1.0, ge=0, description="weight of the per-character replaced-token loss")
    max_minutes: Optional[float] = Field(None, gt=0)
    sampler: SamplerConfig = SamplerConfig(steps=16)
    corpus: CorpusConfig = CorpusConfig()


class LMTrainConfig(Section):
    """The autoregressive character model of the gold evaluation (dgrpo/models/char_lm.py)."""
    preset: Literal["tiny", "small", "base"] = "small"
    out: str = "runs/lm"
    seed: int = 0
    max_iters: int = Field(3000, ge=1)
    batch_size: int = Field(32, ge=1)
    block_size: Optional[int] = Field(None, ge=8, description=(
        "override the preset's block size; at least the length of the texts it will score"))
    lr: float = Field(2e-3, gt=0)
    min_lr: float = Field(1e-4, ge=0)
    warmup_iters: int = Field(100, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = Field(1.0, gt=0)
    dropout: Optional[float] = Field(None, ge=0, lt=1, description="override the preset's dropout")
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    eval_every: int = Field(500, ge=1)
    eval_windows: int = Field(256, ge=1, description="held-out validation windows per evaluation")
    max_minutes: Optional[float] = Field(None, gt=0, description="stop (and checkpoint) after this wall time")
    corpus: CorpusConfig = CorpusConfig()


class GeneratorConfig(Section):
    checkpoint: Optional[str] = Field(None, description="pretrained generator; None = fresh init of `preset`")
    preset: Literal["tiny", "small", "base"] = "tiny"


class RewardConfig(Section):
    kind: Literal["judge", "char_frequency", "regex"] = "judge"
    judge_checkpoint: Optional[str] = None
    chars: str = Field("e", description="char_frequency: characters whose frequency is the reward")
    pattern: str = Field(r"\b(the|and|to|of)\b", description="regex: pattern whose match count is rewarded")
    normalize: bool = Field(True, description="regex: divide match count by text length")

    @model_validator(mode="after")
    def _judge_needs_checkpoint(self):
        if self.kind == "judge" and not self.judge_checkpoint:
            raise ValueError("reward.kind 'judge' needs reward.judge_checkpoint (a `dgrpo judge train --out` directory)")
        if self.kind == "char_frequency" and not self.chars:
            raise ValueError("reward.chars must name at least one character")
        return self


class PromptConfig(Section):
    kind: Literal["unconditional", "infill"] = "unconditional"
    mask_fraction: float = Field(0.5, gt=0, le=1)
    length: Optional[int] = Field(None, ge=2, description="window length; default: model block size")


class GRPOConfig(Section):
    group_size: int = Field(8, ge=2)
    prompts_per_step: int = Field(8, ge=1)
    advantage: Literal["zscore", "center", "loo"] = "zscore"
    adv_eps: float = Field(1e-6, gt=0)
    skip_zero_std_groups: bool = True
    clip_eps: float = Field(0.2, gt=0)
    clip_eps_high: Optional[float] = Field(None, gt=0, description="asymmetric upper clip; None = clip_eps")
    kl_coef: float = Field(0.04, ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
    epochs: int = Field(1, ge=1, description="inner epochs (mu) over each batch")
    minibatch_size: int = Field(32, ge=1, description="samples per optimizer step")
    lr: float = Field(3e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = Field(1.0, gt=0)
    old_logprob: Literal["behaviour", "recompute"] = Field(
        "behaviour", description="PPO's old policy: the rollout's recorded log-probs, or recomputed by the "
                                 "learner before the update (then the rollout's give a truncated IS weight)")
    tis_cap: float = Field(2.0, gt=0, description="cap of the truncated importance weight (recompute mode)")
    replay_steps: Optional[int] = Field(None, ge=1, description="replay this many random steps per sample "
                                                                "(None = all: exact)")
    replay_rows_per_chunk: int = Field(256, ge=1)


class RoleResources(Section):
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    max_restarts: int = Field(3, ge=0)
    custom_resources: dict[str, PositiveFloat] = Field(
        default_factory=dict, description="Ray custom resources per actor of this role, e.g. {dgrpo_rollout: 0.001} "
                                          "pins the role to the nodes (worker group) that advertise dgrpo_rollout")


class WorkerPoolResources(RoleResources):
    """A role of interchangeable actors: a fixed number (num_workers), or elastic between min_workers and
    max_workers (docs/OPERATIONS.md, "Elastic workers")."""
    num_workers: int = Field(1, ge=1, description=(
        "actors the run keeps (its target); alone, a fixed size (min_workers = max_workers = num_workers); "
        "with min_workers/max_workers, the target it starts with (default max_workers), moved by `dgrpo scale`"))
    min_workers: Optional[int] = Field(None, ge=1, description=(
        "elastic: the fewest placed actors the run goes on with (it waits run.placement_timeout_s for them, "
        "then stops); give max_workers too"))
    max_workers: Optional[int] = Field(None, ge=1, description=(
        "elastic: the most actors the run asks the cluster for; actors that do not fit wait to be placed "
        "(a node joins, or the autoscaler adds one)"))

    @model_validator(mode="after")
    def _bounds(self):
        if self.min_workers is None and self.max_workers is None:
            return self
        if self.min_workers is None or self.max_workers is None:
            raise ValueError(f"give min_workers and max_workers together (got min_workers={self.min_workers}, "
                             f"max_workers={self.max_workers}); num_workers alone is a fixed size")
        if self.min_workers > self.max_workers:
            raise ValueError(f"min_workers ({self.min_workers}) must be at most max_workers ({self.max_workers})")
        if "num_workers" not in self.model_fields_set:
            object.__setattr__(self, "num_workers", self.max_workers)  # the target: as many as the cluster places
        elif not self.min_workers <= self.num_workers <= self.max_workers:
            raise ValueError(f"num_workers ({self.num_workers}) is the target the run starts with and must lie "
                             f"within min_workers..max_workers ({self.min_workers}..{self.max_workers}); leave it "
                             f"out to start at max_workers")
        return self

    @property
    def bounds(self) -> tuple[int, int]:
        """(min, max) actors: num_workers twice for a fixed size."""
        if self.min_workers is None:
            return self.num_workers, self.num_workers
        return self.min_workers, self.max_workers


class RolloutResources(WorkerPoolResources):
    num_workers: int = Field(2, ge=1, description=WorkerPoolResources.model_fields["num_workers"].description)
    num_cpus: float = Field(0.5, ge=0)


class JudgeResources(WorkerPoolResources):
    num_workers: int = Field(1, ge=1, description=WorkerPoolResources.model_fields["num_workers"].description)
    num_cpus: float = Field(0.5, ge=0)


class LearnerResources(RoleResources):
    # 0: a restarted learner would silently start over from the initial weights; resume from a checkpoint instead
    max_restarts: int = Field(0, ge=0)


class JudgeTrainerResources(RoleResources):
    """The judge trainer of judge_refresh; a restarted one resumes from its last published state."""


class ResourcesConfig(Section):
    rollout: RolloutResources = RolloutResources()
    judge: JudgeResources = JudgeResources()
    learner: LearnerResources = LearnerResources()
    judge_trainer: JudgeTrainerResources = Field(JudgeTrainerResources(), description=(
        "the judge trainer (only started with judge_refresh.enabled)"))
    torch_threads: int = Field(1, ge=1, description="torch threads per actor")


class RunConfig(Section):
    out_dir: str = "runs/grpo"
    seed: int = 0
    steps: int = Field(50, ge=1)
    max_minutes: Optional[float] = Field(None, gt=0, description="stop after this wall time (final eval + checkpoint)")
    mode: Literal["sync", "async"] = "sync"
    max_staleness: int = Field(1, ge=0)
    eval_every: int = Field(10, ge=1)
    eval_prompts: int = Field(32, ge=1)
    eval_seed: int = 1234
    checkpoint_every: int = Field(25, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    log_rollouts: bool = False
    actor_timeout_s: float = Field(300.0, gt=0)
    max_worker_failures: int = Field(10, ge=0, description=(
        "stop the run after this many actor crashes (actors lost with their node are not counted)"))
    placement_timeout_s: float = Field(300.0, gt=0, description=(
        "how long a role may have fewer placed actors than its minimum (at the start, or after losing nodes) "
        "before the run stops; a cluster autoscaler needs minutes to add a node"))
    membership_check_s: float = Field(2.0, gt=0, description=(
        "seconds between checks of the actor groups: nodes Ray marked dead, surplus actors, `dgrpo scale` targets"))
    ray_address: Optional[str] = Field(None, description="None: $RAY_ADDRESS or an embedded local cluster")
    dashboard: bool = Field(False, description=(
        "start the embedded local cluster with Ray's dashboard on 127.0.0.1 and print its URL (a run that joins "
        "a cluster uses that cluster's dashboard)"))
    dashboard_port: int = Field(8265, ge=1, le=65535, description=(
        "port of the embedded cluster's dashboard; if it is taken, Ray takes the next free one (the printed "
        "URL says which)"))
    metrics_export: bool = True
    tensorboard: bool = False
    wandb_project: Optional[str] = None


class JudgeRefreshConfig(Section):
    """Keep training the judge against the current policy and publish new judge versions to the judge actors."""
    enabled: bool = Field(False, description=(
        "run a judge trainer beside the learner; needs reward.kind judge"))
    publish_every: int = Field(5, ge=1, description="GRPO steps between judge versions")
    iters_per_publish: int = Field(20, ge=1, description="optimizer steps of the judge per version")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate of the judge (constant)")
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    batch_size: int = Field(32, ge=2, description="windows per judge optimizer step")
    p_real: float = Field(0.5, ge=0, le=1, description=(
        "share of a judge batch that is real train windows (target x = 0), drawn fresh every step"))
    p_policy: float = Field(0.25, gt=0, le=1, description=(
        "share that is recent policy samples (target x = the share of positions the policy wrote); the rest "
        "comes from the refill pool stored in the judge checkpoint, so the judge keeps the base generator's "
        "mistakes in mind"))
    policy_buffer: int = Field(1024, ge=1, description="the newest policy samples kept to train on")
    max_pending_batches: int = Field(8, ge=1, description=(
        "steps of policy samples sent to the judge trainer and not yet taken in; beyond this a step's "
        "samples are dropped (counted in judge_samples_dropped) so that a slow trainer never stalls GRPO"))
    eval_windows: int = Field(64, ge=1, description=(
        "held-out validation windows (and at most as many of the newest policy samples) behind the "
        "judge_refresh/auc_* figures"))

    @model_validator(mode="after")
    def _shares(self):
        if self.p_real + self.p_policy > 1 + 1e-9:
            raise ValueError(f"p_real ({self.p_real}) + p_policy ({self.p_policy}) must be at most 1 "
                             f"(the rest of each batch comes from the judge's refill pool)")
        return self


class TrainConfig(Section):
    run: RunConfig = RunConfig()
    corpus: CorpusConfig = CorpusConfig()
    generator: GeneratorConfig = GeneratorConfig()
    reward: RewardConfig = RewardConfig(kind="char_frequency")
    prompts: PromptConfig = PromptConfig()
    sampler: SamplerConfig = SamplerConfig()
    grpo: GRPOConfig = GRPOConfig()
    judge_refresh: JudgeRefreshConfig = JudgeRefreshConfig()
    resources: ResourcesConfig = ResourcesConfig()

    @model_validator(mode="after")
    def _refresh_needs_a_judge(self):
        if self.judge_refresh.enabled and self.reward.kind != "judge":
            raise ValueError(f"judge_refresh.enabled trains a learned judge, but reward.kind is "
                             f"{self.reward.kind!r}; set reward.kind=judge with reward.judge_checkpoint, "
                             f"or judge_refresh.enabled=false")
        return self


def format_errors(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (check spelling; `dgrpo config train|pretrain|judge` prints every key)")
        else:
            lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def read_yaml_mapping(path: str | Path, what: str) -> dict:
    """A YAML/JSON file holding a mapping at top level, or a ConfigError saying what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {p} is not valid YAML/JSON: {e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{what} {p} must hold a mapping at top level")
    return loaded


def load_config(cls: type[Section], path: str | Path | None = None, overrides: list[str] | tuple = (),
                base: dict | None = None) -> Section:
    """Load `cls` from a YAML/JSON file (optional), apply `a.b=value` overrides, validate."""
    data: dict = dict(base or {})
    if path is not None:
        data = deep_merge(data, read_yaml_mapping(path, "config file"))
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k} is not a section")
        node[keys[-1]] = value
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid configuration{where}:\n{format_errors(e)}") from None


def deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_dict(cfg: Section) -> dict:
    return cfg.model_dump(mode="json")


def to_yaml(cfg: Section) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Section, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2))


class PipelineEvaluateConfig(Section):
    prompts: int = Field(128, ge=2, description="held-out prompts (validation windows)")
    samples_per_prompt: int = Field(4, ge=1, description="samples of the base generator and of the policy per prompt")
    best_of: list[int] = Field([1, 2, 4, 8, 16, 32, 64], description="best-of-N curve from the base generator "
                                                                       "(one pool of max(N) per prompt); [] = none")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description=(
        "sampling and scoring; the measured KL stays exact in either (policy and reference in one precision)"))
    samples_shown: int = Field(5, ge=0, description="texts printed before and after")


class PipelineConfig(Section):
    """The whole chain of one experiment: generator, proxy judge(s), gold judge, evaluation LM, GRPO, and
    the gold evaluation. Each stage section holds keys of that stage's own config (`dgrpo config pretrain`,
    `judge`, `lm`, `train`); the pipeline sets their output directories, corpus and generator. A stage whose
    directory holds a finished run of the same config is reused; an unfinished one is resumed."""
    out: str = Field("runs/pipeline", description="every stage writes below this directory")
    corpus: CorpusConfig = CorpusConfig()
    threads: int = Field(2, ge=1, description="torch threads of the single-process stages")
    generator: dict = Field(default_factory=dict, description="PretrainConfig keys")
    proxy_judges: list[dict] = Field(default_factory=lambda: [{}], min_length=1, description=(
        "JudgeTrainConfig keys, one mapping per proxy judge (the reward); several form an ensemble"))
    gold_judge: Optional[dict] = Field(default_factory=dict, description=(
        "JudgeTrainConfig keys of the gold judge (its own seed, never a reward); null: no gold evaluation"))
    lm: Optional[dict] = Field(default_factory=dict, description="LMTrainConfig keys; null: no LM measure")
    grpo: dict = Field(default_factory=dict, description="TrainConfig keys of the GRPO run")
    evaluate: PipelineEvaluateConfig = PipelineEvaluateConfig()
