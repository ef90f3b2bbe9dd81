"""Ray clusters of `ray start` processes on this machine, for tests: a head and worker nodes.

Each `ray start` runs in a process session of its own, so a node is exactly the processes of
that session (raylet, agents, log monitor, and the actor workers its raylet forks): killing the
session is losing the node, and stopping the cluster stops exactly what it started, by PID
(`ray stop` would stop every Ray instance on the machine). Every port is picked free on
127.0.0.1; the cluster has its own temp dir (worker nodes on the same machine share the head's)
and its own auth token (RAY_AUTH_TOKEN_PATH), so it cannot collide with other clusters here.

Ray 2.60 registers a node started with `--node-ip-address 127.0.0.1` under the host's own
routable address (ray._private.services.resolve_ip_for_localhost), and most of its servers bind
all interfaces: `listening()` reports what each node listens on.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"  # zombies are gone, only not yet reaped
    except (FileNotFoundError, IndexError):
        return False


def stop_session(sid: int, grace_s: float = 3.0, signals=(signal.SIGTERM, signal.SIGKILL)) -> list[int]:
    """Sends each signal in turn to every process of the session `ray start` ran in. -> the pids signalled."""
    signalled = set()
    for sig in signals:
        for pid in session_pids(sid):
            try:
                os.kill(pid, sig)
                signalled.add(pid)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_s
        while time.time() < deadline and any(alive(p) for p in session_pids(sid)):
            time.sleep(0.2)
    return sorted(signalled)


def ray_env(**extra: str) -> dict:
    env = dict(os.environ, RAY_AUTH_MODE="token", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


def listening_sockets(pids: set[int]) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket the processes `pids` hold (from /proc)."""
    table = {}
    for name, v6 in (("tcp", False), ("tcp6", True)):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A":  # LISTEN
                continue
            ip, port = f[1].split(":")
            raw = bytes.fromhex(ip)
            if v6:
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                addr = socket.inet_ntop(socket.AF_INET6, raw).removeprefix("::ffff:")  # IPv4-mapped
            else:
                addr = socket.inet_ntop(socket.AF_INET, raw[::-1])
            table[f[9]] = (addr, int(port, 16))
    found = []
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in table:
                found.append((*table[link[8:-1]], name))
    return sorted(set(found))


@dataclass
class Node:
    name: str
    sid: int  # the process session of its `ray start`
    node_manager_port: int
    resources: dict = field(default_factory=dict)
    ports: dict = field(default_factory=dict)  # port -> what `ray start` was told to serve there
    started_s: float = 0.0
    killed: bool = False


