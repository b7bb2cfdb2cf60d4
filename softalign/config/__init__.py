"""Configs: the schema with defaults (``schema``), the checks run before compiling (``checks``) and ``ConfigError``
(``errors``, a leaf every layer may import). Import the submodules directly; this package imports nothing."""
