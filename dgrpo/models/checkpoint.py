"""Checkpoints as directories: config.json + safetensors files. No pickle anywhere.

    CKPT/config.json            format, kind, model config, vocabulary, state summary, run config
    CKPT/model.safetensors      the model's weights
    CKPT/optimizer.safetensors  optimizer tensors; its non-tensor state in the file's metadata
    CKPT/<name>.safetensors     any further tensor sets (reference policy, RNG states, ...)

Writes are atomic: everything goes to a hidden temporary directory that is
renamed into place, so a crash mid-write never leaves a directory that loads.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .transformer import ModelConfig

FORMAT = "dgrpo-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"


class CheckpointError(ValueError):
    pass


def _state_dict(weights) -> dict[str, torch.Tensor]:
    sd = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, pstate in sd["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    meta = {"param_groups": json.dumps(sd["param_groups"]), "scalars": json.dumps(scalars)}
    return tensors, meta


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           meta: dict[str, str]) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for name, value in json.loads(meta["scalars"]).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = json.loads(meta["param_groups"])
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path: str | os.PathLike, *, kind: str, model_config: ModelConfig, vocab: dict,
                    weights, state: dict | None = None, config: dict | None = None,
                    optimizer: torch.optim.Optimizer | None = None,
                    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write a checkpoint directory atomically; replaces an existing one at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    old = None
    try:
        save_file(_state_dict(weights), tmp / MODEL_FILE)
        if optimizer is not None:
            tensors, meta = optimizer_to_tensors(optimizer)
            save_file(tensors, tmp / OPTIMIZER_FILE, metadata=meta)
        for name, tensors in (extra_tensors or {}).items():
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / f"{name}.safetensors")
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind,
                    "model": model_config.to_dict(), "vocab": vocab, "state": state or {},
                    "config": config or {}, "files": sorted(p.name for p in tmp.iterdir())}
        (tmp / CONFIG_FILE).write_text(json.dumps(manifest, indent=2, default=str))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            path.rename(old)
        tmp.rename(path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not path.exists():
            old.rename(path)  # the swap failed half-way: put the previous checkpoint back
        raise
    return path


@dataclass
class Checkpoint:
    path: Path
    kind: str
    model_config: ModelConfig
    vocab: dict
    state: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    files: list = field(default_factory=list)

    def _load(self, filename: str) -> dict[str, torch.Tensor]:
        f = self.path / filename
        if not f.is_file():
            raise CheckpointError(f"checkpoint {self.path} has no {filename}; it is incomplete, "
                                  f"use another checkpoint or re-create it")
        try:
            tensors = load_file(f)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint file {f} is corrupt or truncated ({e}); "
                                  f"use another checkpoint or re-create it") from None
        bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise CheckpointError(f"checkpoint file {f} holds NaN or inf values in {len(bad)} tensor(s) "
                                  f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): it was written by a "
                                  f"diverged run; use an earlier checkpoint")
        return tensors

    def load_weights_into(self, module: torch.nn.Module, filename: str = MODEL_FILE) -> torch.nn.Module:
        tensors = self._load(filename)
        expected = module.state_dict()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        wrong = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
                 for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
        if missing or unexpected or wrong:
            raise CheckpointError(
                f"weights in {self.path / filename} do not fit the model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}; the checkpoint was written by a "
                f"different model configuration")
        module.load_state_dict(tensors)
        return module

    def load_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return self._load(f"{name}.safetensors")

    def has(self, name: str) -> bool:
        return (self.path / f"{name}.safetensors").is_file()

    def load_optimizer_into(self, optimizer: torch.optim.Optimizer) -> None:
        f = self.path / OPTIMIZER_FILE
        tensors = self._load(OPTIMIZER_FILE)
        from safetensors import safe_open
        with safe_open(f, framework="pt") as fh:
            meta = fh.metadata() or {}
        try:
            optimizer_from_tensors(optimizer, tensors, meta)
        except (KeyError, ValueError, json.JSONDecodeError) as e:
            raise CheckpointError(f"optimizer state in {f} does not fit this optimizer ({e})") from None


def load_checkpoint(path: str | os.PathLike, expect_kind: str | None = None) -> Checkpoint:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the directory written by "
                              f"`dgrpo pretrain --out`, `dgrpo judge train --out` or `dgrpo train`")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a directory; checkpoints are directories "
                              f"holding {CONFIG_FILE} and {MODEL_FILE}")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"checkpoint {path} has no {CONFIG_FILE}; it is incomplete or not a dgrpo checkpoint")
    try:
        manifest = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({e}); the checkpoint is corrupt") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_file} is not a dgrpo checkpoint manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {manifest.get('format_version')}, "
                              f"this dgrpo reads version {FORMAT_VERSION}")
    kind = manifest.get("kind")
    if expect_kind is not None and kind != expect_kind:
        raise CheckpointError(f"{path} holds a {kind} checkpoint, expected a {expect_kind} checkpoint")
    try:
        model_config = ModelConfig.from_dict(manifest["model"])
        model_config.validate()
        vocab = manifest["vocab"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_file} has an invalid model or vocabulary entry ({e})") from None
    files = manifest.get("files", [])
    for f in files:
        if not (path / f).is_file():
            raise CheckpointError(f"checkpoint {path} lists {f} but the file is missing; it is incomplete")
    return Checkpoint(path=path, kind=kind, model_config=model_config, vocab=vocab,
                      state=manifest.get("state", {}), config=manifest.get("config", {}), files=files)
