"""Append-only log of encoded messages, for offline inspection and replay.

Each frame is a 4-byte little-endian payload length followed by the payload
(one `codec.encode` message), so a tail cut short by a crash is detected
rather than misread. `dgrpo rollouts inspect FILE` prints
`format_summary(summarize_rollout_log(FILE))`.
"""

from __future__ import annotations

import math
import os
import struct
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch

from dgrpo.protocols.codec import MAX_MESSAGE_BYTES, CodecError, decode, encode
from dgrpo.protocols.messages import RolloutBatch, ScoredBatch

_HEADER = struct.Struct("<I")
_REPAIR_HINT = "the writer probably died mid-write; RolloutLogWriter(path, repair_tail=True) cuts the partial frame off"


def _scan_frames(path: Path) -> tuple[int, int, int]:
    """Walk frame headers without decoding payloads -> (complete frames, end of last complete frame, file size)."""
    size = path.stat().st_size
    frames = offset = 0
    with open(path, "rb") as f:
        while offset + _HEADER.size <= size:
            f.seek(offset)
            (n,) = _HEADER.unpack(f.read(_HEADER.size))
            if n > MAX_MESSAGE_BYTES or offset + _HEADER.size + n > size:
                break
            offset += _HEADER.size + n
            frames += 1
    return frames, offset, size


class RolloutLogWriter:
    """Append messages to `path`, one flushed frame per `write`.

    Opening a file whose last frame is incomplete raises CodecError, since new
    frames appended after it would be unreadable; `repair_tail=True` truncates
    the partial frame (with a warning) instead.
    """

    def __init__(self, path: str | os.PathLike, *, repair_tail: bool = False) -> None:
        self.path = Path(path)
        if self.path.exists():
            frames, end, size = _scan_frames(self.path)
            if end != size:
                if not repair_tail:
                    raise CodecError(f"{self.path}: frame {frames} at byte offset {end} is incomplete "
                                     f"({size - end} trailing bytes); {_REPAIR_HINT}, or write to a new file")
                warnings.warn(f"{self.path}: dropping incomplete frame {frames} "
                              f"({size - end} bytes at offset {end})", stacklevel=2)
                os.truncate(self.path, end)
        self._file = open(self.path, "ab")
        self.frames_written = 0

    def write(self, msg: object) -> None:
        if self._file.closed:
            raise ValueError(f"RolloutLogWriter for {self.path} is closed; open a new one to append")
        payload = encode(msg)
        self._file.write(_HEADER.pack(len(payload)) + payload)
        self._file.flush()
        self.frames_written += 1

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "RolloutLogWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_rollout_log(path: str | os.PathLike, expected: type | None = None) -> Iterator[object]:
    """Yield each message in order; CodecError names the frame index and byte offset of any bad frame."""
    path = Path(path)
    with open(path, "rb") as f:
        index = offset = 0
        while True:
            header = f.read(_HEADER.size)
            if not header:
                return
            where = f"{path}: frame {index} at byte offset {offset}"
            if len(header) < _HEADER.size:
                raise CodecError(f"{where} is truncated ({len(header)} of {_HEADER.size} length bytes); {_REPAIR_HINT}")
            (n,) = _HEADER.unpack(header)
            if n > MAX_MESSAGE_BYTES:
                raise CodecError(f"{where} claims a {n}-byte payload, above the {MAX_MESSAGE_BYTES}-byte limit; "
                                 "the file is corrupt or not a dgrpo rollout log")
            payload = f.read(n)
            if len(payload) < n:
                raise CodecError(f"{where} is truncated ({len(payload)} of {n} payload bytes); {_REPAIR_HINT}")
            try:
                msg = decode(payload, expected)
            except CodecError as exc:
                raise CodecError(f"{where}: {exc}") from None
            yield msg
            index += 1
            offset += _HEADER.size + n


def _check_shapes(msg, rollout: RolloutBatch, where: str) -> None:
    """Shapes only: non-finite values are counted by the summary, not rejected."""
    n_t = tuple(rollout.tokens.shape)
    expected = {"reveal_step": n_t, "logprobs": n_t, "group_index": n_t[:1]}
    got = {name: tuple(getattr(rollout, name).shape) for name in expected}
    if isinstance(msg, ScoredBatch):
        expected["rewards"], got["rewards"] = n_t[:1], tuple(msg.rewards.shape)
    bad = [f"{k} {got[k]} (expected {expected[k]})" for k in expected if got[k] != expected[k]]
    if len(n_t) != 2 or bad:
        raise CodecError(f"{where}: inconsistent batch: tokens {n_t}, {', '.join(bad) or 'tokens must be 2-D'}; "
                         f"the file is corrupt or was not written by dgrpo")


