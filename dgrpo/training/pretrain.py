"""Supervised masked-diffusion pretraining of the generator (pure torch, no Ray)."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from ..corpus import Corpus, check_length, fixed_windows, random_windows
from ..models.checkpoint import MODEL_FILE, CheckpointError, load_checkpoint, save_checkpoint
from ..models.diffusion import DiffusionLM, diffusion_loss, mask_tokens, masked_token_ce
from ..models.optim import make_optimizer
from ..models.transformer import preset_config
from ..precision import autocast_context, resolve_precision

TRAIN_WEIGHTS = "train_weights"  # the raw training weights when the checkpoint holds an EMA


def scheduled_lr(it: int, max_iters: int, lr: float, min_lr: float, warmup: int,
                 time_fraction: float = 0.0, shape: str = "cosine", hold: float = 0.0) -> float:
    """Linear warmup, then lr held for the first `hold` of the run, then a cosine or linear
    decay to min_lr; with a wall-time budget the schedule follows whichever of iterations or
    time is further along."""
    if it < warmup:
        return lr * (it + 1) / warmup
    progress = min(1.0, max(time_fraction, (it - warmup) / max(1, max_iters - warmup)))
    decayed = max(0.0, progress - hold) / (1.0 - hold)
    if shape == "linear":
        return lr - (lr - min_lr) * decayed
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * decayed))


@torch.no_grad()
def evaluate_masked_ce(model: DiffusionLM, windows: torch.Tensor, batch_size: int, seed: int = 0,
                       autocast_dtype=None, stratified: bool = True) -> float:
    """Masked-token cross-entropy (nats) averaged over t ~ U(0,1), masked tokens only.

    The masking draws come from a fixed seed so successive evaluations are comparable, and
    each batch's t values are stratified over (0, 1): with i.i.d. t the estimate on 256
    windows scattered by ±0.035 nats between window sets, stratified ±0.014 (1,024
    windows: ±0.020 vs ±0.008), measured on the small generator by bench/eval_generator.py.
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


