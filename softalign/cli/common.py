"""Shared command-line plumbing for ``softalign.main`` and ``softalign.evaluate``: one-line flag errors and quiet
library logs."""

from __future__ import annotations

import os
import sys

from absl import flags, logging


def configure_xla_cpu(dtype_name: str) -> None:
    """The XLA:CPU flags measured faster for this matmul dtype (``models.precision.configure_xla_cpu``); silent
    here (a config error must stay one line on stderr), the train loop's start-up line says what was set."""
    from softalign.models import precision

    precision.configure_xla_cpu(dtype_name)


class QuietLibraries:
    """Drops INFO chatter from checkpointing/data libraries (warnings still show, without their tracebacks: a
    failed asynchronous checkpoint write is logged by several Orbax threads, and softalign reports it in one line);
    ``-v 0`` shows everything."""

    NOISY = ("/orbax/", "/grain/", "/jax/_src/", "/tensorboardX/", "/tensorflow_datasets/", "/faiss/")

    def filter(self, record) -> bool:
        if not any(part in record.pathname for part in self.NOISY):
            return True
        if record.levelno >= 30 and record.exc_info:
            record.exc_info, record.exc_text = None, None
        return record.levelno >= 30


def quiet_async_write_noise() -> None:
    """Silences the echoes of a failed asynchronous write (unless a verbosity was chosen): once one tensorstore
    write fails, Orbax's event loop closes and every other pending write reports ``RuntimeError: Event loop is
    closed`` as an unraisable exception (measured: 145 tracebacks for a full disk). The failure itself is reported
    by the loop in one line; other unraisable exceptions still print."""
    if flags.FLAGS["verbosity"].present:
        return
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        previous(unraisable)

    sys.unraisablehook = hook


def exit_now(code: int) -> None:
    """Flushes the output and exits at once, skipping interpreter shutdown: after a failed checkpoint write,
    Orbax's abandoned write coroutines would otherwise each print a traceback while the interpreter tears down."""
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def setup_logging() -> None:
    """INFO logs without library chatter, unless the user chose a verbosity."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.INFO)
        logging.get_absl_handler().addFilter(QuietLibraries())


def _overrides(argv: list[str]) -> str:
    return " ".join(a for a in argv[1:] if a.startswith("--config."))


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with config override mistakes (e.g. an unknown key) reported in one line, exit code 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"softalign: {e}\nPass --helpfull to see the flags.", file=sys.stderr)
        sys.exit(2)
    except (AttributeError, KeyError) as e:
        print(f"softalign: config error: unknown config key {e} in {_overrides(argv)}", file=sys.stderr)
        sys.exit(2)
    except (TypeError, ValueError) as e:
        print(f"softalign: config error: cannot apply {_overrides(argv)}: {e}", file=sys.stderr)
        sys.exit(2)
