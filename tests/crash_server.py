"""Fork server for the crash tests: imports torch, transformers and offsite once, then runs each request
(one ``offsite.tune.tune`` call, optionally killed at a write point, see ``crash.py``) in a fresh child
process made by ``fork``. The parent never runs a torch operation, so forking it is safe.

Protocol: one JSON request per line on stdin, one JSON line ``{"exit": code}`` per request on stdout
(code < 0: killed by that signal). A child that finishes writes what it observed to ``request["result"]``:
the run's outcome, and every checkpoint it saved or loaded as (recorded step, optimizer steps applied).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import crash  # noqa: E402
import opacus.accountants  # noqa: E402, F401  (imported here so that children do not)
import opacus.optimizers  # noqa: E402, F401
import torch  # noqa: E402

from offsite.privacy import receipt as receipt_module  # noqa: E402, F401
from offsite.training import checkpoint  # noqa: E402
from offsite.tune import TuneOptions, tune  # noqa: E402


def _applied(optimizer) -> int:
    if optimizer is None:
        return 0
    return max((int(st["step"]) for st in optimizer.state.values() if "step" in st), default=0)


def _warm(request: dict) -> None:
    """One whole run in this process, without hooks, so that every child starts with the imports done,
    the model classes resolved and the accountant's caches filled: a child then takes well under a
    second. The run is single-threaded, so no OpenMP thread pool exists at fork time."""
    _tune(request)


def _tune(request: dict):
    opts = dict(request["options"])
    for key in ("keys_dir", "budget_dir"):
        opts[key] = opts[key] and Path(opts[key])
    return tune(request["bundle"], request["data"], request["out"], TuneOptions(**opts))


def _child(request: dict) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # stdout is the protocol channel
    seen: dict = {"saves": [], "loads": []}
    save, load = checkpoint.save, checkpoint.load

    def logged_save(directory, params, optimizer, meta):
        seen["saves"].append([meta["step"], _applied(optimizer)])
        return save(directory, params, optimizer, meta)

    def logged_load(directory, params, optimizer, check=None):
        meta = load(directory, params, optimizer, *([check] if check else []))
        seen["loads"].append([meta["step"], _applied(optimizer)])
        return meta

    checkpoint.save, checkpoint.load = logged_save, logged_load
    crash.install(request["root"], request["kill_at"], request["log"])
    try:
        result = _tune(request)
        seen.update(
            ok=True,
            run_id=result.run_id,
            resumed_from=result.resumed_from,
            steps=result.plan.steps,
            receipt=result.receipt,
        )
    except Exception as e:  # reported to the test, which decides
        seen.update(ok=False, error=f"{type(e).__name__}: {e}")
    with open(request["result"], "w") as f:  # outside the watched root: not a write point
        json.dump(seen, f)
    os._exit(0)


def main() -> None:
    torch.set_num_threads(1)
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("warm"):
            _warm(request)
            sys.stdout.write(json.dumps({"exit": 0}) + "\n")
            sys.stdout.flush()
            continue
        pid = os.fork()
        if pid == 0:
            try:
                _child(request)
            finally:
                os._exit(70)
        _, status = os.waitpid(pid, 0)
        sys.stdout.write(json.dumps({"exit": os.waitstatus_to_exitcode(status)}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
