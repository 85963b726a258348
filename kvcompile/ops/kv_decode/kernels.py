"""Runs kv_decode on CUDA through the kernel library (ctypes): all chunks in one launch.

KvDecodeArgs mirrors `kvc_kv_decode_args` in plugins/csrc/kvcompile_kernels.h field by field;
SYMBOLS declares the C function (the kernel loader reads it from the registry). The kernel
checks every offset and length on the device and reports per chunk in a status array, which
`run` reads back (one synchronisation) to raise BitstreamError for a corrupt chunk.

Two kernels decode the same bits (plugins/csrc/kv_decode.cu, v1; kv_decode_v2.cu, v2): `launch`
takes `kernel` ("v1", "v2" or None for the library's default, v2 unless
$KVCOMPILE_KV_DECODE_KERNEL=v1), so a benchmark can time both in one process.
"""
from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from kvcompile.ops.registry import KernelSymbol
from kvcompile.plugins import load_kernels
from kvcompile.plugins import kernels_available as plugin_kernels_available

_int, _i64, _ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p

SYMBOLS = (KernelSymbol("kvc_kv_decode", ctypes.c_int, (ctypes.c_void_p, ctypes.c_void_p)),
           KernelSymbol("kvc_kv_decode_with", ctypes.c_int, (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)))
KERNELS = {None: 0, "v1": 1, "v2": 2}  # KVC_KV_DECODE_DEFAULT, _V1, _V2

_CODES = {1: "invalid argument", 2: "CUDA launch error"}
# KVC_DECODE_* status of a chunk
STATUS = {1: "its offset, size or token range is out of bounds", 2: "a rANS stream is out of range or does not decode",
          3: "it names a table outside the codec's bank", 4: "a scale is negative or not finite"}


class KvDecodeArgs(ctypes.Structure):
    _fields_ = [
        ("layers", _int), ("kv_heads", _int), ("head_dim", _int), ("capacity", _int), ("group", _int),
        ("dtype", _int), ("log_scales", _int), ("chunks", _int),
        ("data", _ptr), ("data_bytes", _i64),
        ("chunk_table", _ptr), ("halves", _ptr), ("table_base", _ptr), ("bank_cdf", _ptr),
        ("bank_rows", _int), ("bank_width", _int), ("bank_shapes", _int),
        ("scale_steps", _ptr), ("keys", _ptr), ("values", _ptr), ("status", _ptr),
        ("version", _int), ("channel_tables", _ptr),
    ]


def kernels_available() -> bool:
    return plugin_kernels_available("kv_decode")


def can_use_kernels(data: Tensor, group: int, width: int) -> bool:
    if not data.is_cuda or not data.numel() or group not in (1, 2, 4, 8) or width > 256 or data.data_ptr() % 4:
        return False
    return kernels_available()


_device_tables: dict = {}


def _kernel_tables(bank_cdf: Tensor, halves: Tensor, table_base: Tensor, scale_steps: Tensor):
    """The table inputs in the kernel's types: CDF rows as uint16 without the final 65536."""
    cdf = bank_cdf[:, :-1].to(torch.int32)
    cdf16 = torch.where(cdf >= 32768, cdf - 65536, cdf).to(torch.int16)  # the uint16 bits, as int16
    return (cdf16.contiguous(), halves.to(torch.int32).contiguous(), table_base.to(torch.int32).contiguous(),
            scale_steps.to(torch.float32).contiguous())


