"""Graceful stops: SIGTERM (preemption) or Ctrl-C sets a flag that the training loop reads, so the run saves a
checkpoint and exits cleanly instead of dying mid-step.

The flag is installed before anything slow starts (``cli/train.py`` does it before importing JAX; a direct call
of ``train_and_evaluate`` installs its own first thing), so a SIGTERM that arrives while the tokenizer trains or
the step compiles also ends the run cleanly, with exit code 0, rather than with the default 143. Light imports
only: numpy and JAX are imported when the flag is first read by several processes.
"""

from __future__ import annotations

import signal

from absl import logging


class StopFlag:
    """Set by SIGTERM or Ctrl-C. A second Ctrl-C interrupts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.stop = False
        self.signal_name = ""
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame):
        if self.stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        logging.warning("%s received: the run stops at the next safe point (saving a checkpoint once training has "
                        "started) and exits", self.signal_name)
        self.stop = True

    def agreed(self, step: int, every: int, *local: bool) -> tuple[bool, ...]:
        """``(stop, *local)``, each true if it is true on any process. With one process every step; with several
        the processes agree every ``every`` steps (one that saw SIGTERM runs on to that step, so all of them join
        the same final multi-host save) and report False in between."""
        import jax

        flags = (self.stop, *local)
        if jax.process_count() == 1:
            return tuple(bool(f) for f in flags)
        if step % every:
            return (False,) * len(flags)
        import numpy as np
        from jax.experimental import multihost_utils

        gathered = multihost_utils.process_allgather(np.asarray(flags, np.int32))
        return tuple(bool(v) for v in np.max(np.asarray(gathered).reshape(-1, len(flags)), axis=0))

    def restore(self) -> None:
        """Puts the previous handlers back."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
