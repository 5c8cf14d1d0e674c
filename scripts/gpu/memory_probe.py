"""GPU probe for issue 13's memory targets: what is live at the peak of one block-stack forward + backward.

    python scripts/gpu/memory_probe.py [--shape llama-7b-like] [--modes bf16,int8,int8+fallback,int8-linear]
        [--out DIR] [--device cuda|cpu]

Same stack, input and loss as ``python -m int8flow.bench blocks`` (eager: the allocation stacks then name our
Python lines). Per mode, one warm-up step, then one step under ``torch.cuda.memory._record_memory_history``:
the allocator's event trace is replayed (`peak_live_set`) to find the peak of allocated bytes and the blocks live
at that moment, grouped by the innermost frame in ``int8flow`` (or the innermost frame at all), and every float32
block of at least ``tokens x dim x 4`` bytes allocated during the step, by frame (issue 13 item 4: no full-size
FP32 temporaries; the loss's own ``.float()`` of the output is one). Writes ``memory_probe.json`` under --out and
prints a short table last. ``--device cpu`` checks the script on tiny shapes (saved bytes only).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402

from int8flow.bench.blocks import SHAPES, TINY_SHAPES, _build, saved_bytes  # noqa: E402

GIB = 2 ** 30
TRACE_ENTRIES = 200000  # the allocator's trace ring buffer (_record_memory_history max_entries)


def _where(frames, depth: int = 2) -> str:
    """The innermost ``depth`` frames inside int8flow, innermost first (file:line function), past the allocation
    helper ``kernels/_launch.py``; else the innermost frame."""
    names = []
    for f in frames or ():
        if "int8flow" in f.get("filename", "") and not f["filename"].endswith("_launch.py"):
            name = f["filename"].split("int8flow", 1)[1].lstrip("/")
            names.append(f"{name}:{f['line']} {f['name']}")
            if len(names) == depth:
                break
    if names:
        return " < ".join(names)
    if frames:
        f = frames[0]
        return f"{os.path.basename(f.get('filename', '?'))}:{f.get('line', 0)} {f.get('name', '?')}"
    return "?"


def peak_live_set(events, base_bytes: int = 0):
    """(peak bytes, {addr: (size, frames)} live at the peak) from an allocator trace (``device_traces[i]`` of
    ``torch.cuda.memory._snapshot()``): 'alloc' adds a block, 'free_requested' removes it (the allocator lowers
    its allocated bytes there, not at 'free_completed', which only ends a block's cross-stream use; the segment
    actions move reserved bytes, not allocated ones, and are ignored). Sizes are the requested ones, so the
    level runs a little under ``max_memory_allocated``, which counts whole blocks (rounded up to 512 B at least).
    ``base_bytes``: bytes allocated before the trace started (persistent tensors), added to every level; a
    block of those freed during the trace (its 'free_requested' with no 'alloc' before it) leaves that level."""
    live, cur, peak, at_peak = {}, base_bytes, base_bytes, {}
    for e in events:
        act = e.get("action")
        if act == "alloc":
            live[e["addr"]] = (e["size"], e.get("frames", []))
            cur += e["size"]
            if cur > peak:
                peak, at_peak = cur, dict(live)
        elif act == "free_requested":
            cur -= live.pop(e["addr"])[0] if e["addr"] in live else e["size"]
    return peak, at_peak


def run(shape: str, mode: str, device: str, table: dict) -> dict:
    config, layers, batch, tokens = table[shape]
    dim = getattr(config, "dim", None) or config.n_embd
    model = _build(config, layers, mode, device)
    x = torch.randn(batch, tokens, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    if device == "cuda":
        from int8flow.kernels import nonfinite

        nonfinite.device_flag(device)

    def step():
        model(x).float().square().mean().backward()

    step()  # warm-up: kernels compiled, .grad buffers allocated (they persist, as in training)
    rec = {"shape": shape, "mode": mode, "layers": layers, "tokens": batch * tokens,
           "saved_gib": saved_bytes(model, x) / GIB}
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.memory._record_memory_history(max_entries=TRACE_ENTRIES, stacks="python")
        step()
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        trace = snap["device_traces"][torch.cuda.current_device()]
        if len(trace) >= TRACE_ENTRIES:  # a ring buffer: the oldest events were dropped, the replay is off
            print(f"memory_probe: {mode}: the allocator trace filled its {TRACE_ENTRIES} entries; the replayed "
                  "peak and live set miss the step's first events", file=sys.stderr)
        peak, live = peak_live_set(trace, base)
        groups = collections.defaultdict(lambda: [0, 0])
        for size, frames in live.values():
            g = groups[_where(frames)]
            g[0] += size
            g[1] += 1
        big = collections.Counter()  # allocations of >= one full-size fp32 activation, by frame (any dtype: sizes only)
        for e in trace:
            if e.get("action") == "alloc" and e["size"] >= batch * tokens * dim * 4:
                big[(_where(e.get("frames", [])), e["size"])] += 1
        rec["full_size_fp32_allocs"] = [{"where": w, "bytes": s, "count": n} for (w, s), n in big.most_common(20)]
        rec.update(persistent_gib=base / GIB, peak_gib=torch.cuda.max_memory_allocated() / GIB,
                   replayed_peak_gib=peak / GIB, transient_at_peak_gib=(peak - base) / GIB,
                   at_peak=[{"where": w, "gib": s / GIB, "blocks": n}
                            for w, (s, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:25]])
    if device == "cuda":
        torch.cuda.empty_cache()
    return rec


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default=None)
    p.add_argument("--modes", default="bf16,int8,int8+fallback,int8-linear")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    a = p.parse_args()
    table = SHAPES if a.device == "cuda" else TINY_SHAPES
    shape = a.shape or ("llama-7b-like" if a.device == "cuda" else "llama-tiny")
    if shape not in table:
        sys.exit(f"memory_probe: unknown --shape {shape!r}; choose from {sorted(table)}")
    recs = []
    for mode in a.modes.split(","):
        recs.append(run(shape, mode, a.device, table))
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "memory_probe.json"), "w") as f:
            json.dump(recs, f, indent=1)
    for r in recs:
        print(f"\n{r['shape']} {r['mode']}: saved {r['saved_gib']:.3f} GiB"
              + (f", persistent {r['persistent_gib']:.3f}, peak {r['peak_gib']:.3f} (replayed "
                 f"{r['replayed_peak_gib']:.3f}), transient at peak {r['transient_at_peak_gib']:.3f}"
                 if "peak_gib" in r else ""))
        for g in r.get("at_peak", [])[:12]:
            print(f"   {g['gib']:7.3f} GiB {g['blocks']:4d}  {g['where']}")
        for c in r.get("full_size_fp32_allocs", [])[:8]:
            print(f"   >= fp32 full-size alloc: {c['bytes'] / 2**20:.0f} MiB x{c['count']}  {c['where']}")


if __name__ == "__main__":
    main()