def pretrain(cfg, corpus: Corpus, config_dict: dict, resume: bool = False, progress: bool = True,
             log=print) -> dict:
    """Train a DiffusionLM per `cfg` (PretrainConfig); the checkpoint directory is cfg.out."""
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    overrides = {"block_size": cfg.block_size} if cfg.block_size else {}
    if cfg.dropout is not None:
        overrides["dropout"] = cfg.dropout
    model_cfg = preset_config(cfg.preset, corpus.tokenizer.vocab_size, **overrides)
    check_length(corpus.train, model_cfg.block_size, "train")
    check_length(corpus.val, model_cfg.block_size, "validation")
    model = DiffusionLM(model_cfg)
    if cfg.zero_init_residual:
        model.trunk.zero_residual_projections()
    # with ema_decay the checkpoint's weights (what is evaluated, sampled and fine-tuned) are the
    # moving average; the training weights are kept beside them for resuming
    ema = AveragedModel(model, multi_avg_fn=ema_with_warmup(cfg.ema_decay)) if cfg.ema_decay else None
    saved_model = ema.module if ema is not None else model
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas, cfg.optimizer, cfg.muon_split_qkv)
    data_gen = torch.Generator().manual_seed(cfg.seed)
    mask_gen = torch.Generator().manual_seed(cfg.seed + 1)
    start_iter, tokens_seen, elapsed, history = 0, 0, 0.0, []
    if resume and (out / "config.json").exists():
        ckpt = load_checkpoint(out, expect_kind="generator")
        saved_optimizer = ckpt.state.get("optimizer", "adamw")  # checkpoints before Muon: AdamW
        if saved_optimizer != cfg.optimizer:
            raise CheckpointError(f"{out} was trained with optimizer {saved_optimizer!r}, this run asks for "
                                  f"{cfg.optimizer!r}; resume with --set optimizer={saved_optimizer}")
        saved_split = ckpt.state.get("muon_split_qkv", False)  # checkpoints before stop 14: fused qkv
        if cfg.optimizer == "muon" and saved_split != cfg.muon_split_qkv:
            raise CheckpointError(f"{out} was trained with muon_split_qkv={saved_split}, this run asks for "
                                  f"{cfg.muon_split_qkv} (the optimizer state is laid out differently); resume "
                                  f"with --set muon_split_qkv={str(saved_split).lower()}")
        averaged = ckpt.has(TRAIN_WEIGHTS)  # trained with an EMA: model.safetensors holds the average
        ckpt.load_weights_into(model, f"{TRAIN_WEIGHTS}.safetensors" if averaged else MODEL_FILE)
        if ema is not None and averaged:  # the average goes on from the saved one
            ckpt.load_weights_into(ema.module)
            ema.n_averaged.fill_(ckpt.state.get("ema_updates", 1))  # absent before d5ae593
        elif ema is not None:  # or starts from the weights trained so far
            ema.module.load_state_dict(model.state_dict())
            ema.n_averaged.fill_(1)
        ckpt.load_optimizer_into(optimizer)
        rng = ckpt.load_tensors("rng")
        data_gen.set_state(rng["data"])
        mask_gen.set_state(rng["mask"])
        start_iter = ckpt.state["iter"]
        tokens_seen = ckpt.state["tokens_seen"]
        elapsed = ckpt.state["wall_time_s"]
        history = ckpt.state.get("history", [])
        log(f"resumed from {out} at iter {start_iter}")
    autocast_dtype = resolve_precision(cfg.precision)
    val_windows = fixed_windows(corpus.val, cfg.eval_windows, model_cfg.block_size, seed=cfg.seed)
    state = dict(ckpt.state) if start_iter else {}  # resuming a finished run returns its state

    def save(it: int, val_loss: float | None):
        nonlocal state
        state = {"iter": it, "tokens_seen": tokens_seen, "wall_time_s": elapsed, "val_loss": val_loss,
                 "preset": cfg.preset, "optimizer": cfg.optimizer, "muon_split_qkv": cfg.muon_split_qkv,
                 "history": history}
        extra = {"rng": {"data": data_gen.get_state(), "mask": mask_gen.get_state()}}
        if ema is not None:
            state["ema_updates"] = int(ema.n_averaged)
            extra[TRAIN_WEIGHTS] = model.state_dict()
        save_checkpoint(out, kind="generator", model_config=model_cfg, vocab=corpus.tokenizer.to_dict(),
                        weights=saved_model, state=state, config=config_dict, optimizer=optimizer,
                        extra_tensors=extra)

    model.train()
    # compiled for the training step only: evaluation batches differ in size (no recompiles)
    step_model = torch.compile(model) if cfg.compile else model
    t_start = time.perf_counter() - elapsed
    bar = tqdm(range(start_iter, cfg.max_iters), initial=start_iter, total=cfg.max_iters,
               disable=not progress, desc="pretrain", dynamic_ncols=True, mininterval=5.0)
    val_loss = None
    it = start_iter
    for it in bar:
        time_fraction = elapsed / (60 * cfg.max_minutes) if cfg.max_minutes else 0.0
        lr = scheduled_lr(it, cfg.max_iters, cfg.lr, cfg.min_lr, cfg.warmup_iters, time_fraction,
                          cfg.lr_schedule, cfg.lr_hold)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if cfg.complementary_masks:
            x = random_windows(corpus.train, cfg.batch_size // 2, model_cfg.block_size, data_gen).repeat(2, 1)
        else:
            x = random_windows(corpus.train, cfg.batch_size, model_cfg.block_size, data_gen)
        first_compiled_step = cfg.compile and it == start_iter
        with autocast_context("cpu", autocast_dtype), compile_errors_explained() if first_compiled_step else nullcontext():
            loss, ce = diffusion_loss(step_model, x, generator=mask_gen, elbo_weight=cfg.elbo_weight,
                                      stratified_t=cfg.stratified_t, complementary=cfg.complementary_masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        if ema is not None:
            ema.update_parameters(model)
        tokens_seen += x.numel()
        elapsed = time.perf_counter() - t_start
        bar.set_postfix(loss=f"{float(ce):.3f}", tok_s=f"{tokens_seen / max(elapsed, 1e-9):.0f}")
        last = it + 1 == cfg.max_iters
        out_of_time = cfg.max_minutes is not None and elapsed > 60 * cfg.max_minutes
        if (it + 1) % cfg.eval_every == 0 or last or out_of_time:
            val_loss = evaluate_masked_ce(saved_model, val_windows, cfg.batch_size, seed=cfg.seed,
                                          autocast_dtype=autocast_dtype)
            history.append({"iter": it + 1, "val_loss": val_loss, "train_ce": float(ce), "wall_time_s": elapsed})
            log(f"iter {it + 1}: val masked-token CE {val_loss:.4f} nats, {elapsed:.0f} s, "
                f"{tokens_seen / elapsed:.0f} tokens/s")
            save(it + 1, val_loss)
        if out_of_time:
            log(f"stopping: max_minutes={cfg.max_minutes} reached at iter {it + 1}")
            break
    bar.close()
    return state
