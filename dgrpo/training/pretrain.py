"""Supervised masked-diffusion pretraining of the generator (pure torch, no Ray)."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel

from ..corpus import Corpus, check_length, fixed_windows, random_windows
from ..models.checkpoint import MODEL_FILE, CheckpointError, load_checkpoint, save_checkpoint
from ..models.diffusion import DiffusionLM, diffusion_loss, mask_tokens, masked_token_ce
from ..models.optim import make_optimizer
from ..models.transformer import preset_config
from ..precision import autocast_context, resolve_precision
from .loop import TrainingLoop

TRAIN_WEIGHTS = "train_weights"  # the raw training weights when the checkpoint holds an EMA


@torch.no_grad()
def evaluate_masked_ce(model: DiffusionLM, windows: torch.Tensor, batch_size: int, seed: int = 0,
                       autocast_dtype=None, stratified: bool = True) -> float:
    """Masked-token cross-entropy (nats) averaged over t ~ U(0,1), masked tokens only.

    The masking draws come from a fixed seed so successive evaluations are comparable, and
    each batch's t values are stratified over (0, 1), which scatters the estimate between
    window sets much less than i.i.d. t (bench/eval_generator.py --compare-iid shows both).
    """
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        x = windows[start:start + batch_size]
        noisy, masked, _ = mask_tokens(x, model.mask_id, g, stratified=stratified)
        with autocast_context(x.device, autocast_dtype):
            ce = masked_token_ce(model, noisy, x, masked)
        total += float(ce.sum())
        count += ce.numel()
    model.train(was_training)
    return total / max(count, 1)


def ema_with_warmup(decay: float):
    """Exponential moving average whose decay grows as min(decay, (1 + n) / (10 + n)) over the
    first n updates, so that a short run's average is not dominated by its first weights."""
    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        n = float(n_averaged)
        torch._foreach_lerp_(averaged, current, 1.0 - min(decay, (1.0 + n) / (10.0 + n)))
    return update


class CompileError(RuntimeError):
    pass


@contextmanager
def compile_errors_explained():
    """torch.compile fails on the first call when, say, no C++ compiler is installed: say how to go on."""
    try:
        yield
    except torch._dynamo.exc.TorchDynamoException as e:
        raise CompileError(f"torch.compile of the training step failed ({type(e).__name__}: {str(e)[:300]}); "
                           f"train without it: --set compile=false") from e


