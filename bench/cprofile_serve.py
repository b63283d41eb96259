"""Run `main.py ARGS` under cProfile timed by the thread's CPU clock, and write the profile when it exits.

    python bench/cprofile_serve.py OUT.prof serve

`bench/run.py --cprofile` starts the first `serve` this way (cprofile-serve.prof in the logs folder). Unlike
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
import sys
import time
from pathlib import Path


def main() -> None:
    out, *args = sys.argv[1:]
    root = Path(__file__).resolve().parent.parent
    sys.argv = [str(root / "main.py"), *args]
    sys.path.insert(0, str(root))
    profile = cProfile.Profile(time.thread_time)
    try:
        profile.enable()
        runpy.run_path(str(root / "main.py"), run_name="__main__")
    except SystemExit:
        pass
    finally:
        profile.disable()
        profile.dump_stats(out)


if __name__ == "__main__":
    main()
