"""Optimizers for pretraining and judge training: Muon with the Newton-Schulz iteration in fp32,
a wrapper that steps several optimizers as one, and make_optimizer that builds either (pure torch)."""

from __future__ import annotations

import torch


def orthogonalize(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                  eps: float) -> torch.Tensor:
    """Newton-Schulz approximation of U V^T for a batch of matrices g (N, rows, cols), as in
    torch.optim.Muon (its quintic coefficients), batched so same-shaped matrices share calls.

    Each iteration is x <- p(A) x with A = x x^T and p(A) = aI + bA + cA^2 (x wide: rows <= cols).
    For a rectangular x the iteration runs on the small side alone: every iterate is Q x_0 with Q
    a polynomial in A_0, so Q <- p(A) Q and A <- p(A) A p(A) (m x m products), and x_0 is
    multiplied once at the end: fewer flops than the direct form when rows << cols, the same
    result to fp32 rounding (tests/test_optim.py); square matrices gain nothing from it and
    keep the direct form."""
    a, b, c = coefficients
    tall = g.size(1) > g.size(2)
    x = g.mT if tall else g
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)  # spectral norm <= 1
    if x.size(1) == x.size(2):
        for _ in range(steps):
            gram = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        return x
    gram = x @ x.mT
    q = None
    for k in range(steps):
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # bA + cA^2
        poly.diagonal(dim1=1, dim2=2).add_(a)  # + aI
        q = poly if q is None else poly @ q
        if k + 1 < steps:
            gram = poly @ gram @ poly
    x = q @ x
    return x.mT if tall else x


class Muon(torch.optim.Muon):
    """torch.optim.Muon, with the orthogonalisation run in the parameters' dtype (fp32 here)
    instead of bf16, batched over matrices of one shape.

    PyTorch's Muon casts to bf16 for Newton-Schulz; on a CPU without native bf16 (AVX2
    only) that is emulated and makes pretraining several times slower (docs/RESULTS.md).
    The update, its state (`momentum_buffer`) and the lr scaling are torch's. A param group with `split: n` treats each of its matrices as n
    stacked blocks of rows, each orthogonalised (and lr-scaled) as a matrix of its own.
    """

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            split = group.get("split", 1)  # a fused matrix (e.g. q, k, v stacked) orthogonalised per block
            by_shape: dict[tuple, list] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buf.lerp_(p.grad, 1 - group["momentum"])
                g = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                g = g.view(split, p.size(0) // split, p.size(1))
                by_shape.setdefault(tuple(g.shape[1:]), []).append((p, g))
            for shape, items in by_shape.items():
                updates = orthogonalize(torch.cat([g for _, g in items]), group["ns_coefficients"],
                                        group["ns_steps"], group["eps"])
                lr = torch.optim._muon._adjust_lr(group["lr"], group["adjust_lr_fn"], torch.Size(shape))
                for (p, _), update in zip(items, updates.split(split)):
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(update.view_as(p), alpha=-lr)
        return loss


class ChainedOptimizer:
    """Several torch optimizers stepped as one, with one merged state_dict (parameter ids
    numbered across them in order) so a checkpoint holds a single optimizer file."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def state_dict(self) -> dict:
        state, groups, offset = {}, [], 0
        for opt in self.optimizers:
            sd = opt.state_dict()
            state.update({offset + i: s for i, s in sd["state"].items()})
            groups += [{**g, "params": [offset + i for i in g["params"]]} for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in sd["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict) -> None:
        groups = sd["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"{len(groups)} parameter groups saved, this optimizer has {len(self.param_groups)}")
        offset = 0
        for opt in self.optimizers:
            own, groups = groups[:len(opt.param_groups)], groups[len(opt.param_groups):]
            n = sum(len(g["params"]) for g in own)
            opt.load_state_dict({
                "state": {i - offset: s for i, s in sd["state"].items() if offset <= i < offset + n},
                "param_groups": [{**g, "params": [i - offset for i in g["params"]]} for g in own]})
            offset += n


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas,
                   kind: str = "adamw", split_qkv: bool = False) -> torch.optim.Optimizer | ChainedOptimizer:
    """AdamW on everything, or Muon on the hidden weight matrices (attention and MLP) with
    AdamW on embeddings, head and norms. Muon's step is scaled to AdamW's update RMS
    ("match_rms_adamw"), so both use the same lr and the same schedule. split_qkv: Muon
    orthogonalises the query, key and value blocks of the fused qkv matrix one by one."""
    if kind not in ("adamw", "muon"):
        raise ValueError(f"unknown optimizer {kind!r}; choose adamw or muon")
    params = dict(model.named_parameters())
    hidden = [n for n, p in params.items() if p.dim() == 2 and ".blocks." in f".{n}"]
    decay = [p for n, p in params.items() if p.dim() >= 2 and (kind == "adamw" or n not in hidden)]
    no_decay = [p for p in params.values() if p.dim() < 2]
    adamw = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=tuple(betas))
    if kind == "adamw":
        return adamw
    qkv = [n for n in hidden if split_qkv and n.endswith("attn.qkv.weight")]
    groups = [{"params": [params[n] for n in hidden if n not in qkv]}]
    if qkv:
        groups.append({"params": [params[n] for n in qkv], "split": 3})
    muon = Muon(groups, lr=lr, weight_decay=weight_decay, momentum=0.95, adjust_lr_fn="match_rms_adamw")
    return ChainedOptimizer(muon, adamw)
