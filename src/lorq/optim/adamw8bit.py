"""AdamW with 8-bit states (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization").

Both moments live as uint8 codes, one fp32 absmax per block of 256: m on the signed dynamic
tree map (lorq.quant.nf), v (never negative) on an unsigned one whose sign bit becomes one
more fraction bit. Each value is rounded to its nearest level exactly (binary search; a fixed
grid would flush the small entries that dominate optimizer states to 0). Tensors smaller than
`min_8bit_size` keep fp32 states, as bitsandbytes does.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from ..quant.nf import blocks, dynamic_map_8bit

BLOCK = 256


@lru_cache(maxsize=None)
def dynamic_map_unsigned() -> torch.Tensor:
    """Unsigned 8-bit dynamic map, sorted: for exponent e = 0..7, 2**e fraction levels (midpoints
    of linspace(0.1, 1, 2**e + 1)) scaled by 10**(e - 7); the smallest level gives way to 1."""
    values: list[float] = []
    for e in range(8):
        edges = torch.linspace(0.1, 1.0, 2**e + 1)
        values += (10.0 ** (e - 7) * (edges[:-1] + edges[1:]) / 2.0).tolist()
    return torch.tensor(sorted(sorted(values)[1:] + [0.0, 1.0]), dtype=torch.float32)


@lru_cache(maxsize=None)
def levels(signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    code = dynamic_map_8bit() if signed else dynamic_map_unsigned()
    return code, 0.5 * (code[:-1] + code[1:])  # levels, decision midpoints


def pack8(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (codes uint8 (numel,), absmax fp32 (n_blocks,)), nearest level per value."""
    xb = blocks(x.reshape(-1), BLOCK)  # (n_blocks, 256)
    absmax = xb.abs().amax(dim=1)
    _, mid = levels(signed)
    codes = torch.searchsorted(mid.to(x.device), (xb / absmax.clamp_min(1e-30)[:, None]).contiguous())
    return codes.to(torch.uint8).reshape(-1)[: x.numel()], absmax


def unpack8(codes: torch.Tensor, absmax: torch.Tensor, shape, signed: bool) -> torch.Tensor:
    code, _ = levels(signed)
    values = blocks(code.to(codes.device)[codes.long()], BLOCK) * absmax[:, None]
    return values.reshape(-1)[: codes.numel()].reshape(shape)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter 2019) whose m and v are kept in 8 bits between steps."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 min_8bit_size: int = 4096):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.min_8bit_size = min_8bit_size

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts every state tensor to its parameter's dtype on load: codes back to uint8."""
        super().load_state_dict(state_dict)
        for st in self.state.values():
            for key in ("m_codes", "v_codes"):
                if key in st:
                    st[key] = st[key].to(torch.uint8)
            for key in ("m_absmax", "v_absmax", "m", "v"):
                if key in st:
                    st[key] = st[key].float()

    def moments(self, st: dict, g: torch.Tensor, small: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if small:
            return st.setdefault("m", torch.zeros_like(g)), st.setdefault("v", torch.zeros_like(g))
        if "m_codes" not in st:
            return torch.zeros_like(g), torch.zeros_like(g)
        return (unpack8(st["m_codes"], st["m_absmax"], g.shape, signed=True),
                unpack8(st["v_codes"], st["v_absmax"], g.shape, signed=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                st = self.state[p]
                small = p.numel() < self.min_8bit_size
                st["step"] = st.get("step", torch.zeros(())) + 1
                t = float(st["step"])
                m, v = self.moments(st, g, small)
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                denom = (v / (1 - b2**t)).sqrt_().add_(group["eps"])
                p.add_((m / (1 - b1**t) / denom).to(p.dtype), alpha=-group["lr"])
                if not small:
                    st["m_codes"], st["m_absmax"] = pack8(m, signed=True)
                    st["v_codes"], st["v_absmax"] = pack8(v, signed=False)
        return loss
