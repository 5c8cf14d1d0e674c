"""A pytest plugin for `gpu_check`: each failing test's id, appended to a file the moment it fails.

``pytest -p int8flow.bench.failure_log`` with ``INT8FLOW_FAILURE_LOG=<path>`` in the environment appends one line
per failed phase (``<node id>\\t<setup|call|teardown>``). The junit report is written only when pytest ends; a run
cut by a time limit (the GPU machine's per-call limit) keeps the names of the failures seen so far here. Under
pytest-xdist only the controller writes (the workers' reports reach it), so a failure is listed once.
"""
from __future__ import annotations

import os

ENV = "INT8FLOW_FAILURE_LOG"


_WORKER = False  # set per process by pytest_configure: an xdist worker forwards its reports, the controller writes


def pytest_configure(config) -> None:
    global _WORKER
    _WORKER = hasattr(config, "workerinput")  # xdist's mark of a worker (an env variable would leak to subprocesses)


def pytest_runtest_logreport(report) -> None:
    path = os.environ.get(ENV)
    if not path or not report.failed or _WORKER:
        return
    with open(path, "a") as f:  # one short line per write: appends from one process stay whole
        f.write(f"{report.nodeid}\t{report.when}\n")
        f.flush()


def read(path: str) -> list[dict]:
    """The failures a log holds, in order, each id once: ``[{"test": node id, "phase": when}]``."""
    if not os.path.exists(path):
        return []
    seen, out = set(), []
    with open(path) as f:
        for line in f:
            test, _, phase = line.rstrip("\n").partition("\t")
            if test and test not in seen:
                seen.add(test)
                out.append({"test": test, "phase": phase})
    return out
