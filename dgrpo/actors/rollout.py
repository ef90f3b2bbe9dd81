"""RolloutWorker: a generator replica that samples groups with the weights it was sent.

A plain class; the driver turns it into a Ray actor with the resources of the
`resources.rollout` config section. Given a GPU it samples there, otherwise on CPU.
The driver's calls leave the batches in the object store (`generate_by_ref`, references.py). Weights arrive
as one object of the object store, with the next request (`generate_by_ref(request, weights=[ref])`) or on
their own (`set_weights`), or by the learner's collective broadcast (`receive_weights`, collective.py).

With grpo.reference_on=rollout the worker is built with the reference (the run's starting generator) and a
request with `reference_terms` has it replay the reference right after sampling, on replay rows it draws from
the request's seed (trajectory.reference_terms): the batch carries the rows and the terms, and the learner
replays only the policy on exactly those rows. The terms are computed in this worker's precision.
"""

from __future__ import annotations

import dataclasses
import time

import ray
import torch

from ..config import SamplerConfig
from ..models.diffusion import DiffusionLM
from ..models.sampler import RevealRule, sample
from ..models.trajectory import reference_terms
from ..models.transformer import ModelConfig
from ..precision import describe_precision, pick_device, resolve_precision
from ..protocols import RolloutBatch, RolloutRequest, WeightSnapshot
from .collective import BroadcastMember
from .references import Receipt
from .telemetry import ActorTelemetry, placement


class StaleWorkerError(RuntimeError):
    pass


