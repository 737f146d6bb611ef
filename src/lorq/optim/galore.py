"""GaLore (Zhao et al. 2024): full-parameter training whose Adam states live in a rank-r
projection of each weight matrix's gradient.

For W (m, n) with gradient G: every `update_gap` steps P = the top-r singular vectors of G on
the smaller side; in between, R = Pᵀ G (r, n) (or G P (m, r)), Adam runs on R, and the update
is projected back, W -= lr · scale · P N(R). Matrices not in a projected group (embeddings,
norms) get plain AdamW. `layerwise`: each parameter is updated in its gradient hook during
backward and its gradient freed at once (GaLore's per-layer updates), so the model's full
gradient is never held; the global norm cannot be clipped then, each parameter's gradient is
clipped to max_grad_norm on its own.

`states="int8"` is the paper's 8-bit GaLore: the Adam moments (projected ones and those of the
unprojected embeddings) are kept as block-wise 8-bit codes, as 8-bit AdamW keeps them; tensors
under 4096 values (norms) keep fp32 moments, as bitsandbytes does.

Sharded (FSDP) weights: a projected matrix's gradient is gathered whole (the projection needs
all of it), every rank computes the same update from it and applies its own rows; the
projected states are small and held whole by every rank.
"""

from __future__ import annotations

import math

import torch

from ..adapters.init import top_svd
from ..train.distributed import full, place
from .adamw8bit import MIN_8BIT_SIZE, adam_direction, adam_direction_8bit, adam_moments, restore_8bit_dtypes


def projection(G: torch.Tensor, rank: int, iters: int) -> tuple[torch.Tensor, bool]:
    """(P, left): left singular vectors (m, r) when m <= n, else right ones (n, r), in their own
    storage: top_svd's are views into its (m, 2r + 8) sketch, which a kept state would hold
    whole (twice the memory, and a checkpoint saves the whole storage)."""
    m, n = G.shape
    U, S, V = top_svd(G, rank, iters)
    return (U.clone(), True) if m <= n else (V.clone(), False)


def project(G: torch.Tensor, P: torch.Tensor, left: bool) -> torch.Tensor:
    return P.T @ G if left else G @ P  # (r, n) or (m, r)


def project_back(N: torch.Tensor, P: torch.Tensor, left: bool) -> torch.Tensor:
    return P @ N if left else N @ P.T  # (m, n)


def add_projected_back(W: torch.Tensor, N: torch.Tensor, P: torch.Tensor, left: bool, alpha: float) -> torch.Tensor:
    """W += alpha · project_back(N, P), in place: one addmm, no (m, n) temporary."""
    return W.addmm_(P, N, alpha=alpha) if left else W.addmm_(N, P.T, alpha=alpha)


