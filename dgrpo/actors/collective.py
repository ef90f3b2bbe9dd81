"""The weight broadcast as a collective (run.weight_sync: collective): torch.distributed, gloo on CPU, NCCL on CUDA.

The learner is rank 0 and the source; the rollout workers the driver names as members are ranks 1..n.
The learner hosts the rendezvous, a TCPStore on its node made once for the run; each membership of the
group (an epoch) keys its own part of the store. When the members change, or a broadcast failed, the
driver opens a new epoch: each member leaves its old process group and joins the new one in the same
call that carries the broadcast. The state_dict tensors go in buckets of at most BUCKET_BYTES (one
broadcast per bucket, not per tensor: a small model has hundreds of tensors), received into the model in
place, so that a member holds at most one bucket beside its weights. A member first checks that its model
has the learner's layout (names, dtypes, shapes), which a digest in the spec carries.
"""

from __future__ import annotations

import datetime
import hashlib
import time

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

BUCKET_BYTES = 32 * 2**20


def layout_digest(module: torch.nn.Module) -> str:
    """A digest of the module's state_dict layout: names, dtypes and shapes, in order."""
    text = ";".join(f"{k}:{t.dtype}:{tuple(t.shape)}" for k, t in module.state_dict().items())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def backend_for(device: torch.device) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def buckets(tensors: list[torch.Tensor], limit: int = BUCKET_BYTES) -> list[list[torch.Tensor]]:
    """Consecutive tensors of one dtype, at most `limit` bytes a bucket (a larger tensor alone)."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        n = t.numel() * t.element_size()
        if not out or out[-1][0].dtype != t.dtype or size + n > limit:
            out.append([])
            size = 0
        out[-1].append(t)
        size += n
    return out


def broadcast_tensors(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Rank `src` sends `tensors`; every other rank receives them into its own tensors of the same layout."""
    receiving = dist.get_rank() != src
    for bucket in buckets(tensors):
        if len(bucket) == 1 and bucket[0].is_contiguous():
            dist.broadcast(bucket[0], src=src)
            continue
        flat = _flatten_dense_tensors(bucket)
        dist.broadcast(flat, src=src)
        if receiving:
            for t, value in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                t.copy_(value)


class BroadcastMember:
    """This process's part in the weight broadcast: the process group of the current epoch, if any."""

    def __init__(self):
        self.epoch: int | None = None
        self.store = None  # the rendezvous: the learner's own (the server), or a client of it

    def host(self, module: torch.nn.Module, device, timeout_s: float) -> dict:
        """Rank 0: starts the rendezvous (once) -> what every member's spec holds of it."""
        import ray
        if self.store is None:
            self.store = dist.TCPStore(ray.util.get_node_ip_address(), 0, is_master=True, wait_for_workers=False,
                                       timeout=datetime.timedelta(seconds=timeout_s))
        return {"host": self.store.host, "port": self.store.port, "layout": layout_digest(module),
                "backend": backend_for(device)}

    def join(self, spec: dict) -> None:
        """Joins the process group of spec["epoch"] (blocks until every member has), leaving any older one."""
        if self.epoch == spec["epoch"] and dist.is_initialized():
            return
        self.leave()
        timeout = datetime.timedelta(seconds=spec["timeout_s"])
        if spec["rank"] != 0 and self.store is None:
            self.store = dist.TCPStore(spec["host"], spec["port"], is_master=False, timeout=timeout)
        dist.init_process_group(spec["backend"], store=dist.PrefixStore(f"epoch{spec['epoch']}/", self.store),
                                rank=spec["rank"], world_size=spec["world_size"], timeout=timeout)
        self.epoch = spec["epoch"]

    def leave(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        self.epoch = None

    def broadcast(self, module: torch.nn.Module, spec: dict) -> dict:
        """Takes part in the broadcast of spec["epoch"]: rank 0 sends its module's tensors, the others receive
        them into theirs in place. -> {"ok": True, "seconds"} or, when a member was lost or the group timed
        out, {"ok": False, "error"} (this member has left the group; the driver opens a new epoch)."""
        if spec["rank"] != 0 and layout_digest(module) != spec["layout"]:
            raise ValueError(f"the model of broadcast member {spec['rank']} has another state_dict layout than the "
                             f"learner's; build every role's model from the same config")
        t0 = time.perf_counter()
        try:
            self.join(spec)
            with torch.no_grad():
                broadcast_tensors(list(module.state_dict().values()), src=0)
        except (RuntimeError, dist.DistError) as e:  # a member died or hung: this group is done for
            self.leave()
            return {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        return {"ok": True, "seconds": time.perf_counter() - t0}
