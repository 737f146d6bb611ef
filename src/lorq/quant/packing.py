"""Bit packing of low-bit codes into bytes."""

import torch


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, the first element in the high nibble (bitsandbytes' layout).

    codes: uint8 values in [0, 15], any shape; an odd count is padded with one zero code.
    Returns a flat uint8 tensor of ceil(n / 2) bytes.
    """
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] << 4) | flat[1::2]


def unpack_4bit(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of pack_4bit: a flat uint8 tensor of `numel` codes."""
    out = torch.empty(packed.numel() * 2, dtype=torch.uint8, device=packed.device)
    out[0::2] = packed >> 4
    out[1::2] = packed & 0x0F
    return out[:numel]
