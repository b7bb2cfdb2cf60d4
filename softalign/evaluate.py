"""``python -m softalign.evaluate``: standalone evaluation of a checkpoint (see :mod:`softalign.cli.evaluate`)."""

from softalign.cli.evaluate import run

if __name__ == "__main__":
    run()
