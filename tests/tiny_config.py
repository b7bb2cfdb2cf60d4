"""Config file form of tests/tiny.py, for runs through ``python -m softalign.main``."""

from tiny import tiny_config


def get_config():
    return tiny_config()