class LocalCluster:
    """A head (with the dashboard, i.e. the job server, on 127.0.0.1) and worker nodes added by name."""

    def __init__(self, num_cpus_head: float = 1, system_config: dict | None = None):
        self.temp_dir = tempfile.mkdtemp(prefix="dgmn_", dir="/tmp")  # short: Ray's unix sockets live under it
        self.token_path = Path(self.temp_dir) / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        self.env = ray_env(RAY_AUTH_TOKEN_PATH=str(self.token_path), PYTHONPATH=str(REPO))
        self.gcs_port, self.dashboard_port, self.client_port = free_ports(3)
        self.nodes: dict[str, Node] = {}
        head = ["--head", "--port", str(self.gcs_port), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                "--dashboard-port", str(self.dashboard_port), "--ray-client-server-port", str(self.client_port),
                "--temp-dir", self.temp_dir]
        if system_config:
            head += ["--system-config", json.dumps(system_config)]
        try:
            self.head = self._start("head", head, {}, num_cpus_head)
        except BaseException:
            self.stop()
            raise

    @property
    def address(self) -> str:
        """The GCS address a driver joins (RAY_ADDRESS / run.ray_address)."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        """The dashboard URL `ray job submit --address` takes."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str], resources: dict, num_cpus: float) -> Node:
        node_mgr, obj_mgr, metrics, agent_http, agent_grpc, rt_env = free_ports(6)
        ports = {node_mgr: "node manager", obj_mgr: "object manager", metrics: "metrics export",
                 agent_http: "dashboard agent HTTP", agent_grpc: "dashboard agent gRPC", rt_env: "runtime env agent"}
        if name == "head":
            ports.update({self.gcs_port: "GCS", self.dashboard_port: "dashboard", self.client_port: "Ray Client"})
        cmd = [str(BIN / "ray"), "start", *args, "--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus),
               "--resources", json.dumps(resources), "--node-manager-port", str(node_mgr),
               "--object-manager-port", str(obj_mgr), "--metrics-export-port", str(metrics),
               "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
               "--runtime-env-agent-port", str(rt_env), "--include-log-monitor", "false", "--disable-usage-stats"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=self.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        node = Node(name, proc.pid, node_mgr, resources, ports)  # pid = the session id of all it spawns
        self.nodes[name] = node
        try:
            out, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise RuntimeError(f"ray start of node {name} did not finish in 240 s") from None
        if proc.returncode != 0:
            raise RuntimeError(f"ray start of node {name} failed ({proc.returncode}):\n{out[-3000:]}")
        node.started_s = time.perf_counter() - t0
        return node

    def add_nodes(self, specs: dict[str, dict], num_cpus: float = 1) -> list[Node]:
        """Starts worker nodes {name: custom resources}, one after the other (a raylet has 30 s to register,
        which nodes started side by side on a loaded 2-core machine miss), trying each twice."""
        nodes = []
        for name, resources in specs.items():
            try:
                nodes.append(self._start(name, ["--address", self.address], resources, num_cpus))
            except RuntimeError as e:
                print(f"{e}\nstarting {name} again")
                stop_session(self.nodes.pop(name).sid)
                nodes.append(self._start(name, ["--address", self.address], resources, num_cpus))
        return nodes

    def kill_node(self, name: str) -> list[int]:
        """Loses the node: SIGKILL to every process of its session (raylet, agents, its actors). -> pids."""
        node = self.nodes[name]
        node.killed = True
        return stop_session(node.sid, signals=(signal.SIGKILL,))

    def live(self, marker: str) -> list[str]:
        return [n.name for n in self.nodes.values() if not n.killed and marker in n.resources]

    def node_ids(self) -> dict[str, str]:
        """name -> Ray node id of every node ever started (matched by node manager port)."""
        code = ("import json, ray; ray.init(address='auto', log_to_driver=False); "
                "print('NODES ' + json.dumps([[n['NodeID'], n['NodeManagerPort'], n['NodeManagerAddress'], "
                "n['Alive']] for n in ray.nodes()]))")
        env = dict(self.env, RAY_ADDRESS=self.address)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("NODES ")), None)
        if line is None:
            raise RuntimeError(f"could not list the nodes: {out.stderr[-2000:]}")
        by_port = {port: node_id for node_id, port, _addr, _alive in json.loads(line[6:])}
        self.addresses = {port: addr for _id, port, addr, _alive in json.loads(line[6:])}
        return {n.name: by_port[n.node_manager_port] for n in self.nodes.values() if n.node_manager_port in by_port}

    def listening(self) -> dict[str, list[tuple[str, int, str, str]]]:
        """node name -> (address, port, process, what the port is for) of its processes' listening TCP sockets;
        ports `ray start` was not given are a worker's (actors, the job driver) or Ray's own choice."""
        return {n.name: [(a, p, proc, n.ports.get(p, "worker" if proc.startswith("ray::") and proc != "ray::DashboardA"
                                                   and proc != "ray::RuntimeEnv" else "other"))
                         for a, p, proc in listening_sockets(set(session_pids(n.sid)))]
                for n in self.nodes.values() if not n.killed}

    def stop(self) -> None:
        """Stops every process of every node started, by session; removes the temp dir."""
        for node in reversed(list(self.nodes.values())):
            stop_session(node.sid)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        left = [p for n in self.nodes.values() for p in session_pids(n.sid) if alive(p)]
        assert not left, f"ray processes left running: {left}"
