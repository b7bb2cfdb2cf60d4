"""Shared command-line plumbing for ``softalign.main`` and ``softalign.evaluate``: one-line flag errors and quiet
library logs."""

from __future__ import annotations

import sys

from absl import flags, logging


class QuietLibraries:
    """Drops INFO chatter from checkpointing/data libraries (warnings still show); ``-v 0`` shows everything."""

    NOISY = ("/orbax/", "/grain/", "/jax/_src/", "/tensorboardX/", "/tensorflow_datasets/")

    def filter(self, record) -> bool:
        return record.levelno >= 30 or not any(part in record.pathname for part in self.NOISY)


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