class Pretrainer:
    """One pretraining run of a DiffusionLM per `cfg` (PretrainConfig); the checkpoint directory is cfg.out."""

    def __init__(self, cfg, corpus: Corpus, config_dict: dict, resume: bool = False, log=print):
        self.cfg, self.corpus, self.config_dict, self.log = cfg, corpus, config_dict, log
        torch.manual_seed(cfg.seed)
        self.out = Path(cfg.out)
        overrides = {"block_size": cfg.block_size} if cfg.block_size else {}
        if cfg.dropout is not None:
            overrides["dropout"] = cfg.dropout
        self.model_cfg = preset_config(cfg.preset, corpus.tokenizer.vocab_size, **overrides)
        check_length(corpus.train, self.model_cfg.block_size, "train")
        check_length(corpus.val, self.model_cfg.block_size, "validation")
        self.model = DiffusionLM(self.model_cfg)
        if cfg.zero_init_residual:
            self.model.trunk.zero_residual_projections()
        # with ema_decay the checkpoint's weights (what is evaluated, sampled and fine-tuned) are the
        # moving average; the training weights are kept beside them for resuming
        self.ema = AveragedModel(self.model, multi_avg_fn=ema_with_warmup(cfg.ema_decay)) if cfg.ema_decay else None
        self.saved_model = self.ema.module if self.ema is not None else self.model
        self.optimizer = make_optimizer(self.model, cfg.lr, cfg.weight_decay, cfg.betas, cfg.optimizer,
                                        cfg.muon_split_qkv)
        self.data_gen = torch.Generator().manual_seed(cfg.seed)
        self.mask_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.loop = TrainingLoop(cfg, self.optimizer, {"data": self.data_gen, "mask": self.mask_gen}, "pretrain",
                                 log, cfg.lr_schedule, cfg.lr_hold)
        self.tokens_seen, self.train_ce, self.state = 0, None, {}
        if resume and (self.out / "config.json").exists():
            self._resume(load_checkpoint(self.out, expect_kind="generator"))
        self.autocast_dtype = resolve_precision(cfg.precision)
        self.val_windows = fixed_windows(corpus.val, cfg.eval_windows, self.model_cfg.block_size, seed=cfg.seed)

    def _resume(self, ckpt) -> None:
        cfg, out = self.cfg, self.out
        saved_optimizer = ckpt.state.get("optimizer", "adamw")  # checkpoints from before Muon: AdamW
        if saved_optimizer != cfg.optimizer:
            raise CheckpointError(f"{out} was trained with optimizer {saved_optimizer!r}, this run asks for "
                                  f"{cfg.optimizer!r}; resume with --set optimizer={saved_optimizer}")
        saved_split = ckpt.state.get("muon_split_qkv", False)  # checkpoints from before the option: fused qkv
        if cfg.optimizer == "muon" and saved_split != cfg.muon_split_qkv:
            raise CheckpointError(f"{out} was trained with muon_split_qkv={saved_split}, this run asks for "
                                  f"{cfg.muon_split_qkv} (the optimizer state is laid out differently); resume "
                                  f"with --set muon_split_qkv={str(saved_split).lower()}")
        averaged = ckpt.has(TRAIN_WEIGHTS)  # trained with an EMA: model.safetensors holds the average
        ckpt.load_weights_into(self.model, f"{TRAIN_WEIGHTS}.safetensors" if averaged else MODEL_FILE)
        ema = self.ema
        if ema is not None and averaged:  # the average goes on from the saved one
            ckpt.load_weights_into(ema.module)
            ema.n_averaged.fill_(ckpt.state.get("ema_updates", 1))  # absent in checkpoints from before the warm-up
        elif ema is not None:  # or starts from the weights trained so far
            ema.module.load_state_dict(self.model.state_dict())
            ema.n_averaged.fill_(1)
        self.state = dict(self.loop.resume(ckpt))  # resuming a finished run returns its state
        self.tokens_seen = self.state["tokens_seen"]

    def step(self, it: int) -> dict:
        cfg, T = self.cfg, self.model_cfg.block_size
        if cfg.complementary_masks:
            x = random_windows(self.corpus.train, cfg.batch_size // 2, T, self.data_gen).repeat(2, 1)
        else:
            x = random_windows(self.corpus.train, cfg.batch_size, T, self.data_gen)
        first_compiled_step = cfg.compile and it == self.loop.start_iter
        with autocast_context("cpu", self.autocast_dtype), \
                compile_errors_explained() if first_compiled_step else nullcontext():
            loss, ce = diffusion_loss(self.step_model, x, generator=self.mask_gen, elbo_weight=cfg.elbo_weight,
                                      stratified_t=cfg.stratified_t, complementary=cfg.complementary_masks)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.tokens_seen += x.numel()
        self.train_ce = float(ce)
        return {"loss": f"{self.train_ce:.3f}", "tok_s": f"{self.tokens_seen / max(self.loop.tick(), 1e-9):.0f}"}

    def checkpoint(self, iters: int) -> None:
        cfg, elapsed = self.cfg, self.loop.elapsed
        val_loss = evaluate_masked_ce(self.saved_model, self.val_windows, cfg.batch_size, seed=cfg.seed,
                                      autocast_dtype=self.autocast_dtype)
        self.loop.history.append({"iter": iters, "val_loss": val_loss, "train_ce": self.train_ce,
                                  "wall_time_s": elapsed})
        self.log(f"iter {iters}: val masked-token CE {val_loss:.4f} nats, {elapsed:.0f} s, "
                 f"{self.tokens_seen / elapsed:.0f} tokens/s")
        self.state = {**self.loop.state(iters), "tokens_seen": self.tokens_seen, "val_loss": val_loss,
                      "preset": cfg.preset, "optimizer": cfg.optimizer, "muon_split_qkv": cfg.muon_split_qkv,
                      "history": self.loop.history}
        extra = self.loop.rng_tensors()
        if self.ema is not None:
            self.state["ema_updates"] = int(self.ema.n_averaged)
            extra[TRAIN_WEIGHTS] = self.model.state_dict()
        save_checkpoint(self.out, kind="generator", model_config=self.model_cfg, vocab=self.corpus.tokenizer.to_dict(),
                        weights=self.saved_model, state=self.state, config=self.config_dict, optimizer=self.optimizer,
                        extra_tensors=extra)

    def run(self, progress: bool = True) -> dict:
        self.model.train()
        # compiled for the training step only: evaluation batches differ in size (no recompiles)
        self.step_model = torch.compile(self.model) if self.cfg.compile else self.model
        self.loop.run(self.step, self.checkpoint, progress)
        return self.state


def pretrain(cfg, corpus: Corpus, config_dict: dict, resume: bool = False, progress: bool = True,
             log=print) -> dict:
    """Train a DiffusionLM per `cfg` (PretrainConfig); the checkpoint directory is cfg.out. Returns the
    state of the last checkpoint (iter, wall_time_s, tokens_seen, val_loss, history, ...)."""
    return Pretrainer(cfg, corpus, config_dict, resume, log).run(progress)
