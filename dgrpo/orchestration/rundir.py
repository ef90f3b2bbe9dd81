"""The run directory of `dgrpo train`: its identity and lock, its checkpoints, and what a resume keeps of its logs.

    RUN/run.json             run id, config fingerprint, the config, and every start of the run
    RUN/run.lock             flock'ed by the driver while the run is live; names the holder's PID and host
    RUN/config.yaml          the resolved config
    RUN/metrics.jsonl        one line per step (and per evaluation)
    RUN/samples.jsonl        held-out samples of each evaluation
    RUN/rollouts.msgpack     every consumed scored batch (run.log_rollouts)
    RUN/checkpoints/step_N/  the last run.keep_checkpoints checkpoints, written atomically
    RUN/checkpoints/best.json names the best checkpoint on the held-out selection measure (never pruned)
    RUN/summary.json         the summary of the finished (or stopped) run
    RUN/scale.json           worker targets set by `dgrpo scale` on the live run (orchestration/scale.py)

A fresh run starts only in a new or empty directory, or in a run directory with --overwrite; --resume
continues the run in it when the config differs only in RESUMABLE_KEYS. Nothing is written before
those checks pass.
"""

from __future__ import annotations

import fcntl
import fnmatch
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from pydantic import ValidationError

from ..config import RESUMABLE_KEYS, TrainConfig, to_dict, to_yaml
from ..errors import ConfigError, RunError
from ..protocols import CodecError
from ..protocols.rollout_log import RolloutLogWriter, read_rollout_log
from .metrics import read_jsonl

RUN_FILE, LOCK_FILE = "run.json", "run.lock"
# everything a run writes into its directory (a fresh run with --overwrite removes these, and only these)
RUN_ENTRIES = {RUN_FILE, LOCK_FILE, "config.yaml", "metrics.jsonl", "metrics.tmp", "samples.jsonl", "samples.tmp",
               "rollouts.msgpack", "rollouts.msgpack.tmp", "checkpoints", "summary.json", "tensorboard", "wandb",
               "report", "scale.json", ".scale.json.tmp"}
IN_RAY_JOB = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in the environment of a submitted job's entrypoint


def find_checkpoints(out_dir: Path) -> list[Path]:
    return sorted((Path(out_dir) / "checkpoints").glob("step_*"))


