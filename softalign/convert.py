"""``python -m softalign.convert``: open_clip / OpenAI CLIP weights in and out (see :mod:`softalign.cli.convert`)."""

from softalign.cli.convert import run

if __name__ == "__main__":
    run()