def launch(data: Tensor, chunk_table: Tensor, tables, out: Tensor, layers: int, kv_heads: int, head_dim: int,
           group: int, log_scales: int, dtype: int, status: Tensor, kernel=None, version: int = 2,
           channel_tables=None) -> None:
    """Enqueue the decoder on the current stream: chunk_table [N, 4] int64 (offset, bytes, tokens,
    first token) on the device; out [2, L, H, capacity, D]; status [N] int32 zeroed; kernel one
    of KERNELS; version the chunks' format (3: channel_tables, the header's [2, 2, L, C] uint8
    centres and shapes, contiguous on the device)."""
    if kernel not in KERNELS:
        raise ValueError(f"kv_decode: kernel must be one of {sorted(k for k in KERNELS if k)} or None, got {kernel!r}")
    import kvcompile.codec.tables as bank

    lib = load_kernels()
    cdf16, halves32, base32, steps = tables
    args = KvDecodeArgs(
        layers=layers, kv_heads=kv_heads, head_dim=head_dim, capacity=out.shape[3], group=group, dtype=dtype,
        log_scales=log_scales, chunks=chunk_table.shape[0], data=data.data_ptr(), data_bytes=data.numel(),
        chunk_table=chunk_table.data_ptr(), halves=halves32.data_ptr(), table_base=base32.data_ptr(),
        bank_cdf=cdf16.data_ptr(), bank_rows=cdf16.shape[0], bank_width=cdf16.shape[1], bank_shapes=bank.SHAPES,
        scale_steps=steps.data_ptr(), keys=out[0].data_ptr(), values=out[1].data_ptr(), status=status.data_ptr(),
        version=version, channel_tables=channel_tables.data_ptr() if channel_tables is not None else None)
    if version == 3 and (channel_tables is None or not channel_tables.is_contiguous()
                         or channel_tables.numel() != 4 * layers * kv_heads * head_dim):
        raise ValueError("kv_decode: format 3 needs the header's channel tables, contiguous uint8 [2, 2, L, C]")
    with torch.cuda.device(data.device):
        code = lib.kvc_kv_decode_with(ctypes.byref(args), torch.cuda.current_stream(data.device).cuda_stream,
                                      KERNELS[kernel])
    if code != 0:
        raise RuntimeError(f"kvcompile kernel library: kvc_kv_decode failed with code {code} "
                           f"({_CODES.get(code, 'unknown')})")


def check_status(status: Tensor) -> None:
    failed = torch.nonzero(status).flatten().tolist()  # synchronises
    if failed:
        from kvcompile.codec.bitstream import BitstreamError

        code = int(status[failed[0]])
        raise BitstreamError(f"KV bitstream chunk {failed[0]} does not decode on the GPU: "
                             f"{STATUS.get(code, f'status {code}')} ({len(failed)} chunk(s) failed)")


def packed_chunks(chunks: list, tokens: int, device) -> tuple:
    """Encoded chunks (bytes each, `tokens` tokens each) laid end to end in one uint8 blob on
    `device`, and the chunk table `launch` reads: [N, 4] int64 rows (offset, bytes, tokens, first
    cache row). For callers that hold the chunks' bytes themselves (benchmarks, kernel tests)."""
    offsets, at = [], 0
    for data in chunks:
        offsets.append(at)
        at += len(data)
    blob = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).to(device)
    table = torch.tensor([[o, len(d), tokens, i * tokens] for i, (o, d) in enumerate(zip(offsets, chunks))],
                         dtype=torch.int64, device=device)
    return blob, table


def run(data, chunk_offsets, bank_cdf, halves, table_base, scale_steps, layers, kv_heads, head_dim, tokens, group,
        log_scales, dtype, channel_tables=None, version=2) -> Tensor:
    from kvcompile.ops.kv_decode.definition import DTYPES

    device = data.device
    offsets = chunk_offsets.to(device)
    chunks = offsets.shape[0]
    ends = torch.cat([offsets[1:], torch.tensor([data.numel()], dtype=torch.int64, device=device)])
    index = torch.arange(chunks, dtype=torch.int64, device=device)
    chunk_table = torch.stack([offsets, ends - offsets, torch.full_like(offsets, tokens), index * tokens], dim=1)
    out = torch.empty((2, layers, kv_heads, chunks * tokens, head_dim), dtype=DTYPES[dtype], device=device)
    status = torch.zeros(chunks, dtype=torch.int32, device=device)
    tables = _kernel_tables(bank_cdf.to(device), halves.to(device), table_base.to(device), scale_steps.to(device))
    if channel_tables is not None:
        channel_tables = channel_tables.to(device).contiguous()
    launch(data.contiguous(), chunk_table.contiguous(), tables, out, layers, kv_heads, head_dim, group, log_scales,
           dtype, status, version=version, channel_tables=channel_tables)
    check_status(status)
    return out
