"""``ConfigError``: the one exception every layer raises for a config value that cannot work (a leaf module)."""


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""
