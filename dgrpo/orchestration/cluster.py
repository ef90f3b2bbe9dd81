"""Connecting to Ray and placing the actors of each role with the resources from config."""

from __future__ import annotations

import math
import os
import socket

import ray
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..config import TrainConfig
from ..errors import ConfigError, RunError


def required_resources(cfg: TrainConfig) -> dict[str, float]:
    """CPUs and GPUs of every actor of the run, elastic roles at their largest."""
    r = cfg.resources
    trainers = 1 if cfg.judge_refresh.enabled else 0
    rollouts, judges = r.rollout.bounds[1], r.judge.bounds[1]
    return {
        "CPU": rollouts * r.rollout.num_cpus + judges * r.judge.num_cpus + r.learner.num_cpus
        + trainers * r.judge_trainer.num_cpus,
        "GPU": rollouts * r.rollout.num_gpus + judges * r.judge.num_gpus + r.learner.num_gpus
        + trainers * r.judge_trainer.num_gpus,
    }


def describe_needs(role_cfg) -> str:
    """What one actor of a role asks of the cluster, e.g. "0.5 CPU, dgrpo_rollout: 1" (for messages)."""
    parts = [f"{role_cfg.num_cpus:g} CPU"] + ([f"{role_cfg.num_gpus:g} GPU"] if role_cfg.num_gpus else [])
    return ", ".join(parts + [f"{k}: {v:g}" for k, v in role_cfg.custom_resources.items()])


def join_address(address: str, source: str) -> str:
    """The host:port (or ray://host:port) ray.init will dial for a run.ray_address / $RAY_ADDRESS."""
    if address.startswith(("http://", "https://")):
        raise ConfigError(f"{source} {address} is a dashboard URL (for `ray job submit`); dgrpo train joins a cluster "
                          f"at its GCS address host:port (`ray start --head --port`, 6379 by default)")
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if address != "auto" and (not host or not port.isdigit()):
        raise ConfigError(f"{source} {address!r} is not a cluster address; give host:port, ray://host:port or auto")
    if address.startswith("ray://"):
        return address
    from ray._common.utils import get_ray_address_file
    from ray._private.services import canonicalize_bootstrap_address
    if address == "auto" and not os.path.isfile(get_ray_address_file(None)):
        raise RunError(f"{source}=auto, but no Ray cluster is recorded in {get_ray_address_file(None)}; start one "
                       f"with `ray start --head`, or give its address")
    return canonicalize_bootstrap_address(address)  # Ray dials 127.0.0.1 as the host's routable address


def unreachable(address: str, timeout_s: float) -> str | None:
    """None if the cluster at `address` answers within about timeout_s, else why not."""
    gcs = not address.startswith("ray://")
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except socket.timeout:
        return f"no answer within {timeout_s:g} s (run.connect_timeout_s)"
    except OSError as e:
        return e.strerror or str(e)
    if gcs:  # an open port that is no Ray GCS would keep ray.init retrying for many minutes
        from ray._raylet import InnerGcsClient
        from ray.exceptions import AuthenticationError
        try:
            InnerGcsClient.standalone(address, None, int(timeout_s * 1000))
        except AuthenticationError:
            return ("the cluster refused this client's token; join with RAY_AUTH_MODE=token and the cluster's token "
                    "(~/.ray/auth_token, $RAY_AUTH_TOKEN_PATH or $RAY_AUTH_TOKEN)")
        except Exception as e:  # noqa: BLE001 - Ray's RpcError and its kin
            return f"the port is open but no Ray GCS answers ({e})"
    return None


def connect(cfg: TrainConfig, extra_cpus: float = 0.0) -> bool:
    """Join the cluster at run.ray_address / $RAY_ADDRESS, else start an embedded local one.

    Returns True when this call started a local cluster (the caller shuts it down). The embedded cluster
    is always a new one, never a cluster recorded by `ray start` (ray.init() alone would join that).
    `extra_cpus`: logical CPUs the embedded cluster needs beyond the roles (Ray Tune's trial drivers).
    """
    if ray.is_initialized():
        return False
    address, source = cfg.run.ray_address, "run.ray_address"
    if not address and os.environ.get("RAY_ADDRESS"):
        address, source = os.environ["RAY_ADDRESS"], "$RAY_ADDRESS"
    env = {"env_vars": {"OMP_NUM_THREADS": str(cfg.resources.torch_threads)}}
    if address:
        # ray.init retries an unreachable cluster for many minutes: probe what it will dial first
        target = join_address(address, source)
        problem = unreachable(target, cfg.run.connect_timeout_s)
        if problem:
            dialed = "" if target == address else f", dialed as {target}"
            raise RunError(f"cannot join the Ray cluster at {address} ({source}{dialed}): {problem}; start it "
                           f"(`ray start --head`), fix {source}, or unset it for an embedded local cluster")
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return False
    need = required_resources(cfg)
    # Logical CPUs on the embedded cluster: at least the machine's, more if the
    # roles ask for more (actors then share cores; torch threads stay as set).
    # Nothing listens beyond 127.0.0.1. Ray swaps a loopback _node_ip_address for the
    # machine's routable address (and its gRPC servers then bind it or all interfaces) unless it
    # thinks it runs a one-machine cluster, as on macOS/Windows; say so for this embedded one.
    from ray._private import ray_constants
    multi_node = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        context = ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(need["CPU"] + extra_cpus)),
                           include_dashboard=cfg.run.dashboard, dashboard_host="127.0.0.1",
                           dashboard_port=cfg.run.dashboard_port, runtime_env=env, _node_ip_address="127.0.0.1",
                           log_to_driver=True)
    finally:
        if multi_node is not None:
            ray_constants.ENABLE_RAY_CLUSTER = multi_node
    if cfg.run.dashboard:
        metrics = next((n["MetricsExportPort"] for n in ray.nodes() if n["Alive"]), None)
        print(f"Ray dashboard: http://{context.dashboard_url} (127.0.0.1 only, while the run lasts; sign in with the "
              f"token `ray get-auth-token` prints); the run's metrics: http://127.0.0.1:{metrics}/metrics", flush=True)
    return True


def role_options(role_cfg, name: str | None = None) -> dict:
    """Ray actor options for one role; inside a Tune trial, schedule into the trial's placement group."""
    opts = {"num_cpus": role_cfg.num_cpus, "num_gpus": role_cfg.num_gpus,
            "max_restarts": role_cfg.max_restarts, "max_task_retries": 0}
    if getattr(role_cfg, "custom_resources", None):
        opts["resources"] = dict(role_cfg.custom_resources)  # pins the role onto its worker group
    pg = get_current_placement_group()
    if pg is not None:
        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_capture_child_tasks=True)
    if name:
        opts["name"] = name
    return opts


def make_actor(cls, role_cfg, *args, **kwargs):
    return ray.remote(cls).options(**role_options(role_cfg)).remote(*args, **kwargs)
