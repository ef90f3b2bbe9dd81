"""deploy/: runtime env, submit command, cluster launcher YAML, KubeRay RayJob, Prometheus and Grafana files.

No cluster runs here, so the files are validated statically: parsed, required
fields present (Ray's own cluster-config schema for the launcher YAML; the
KubeRay v1 field names for the RayJob), and the resources of every worker group
consistent with the role resources of the config the job runs.
"""

import json
import math
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from dgrpo.config import TrainConfig, load_config
from dgrpo.orchestration.cluster import required_resources, role_options
from dgrpo.entrypoints.tune import trial_bundles

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
ROLES = ("rollout", "learner", "judge")
SECRET_WORDS = re.compile(r"(token|secret|password|api_?key|access_?key)", re.I)


def load_yaml(rel):
    return yaml.safe_load((DEPLOY / rel).read_text())


def cluster_cfg() -> TrainConfig:
    return load_config(TrainConfig, DEPLOY / "configs" / "cluster.yaml")


def role_cfg(cfg: TrainConfig, role: str):
    return getattr(cfg.resources, role)


def role_count(cfg: TrainConfig, role: str) -> int:
    return getattr(role_cfg(cfg, role), "num_workers", 1)


def actors_per_node(node: dict, rc) -> int:
    """How many actors of a role (num_cpus, num_gpus, custom_resources) fit on a node with `node` resources."""
    need = {"CPU": rc.num_cpus, "GPU": rc.num_gpus, **rc.custom_resources}
    fits = [math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0]
    return min(fits) if fits else 10**9


def check_groups_match_roles(groups: dict[str, tuple[dict, int]], cfg: TrainConfig, where: str) -> None:
    """groups: name -> (node resources, guaranteed node count). Each role's marker is advertised by exactly
    one group, and that group's guaranteed nodes hold all of the role's actors."""
    for role in ROLES:
        rc = role_cfg(cfg, role)
        assert len(rc.custom_resources) == 1, f"{role}: one marker resource maps it onto its worker group"
        marker = next(iter(rc.custom_resources))
        owners = [name for name, (res, _) in groups.items() if res.get(marker)]
        assert len(owners) == 1, f"{where}: {marker} must be advertised by exactly one group, got {owners}"
        res, nodes = groups[owners[0]]
        per_node = actors_per_node(res, rc)
        assert per_node >= 1, f"{where}: one {role} actor ({rc}) does not fit a {owners[0]} node {res}"
        assert per_node * nodes >= role_count(cfg, role), \
            f"{where}: {owners[0]} holds {per_node} x {nodes} {role} actors, the config runs {role_count(cfg, role)}"
        if rc.num_gpus > 0:
            assert res.get("GPU", 0) > 0, f"{where}: {role} uses GPUs but {owners[0]} has none"


def no_literal_secrets(tree, where: str) -> None:
    if isinstance(tree, dict):
        if "name" in tree and "value" in tree and SECRET_WORDS.search(str(tree["name"])):
            raise AssertionError(f"{where}: secret-looking env var {tree['name']} has a literal value")
        for k, v in tree.items():
            if SECRET_WORDS.search(str(k)) and isinstance(v, str) and len(v) >= 16 and v[:1] not in "/~$":
                raise AssertionError(f"{where}: {k} holds a literal value")
            no_literal_secrets(v, where)
    elif isinstance(tree, list):
        for v in tree:
            no_literal_secrets(v, where)


# -- job submission -------------------------------------------------------------------------------------------

def test_runtime_env_is_valid_and_holds_no_secrets():
    from ray.runtime_env import RuntimeEnv
    env = load_yaml("runtime_env.yaml")
    RuntimeEnv(**env)  # Ray's own validation of the fields
    assert {".venv/", ".git/", "runs/"} <= set(env["excludes"])
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    # `dgrpo train` sets OMP_NUM_THREADS through ray.init; Ray rejects a job env that sets it too
    assert "OMP_NUM_THREADS" not in env["env_vars"]
    assert not any(SECRET_WORDS.search(k) for k in env["env_vars"])


def test_submit_script_is_the_documented_command():
    script = (DEPLOY / "submit.sh").read_text()
    assert subprocess.run(["bash", "-n", str(DEPLOY / "submit.sh")]).returncode == 0
    assert "ray job submit" in script and "--working-dir ." in script
    assert "--runtime-env deploy/runtime_env.yaml" in script and "-- dgrpo train --config" in script
    assert 'RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"' in script
    docs = (REPO / "docs" / "OPERATIONS.md").read_text()
    assert "ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env deploy/runtime_env.yaml" \
        in " ".join(docs.replace("\\\n", " ").split())
    load_config(TrainConfig, DEPLOY / "configs" / "tiny.yaml")


