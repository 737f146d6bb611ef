"""AdamW with 8-bit states (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization").

Both moments live as uint8 codes, one fp32 absmax per block of 256: m on the signed dynamic
tree map (lorq.quant.nf), v (never negative) on an unsigned one whose sign bit becomes one
more fraction bit. Each value is rounded to its nearest level exactly (a fixed grid would flush
the small entries that dominate optimizer states to 0): the float's sign, exponent and top 8
mantissa bits pick a cell of a lookup table, and no cell holds more than one decision midpoint,
so one comparison settles the code (as a binary search would, ~8x faster on CPU). Tensors
smaller than `min_8bit_size` keep fp32 states, as bitsandbytes does.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from ..quant.nf import blocks, dynamic_map_8bit

BLOCK = 256
MIN_8BIT_SIZE = 4096  # smaller tensors keep fp32 moments, as in bitsandbytes


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


CELL_BITS = 8  # mantissa bits of a lookup cell: every cell then holds at most one midpoint of either map
SHIFT = 23 - CELL_BITS


def as_float(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int32).view(torch.float32)


@lru_cache(maxsize=None)
def nearest_level_table(signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """For each cell (the top 1 + 8 + CELL_BITS bits of a float32): (the code of the cell's
    smallest value, the one decision midpoint inside the cell or +inf). A value v of the cell
    then has code base + (v > midpoint), which is searchsorted(midpoints, v)."""
    _, mid = levels(signed)
    mid = mid.double()
    cells = torch.arange(1 << (32 - SHIFT), dtype=torch.int64)
    magnitude = cells & ((1 << (31 - SHIFT)) - 1)  # without the sign bit
    lo = as_float(magnitude << SHIFT).double()
    hi = as_float((magnitude + 1) << SHIFT).double()
    negative = cells >= (1 << (31 - SHIFT))
    start, end = torch.where(negative, -hi, lo), torch.where(negative, -lo, hi)  # v in [lo, hi) or (-hi, -lo]
    base = torch.where(negative, torch.searchsorted(mid, start, right=True), torch.searchsorted(mid, start))
    inside = torch.where(negative, torch.searchsorted(mid, end, right=True), torch.searchsorted(mid, end)) - base
    inside[~torch.isfinite(lo)] = 0  # infinities and NaNs: normalized states never hold them
    if int(inside.max()) > 1:
        raise AssertionError("a lookup cell holds two midpoints: raise CELL_BITS")
    midpoint = torch.where(inside > 0, mid[base.clamp(max=len(mid) - 1)], torch.tensor(float("inf"), dtype=torch.float64))
    return base.to(torch.uint8), midpoint.float()


def nearest_codes(x: torch.Tensor, signed: bool) -> torch.Tensor:
    """uint8 code of the level nearest to each value of x (fp32, within [-1, 1])."""
    base, midpoint = nearest_level_table(signed)
    cell = (x.view(torch.int32) >> SHIFT) & ((1 << (32 - SHIFT)) - 1)  # arithmetic shift: mask the sign's copies
    cell = cell.reshape(-1)
    codes = base.to(x.device).index_select(0, cell)
    return codes.add_(x.reshape(-1) > midpoint.to(x.device).index_select(0, cell))


def as_blocks(flat: torch.Tensor) -> torch.Tensor:
    """(n_blocks, BLOCK) fp32: a view when flat fills whole blocks, else a zero-padded copy."""
    whole = flat.dtype == torch.float32 and flat.numel() % BLOCK == 0 and flat.is_contiguous()
    return flat.view(-1, BLOCK) if whole else blocks(flat, BLOCK)


def pack8(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (codes uint8 (numel,), absmax fp32 (n_blocks,)), nearest level per value."""
    xb = as_blocks(x.reshape(-1))  # (n_blocks, 256)
    absmax = xb.abs().amax(dim=1)
    codes = nearest_codes(xb * absmax.clamp_min(1e-30).reciprocal()[:, None], signed)
    return codes[: x.numel()], absmax


def unpack8(codes: torch.Tensor, absmax: torch.Tensor, shape, signed: bool) -> torch.Tensor:
    code, _ = levels(signed)
    values = as_blocks(code.to(codes.device).index_select(0, codes.int())).mul_(absmax[:, None])  # a fresh tensor either way
    return values.reshape(-1)[: codes.numel()].reshape(shape)