def checkpoint_path(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step_{step:06d}"


def remove_partial_checkpoints(out_dir: Path) -> None:
    """Hidden temp/old directories left by a writer that was killed mid-write never load; drop them."""
    for junk in (Path(out_dir) / "checkpoints").glob(".step_*"):
        shutil.rmtree(junk, ignore_errors=True)


def keep_last_checkpoints(out_dir: Path, keep: int, protect: Path | None = None) -> None:
    """Remove all but the newest `keep` checkpoints; `protect` (the best one) is kept besides them."""
    for old in [p for p in find_checkpoints(out_dir) if p != protect][:-keep]:
        shutil.rmtree(old, ignore_errors=True)


BEST_POINTER = "best.json"


def write_best(out_dir: Path, best: dict) -> None:
    """checkpoints/best.json, atomically: the best checkpoint's directory name, step, measure and value."""
    path = Path(out_dir) / "checkpoints" / BEST_POINTER
    tmp = path.with_name(f".{BEST_POINTER}.tmp")
    tmp.write_text(json.dumps(best, indent=2))
    os.replace(tmp, path)


def read_best(out_dir: Path) -> dict | None:
    """The best pointer of a run directory (None when the run kept none)."""
    path = Path(out_dir) / "checkpoints" / BEST_POINTER
    return json.loads(path.read_text()) if path.is_file() else None


def truncate_rollout_log(path: Path, request_counter: int) -> int:
    """On resume: keep the logged batches of requests issued before the checkpoint (the
    resumed run issues the later ids again and logs them itself). Returns batches kept."""
    if not path.is_file():
        return 0
    tmp, kept = path.with_name(path.name + ".tmp"), 0
    tmp.unlink(missing_ok=True)
    with RolloutLogWriter(tmp) as out:
        try:
            for msg in read_rollout_log(path):
                if getattr(msg, "rollout", msg).request_id < request_counter:
                    out.write(msg)
                    kept += 1
        except CodecError:
            pass  # a frame torn by the crash: everything before it is intact
    tmp.replace(path)
    return kept


# -- where a run goes ---------------------------------------------------------------


def resolve_out_dir(run) -> Path:
    """run.out_dir as an absolute path. A relative one is resolved against run.storage_path ($DGRPO_STORAGE),
    else against the working directory, except inside a Ray job, whose working directory Ray deletes."""
    out = Path(run.out_dir).expanduser()
    if out.is_absolute():
        return out
    storage = run.storage_path or os.environ.get("DGRPO_STORAGE")
    if storage:
        if not Path(storage).expanduser().is_absolute():
            raise ConfigError(f"run.storage_path / $DGRPO_STORAGE {storage!r} must be an absolute path")
        return Path(storage).expanduser() / out
    if IN_RAY_JOB in os.environ:
        raise ConfigError(f"run.out_dir {run.out_dir!r} is relative and this is a Ray job, whose working directory "
                          f"({Path.cwd()}) is a temporary copy Ray deletes: give an absolute run.out_dir on storage "
                          f"every node mounts, or set run.storage_path (or $DGRPO_STORAGE) to resolve it against")
    return out.absolute()


def run_entries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name != LOCK_FILE)


def is_run_directory(entries: list[str]) -> bool:
    """run.json, or (a run from before run.json existed) a log or checkpoints and nothing but run files."""
    names = set(entries)
    return RUN_FILE in names or (bool(names & {"metrics.jsonl", "checkpoints"}) and names <= RUN_ENTRIES)


def holds_results(entries: list[str]) -> bool:
    return bool(set(entries) - {RUN_FILE, "config.yaml"})


def read_run_file(path: Path) -> dict:
    f = path / RUN_FILE
    if not f.is_file():
        return {}
    try:
        record = json.loads(f.read_text())
    except (ValueError, OSError) as e:
        raise RunError(f"{f} is unreadable ({e}); the run's identity is lost: start a new run in another "
                       f"run.out_dir (generator.checkpoint=<a checkpoint of this run> starts from its weights)") from None
    return record if isinstance(record, dict) else {}


def check_directory(path: Path, resume: bool = False, overwrite: bool = False) -> list[str]:
    """The entries of run directory `path` (none if it does not exist yet), if a run may start there:
    refused are a non-empty directory that is not a run directory (always) and, for a fresh run
    without `overwrite`, a run directory holding results."""
    entries = run_entries(path) if path.is_dir() else []
    if entries and not is_run_directory(entries):
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise ConfigError(f"run.out_dir {path} is not empty and is not a dgrpo run directory (it holds {shown}); "
                          f"choose a new or empty directory")
    if holds_results(entries) and not resume and not overwrite:
        raise RunError(f"run.out_dir {path} already holds a run ({describe_run(path)}); continue it with --resume, "
                       f"start it afresh with --overwrite (deletes its checkpoints and logs), or choose another "
                       f"run.out_dir")
    return entries


def describe_run(path: Path) -> str:
    """'run ID, N steps logged, checkpoints step_A, step_B' for messages about an existing run."""
    steps = [r["step"] for r in read_jsonl(path / "metrics.jsonl") if "num_samples" in r]
    checkpoints = [p.name for p in find_checkpoints(path)]
    run_id = read_run_file(path).get("run_id")
    return ", ".join(([f"run {run_id}"] if run_id else []) +
                     [f"steps logged up to {max(steps)}" if steps else "no step logged",
                      f"checkpoints {', '.join(checkpoints)}" if checkpoints else "no checkpoint"])


