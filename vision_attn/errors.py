"""Errors users see: each names the config key (or path) at fault and how to fix it."""


class ConfigError(ValueError):
    """A config value is invalid. The message names the key, e.g. ``model.window_size``."""
