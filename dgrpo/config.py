"""One config tree per command: YAML/JSON file + dotted CLI overrides, validated.

Every loss option, resource and schedule lives here; nothing is hidden in code.
Unknown keys and out-of-range values are errors that name the key and the
allowed range (pydantic, extra="forbid").
One file, longer than most: the whole tree with every option's help is what `dgrpo config` prints and
every checkpoint stores.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, model_validator

from .errors import ConfigError


RevealOrder = Literal["random", "confidence", "gumbel_confidence"]
AdvantageMode = Literal["zscore", "center", "loo"]
KLEstimator = Literal["k1", "k2", "k3"]
LossAggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
Preset = Literal["tiny", "small", "base"]
Precision = Literal["auto", "fp32", "bf16"]  # precision.PRECISIONS (that module imports torch; this one must not)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CorpusConfig(Section):
    path: Optional[str] = Field(None, description="local UTF-8 text file; None downloads tiny Shakespeare")
    cache_dir: Optional[str] = None
    val_fraction: float = Field(0.1, gt=0, lt=1)


class SamplerConfig(Section):
    """The one sampler of every command (training rollouts, evaluation, `dgrpo sample`, judge refills)."""
    steps: int = Field(16, ge=1, description="denoising steps; the masked positions are revealed evenly over them")
    temperature: float = Field(0.5, gt=0, description=(
        "the sampling distribution is softmax(logits / temperature); below 1 it sharpens every draw"))
    top_k: int = Field(0, ge=0, description="0 = off")
    top_p: float = Field(1.0, gt=0, le=1)
    order: RevealOrder = Field("random", description=(
        "which positions a step reveals: those whose drawn tokens are the most likely (confidence), positions "
        "drawn without replacement with weights p_max^(1/reveal_temperature), p_max the probability of a "
        "position's likeliest token (gumbel_confidence), or positions chosen at random (random)"))
    random_reveal: float = Field(0.01, ge=0, lt=1, description=(
        "confidence order: the share of steps that reveal positions chosen at random instead; above 0 every "
        "trajectory stays possible under any model, so the KL to the reference and its penalty stay finite"))
    reveal_temperature: float = Field(0.1, gt=0, description=(
        "gumbel_confidence: how sharply the likeliest positions come first (towards 0: strictly by confidence)"))
    reveal_threshold: Optional[float] = Field(None, gt=0, le=1, description=(
        "confidence order: a step also reveals every masked position whose drawn token is at least this likely, "
        "besides the linear schedule's count for the step (at least one position), so `steps` becomes a most and "
        "samples the model is sure of finish in fewer forwards; None: off"))

    @model_validator(mode="after")
    def _threshold_under_confidence(self):
        if self.reveal_threshold is not None and self.order != "confidence":
            raise ValueError(f"sampler.reveal_threshold applies to confidence order only, got order={self.order!r}; "
                             "set sampler.order=confidence or sampler.reveal_threshold=null")
        return self


class PretrainConfig(Section):
    preset: Preset = "small"
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
    precision: Precision = "auto"
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
    preset: Preset = "small"
    out: str = "runs/judge"
    seed: int = 0
    max_iters: int = Field(1500, ge=1)
    batch_size: int = Field(16, ge=2)
    lr: float = Field(3e-4, gt=0)
    min_lr: float = Field(3e-5, ge=0)
    warmup_iters: int = Field(30, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    precision: Precision = "auto"
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
    refill_temperatures: Optional[list[float]] = Field(None, min_length=1, description=(
        "refill each window at one of these sampling temperatures, drawn at random, instead of sampler.temperature "
        "(the held-out figures stay at sampler.temperature): a judge that has seen the generator's text sharper "
        "and flatter than the policy's is not pleased by a change of temperature alone"))
    corpus: CorpusConfig = CorpusConfig()

    @model_validator(mode="after")
    def _positive_temperatures(self):
        if self.refill_temperatures and min(self.refill_temperatures) <= 0:
            raise ValueError(f"refill_temperatures must all be > 0, got {self.refill_temperatures}")
        return self


class LMTrainConfig(Section):
    """The autoregressive character model of the gold evaluation (dgrpo/models/char_lm.py)."""
    preset: Preset = "small"
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
    precision: Precision = "auto"
    eval_every: int = Field(500, ge=1)
    eval_windows: int = Field(256, ge=1, description="held-out validation windows per evaluation")
    max_minutes: Optional[float] = Field(None, gt=0, description="stop (and checkpoint) after this wall time")
    corpus: CorpusConfig = CorpusConfig()


class GeneratorConfig(Section):
    checkpoint: Optional[str] = Field(None, description="pretrained generator; None = fresh init of `preset`")
    preset: Preset = "tiny"


class RewardConfig(Section):
    kind: Literal["judge", "char_frequency", "regex", "python"] = "judge"
    function: Optional[str] = Field(None, description=(
        "python: the reward as package.module:name, importable in the driver and the judge actors: a function "
        "fn(texts, prompts) -> one float per text, or a class whose instances are such functions (one instance "
        "per judge actor, built with reward.kwargs)"))
    kwargs: dict[str, Any] = Field(default_factory=dict, description=(
        "python: keyword arguments of the class, or of every call of the function"))
    python_path: list[str] = Field(default_factory=list, description=(
        "python: directories put first on sys.path (driver and judge actors) before importing reward.function; "
        "the driver's working directory, $PYTHONPATH and a Ray job's working_dir reach the actors already"))
    judge_checkpoint: Optional[str] = Field(None, description="the judge (a `dgrpo judge train --out` directory)")
    judge_checkpoints: Optional[list[str]] = Field(None, description=(
        "an ensemble instead of judge_checkpoint: two or more judges (trained with different seeds), "
        "combined by reward.ensemble"))
    ensemble: Literal["mean", "mean_minus_std", "min"] = Field("mean", description=(
        "how the members' rewards combine: their mean, mean - ensemble_std_coef * std (sample std over "
        "members), or the minimum (worst case)"))
    ensemble_std_coef: float = Field(1.0, ge=0, description="lambda of mean_minus_std")
    chars: str = Field("e", description="char_frequency: characters whose frequency is the reward")
    pattern: str = Field(r"\b(the|and|to|of)\b", description="regex: pattern whose match count is rewarded")
    normalize: bool = Field(True, description="regex: divide match count by text length")

    @model_validator(mode="after")
    def _judge_needs_checkpoint(self):
        if self.kind == "judge" and not self.judge_checkpoint and not self.judge_checkpoints:
            raise ValueError("reward.kind 'judge' needs reward.judge_checkpoint (a `dgrpo judge train --out` directory)"
                             " or reward.judge_checkpoints (an ensemble)")
        if self.judge_checkpoint and self.judge_checkpoints:
            raise ValueError("set reward.judge_checkpoint (one judge) or reward.judge_checkpoints (an ensemble), "
                             "not both")
        if self.judge_checkpoints is not None:
            if len(self.judge_checkpoints) < 2:
                raise ValueError("reward.judge_checkpoints is an ensemble of at least two judges; for one judge "
                                 "set reward.judge_checkpoint")
            if len(set(self.judge_checkpoints)) != len(self.judge_checkpoints):
                raise ValueError("reward.judge_checkpoints names a judge twice; an ensemble needs distinct judges "
                                 "(trained with different seeds)")
        elif self.ensemble != "mean" or self.ensemble_std_coef != 1.0:
            raise ValueError("reward.ensemble and reward.ensemble_std_coef combine the judges of "
                             "reward.judge_checkpoints; set that list (two or more judges) or drop them")
        if self.kind == "char_frequency" and not self.chars:
            raise ValueError("reward.chars must name at least one character")
        if self.kind == "python":
            if not self.function or not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", self.function):
                raise ValueError(f"reward.kind 'python' needs reward.function as package.module:name (e.g. "
                                 f"examples.rewards:vowel_share), got {self.function!r}")
        elif self.function or self.kwargs or self.python_path:
            raise ValueError(f"reward.function, reward.kwargs and reward.python_path name a Python reward; set "
                             f"reward.kind=python (it is {self.kind!r}) or drop them")
        return self

    @property
    def judge_paths(self) -> list[str]:
        """The judge checkpoints of a judge reward: one, or the ensemble's members ([] for other kinds)."""
        if self.kind != "judge":
            return []
        return list(self.judge_checkpoints) if self.judge_checkpoints else [self.judge_checkpoint]