# values per pass of a large state: bounds the fp32 and index temporaries of unpacking and
# packing (a whole 28M-value embedding state would need ~0.3 GiB of them at once)
CHUNK = 4096 * BLOCK


def adam_moments(m: torch.Tensor, v: torch.Tensor, g: torch.Tensor, betas) -> None:
    """Fold gradient g into Adam's fp32 moments, in place: m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g²."""
    b1, b2 = betas
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)


def adam_direction(m: torch.Tensor, v: torch.Tensor, t: int, betas, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Adam's direction m̂ / (sqrt(v̂) + eps) at step t, built in one tensor the size of m (`out`
    if given, which may be the gradient the moments were just updated with)."""
    b1, b2 = betas
    d = torch.sqrt(v, out=out).div_(math.sqrt(1 - b2**t)).add_(eps)  # sqrt(v̂) + eps
    return torch.div(m, d, out=d).div_(1 - b1**t)


def adam_direction_8bit(st: dict, g: torch.Tensor, t: int, betas, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Adam's direction m̂ / (sqrt(v̂) + eps) at step t for gradient g, with m and v kept in st as
    8-bit codes and block absmaxes; updated chunk by chunk, the direction from the fp32 moments
    before they are rounded (as bitsandbytes' kernel does). Written into `out` if given (g
    itself may be it: each chunk of g is read before its direction is written)."""
    flat, n = g.reshape(-1).float(), g.numel()
    if "m_codes" not in st:  # absmax 0: every code reads as 0
        n_blocks = -(-n // BLOCK)
        codes, absmax = dict(dtype=torch.uint8, device=g.device), dict(device=g.device)
        st["m_codes"], st["v_codes"] = torch.zeros(n, **codes), torch.zeros(n, **codes)
        st["m_absmax"], st["v_absmax"] = torch.zeros(n_blocks, **absmax), torch.zeros(n_blocks, **absmax)
    out = torch.empty_like(flat) if out is None else out.view(-1)
    for a in range(0, n, CHUNK):
        b = min(a + CHUNK, n)
        ba, bb = a // BLOCK, -(-b // BLOCK)
        gc = flat[a:b]
        m = unpack8(st["m_codes"][a:b], st["m_absmax"][ba:bb], (b - a,), signed=True)
        v = unpack8(st["v_codes"][a:b], st["v_absmax"][ba:bb], (b - a,), signed=False)
        adam_moments(m, v, gc, betas)
        adam_direction(m, v, t, betas, eps, out[a:b])
        for key, x, signed in (("m", m, True), ("v", v, False)):
            codes, absmax = pack8(x, signed)
            st[f"{key}_codes"][a:b], st[f"{key}_absmax"][ba:bb] = codes, absmax
    return out.view(g.shape)


def restore_8bit_dtypes(state: dict) -> None:
    """torch's Optimizer.load_state_dict casts every state tensor to its parameter's dtype: the
    codes go back to uint8, the absmaxes and fp32 moments to fp32."""
    for st in state.values():
        for key in ("m_codes", "v_codes"):
            if key in st:
                st[key] = st[key].to(torch.uint8)
        for key in ("m_absmax", "v_absmax", "m", "v"):
            if key in st:
                st[key] = st[key].float()


class AdamW8bit(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter 2019) whose m and v are kept in 8 bits between steps."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 min_8bit_size: int = MIN_8BIT_SIZE):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.min_8bit_size = min_8bit_size

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        restore_8bit_dtypes(self.state)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                st = self.state[p]
                st["step"] = st.get("step", torch.zeros(())) + 1
                t = float(st["step"])
                if p.numel() < self.min_8bit_size:
                    m, v = st.setdefault("m", torch.zeros_like(g)), st.setdefault("v", torch.zeros_like(g))
                    adam_moments(m, v, g, group["betas"])
                    direction = adam_direction(m, v, t, group["betas"], group["eps"])
                else:
                    direction = adam_direction_8bit(st, g, t, group["betas"], group["eps"])
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(direction.to(p.dtype), alpha=-group["lr"])
        return loss
