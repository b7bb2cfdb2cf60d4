"""Research tools around a trained model, each a ``python -m softalign.tools.<name>`` command (see README, Tools).

They sit at the top of the layers with the CLI shims: they may import the public API, the CLI, training,
evaluation, interop and data, and nothing below imports them.
"""
