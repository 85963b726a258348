"""Hardware floors measured on the device the benchmark runs on (never typed in).

    hbm_read_bytes_per_s()        device memory read rate: a sum over 2 GiB (reads only)
    hbm_copy_bytes_per_s()        device memory copy, read + write counted (1 GiB; 256 MiB on CPU)
    hbm_bytes_per_s()             the floor rate for bytes read from HBM: the faster of the two
    host_to_device_bytes_per_s()  pinned host -> device copy (1 GiB); nan without CUDA
    host_gather_bytes_per_s(row)  zero-copy gather of random rows of `row` bytes from pinned host
                                  memory into the device (kvc_host_row_gather, the access pattern
                                  of KCache's value fetch), the faster of a 128 MiB and a 1 GiB
                                  buffer (small rows over a large buffer are slower: the GPU's
                                  translations of host pages miss); nan without CUDA
    link_rate(row)                the gather rate for any row size, log-interpolated between the
                                  measured sizes (GATHER_ROW_BYTES)

Each is measured once per process (best of 5 after a warm-up) and cached, or read from a floors
JSON written earlier (`use_floors_file`), so every benchmark of one GPU call shares one set:

    python bench/floors.py --out DIR      # measures, writes DIR/floors.json, prints the table

The benchmarks report their ratios to these figures and record them in their JSON.
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import json
import math
import time
from pathlib import Path

import torch

GATHER_ROW_BYTES = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
GATHER_BYTES_PER_CALL = 32 << 20  # ~16x what one KCache decode step fetches per layer
GATHER_FOOTPRINTS = (128 << 20, 1 << 30)  # host buffer sizes the rows are drawn from
_from_file: dict = {}  # figures read by use_floors_file, by function name


def running_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _best_seconds(fn, device: torch.device, repeats: int = 5) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def event_times(fn, repeats: int) -> list[float]:
    """Seconds of each of `repeats` runs of fn after one warm-up, timed by CUDA events (device
    time, no host gaps)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def _best_event_seconds(fn, repeats: int = 5) -> float:
    """Best of `repeats` CUDA-event timings of fn."""
    return min(event_times(fn, repeats))


@functools.lru_cache(maxsize=None)
def hbm_copy_bytes_per_s() -> float:
    if "hbm_copy_bytes_per_s" in _from_file:
        return _from_file["hbm_copy_bytes_per_s"]
    device = running_device()
    size = (1 << 30) if device.type == "cuda" else (256 << 20)
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = _best_seconds(lambda: target.copy_(source), device)
    del source, target
    return 2 * size / seconds


@functools.lru_cache(maxsize=None)
def hbm_read_bytes_per_s() -> float:
    if "hbm_read_bytes_per_s" in _from_file:
        return _from_file["hbm_read_bytes_per_s"]
    device = running_device()
    size = (2 << 30) if device.type == "cuda" else (256 << 20)
    source = torch.ones(size // 4, dtype=torch.float32, device=device)  # ones, not zeros
    seconds = _best_seconds(lambda: source.sum(), device)
    del source
    return size / seconds


def hbm_bytes_per_s() -> float:
    """The rate a floor divides HBM bytes read by: the faster measured way of moving them."""
    return max(hbm_read_bytes_per_s(), hbm_copy_bytes_per_s())


@functools.lru_cache(maxsize=None)
def host_to_device_bytes_per_s() -> float:
    if "host_to_device_bytes_per_s" in _from_file:
        return _from_file["host_to_device_bytes_per_s"]
    device = running_device()
    if device.type != "cuda":
        return float("nan")  # no host link to measure
    size = 1 << 30
    source = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(size, dtype=torch.uint8, device=device)
    seconds = _best_seconds(lambda: target.copy_(source, non_blocking=True), device)
    del source, target
    return size / seconds


def _gather_library():
    from kvcompile.plugins import load_kernels

    lib = load_kernels()
    lib.kvc_host_row_gather.restype = ctypes.c_int
    lib.kvc_host_row_gather.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int32,
                                        ctypes.c_void_p, ctypes.c_void_p]
    lib.kvc_host_row_gather_error.restype = ctypes.c_char_p
    return lib


