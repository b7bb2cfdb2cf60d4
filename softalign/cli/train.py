"""Training from the command line: ``python -m softalign.main --config=configs/demo.py --workdir=/tmp/run``
(or ``softalign-train`` once the package is installed).

Any config key can be overridden with ``--config.key=value`` (ml_collections); unknown keys are an error.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from softalign.cli import common

flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events and evaluation results.")
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
flags.DEFINE_enum("multihost", "auto", ["auto", "on", "off"],
                  "Start jax.distributed: auto = when the flags below are given or a TPU slice / SLURM job is "
                  "detected.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for an explicit multi-process start.")
flags.DEFINE_integer("num_processes", None, "Number of processes, with --coordinator_address.")
flags.DEFINE_integer("process_id", None, "This process's index, with --coordinator_address.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from softalign.training import signals  # light: installed before JAX is imported or the tokenizer trains

    stop_flag = signals.StopFlag()
    try:
        _train(stop_flag)
    finally:
        stop_flag.restore()


def _train(stop_flag) -> None:
    """Trains; each expected failure ends in one line on stderr: 2 config, 3 non-finite, 4 checkpoint save."""
    common.setup_logging()  # before the imports: their libraries' start-up chatter is filtered too
    common.quiet_async_write_noise()
    common.configure_xla_cpu(FLAGS.config.model.dtype)  # before JAX's CPU backend starts
    from softalign.config.errors import ConfigError  # after flag parsing: keeps --help fast
    from softalign.parallel import distributed
    from softalign.training import checkpointing, train

    distributed.initialize(FLAGS.multihost, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)

    try:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir, stop_flag)
    except ConfigError as e:
        print(f"softalign: config error: {e}", file=sys.stderr)
        sys.exit(2)
    except train.NonFiniteLossError as e:
        print(f"softalign: {e}", file=sys.stderr)
        sys.exit(3)
    except checkpointing.CheckpointSaveError as e:
        print(f"softalign: {e}", file=sys.stderr, flush=True)
        common.exit_now(4)  # pending background writes must not print their tracebacks during shutdown


def run() -> None:
    """The ``softalign-train`` console script."""
    app.run(main, flags_parser=common.parse_flags)


if __name__ == "__main__":
    run()
