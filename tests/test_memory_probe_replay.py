"""scripts/gpu/memory_probe.py's replay of a CUDA allocator trace (torch.cuda.memory._snapshot()'s device_traces):
allocated bytes rise at 'alloc' and fall at 'free_requested'; segment and free_completed events move nothing."""
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu" / "memory_probe.py"


def _probe():
    spec = importlib.util.spec_from_file_location("memory_probe", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ev(action, addr, size):
    return {"action": action, "addr": addr, "size": size, "frames": []}


def test_replay_counts_alloc_and_free_requested_only():
    trace = [_ev("segment_alloc", 0, 1 << 20), _ev("alloc", 0, 100), _ev("alloc", 512, 50),
             _ev("free_requested", 0, 100), _ev("free_completed", 0, 100), _ev("segment_free", 0, 1 << 20),
             _ev("alloc", 1024, 30)]
    peak, live = _probe().peak_live_set(trace, base_bytes=1000)
    assert peak == 1150 and set(live) == {0, 512}


def test_a_persistent_block_freed_during_the_trace_leaves_the_level():
    """base_bytes counts blocks allocated before the trace; when one of them is freed (a 'free_requested' with no
    'alloc' in the trace) the level drops, so a later allocation of the same size is no new peak."""
    trace = [_ev("alloc", 0, 100), _ev("free_requested", 4096, 400), _ev("alloc", 512, 350)]
    peak, live = _probe().peak_live_set(trace, base_bytes=1000)
    assert peak == 1100 and set(live) == {0}
