"""``python -m softalign.main``: training (see :mod:`softalign.cli.train`)."""

from softalign.cli.train import run

if __name__ == "__main__":
    run()
