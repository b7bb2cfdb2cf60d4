"""Command-line entry points: ``train`` (``python -m softalign.main``), ``evaluate`` and ``convert``, with the
shared flag handling in ``common``."""
