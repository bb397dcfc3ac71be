"""Errors users see: each names the config key (or path) at fault and how to fix it."""


class ConfigError(ValueError):
    """A config value is invalid. The message names the key, e.g. ``model.window_size``."""


def config_error_in(exc: BaseException) -> "ConfigError | None":
    """The ConfigError behind ``exc`` (Hydra's instantiate wraps errors), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ConfigError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class TrainingDiverged(RuntimeError):
    """The training loss became NaN/Inf; the message names the step. Checkpoints are left as they were."""