def adam_state_direction(st: dict, g: torch.Tensor, betas, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """One Adam step's direction for gradient g with fp32 moments kept in st, built in one tensor
    the size of g, `out` if given (g itself may be it): a chain of temporaries for the
    full-size embedding state cost GaLore ~0.2 GiB of peak memory on SmolLM2-135M."""
    if "exp_avg" not in st:
        st["exp_avg"], st["exp_avg_sq"], st["adam_step"] = torch.zeros_like(g), torch.zeros_like(g), 0
    st["adam_step"] += 1
    adam_moments(st["exp_avg"], st["exp_avg_sq"], g, betas)
    return adam_direction(st["exp_avg"], st["exp_avg_sq"], st["adam_step"], betas, eps, out)


def fp32_moments(st: dict, g: torch.Tensor, group: dict, out: torch.Tensor | None = None) -> torch.Tensor:
    return adam_state_direction(st, g, group["betas"], group["eps"], out)


def int8_moments(st: dict, g: torch.Tensor, group: dict, out: torch.Tensor | None = None) -> torch.Tensor:
    if g.numel() < MIN_8BIT_SIZE:
        return fp32_moments(st, g, group, out)
    st["adam_step"] = st.get("adam_step", 0) + 1
    return adam_direction_8bit(st, g, st["adam_step"], group["betas"], group["eps"], out)


# the group's `states` -> Adam's direction with its moments kept in that format
MOMENTS = {"fp32": fp32_moments, "int8": int8_moments}


def adam_direction_in(st: dict, g: torch.Tensor, group: dict, out: torch.Tensor | None = None) -> torch.Tensor:
    # a group restored from a checkpoint older than the option has no "states": it was fp32
    return MOMENTS[group.get("states", "fp32")](st, g, group, out)


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW; parameter groups with `rank` > 0 get GaLore's projected states."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 rank: int = 0, update_gap: int = 200, scale: float = 0.25, svd_iters: int = 2, states: str = "fp32"):
        if states not in MOMENTS:
            raise ValueError(f"GaLore states are one of {sorted(MOMENTS)}, not {states!r}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank, update_gap=update_gap,
                        scale=scale, svd_iters=svd_iters, states=states)
        super().__init__(params, defaults)
        self.hooked_norm_sq = 0.0
        self.clip = 0.0

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        restore_8bit_dtypes(self.state)

    def refresh_projection(self, st: dict, G: torch.Tensor, group: dict) -> None:
        # a bool, not a string: Optimizer.load_state_dict would turn a string into a generator
        st["P"], st["left"] = projection(G, min(group["rank"], *G.shape), group["svd_iters"])

    def projector(self, st: dict) -> torch.Tensor:
        return st["P"]

    def refresh_due(self, st: dict, group: dict) -> bool:
        return st["step"] % group["update_gap"] == 0

    def projected_adam(self, st: dict, g: torch.Tensor, group: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(N(Pᵀ g), P) (or their right-side twins), refreshing P when due."""
        st.setdefault("step", 0)
        if self.refresh_due(st, group):
            self.refresh_projection(st, g, group)
        st["step"] += 1
        P = self.projector(st)
        return adam_direction_in(st, project(g, P, st["left"]), group), P

    def projected_step(self, W: torch.Tensor, st: dict, g: torch.Tensor, group: dict) -> None:
        """W -= lr · scale · P N(Pᵀ g), in place (W whole: a plain tensor)."""
        N, P = self.projected_adam(st, g, group)
        add_projected_back(W, N, P, st["left"], -group["lr"] * group["scale"])

    def clipped(self, g: torch.Tensor) -> torch.Tensor:
        """A hooked matrix's gradient, its norm counted and clipped to `clip` on its own (in
        place: the hooks own the gradient, and a copy of the embeddings' is ~0.1 GiB)."""
        norm = float(g.norm())
        self.hooked_norm_sq += norm**2
        return g.mul_(self.clip / (norm + 1e-6)) if self.clip > 0 and norm > self.clip else g

    @torch.no_grad()
    def update(self, p: torch.Tensor, group: dict, consume: bool = False) -> None:
        """One step of p from p.grad (projected if the group has a rank). consume: p.grad is not
        needed afterwards, so an unprojected direction is built in its buffer."""
        g = p.grad.float()
        st = self.state[p]
        wd, lr = group["weight_decay"], group["lr"]
        if group["rank"] and g.dim() == 2:
            if p.dtype == torch.float32 and not hasattr(p, "device_mesh"):
                if wd:  # decay first: the update below is added to W in place
                    p.mul_(1 - lr * wd)
                self.projected_step(p, st, g, group)
                return
            # sharded or low-precision: the whole update, then this rank's part
            N, P = self.projected_adam(st, full(g), group)
            direction = place(group["scale"] * project_back(N, P, st["left"]), p)
        else:
            direction = adam_direction_in(st, g, group, out=g if consume else None)
        if wd:
            p.mul_(1 - lr * wd)
        p.add_(direction.to(p.dtype), alpha=-lr)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.update(p, group)
        return loss

    def attach_layerwise(self, clip: float) -> list:
        """Update every parameter (projected or not: the embeddings' gradient is the largest) in
        its gradient hook and free the gradient at once."""
        self.clip = clip
        handles = []
        for i, group in enumerate(self.param_groups):
            if group.get("int8"):  # int8 weights update from their own backward
                continue
            for p in group["params"]:  # the group by index: load_state_dict replaces the group dicts
                handles.append(p.register_post_accumulate_grad_hook(lambda p, i=i: self.hook(p, self.param_groups[i])))
        return handles

    @torch.no_grad()
    def hook(self, p: torch.Tensor, group: dict) -> None:
        self.clipped(p.grad)
        self.update(p, group, consume=True)
        p.grad = None

    def take_hooked_norm(self) -> float:
        n, self.hooked_norm_sq = math.sqrt(self.hooked_norm_sq), 0.0
        return n
