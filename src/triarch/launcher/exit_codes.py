"""Exit codes of ``triarch train`` (and of each rank): what a script or a scheduler can rely on.

Every non-zero code comes with one ``error:`` (or ``stopped``/``hang:``) line on stderr saying why.
"""

OK = 0
FAILED = 1  # a rank crashed or was killed (its log has the details)
CONFIG = 2  # bad input: config, flags, data, run directory, a layout that does not fit
NON_FINITE = 3  # the loss became NaN or infinite; stopped before the optimizer step
CHECKPOINT = 4  # a checkpoint could not be saved or loaded; committed checkpoints are untouched
HANG = 5  # the hang watchdog ended a run that stopped making progress
STOPPED = 6  # stopped before the last step (a signal, or SLURM's time-limit budget); checkpoint committed
DATA = 7  # the prepared data failed a check while training: a missing, truncated or damaged shard
INTERRUPTED = 128  # + signal number: a second Ctrl-C / TERM / HUP ended the run at once