def summarize_rollout_log(path: str | os.PathLike) -> dict:
    """JSON-safe statistics of a rollout log.

    Batches are counted once per request_id: a ScoredBatch whose rollout was
    already logged as a RolloutBatch (or vice versa) adds no samples, and a
    repeat of the same schema counts as a duplicate. Non-finite log-probs and
    rewards are left out of the means and counted separately.
    """
    path = Path(path)
    by_schema: Counter[str] = Counter()
    seen: dict[str, set[int]] = {RolloutBatch.SCHEMA: set(), ScoredBatch.SCHEMA: set()}
    sampled_ids: set[int] = set()
    scored_ids: set[int] = set()
    versions: set[int] = set()
    workers: set[int] = set()
    judges: set[int] = set()
    judge_versions: set[int] = set()
    num_samples = duplicates = tokens = nonfinite_logprobs = 0
    logprob_sum = 0.0
    rewards_n = nonfinite_rewards = 0
    reward_sum = 0.0

    for index, msg in enumerate(read_rollout_log(path)):
        by_schema[msg.SCHEMA] += 1
        if not isinstance(msg, (RolloutBatch, ScoredBatch)):
            continue
        rollout = msg.rollout if isinstance(msg, ScoredBatch) else msg
        _check_shapes(msg, rollout, f"{path}: frame {index}")
        rid = rollout.request_id
        if rid in seen[msg.SCHEMA]:
            duplicates += 1
            continue
        seen[msg.SCHEMA].add(rid)
        versions.add(rollout.policy_version)
        workers.add(rollout.worker_id)
        if rid not in sampled_ids:
            sampled_ids.add(rid)
            num_samples += rollout.num_samples
            lp = rollout.logprobs[rollout.reveal_step >= 0].double()
            finite = torch.isfinite(lp)
            tokens += int(finite.sum())
            nonfinite_logprobs += int((~finite).sum())
            logprob_sum += float(lp[finite].sum())
        if isinstance(msg, ScoredBatch) and rid not in scored_ids:
            scored_ids.add(rid)
            judges.add(msg.judge_id)
            judge_versions.add(msg.judge_version)
            r = msg.rewards.double()
            finite = torch.isfinite(r)
            rewards_n += int(finite.sum())
            nonfinite_rewards += int((~finite).sum())
            reward_sum += float(r[finite].sum())

    return {
        "path": str(path),
        "bytes": path.stat().st_size,
        "messages": sum(by_schema.values()),
        "by_schema": dict(sorted(by_schema.items())),
        "num_batches": len(sampled_ids),
        "num_samples": num_samples,
        "duplicate_batches": duplicates,
        "policy_version_min": min(versions) if versions else None,
        "policy_version_max": max(versions) if versions else None,
        "workers": sorted(workers),
        "judges": sorted(judges),
        "judge_versions": sorted(judge_versions),
        "generated_tokens": tokens,
        "mean_logprob_per_token": logprob_sum / tokens if tokens else None,
        "nonfinite_logprobs": nonfinite_logprobs,
        "scored_samples": rewards_n,
        "mean_reward": reward_sum / rewards_n if rewards_n else None,
        "nonfinite_rewards": nonfinite_rewards,
    }


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _num(x: float | None, fmt: str = ".4f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def format_summary(summary: dict) -> str:
    """Human-readable text of `summarize_rollout_log`'s result."""
    s = summary
    schemas = ", ".join(f"{k}: {v}" for k, v in s["by_schema"].items()) or "none"
    if s["policy_version_min"] is None:
        versions = "n/a"
    elif s["policy_version_min"] == s["policy_version_max"]:
        versions = str(s["policy_version_min"])
    else:
        versions = f"{s['policy_version_min']}..{s['policy_version_max']}"
    lines = [
        f"rollout log      {s['path']} ({_size(s['bytes'])})",
        f"messages         {s['messages']} ({schemas})",
        f"batches          {s['num_batches']} ({s['num_samples']} samples, "
        f"{s['duplicate_batches']} duplicate batches skipped)",
        f"policy versions  {versions}",
        f"workers          {', '.join(map(str, s['workers'])) or 'none'}",
        f"judges           {', '.join(map(str, s['judges'])) or 'none'}",
        f"judge versions   {', '.join(map(str, s['judge_versions'])) or 'none'}",
        f"generated tokens {s['generated_tokens']} (mean behaviour log-prob/token "
        f"{_num(s['mean_logprob_per_token'])})",
        f"mean reward      {_num(s['mean_reward'])} over {s['scored_samples']} scored samples",
    ]
    if s["nonfinite_logprobs"] or s["nonfinite_rewards"]:
        lines.append(f"WARNING          {s['nonfinite_logprobs']} NaN/inf log-probs and "
                     f"{s['nonfinite_rewards']} NaN/inf rewards left out of the means")
    return "\n".join(lines)