@functools.lru_cache(maxsize=None)
def host_gather_by_footprint() -> dict:
    """{footprint bytes: ((row bytes, bytes/s), ...)}: random distinct rows of a pinned buffer
    of each GATHER_FOOTPRINTS size, GATHER_BYTES_PER_CALL (at most half the buffer) per call;
    empty without CUDA."""
    if "host_gather_by_footprint" in _from_file:
        return {int(size): tuple((int(row), rate) for row, rate in table.items())
                for size, table in _from_file["host_gather_by_footprint"].items()}
    if not torch.cuda.is_available():
        return {}
    lib = _gather_library()
    host = torch.empty(max(GATHER_FOOTPRINTS), dtype=torch.uint8, pin_memory=True)
    host.random_(0, 256)  # never zeros: timing on zeros can flatter
    out = torch.empty(GATHER_BYTES_PER_CALL, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    tables = {}
    for footprint in GATHER_FOOTPRINTS:
        table = []
        for row_bytes in GATHER_ROW_BYTES:
            count = min(GATHER_BYTES_PER_CALL, footprint // 2) // row_bytes
            rows = torch.randperm(footprint // row_bytes, device="cuda")[:count].to(torch.int32)

            def gather():
                code = lib.kvc_host_row_gather(host.data_ptr(), row_bytes, rows.data_ptr(), count,
                                               out.data_ptr(), stream)
                if code != 0:
                    raise RuntimeError(lib.kvc_host_row_gather_error().decode())

            table.append((row_bytes, count * row_bytes / _best_event_seconds(gather)))
        tables[footprint] = tuple(table)
    del host, out
    return tables


def host_gather_table() -> tuple:
    """((row bytes, bytes/s), ...): per row size the fastest footprint's rate (the floor)."""
    if "host_gather_bytes_per_s" in _from_file and "host_gather_by_footprint" not in _from_file:
        return tuple((int(row), rate) for row, rate in _from_file["host_gather_bytes_per_s"].items())
    tables = host_gather_by_footprint()
    if not tables:
        return ()
    return tuple((row, max(dict(table)[row] for table in tables.values())) for row in GATHER_ROW_BYTES)


def host_gather_bytes_per_s(row_bytes: int) -> float:
    return dict(host_gather_table()).get(row_bytes, float("nan"))


def link_rate(row_bytes: int) -> float:
    """Gather rate for rows of this size: the measured table, log-interpolated between sizes
    (clamped at its ends); nan without CUDA."""
    table = host_gather_table()
    if not table:
        return float("nan")
    if row_bytes <= table[0][0]:
        return table[0][1]
    for (x0, r0), (x1, r1) in zip(table, table[1:]):
        if row_bytes <= x1:
            t = math.log(row_bytes / x0) / math.log(x1 / x0)
            return r0 * (r1 / r0) ** t
    return table[-1][1]


def measure_all() -> dict:
    """Every floor, measured (or read from the floors file in use), as one JSON-ready dict."""
    device = running_device()
    return dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        hbm_read_bytes_per_s=hbm_read_bytes_per_s(),
        hbm_copy_bytes_per_s=hbm_copy_bytes_per_s(),
        hbm_bytes_per_s=hbm_bytes_per_s(),
        host_to_device_bytes_per_s=host_to_device_bytes_per_s(),
        host_gather_bytes_per_s={str(row): rate for row, rate in host_gather_table()},
        host_gather_by_footprint={str(size): {str(row): rate for row, rate in table}
                                  for size, table in host_gather_by_footprint().items()},
        method="read: sum of 2 GiB fp32; copy: 1 GiB device copy, read + write counted; H2D: 1 GiB "
               "pinned copy; gather: kvc_host_row_gather of 32 MiB of random distinct rows of a "
               "128 MiB and a 1 GiB pinned buffer, the faster per row size; each best of 5 after "
               "a warm-up",
    )


def use_floors_file(path) -> dict:
    """Read a floors JSON (this module's --out) so later calls return its figures."""
    floors = json.loads(Path(path).read_text())
    _from_file.clear()
    _from_file.update({key: floors[key] for key in ("hbm_read_bytes_per_s", "hbm_copy_bytes_per_s",
                                                     "host_to_device_bytes_per_s", "host_gather_bytes_per_s",
                                                     "host_gather_by_footprint")
                       if key in floors})
    for cached in (hbm_read_bytes_per_s, hbm_copy_bytes_per_s, host_to_device_bytes_per_s, host_gather_by_footprint):
        cached.cache_clear()
    return floors


def add_floors_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--floors", type=Path, help="floors JSON from bench/floors.py (default: measure now)")


def floors_for(args) -> dict:
    """The floors a benchmark uses and records: from --floors when given, else measured."""
    if getattr(args, "floors", None):
        use_floors_file(args.floors)
    return measure_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    args = parser.parse_args()
    floors = measure_all()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "floors.json").write_text(json.dumps(floors, indent=2))
    print(f"{floors['device']}: HBM read {floors['hbm_read_bytes_per_s'] / 1e9:.0f} GB/s, copy "
          f"{floors['hbm_copy_bytes_per_s'] / 1e9:.0f} GB/s, pinned H2D "
          f"{floors['host_to_device_bytes_per_s'] / 1e9:.1f} GB/s")
    for row, rate in floors["host_gather_bytes_per_s"].items():
        by_size = ", ".join(f"{int(size) >> 20} MiB buffer {table[row] / 1e9:.1f}"
                            for size, table in floors["host_gather_by_footprint"].items())
        print(f"  zero-copy gather, {row:>5} B rows: {rate / 1e9:.1f} GB/s ({by_size})")


if __name__ == "__main__":
    main()
