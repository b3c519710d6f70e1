"""A locally launched rank's entry point: ``launcher.rank_main``, with a Ctrl-C (or the launcher's stop request)
that lands while the rank is still starting (importing torch, before its own signal handling is in place)
ending it quietly with exit 130, which the launcher reports once, instead of a traceback per rank or a rank
killed by the signal.

    python -m triarch.launcher.rank_entry RUN_DIR [CONFIG]
"""

import signal
import sys

INTERRUPTED = 130  # 128 + SIGINT


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


# the launcher turns a Ctrl-C into SIGUSR2 for its ranks (a stop request); until the rank's own handler takes
# over (``training.run_control``), that request interrupts the start-up as Ctrl-C does, instead of killing it
signal.signal(signal.SIGUSR2, _interrupt)

try:
    from triarch.launcher.rank_main import main
except KeyboardInterrupt:
    sys.exit(INTERRUPTED)

if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(INTERRUPTED)
