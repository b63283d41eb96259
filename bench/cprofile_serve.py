"""Run `main.py ARGS` under cProfile timed by the thread's CPU clock, and write the profile when it exits.

    python bench/cprofile_serve.py OUT.prof serve
    python bench/cprofile_serve.py --on-signal OUT.prof serve   # only between SIGUSR1 and SIGUSR2

`bench/run.py --cprofile` starts the first `serve` this way, with --on-signal (cprofile-serve.prof in the logs
folder): each scenario's measured load turns it on and off (RssSampler), so the profile holds the measured requests
and not the start-up's imports, or the set-up and checks between scenarios. Unlike
py-spy's samples, which are wall-clock and, on a saturated machine, land where the kernel preempted the process
(its socket writes), CPU time is charged to the Python function that spent it. cProfile's own cost (about twice
the CPU per request) weighs on call-heavy code more than on the rest: compare shares within one profile, and
before and after a change with the same tool, not against the benchmark's figures. Greenlet switches (SQLAlchemy's
async layer) confuse cumulative times under them; own times stay right.

    python -c "import pstats; pstats.Stats('cprofile-serve.prof').sort_stats('tottime').print_stats(40)"
"""

from __future__ import annotations

import cProfile
import runpy
import signal
import sys
import time
from pathlib import Path


def main() -> None:
    on_signal = sys.argv[1] == "--on-signal"
    out, *args = sys.argv[2:] if on_signal else sys.argv[1:]
    root = Path(__file__).resolve().parent.parent
    sys.argv = [str(root / "main.py"), *args]
    sys.path.insert(0, str(root))
    profile = cProfile.Profile(time.thread_time)
    if on_signal:  # the handlers run in the main thread, the event loop's, between two of its bytecodes
        signal.signal(signal.SIGUSR1, lambda *_: profile.enable())
        signal.signal(signal.SIGUSR2, lambda *_: profile.disable())
    try:
        if not on_signal:
            profile.enable()
        runpy.run_path(str(root / "main.py"), run_name="__main__")
    except SystemExit:
        pass
    finally:
        profile.disable()
        profile.dump_stats(out)


if __name__ == "__main__":
    main()