# -- the lock ------------------------------------------------------------------------


def describe_holder(holder: dict) -> str:
    if not holder:
        return "another process"
    return (f"PID {holder.get('pid')} on host {holder.get('host')}"
            + (f" (run {holder['run_id']}, since {holder.get('since')})" if holder.get("run_id") else ""))


class RunLock:
    """An exclusive flock on RUN/run.lock for the run's lifetime; the OS drops it when the process dies.

    The file names its holder. A name in a file nobody holds is a run that died without releasing it:
    a stale lock, taken over (`stale` holds that name)."""

    def __init__(self, directory: Path):
        self.path = directory / LOCK_FILE
        self.created = not self.path.exists()
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.holder()
            os.close(self.fd)
            raise RunError(f"run directory {directory} is in use by {describe_holder(holder)}; wait for that run to "
                           f"end (or stop it), or choose another run.out_dir") from None
        self.stale = self.holder()

    def holder(self) -> dict:
        try:
            return json.loads(os.pread(self.fd, 4096, 0) or b"{}")
        except ValueError:
            return {}

    def claim(self, run_id: str) -> None:
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id,
                             "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, record, 0)
        os.fsync(self.fd)

    def release(self, refused: bool = False) -> None:
        """Unlock; a run refused before it began leaves the lock file as it found it."""
        if self.fd is None:
            return
        if refused and self.created:
            self.path.unlink()
        elif not refused:
            os.ftruncate(self.fd, 0)  # an empty file: released; a name left behind: its holder died
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


# -- config on resume ----------------------------------------------------------------


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resumable(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUMABLE_KEYS)


def fingerprint(config: dict) -> str:
    """Hash of every key a resume may not change: two configs with one fingerprint train the same run."""
    fixed = {k: v for k, v in flatten(config).items() if not resumable(k)}
    return hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()[:16]


def config_differences(stored: dict, new: dict) -> tuple[list, list]:
    """([(key, stored, new)] a resume applies, [(key, stored, new)] it refuses)."""
    try:  # keys added to dgrpo since the run started take their defaults
        stored = to_dict(TrainConfig.model_validate(stored))
    except ValidationError:
        pass
    a, b = flatten(stored), flatten(new)
    absent = "(absent)"
    changes = [(k, a.get(k, absent), b.get(k, absent)) for k in sorted(a.keys() | b.keys())
               if a.get(k, absent) != b.get(k, absent)]
    return [c for c in changes if resumable(c[0])], [c for c in changes if not resumable(c[0])]


def stored_config(path: Path) -> dict | None:
    """The config the run in `path` last started with: run.json's, else (older runs) its newest checkpoint's."""
    record = read_run_file(path)
    if "config" in record:
        return record["config"]
    for ckpt in reversed(find_checkpoints(path)):
        try:
            config = json.loads((ckpt / "config.json").read_text()).get("config")
        except (OSError, ValueError, AttributeError):
            continue
        if config:
            return config
    return None


def refusal(path: Path, refused: list) -> str:
    diffs = "\n".join(f"  {key}: {old!r} -> {new!r}" for key, old, new in refused)
    return (f"--resume: the config differs from the one the run in {path} was started with, in keys a resumed run "
            f"cannot change:\n{diffs}\nresume with the run's own config (-c {path / 'config.yaml'}) changing only "
            f"when and how long it runs, what it logs and where its actors go, or start a new run in another "
            f"run.out_dir (--set generator.checkpoint={path / 'checkpoints'}/step_N starts it from these weights)")


# -- opening a run directory -----------------------------------------------------------