# -- cluster launcher -------------------------------------------------------------------------------------------

def launcher_groups(cfg: dict) -> dict[str, tuple[dict, int]]:
    return {name: (t.get("resources", {}), t.get("min_workers", 0) if name != cfg["head_node_type"] else 1)
            for name, t in cfg["available_node_types"].items()}


def test_cluster_launcher_yaml_passes_ray_schema_and_fits_the_roles():
    from ray.autoscaler._private.util import fillout_defaults, validate_config
    raw = load_yaml("cluster/ray_cluster.yaml")
    validate_config(fillout_defaults(raw))
    broken = json.loads(json.dumps(raw))
    broken["available_node_types"]["rollout_gpu"]["min_workers"] = "two"
    with pytest.raises(Exception):
        validate_config(fillout_defaults(broken))

    cfg = cluster_cfg()
    groups = launcher_groups(raw)
    head = raw["available_node_types"][raw["head_node_type"]]
    assert not set(head["resources"]) - {"CPU", "memory"}, "the head carries no role marker"
    check_groups_match_roles(groups, cfg, "ray_cluster.yaml")
    total_max = sum(t["max_workers"] for n, t in raw["available_node_types"].items() if n != raw["head_node_type"])
    assert total_max <= raw["max_workers"]
    for name, t in raw["available_node_types"].items():
        assert t["min_workers"] <= t["max_workers"]
    starts = " ".join(raw["head_start_ray_commands"] + raw["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2 and starts.count("--metrics-export-port=8080") == 2
    assert "--dashboard-host=127.0.0.1" in starts
    assert raw["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}  # token copied, never stored
    no_literal_secrets(raw, "ray_cluster.yaml")


# -- KubeRay -----------------------------------------------------------------------------------------------------

# field names of KubeRay's ray.io/v1 RayJobSpec / RayClusterSpec / HeadGroupSpec / WorkerGroupSpec
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
               "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
               "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
               "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule"}
CLUSTER_SPEC = {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions",
                "headServiceAnnotations", "suspend"}
HEAD_SPEC = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_SPEC = {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams", "template",
               "scaleStrategy"}


def cpu_quantity(q) -> float:
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def pod_resources(group: dict) -> dict:
    params = group["rayStartParams"]
    res = {"CPU": float(params["num-cpus"]), "GPU": float(params.get("num-gpus", 0))}
    if "resources" in params:
        res.update(json.loads(json.loads(params["resources"])))  # KubeRay's quoted-JSON form
    return res


def test_kuberay_rayjob_fields_and_resources():
    import ray
    job = load_yaml("kuberay/rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC, set(spec) - RAYJOB_SPEC
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "InteractiveMode")
    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= CLUSTER_SPEC and set(cluster["headGroupSpec"]) <= HEAD_SPEC
    assert cluster["rayVersion"] == ray.__version__
    yaml.safe_load(spec["runtimeEnvYAML"])

    # the entrypoint runs a config of this repository (the image holds it at /home/ray/diffusion-grpo)
    m = re.fullmatch(r"dgrpo train --config /home/ray/diffusion-grpo/(\S+)", spec["entrypoint"])
    assert m, spec["entrypoint"]
    cfg = load_config(TrainConfig, REPO / m.group(1))
    assert cfg == cluster_cfg()

    groups = {}
    workers = cluster["workerGroupSpecs"]
    assert sorted(g["groupName"] for g in workers) == sorted(ROLES)
    images = set()
    for g in workers:
        assert set(g) <= WORKER_SPEC, set(g) - WORKER_SPEC
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert all(isinstance(v, str) for v in g["rayStartParams"].values()), "rayStartParams values are strings"
        (container,) = g["template"]["spec"]["containers"]
        images.add(container["image"])
        limits = container["resources"]["limits"]
        res = pod_resources(g)
        assert cpu_quantity(limits["cpu"]) == res["CPU"], g["groupName"]
        assert float(limits.get("nvidia.com/gpu", 0)) == res["GPU"], g["groupName"]
        assert container["resources"]["requests"] == limits
        assert {"containerPort": 8080, "name": "metrics"} in container["ports"]
        assert g["rayStartParams"]["metrics-export-port"] == "8080"
        groups[g["groupName"]] = (res, g["minReplicas"])
    head = cluster["headGroupSpec"]
    (head_container,) = head["template"]["spec"]["containers"]
    images.add(head_container["image"])
    images.add(spec["submitterPodTemplate"]["spec"]["containers"][0]["image"])
    assert len(images) == 1
    assert "resources" not in head["rayStartParams"], "the head carries no role marker"
    groups["head"] = ({"CPU": float(head["rayStartParams"]["num-cpus"])}, 1)
    check_groups_match_roles(groups, cfg, "rayjob.yaml")
    # each role is served by the group of the same name
    for role in ROLES:
        marker = next(iter(role_cfg(cfg, role).custom_resources))
        assert marker in groups[role][0]
    # token auth everywhere, from a Secret
    for c in [head_container, *(g["template"]["spec"]["containers"][0] for g in workers),
              *spec["submitterPodTemplate"]["spec"]["containers"]]:
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
    no_literal_secrets(job, "rayjob.yaml")


def test_role_resources_map_onto_actor_options_and_tune_bundles(monkeypatch):
    import dgrpo.orchestration.cluster as cluster
    monkeypatch.setattr(cluster, "get_current_placement_group", lambda: None)  # outside Ray: would auto-init it
    cfg = cluster_cfg()
    for role in ROLES:
        rc = role_cfg(cfg, role)
        opts = role_options(rc)
        assert opts["num_cpus"] == rc.num_cpus and opts["num_gpus"] == rc.num_gpus
        assert opts["resources"] == rc.custom_resources
    need = required_resources(cfg)
    assert need == {"CPU": 8 * 4 + 2 * 3 + 8, "GPU": 8 * 1 + 2 * 0.5 + 1}
    # a Tune trial's bundles carry the markers too, so they land on the right groups
    bundles = trial_bundles(cfg, 1.0)
    assert sum("dgrpo_rollout" in b for b in bundles) == 8 and sum("dgrpo_judge" in b for b in bundles) == 2


def test_scaling_rollout_workers_changes_only_rollout_resources():
    base = cluster_cfg()
    more = load_config(TrainConfig, DEPLOY / "configs" / "cluster.yaml", ["resources.rollout.num_workers=12"])
    a, b = base.model_dump(), more.model_dump()
    a["resources"]["rollout"].pop("num_workers"), b["resources"]["rollout"].pop("num_workers")
    assert a == b  # nothing else in the config moves
    da, db = required_resources(base), required_resources(more)
    r = base.resources.rollout
    assert db["CPU"] - da["CPU"] == 4 * r.num_cpus and db["GPU"] - da["GPU"] == 4 * r.num_gpus
    # the launcher's rollout group can grow to 12 workers (max_workers nodes of 4 GPUs)
    raw = load_yaml("cluster/ray_cluster.yaml")
    node = raw["available_node_types"]["rollout_gpu"]
    assert actors_per_node(node["resources"], r) * node["max_workers"] >= 12


# -- metrics -------------------------------------------------------------------------------------------------------

def exported_metric_names() -> set[str]:
    """Prometheus names (ray_ prefix) of every metric the driver and actors define."""
    from dgrpo.orchestration.metrics import DRIVER_GAUGES
    names = {f"ray_{n}" for n in DRIVER_GAUGES} | {"ray_dgrpo_phase"}
    src = (REPO / "dgrpo" / "actors" / "telemetry.py").read_text()
    names |= {f"ray_{n}" for n in re.findall(r'm\.(?:Gauge|Counter|Histogram)\("([a-z0-9_]+)"', src)}
    return names


def test_prometheus_config_and_podmonitor():
    prom = load_yaml("prometheus/prometheus.yml")
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    # one job: a second one on a node the service-discovery file lists too would store every series twice
    assert list(jobs) == ["ray"]
    assert jobs["ray"]["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
    assert prom["rule_files"] == ["rules.yml"] and (DEPLOY / "prometheus" / "rules.yml").is_file()
    pm = load_yaml("prometheus/podmonitor.yaml")
    assert pm["kind"] == "PodMonitor" and pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def test_grafana_dashboard_queries_only_exported_metrics_and_covers_them_all():
    dash = json.loads((DEPLOY / "grafana" / "dgrpo_dashboard.json").read_text())
    assert dash["uid"] and dash["title"] and dash["panels"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    used = set()
    for p in dash["panels"]:
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
            for name in re.findall(r"\bray_dgrpo_[a-z0-9_]+", t["expr"]):
                used.add(re.sub(r"_(bucket|sum|count|total)$", "", name))
    defined = exported_metric_names()
    defined_base = {re.sub(r"_total$", "", n) for n in defined}
    assert used <= defined_base, used - defined_base
    assert defined_base <= used, f"not on the dashboard: {defined_base - used}"