class PromptConfig(Section):
    kind: Literal["unconditional", "infill"] = "unconditional"
    mask_fraction: float = Field(0.5, gt=0, le=1)
    length: Optional[int] = Field(None, ge=2, description="window length; default: model block size")


class GRPOConfig(Section):
    group_size: int = Field(8, ge=2)
    prompts_per_step: int = Field(8, ge=1)
    advantage: AdvantageMode = "zscore"
    adv_eps: float = Field(1e-6, gt=0)
    selection_weight: float = Field(1.0, ge=0, le=1, description=(
        "weight of the selection terms (the log-probability of each step's choice of positions) in the PPO ratio: 1 "
        "is the exact policy gradient of the trajectory; below 1 trades its bias for less variance. The KL "
        "penalty, kl_seq and the KL budget always use the whole trajectory probability"))
    diversity_coef: float = Field(0.0, ge=0, description=(
        "each sample's reward is lowered by this times its mean similarity to the other samples of its group (the "
        "share of its distinct token n-grams they also hold) before the advantages: a reward for diversity that "
        "per-sample judges cannot give; 0 = off"))
    diversity_ngram: int = Field(8, ge=2, le=16, description="n of the token n-grams of diversity_coef")
    skip_zero_std_groups: bool = True
    clip_eps: float = Field(0.2, gt=0)
    clip_eps_high: Optional[float] = Field(None, gt=0, description="asymmetric upper clip; None = clip_eps")
    kl_coef: float = Field(0.04, ge=0, description="beta of the KL penalty (the start value when kl_target is set)")
    kl_estimator: KLEstimator = "k3"
    loss_agg: LossAggregation = "token-mean"
    epochs: int = Field(1, ge=1, description="inner epochs (mu) over each batch")
    minibatch_size: int = Field(32, ge=1, description="samples per optimizer step")
    lr: float = Field(3e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = Field(1.0, gt=0)
    old_logprob: Literal["behaviour", "recompute"] = Field(
        "behaviour", description="PPO's old policy: the rollout's recorded log-probs, or recomputed by the "
                                 "learner before the update (then the rollout's give a truncated IS weight; with one "
                                 "update a step, from the update's own forward)")
    tis_cap: float = Field(2.0, gt=0, description="cap of the truncated importance weight (recompute mode)")
    replay_steps: Optional[int] = Field(None, ge=1, description="replay this many random steps per sample "
                                                                "(None = all: exact)")
    replay_rows_per_chunk: int = Field(256, ge=1)
    kl_target: Optional[float] = Field(None, gt=0, description=(
        "KL budget: nats per sequence (the unit of `dgrpo evaluate`) that an adaptive kl_coef holds the policy "
        "near, measured each step on the step's samples; None = kl_coef stays fixed"))
    kl_horizon: float = Field(10.0, ge=1, description=(
        "steps of the adaptive kl_coef: each step it moves by a factor 1 + e / kl_horizon, "
        "e = clip(kl / kl_target - 1, -0.2, 0.2)"))
    reference_reset_every: Optional[int] = Field(None, ge=1, description=(
        "every this many steps the frozen reference becomes a copy of the current policy; None = never"))
    reference_on: Literal["learner", "rollout"] = Field("learner", description=(
        "where the reference's log-probs of the replayed steps are computed: `learner` replays the reference "
        "before each update; `rollout` has each rollout worker replay it right after sampling (it holds the "
        "starting generator from the start of the run, chooses the replay rows from the request's seed and "
        "sends rows and terms with the batch), so the learner replays only the policy; the terms are then in the "
        "rollout workers' precision. It pays where the learner is the bottleneck and the workers have spare "
        "compute (bench_learner and bench_e2e --reference-on compare the two); the default keeps a learner used "
        "on its own (without the driver's requests) working on plain batches. With reference_reset_every set the "
        "reference moves and the learner's pass is used whatever this says"))

    @property
    def reference_on_rollout(self) -> bool:
        """Whether the rollout workers send the reference's terms (reference_on, unless the reference moves)."""
        return self.reference_on == "rollout" and self.reference_reset_every is None

    @model_validator(mode="after")
    def _kl_target_needs_a_coefficient(self):
        if self.kl_target is not None and self.kl_coef == 0:
            raise ValueError("grpo.kl_target adapts kl_coef by factors, which cannot move it away from 0; "
                             "set grpo.kl_coef > 0 as its start value")
        return self


class RoleResources(Section):
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    precision: Precision = "auto"
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
    weight_sync: Literal["object_store", "collective"] = Field("object_store", description=(
        "how each policy version reaches the rollout workers: one object in Ray's object store that every worker "
        "loads, or a collective broadcast from the learner (torch.distributed: gloo on CPU, NCCL on GPUs; "
        "docs/WEIGHT_SYNC.md)"))
    eval_every: int = Field(10, ge=1)
    eval_prompts: int = Field(32, ge=1)
    eval_seed: int = 1234
    checkpoint_every: int = Field(25, ge=1)
    keep_checkpoints: int = Field(3, ge=1, description="the newest checkpoints kept, besides the best one")
    selection: Literal["eval_reward", "selection_judge", "none"] = Field("eval_reward", description=(
        "the held-out measure that picks checkpoints/best at each evaluation: the proxy reward of the "
        "held-out samples, or run.selection_judge's reward of them; never the final report's gold judge"))
    selection_judge: Optional[str] = Field(None, description=(
        "judge checkpoint of selection=selection_judge: trained with a seed of its own, neither a reward judge "
        "nor the gold judge of `dgrpo evaluate`"))
    selection_kl_max: Optional[float] = Field(None, gt=0, description=(
        "evaluations whose held-out samples' KL to the starting generator exceeds this (nats per sequence) "
        "cannot become the best checkpoint"))
    log_rollouts: bool = False
    actor_timeout_s: float = Field(300.0, gt=0)
    max_worker_failures: int = Field(10, ge=0, description=(
        "stop the run after this many actor crashes (actors lost with their node are not counted)"))
    placement_timeout_s: float = Field(300.0, gt=0, description=(
        "how long a role may have fewer placed actors than its minimum (at the start, or after losing nodes) "
        "before the run stops; a cluster autoscaler needs minutes to add a node"))
    membership_check_s: float = Field(2.0, gt=0, description=(
        "seconds between checks of the actor groups: nodes Ray marked dead, surplus actors, `dgrpo scale` targets"))
    ray_address: Optional[str] = Field(None, description=(
        "the cluster to join: host:port of its GCS, ray://host:port, or auto (the cluster `ray start` recorded on "
        "this machine); None: $RAY_ADDRESS, else an embedded local cluster (which never joins a recorded one)"))
    connect_timeout_s: float = Field(30.0, gt=0, description=(
        "seconds to reach the cluster at run.ray_address / $RAY_ADDRESS before giving up with an error"))
    storage_path: Optional[str] = Field(None, description=(
        "directory a relative run.out_dir is resolved against (default $DGRPO_STORAGE); inside a Ray job a relative "
        "out_dir needs it, the job's working directory being a temporary copy"))
    max_zero_signal_steps: int = Field(5, ge=0, description=(
        "stop the run after this many consecutive steps in which every group's rewards were equal (a collapsed "
        "policy or a saturated reward: nothing left to learn); 0: never"))
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
    def _checks(self):
        run = self.run
        if run.selection == "selection_judge" and not run.selection_judge:
            raise ValueError("run.selection 'selection_judge' needs run.selection_judge (a judge checkpoint trained "
                             "with its own seed)")
        if run.selection_judge and run.selection != "selection_judge":
            raise ValueError("run.selection_judge is only used with run.selection=selection_judge; set that too "
                             "or drop run.selection_judge")
        if run.selection_judge and Path(run.selection_judge).resolve() in {
                Path(p).resolve() for p in self.reward.judge_paths}:
            raise ValueError(f"run.selection_judge {run.selection_judge} is a reward judge; selection needs a judge "
                             "the policy is not trained against (train one with another seed)")
        if self.judge_refresh.enabled and self.reward.kind != "judge":
            raise ValueError(f"judge_refresh.enabled trains a learned judge, but reward.kind is "
                             f"{self.reward.kind!r}; set reward.kind=judge with reward.judge_checkpoint, "
                             f"or judge_refresh.enabled=false")
        if self.sampler.order == "confidence" and self.sampler.random_reveal == 0:
            raise ValueError("sampler.random_reveal must be > 0 under confidence order for training: without a share "
                             "of steps revealing random positions a trajectory can be impossible under the "
                             "reference, its KL infinite (docs/EVALUATION.md); e.g. sampler.random_reveal=0.01")
        if self.judge_refresh.enabled and self.reward.judge_checkpoints:
            raise ValueError("judge_refresh trains one judge, but reward.judge_checkpoints is an ensemble; use "
                             "reward.judge_checkpoint, or judge_refresh.enabled=false")
        return self

    def role_precisions(self) -> dict[str, str]:
        """The precision each role of a run computes in, as configured (auto resolves on its machine)."""
        res = self.resources
        roles = {"rollout": res.rollout.precision, "judge": res.judge.precision, "learner": res.learner.precision}
        if self.judge_refresh.enabled:
            roles["judge trainer"] = res.judge_trainer.precision
        return roles

    def warnings(self) -> list[str]:
        """Settings that run but do not do what their names promise; printed at the start of a run."""
        found = []
        s, g = self.sampler, self.grpo
        if (s.top_k or s.top_p < 1) and (g.kl_coef > 0 or g.kl_target is not None):
            found.append("sampler.top_k/top_p truncate the sampling distribution: a token the reference's truncation "
                         "excludes is impossible under it, its log-ratio is clamped at 20 nats, so kl_seq, the KL "
                         "penalty and grpo.kl_target undercount the KL; sample without truncation for a KL in nats")
        return found


# Keys a resumed run may change (`dgrpo train --resume`): when and how long it runs, what it logs, where its
# actors go. Every other key (the optimisation, the model, the sampler, the reward, the data, the seed)
# must equal the run's; a new key is refused on resume unless it is listed here.
RESUMABLE_KEYS = (
    "run.out_dir", "run.storage_path", "run.steps", "run.max_minutes", "run.eval_every", "run.checkpoint_every",
    "run.keep_checkpoints", "run.log_rollouts", "run.actor_timeout_s", "run.max_worker_failures",
    "run.max_zero_signal_steps", "run.ray_address", "run.connect_timeout_s", "run.metrics_export",
    "run.placement_timeout_s", "run.membership_check_s", "run.dashboard", "run.dashboard_port",
    "run.tensorboard", "run.wandb_project", "run.weight_sync",
    "resources.*.num_workers", "resources.*.min_workers", "resources.*.max_workers", "resources.*.num_cpus",
    "resources.*.num_gpus", "resources.*.max_restarts", "resources.*.custom_resources*", "resources.torch_threads",
)


def _origin(key: str, origins: dict[str, str] | None) -> str | None:
    return next((o for k, o in (origins or {}).items() if key == k or key.startswith(k + ".")), None)


def format_errors(e: ValidationError, origins: dict[str, str] | None = None) -> str:
    """One line per error; `origins` maps a dotted key to the flag that set it (else it came from the file)."""
    lines = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        origin = _origin(key, origins)
        where = f" [from {origin}]" if origin else ""
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (check spelling; `dgrpo config train|pretrain|judge` prints every key)"
                         f"{where}")
        else:
            lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r}){where}")
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


def load_config(cls: type[Section], path: str | Path | None = None, overrides: list | tuple = (),
                base: dict | None = None) -> Section:
    """Load `cls` from a YAML/JSON file (optional), apply `a.b=value` overrides, validate.

    An override is `a.b=value` (from --set) or a pair (`a.b=value`, the flag that gave it, e.g. "--max-iters 0");
    errors name where a bad value came from."""
    data: dict = dict(base or {})
    if path is not None:
        data = deep_merge(data, read_yaml_mapping(path, "config file"))
    origins: dict[str, str] = {}
    for item in overrides:
        text, origin = item if isinstance(item, tuple) else (item, f"--set {item}")
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{origin}: {k} is not a section")
        node[keys[-1]] = value
        origins[".".join(keys)] = origin
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        from_flags = all(_origin(".".join(map(str, err["loc"])), origins) for err in e.errors())
        where = f" in {path}" if path and not from_flags else ""
        raise ConfigError(f"invalid configuration{where}:\n{format_errors(e, origins)}") from None


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
    precision: Precision = Field("auto", description=(
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
