"""Bit packing of low-bit codes into bytes.

Codes are read as one big-endian bit stream: the first code occupies the highest bits of the
first byte. For 4-bit codes that is bitsandbytes' layout (first element in the high nibble);
2-bit codes pack four per byte, 3-bit codes eight per three bytes, 8-bit codes are the bytes.
"""

import sys
from math import gcd

import torch

PACKABLE_BITS = (2, 3, 4, 8)
BYTE_TABLE_BITS = (2, 4, 8)  # widths whose codes never straddle a byte
# a table row of this many bytes is gathered as one scalar of the dtype (see decode_bytes)
# (16-byte rows as complex128 measured slower than the row copy: 2-bit fp32 levels keep it)
ROW_DTYPES = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def codes_per_word(bits: int) -> tuple[int, int]:
    """(codes, bytes) of the smallest whole-byte word: 4 bits -> (2, 1), 3 bits -> (8, 3)."""
    nbytes = bits // gcd(bits, 8)
    return 8 * nbytes // bits, nbytes


def packed_size(numel: int, bits: int) -> int:
    n_codes, n_bytes = codes_per_word(bits)
    return -(-numel // n_codes) * n_bytes


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (integers in [0, 2**bits)) of any shape -> a flat uint8 tensor of packed_size bytes.

    A partial last word is padded with zero codes.
    """
    if bits not in PACKABLE_BITS:
        raise ValueError(f"cannot pack {bits}-bit codes")
    flat = codes.reshape(-1).to(torch.int64)
    if bits == 8:
        return flat.to(torch.uint8)
    n_codes, n_bytes = codes_per_word(bits)
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % n_codes)).view(-1, n_codes)
    shifts = bits * torch.arange(n_codes - 1, -1, -1, device=codes.device)
    words = (flat << shifts).sum(dim=1, keepdim=True)  # at most 24 bits: exact in int64
    byte_shifts = 8 * torch.arange(n_bytes - 1, -1, -1, device=codes.device)
    return ((words >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of pack_bits: a flat uint8 tensor of `numel` codes."""
    if bits == 8:
        return packed.reshape(-1)[:numel]
    n_codes, n_bytes = codes_per_word(bits)
    if n_bytes == 1:  # 2 and 4 bits: stay in uint8, the hot path of every dequantization
        shifts = torch.arange(8 - bits, -1, -bits, dtype=torch.uint8, device=packed.device)
        return ((packed.reshape(-1, 1) >> shifts) & ((1 << bits) - 1)).reshape(-1)[:numel]
    by = packed.reshape(-1, n_bytes).int()  # words of at most 24 bits: int32, or'ed byte by byte
    words = by[:, :1] << 8 * (n_bytes - 1)  # (a sum would promote to int64, about 2x slower)
    for i in range(1, n_bytes):
        words |= by[:, i : i + 1] << 8 * (n_bytes - 1 - i)
    shifts = bits * torch.arange(n_codes - 1, -1, -1, dtype=torch.int32, device=packed.device)
    return ((words >> shifts) & ((1 << bits) - 1)).to(torch.uint8).reshape(-1)[:numel]


def byte_table(levels: torch.Tensor, bits: int) -> torch.Tensor:
    """(256, 8 / bits): the levels of the codes packed in each possible byte, first code first.
    Codes past the table's end (FP8/FP4 have 253 / 15 levels) map to its last level."""
    b = torch.arange(256)
    code = lambda s: ((b >> s) & ((1 << bits) - 1)).clamp(max=levels.numel() - 1)
    return torch.stack([levels[code(s)] for s in range(8 - bits, -1, -bits)], dim=1)


def byte_pair_table(table: torch.Tensor) -> torch.Tensor:
    """(65536, 2k) from a (256, k) byte_table: the levels of two consecutive bytes, indexed by
    the pair read as one native-endian uint16."""
    i = torch.arange(65536, device=table.device)
    first, second = (i & 255, i >> 8) if sys.byteorder == "little" else (i >> 8, i & 255)
    return torch.cat([table[first], table[second]], dim=1)


def pairs_pay(table: torch.Tensor) -> bool:
    """Gathering byte pairs halves the gathers where a pair's row still fits one 64-bit scalar
    (4-bit codes as 16-bit levels: 0.31 -> 0.20 ms for 442k bytes on a 2-core EPYC); on the CPU
    only, where the 512 KiB table stays in cache and a gather costs per row."""
    row = table.shape[1] * table.element_size()
    return table.device.type == "cpu" and row <= 4 and 2 * row in ROW_DTYPES


def decode_bytes(table: torch.Tensor, packed: torch.Tensor, pairs: torch.Tensor | None = None) -> torch.Tensor:
    """table[packed] flattened: every packed code's level, from a byte_table, in one gather;
    with its byte_pair_table (`pairs`), two bytes per gathered row where their count allows.

    Each row is gathered as a single scalar as wide as the row (two fp32 levels as one int64):
    index_select copies a 2-D table's rows one at a time, several times slower on CPU, and
    dequantization is most of a quantized layer's time at small batches (NF4 as a whole:
    0.90 -> 0.54 ms for a 1536 x 576 matrix on a 2-core Xeon, against 0.26 ms for its GEMM
    with 32 rows)."""
    flat = packed.reshape(-1)
    if pairs is not None and flat.numel() % 2 == 0 and flat.storage_offset() % 2 == 0:
        return gather_rows(pairs, flat.view(torch.uint16).int())
    return gather_rows(table, flat.int())


def gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] flattened, each row gathered as one scalar as wide as the row where there is one."""
    wide = ROW_DTYPES.get(table.shape[1] * table.element_size())
    if wide is None:
        return table.index_select(0, index).reshape(-1)
    return table.contiguous().view(wide).reshape(-1).index_select(0, index).view(table.dtype)
