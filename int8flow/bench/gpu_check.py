"""``python -m int8flow.bench gpu-check``: the whole test suite on a GPU machine, then a quick benchmark.

Run from the repository root on a machine with a CUDA GPU (the tests live in ``tests/``, beside the package):

    python3 -m int8flow.bench gpu-check

With CUDA present, tests/conftest.py runs every kernel test compiled on CUDA tensors, the GPU tiers
(``tests/test_gpu_kernels.py``: real shapes; ``tests/test_gpu_models.py``: GPT-2 / Llama in every mode against
a float32 twin, short training runs) run too, and the CPU-only tests still run. Afterwards ``bench kernels
--quick`` times the kernels against cuBLAS BF16 and copy bandwidth. The summary (device, versions, date,
passed / failed / skipped / error counts, failures by name, wall time of each part) goes to
``bench/results/<gpu>_gpu_tests.json`` (``h200_gpu_tests.json`` on an H200). Exit status 0 only when no
test failed or errored.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

from . import failure_log
from .common import device_info, require_cuda, result_path, write_json

# after the time limit's SIGINT, how long pytest may take to stop and write its report before it is killed
REPORT_GRACE_S = 60


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tests", default="tests", help="test directory (default: tests, run from the repository root)")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                   help="pytest-xdist processes sharing the GPU (default: the CPU count, at most 16; on the H200 "
                        "machine's 16 cores the suite took 421 s, with 8 workers 477 s)")
    p.add_argument("--out", default=None, help="summary JSON (default bench/results/<gpu>_gpu_tests.json)")
    p.add_argument("--no-bench", action="store_true", help="skip the quick kernel benchmark")
    p.add_argument("--pytest-args", default="", help="extra pytest arguments, e.g. \"-k gemm\"")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="interrupt the tests after this long (the summary then says incomplete); pytest then has "
                        f"{REPORT_GRACE_S} s to write its report, so give an outer time limit that much more; the "
                        "failures seen before the cut are named either way (failures_seen)")


SLOWEST = 20  # tests named in the summary with their durations


def parse_junit(path: str) -> dict:
    """Counts, failing test ids and the ``SLOWEST`` tests' durations (seconds) from a pytest junit XML report."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures, times = [], []
    for s in suites:
        counts["tests"] += int(s.get("tests", 0))
        counts["failed"] += int(s.get("failures", 0))
        counts["errors"] += int(s.get("errors", 0))
        counts["skipped"] += int(s.get("skipped", 0))
        for case in s.iter("testcase"):
            times.append((float(case.get("time") or 0.0), f"{case.get('classname')}::{case.get('name')}"))
            bad = case.find("failure")
            if bad is None:
                bad = case.find("error")
            if bad is not None:
                msg = (bad.get("message") or "").splitlines()
                failures.append({"test": f"{case.get('classname')}::{case.get('name')}",
                                 "kind": bad.tag, "message": msg[0][:300] if msg else ""})
    counts["passed"] = counts["tests"] - counts["failed"] - counts["errors"] - counts["skipped"]
    slowest = [{"test": name, "seconds": round(t, 2)} for t, name in sorted(times, reverse=True)[:SLOWEST]]
    return {**counts, "failures": failures, "slowest": slowest}


def main(args) -> int:
    require_cuda()
    info = device_info()
    out = args.out or result_path(info, "gpu_tests")
    with tempfile.TemporaryDirectory() as tmp:
        junit = os.path.join(tmp, "junit.xml")
        seen_log = os.path.join(tmp, "failures.log")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "int8flow.bench.failure_log",
               f"--junitxml={junit}", args.tests]
        if args.workers > 1:
            cmd += ["-n", str(args.workers)]
        cmd += args.pytest_args.split()
        t0 = time.time()
        proc = subprocess.Popen(cmd, env={**os.environ, failure_log.ENV: seen_log})
        incomplete = False
        try:
            rc = proc.wait(timeout=args.max_seconds)
        except subprocess.TimeoutExpired:  # like Ctrl-C: pytest stops and still writes its report
            incomplete = True
            proc.send_signal(signal.SIGINT)
            try:
                rc = proc.wait(timeout=REPORT_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
        test_s = time.time() - t0
        seen = failure_log.read(seen_log)  # failures named as they happened: kept even when the report is lost
        if os.path.exists(junit):
            summary = parse_junit(junit)
        else:
            print(f"gpu-check: pytest wrote no report (exit {rc}); counts unknown, the failures seen so far are kept",
                  file=sys.stderr)
            incomplete = True
            summary = {"tests": None, "failed": len(seen), "errors": None, "skipped": None, "passed": None,
                       "failures": [{"test": f["test"], "kind": f"failure ({f['phase']})", "message": ""} for f in seen]}
        summary["failures_seen"] = [f["test"] for f in seen]
    bench = None
    if not args.no_bench:
        t0 = time.time()
        brc = subprocess.call([sys.executable, "-m", "int8flow.bench", "kernels", "--quick"])
        bench = {"command": "python -m int8flow.bench kernels --quick", "exit": brc, "seconds": round(time.time() - t0, 1)}
    ok = summary["failed"] == 0 and summary["errors"] == 0 and rc == 0 and not incomplete
    record = {"command": " ".join(cmd[1:]), "pytest_exit": rc, "test_seconds": round(test_s, 1),
              "incomplete": incomplete, **summary,
              "bench": bench, "ok": ok}
    write_json(out, [], {**info, **record})
    print(f"gpu-check: {summary['passed']} passed, {summary['failed']} failed, {summary['errors']} errors, "
          f"{summary['skipped']} skipped in {test_s:.0f} s on {info['device']} -> {out}")
    for f in summary["failures"][:30]:
        print(f"  FAILED {f['test']}: {f['message']}")
    for t in summary.get("slowest", [])[:5]:
        print(f"  slow {t['seconds']:7.1f} s  {t['test']}")
    return 0 if ok else 1
