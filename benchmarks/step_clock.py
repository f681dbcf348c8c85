"""Runs a training script and clocks its optimizer steps from the outside, the same way for any
trainer built on accelerate: every ``Accelerator.backward`` call is timestamped (seconds since this
process started), and after ``N`` of them the timestamps are written as JSON and the process ends
(the end-of-run save and sample grids are not part of the comparison).

    python benchmarks/step_clock.py OUT.json N path/to/script.py ARGS...   # a script, as __main__
    python benchmarks/step_clock.py OUT.json N -m pipeline.cli ARGS...       # a module, as __main__
"""
from __future__ import annotations

import time

T0 = time.perf_counter()

import json  # noqa: E402
import os  # noqa: E402
import runpy  # noqa: E402
import sys  # noqa: E402


def main() -> None:
    out, n, *cmd = sys.argv[1:]
    n = int(n)
    import accelerate

    stamps: list[float] = []
    original = accelerate.Accelerator.backward

    def backward(self, loss, **kwargs):
        original(self, loss, **kwargs)
        stamps.append(round(time.perf_counter() - T0, 4))
        if len(stamps) == n:
            with open(out, "w") as f:
                json.dump({"command": cmd, "backward_done_s": stamps}, f)
            sys.stdout.flush()
            os._exit(0)

    accelerate.Accelerator.backward = backward
    if cmd[0] == "-m":
        sys.argv = [cmd[1], *cmd[2:]]
        runpy.run_module(cmd[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = cmd
        sys.path.insert(0, os.path.dirname(os.path.abspath(cmd[0])))
        runpy.run_path(cmd[0], run_name="__main__")
    raise SystemExit(f"the script ended after {len(stamps)} of {n} steps")


if __name__ == "__main__":
    main()
