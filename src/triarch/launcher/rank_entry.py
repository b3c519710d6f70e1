"""A locally launched rank's entry point: ``launcher.rank_main``, with a Ctrl-C (or the launcher's stop request,
SIGUSR2) that lands while the rank is still starting (importing torch, meeting the other ranks: before its own
handling, ``launcher.stop_signal``, takes over) ending it at once with exit 130, which the launcher reports in
one line, instead of a traceback per rank or a rank killed by the signal. Nothing is written before the rank's
own handler is in place, so leaving without unwinding loses nothing; raising KeyboardInterrupt instead can land
inside a half-done import (numpy's lazy submodules then recurse until RecursionError).

    python -m triarch.launcher.rank_entry RUN_DIR [CONFIG]
"""

import os
import signal

INTERRUPTED = 130  # 128 + SIGINT


def _leave(signum: int, frame: object) -> None:
    os._exit(INTERRUPTED)


for _sig in (signal.SIGINT, signal.SIGUSR2):
    signal.signal(_sig, _leave)

from triarch.launcher.rank_main import main  # noqa: E402  (after the handlers: the import takes seconds)

if __name__ == "__main__":
    main()
