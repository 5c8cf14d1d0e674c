"""Timing, device description and result writing shared by the benchmarks.

Timing follows the method every benchmark here uses: warm up first, time with CUDA events
(`triton.testing.do_bench`, which also flushes the L2 cache before each repeat), report the median.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
from typing import Callable, Iterable

import torch


class NoCudaError(RuntimeError):
    """The benchmark needs a CUDA GPU."""


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise NoCudaError(
            "this benchmark needs a CUDA GPU (torch.cuda.is_available() is False); run it on the H100 machine"
        )


def host_syncs(fn: Callable[[], object]) -> list:
    """Run ``fn`` with CUDA's sync debug mode on; the host-device synchronizations it made, as the
    ``warnings.WarningMessage`` records torch emits for them (``filename``/``lineno`` locate the call site).
    PyTorch's one-time notice that the debug mode is a prototype feature is not counted."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [w for w in caught
            if "synchroniz" in str(w.message).lower() and "prototype feature" not in str(w.message)]


def parse_choices(text: str, allowed, flag: str) -> list[str]:
    """A comma-separated command-line list, refused with the allowed values if any item is unknown."""
    chosen = [x for x in text.split(",") if x]
    unknown = set(chosen) - set(allowed)
    if unknown:
        raise SystemExit(f"{flag}: unknown {sorted(unknown)}; choose from {sorted(allowed)}")
    return chosen


def compile_flags_error(args, sub: str) -> bool:
    """Refuse ``--compile-mode`` other than default with ``--no-compile`` in one line on stderr; True if refused."""
    if args.no_compile and args.compile_mode != "default":
        print(f"int8flow.bench {sub}: --compile-mode {args.compile_mode} needs compilation; drop --no-compile",
              file=sys.stderr)
        return True
    return False


def time_ms(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median time of ``fn()`` in milliseconds: CUDA events, L2 flushed before each repeat."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def copy_gbps(nbytes: int = 1 << 30, time_fn: Callable = time_ms) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second / 1e9 (the memory-bound ceiling)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    return 2 * nbytes / time_fn(lambda: dst.copy_(src)) / 1e6


def device_info() -> dict:
    """Device name, versions and date for a result file; on a machine without CUDA, the CPU."""
    import platform

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {"torch": torch.__version__, "triton": triton_version,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if not torch.cuda.is_available():
        return {"device": f"cpu ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)", **info}
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"device": props.name, "sms": props.multi_processor_count, "cuda": torch.version.cuda, **info}


def device_slug(name: str) -> str:
    """'NVIDIA H200' -> 'h200': the prefix of result files (``bench/results/h200_blocks.json``)."""
    import re

    m = re.search(r"(H200|H100|A100|B200|L40S?|RTX ?\d+)", name, re.I)
    return (m.group(1) if m else name.split()[0]).replace(" ", "").lower()


def result_path(info: dict, what: str) -> str:
    """``bench/results/<device>_<what>.json``; on the CPU ``cpu_<what>.json``."""
    slug = "cpu" if info["device"].startswith("cpu") else device_slug(info["device"])
    return os.path.join("bench", "results", f"{slug}_{what}.json")


def write_json(path: str, records: list[dict], info: dict) -> None:
    """``{"device":..., "records": [...]}`` with the device fields repeated on every record (long format)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:  # atomic: a reader (or a run killed mid-write) never sees half a file
        json.dump({**info, "records": [{**info, **r} for r in records]}, f, indent=1)
    os.replace(tmp, path)


def print_table(records: Iterable[dict], file=None) -> None:
    file = file or sys.stdout  # looked up per call: pytest's capsys swaps sys.stdout after import
    rows = [("op", "shape", "mode", "ours ms", "base ms", "speedup", "extra")]
    for r in records:
        extra = f"{r['tflops']:.0f} TFLOP/s" if "tflops" in r else (
            f"{r['gbps']:.0f} GB/s ({r['gbps'] / r['copy_gbps']:.2f} of copy)" if "gbps" in r and "copy_gbps" in r else "")
        rows.append((r["op"], str(r["shape"]), r["mode"], f"{r['ours_ms']:.3f}", f"{r['baseline_ms']:.3f}",
                     f"{r['speedup']:.2f}x", extra))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)), file=file)