class RunDirectory:
    """An opened, locked run directory: `cfg` with the absolute run.out_dir, the run's id."""

    def __init__(self, path: Path, cfg: TrainConfig, run_id: str, lock: RunLock):
        self.path, self.cfg, self.run_id, self.lock = path, cfg, run_id, lock

    def write_summary(self, summary: dict, stopped: str | None = None) -> dict:
        summary = {**summary, "out_dir": str(self.path), "run_id": self.run_id,
                   "status": "stopped" if stopped else "finished", **({"stop_reason": stopped} if stopped else {})}
        (self.path / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


@contextmanager
def open_run_dir(cfg: TrainConfig, resume: bool = False, overwrite: bool = False, info: dict | None = None,
                 log=print):
    """Check, lock and label the run directory of `cfg`, then yield it (a RunDirectory); unlock at the end.

    Refused, with nothing written: a file or unwritable path, a non-empty directory that is not a run
    directory, a run directory another process holds, a fresh run into a run directory holding results
    (unless `overwrite`: they are deleted), a resume without a checkpoint or with a changed config outside
    RESUMABLE_KEYS. `info` goes into run.json (e.g. a Tune trial's placement)."""
    path = resolve_out_dir(cfg.run)
    cfg = cfg.model_copy(deep=True)
    cfg.run.out_dir = str(path)
    no_checkpoint = f"--resume: no checkpoint under {path / 'checkpoints'}"
    if path.exists() and not path.is_dir():
        raise ConfigError(f"run.out_dir {path} is a file, not a directory; choose another run.out_dir")
    if not path.exists():
        if resume:
            raise RunError(f"{no_checkpoint}; start without --resume")
        try:
            path.mkdir(parents=True)
        except OSError as e:
            raise ConfigError(f"cannot create run.out_dir {path}: {e.strerror}; choose a writable location") from None
    check_directory(path, resume, overwrite)
    try:
        lock = RunLock(path)
    except OSError as e:
        raise ConfigError(f"run.out_dir {path} is not writable ({e.strerror}); choose a writable location") from None
    try:
        entries = check_directory(path, resume, overwrite)  # again, now that no other run can change it
        previous = read_run_file(path)
        changed = []
        if resume:
            if not find_checkpoints(path):
                fix = "start it afresh with --overwrite" if holds_results(entries) else "start without --resume"
                raise RunError(f"{no_checkpoint}; {fix}")
            stored = stored_config(path)
            if stored is not None:
                changed, refused = config_differences(stored, to_dict(cfg))
                if refused:
                    raise ConfigError(refusal(path, refused))
            run_id = previous.get("run_id") or uuid.uuid4().hex[:12]
        else:
            if holds_results(entries):
                log(f"--overwrite: deleting the previous run in {path} ({describe_run(path)})")
                for name in set(entries) & RUN_ENTRIES:
                    if (path / name).is_dir():
                        shutil.rmtree(path / name)
                    else:
                        (path / name).unlink()
            previous = {}
            run_id = uuid.uuid4().hex[:12]
        if lock.stale:
            log(f"{path / LOCK_FILE}: the run of {describe_holder(lock.stale)} ended without releasing it "
                f"(killed or crashed); taking it over")
        lock.claim(run_id)
        config = to_dict(cfg)
        start = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid(), "host": socket.gethostname(),
                 "resume": resume, "changed": {k: [old, new] for k, old, new in changed}}
        record = {"run_id": run_id, "fingerprint": fingerprint(config), "created": previous.get("created", start["time"]),
                  "starts": previous.get("starts", []) + [start], "info": info or previous.get("info"), "config": config}
        _write_atomic(path / RUN_FILE, json.dumps(record, indent=2))
        _write_atomic(path / "config.yaml", to_yaml(cfg))
    except BaseException:
        lock.release(refused=True)
        raise
    for key, old, new in changed:
        log(f"--resume: {key} {old!r} -> {new!r}")
    log(f"run directory: {path} ({'resuming' if resume else 'new'} run {run_id}, config {record['fingerprint']})")
    try:
        yield RunDirectory(path, cfg, run_id, lock)
    finally:
        lock.release()