class RolloutWorker:
    def __init__(self, worker_id: int, model_config: ModelConfig, sampler: SamplerConfig, precision: str = "auto",
                 torch_threads: int = 1, metrics: bool = False, reference: WeightSnapshot | None = None,
                 replay_rows_per_chunk: int = 256):
        torch.set_num_threads(torch_threads)
        self.worker_id = worker_id
        self.device = pick_device()
        self.model = DiffusionLM(model_config).to(self.device).eval()
        self.model.requires_grad_(False)
        self.model_config = model_config
        # the run's starting generator: given at start (grpo.reference_on=rollout), or kept from the first
        # request that measures KL
        self.reference = None if reference is None else self._load_reference(reference)
        self.replay_rows_per_chunk = replay_rows_per_chunk
        self.sampler = sampler
        self.autocast_dtype = resolve_precision(precision, self.device)
        self.precision = describe_precision(precision, self.device)
        print(f"precision: rollout worker {worker_id}: {self.precision}", flush=True)
        self.version = -1  # no weights yet
        self.telemetry = ActorTelemetry("rollout", str(worker_id), enabled=metrics)
        self.collective = BroadcastMember()

    def _load_reference(self, snapshot: WeightSnapshot) -> DiffusionLM:
        model = DiffusionLM(self.model_config).to(self.device).eval().requires_grad_(False)
        snapshot.load_into(model)
        return model

    def set_weights(self, snapshot: WeightSnapshot) -> dict:
        t0 = time.perf_counter()
        snapshot.load_into(self.model)
        self.version = snapshot.version
        load_s = time.perf_counter() - t0
        self.telemetry.gauge("policy_version", self.version)
        return {"worker_id": self.worker_id, "version": self.version, "load_s": load_s}

    def receive_weights(self, spec: dict) -> dict:
        """Takes part in the learner's collective broadcast of version spec["version"] (collective.py);
        {"version": None} when the broadcast failed (the driver then sends the weights as an object)."""
        result = self.collective.broadcast(self.model, spec)
        if not result["ok"]:
            print(f"rollout worker {self.worker_id}: the weight broadcast of epoch {spec['epoch']} failed: "
                  f"{result['error']}", flush=True)
            self.version = -1  # some tensors may be new and others not: hold nothing until the next load
            return {"worker_id": self.worker_id, "version": None, "error": result["error"]}
        self.version = spec["version"]
        self.telemetry.gauge("policy_version", self.version)
        return {"worker_id": self.worker_id, "version": self.version, "load_s": result["seconds"]}

    def generate_by_ref(self, request: RolloutRequest, weights: list | None = None) -> tuple[RolloutBatch, Receipt]:
        """generate, for the driver's calls with num_returns=2: the batch stays in the object store.
        weights: [the ObjectRef of a WeightSnapshot] the driver sends with the request when this worker holds an
        older version; loaded first (one call where a load and a request would take two)."""
        load_s = self.set_weights(ray.get(weights[0]))["load_s"] if weights is not None else 0.0
        batch = self.generate(request)
        return batch, dataclasses.replace(Receipt.of(batch), load_s=load_s)

    def generate(self, request: RolloutRequest, reference: WeightSnapshot | None = None) -> RolloutBatch:
        """Sample `group_size` completions of each prompt with the weights this worker holds. A request with
        `measure_kl` also measures each sample's KL to `reference` (the run's starting generator: sent with the
        first such request, kept after)."""
        if self.version < request.min_version:
            raise StaleWorkerError(f"worker {self.worker_id} holds policy v{self.version}, "
                                   f"request {request.request_id} needs >= v{request.min_version}")
        t0 = time.perf_counter()
        k = request.group_size
        prompts = request.prompts.to(self.device).repeat_interleave(k, dim=0)
        g = torch.Generator(device=self.device).manual_seed(request.seed)
        s = self.sampler
        if request.measure_kl and self.reference is None:
            if reference is None:
                raise ValueError(f"request {request.request_id} asks rollout worker {self.worker_id} to measure the KL "
                                 "to the starting generator but sends no reference weights")
            self.reference = self._load_reference(reference)
        if request.reference_terms and self.reference is None:
            raise ValueError(f"request {request.request_id} asks rollout worker {self.worker_id} for the reference's "
                             "terms (grpo.reference_on=rollout) but the worker was started without the reference")
        out = sample(self.model, prompts, generator=g, autocast_dtype=self.autocast_dtype,
                     reference=self.reference if request.measure_kl else None, **s.model_dump())
        terms, reference_s = {}, 0.0
        if request.reference_terms:
            t_ref = time.perf_counter()
            mask, logprobs, selection = reference_terms(
                self.reference, out.tokens, out.reveal_step, s.steps, request.replay_steps or None, request.seed,
                rule=RevealRule.of(s.model_dump()), reveal_rank=out.reveal_rank,
                rows_per_chunk=self.replay_rows_per_chunk, autocast_dtype=self.autocast_dtype,
                temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
            terms = {"replay_mask": mask.cpu(), "reference_logprobs": logprobs.cpu(),
                     "reference_selection": selection.cpu()}
            reference_s = time.perf_counter() - t_ref
        generate_s = time.perf_counter() - t0  # the worker's whole call, the reference's replay included
        n_generated = int((out.reveal_step >= 0).sum())
        self.telemetry.observe_rollout(samples=len(prompts), tokens=n_generated, seconds=generate_s)
        return RolloutBatch(
            request_id=request.request_id, tokens=out.tokens.cpu(), reveal_step=out.reveal_step.cpu(),
            logprobs=out.logprobs.cpu(),
            group_index=torch.arange(request.prompts.shape[0]).repeat_interleave(k),
            policy_version=self.version, worker_id=self.worker_id, steps=s.steps, temperature=s.temperature,
            top_k=s.top_k, top_p=s.top_p, order=s.order, random_reveal=s.random_reveal,
            reveal_temperature=s.reveal_temperature, reveal_threshold=s.reveal_threshold or 0.0,
            selection=out.selection.cpu(),
            reveal_rank=out.reveal_rank.cpu(),
            kl_to_reference=(out.kl_to_reference.cpu() if out.kl_to_reference is not None
                             else torch.zeros(0, dtype=torch.float64)),
            timings={"generate_s": generate_s, "reference_s": reference_s, "tokens_generated": float(n_generated)},
            **terms)

    def info(self) -> dict:
        return {"worker_id": self.worker_id, "version": self.version, **placement(),
                "device": str(self.device), "precision": self.precision}
