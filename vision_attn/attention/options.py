"""Each attention kind's own options: a small frozen dataclass, registered with the kind.

A field names the flat config key it is read from (``model.lsh_chunk`` -> ``LSHOptions.chunk``),
so users keep one flat ``model.*`` namespace while the backbone passes the values through
without knowing them. Declare a field with :func:`option`; validation runs when the options are
built (``__post_init__``) and names the config key::

    @dataclass(frozen=True)
    class LSHOptions(KindOptions):
        chunk: int = option("lsh_chunk", 64, minimum=1, per_stage=True, doc="tokens per sorted chunk")

    @register_attention("lsh", options=LSHOptions)
    class LSHAttention(QKVAttention): ...
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ..errors import ConfigError


def option(key: str, default: Any, *, minimum: Optional[int] = None, choices: Optional[Mapping[str, str]] = None,
           per_stage: bool = False, doc: str = "") -> Any:
    """A :class:`KindOptions` field read from config key ``model.<key>``.

    ``minimum``: an integer >= minimum; ``choices``: one of these strings (value -> what it means);
    ``per_stage``: the config may give one value per stage (a list), each stage's block gets its own.
    """
    meta = dict(key=key, minimum=minimum, choices=choices, per_stage=per_stage, doc=doc)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class KindOptions:
    """Base of a kind's options; a kind with none registers this class itself (no fields)."""

    @classmethod
    def keys(cls) -> dict[str, dataclasses.Field]:
        """Config key -> field, for every field declared with :func:`option`."""
        return {f.metadata["key"]: f for f in dataclasses.fields(cls) if "key" in f.metadata}

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> "KindOptions":
        """Build from flat config values (one stage's); absent or None keys keep the default."""
        fields = cls.keys()
        return cls(**{fields[k].name: v for k, v in values.items() if k in fields and v is not None})

    @classmethod
    def validate_config(cls, values: Mapping[str, Any], stages: int) -> None:
        """Raise :class:`ConfigError` for any value of this kind's keys in ``values`` (all stages)."""
        lists = False
        for key, f in cls.keys().items():
            value = values.get(key)
            if isinstance(value, (list, tuple)):
                if not f.metadata["per_stage"] or len(value) != stages:
                    per = f" or one per stage ({stages})" if f.metadata["per_stage"] else ""
                    raise ConfigError(f"model.{key}={list(value)} must be {_what(f)}{per}")
                for i, v in enumerate(value):  # named by stage, before building says only the key
                    _check(f"{key}[{i}]", f, v)
                lists = True
        for stage in range(stages if lists else 1):  # each distinct stage's options as built (their own checks)
            cls.from_config(stage_values(cls, values, stage))

    def __post_init__(self) -> None:
        for key, f in type(self).keys().items():
            _check(key, f, getattr(self, f.name))
        self.check()

    def check(self) -> None:
        """Checks across fields or beyond :func:`option`'s (raise ConfigError naming the key)."""


def stage_values(cls: type[KindOptions], values: Mapping[str, Any], stage: int) -> dict[str, Any]:
    """``cls``'s keys in ``values`` as stage ``stage`` sees them (per-stage lists indexed)."""
    out = {}
    for key, f in cls.keys().items():
        if key in values:
            value = values[key]
            per_stage = f.metadata["per_stage"] and isinstance(value, (list, tuple))
            out[key] = value[stage] if per_stage else value
    return out


def _what(f: dataclasses.Field) -> str:
    minimum, choices = f.metadata["minimum"], f.metadata["choices"]
    if choices:
        return "one of " + " or ".join(f"{c!r} ({meaning})" for c, meaning in choices.items())
    if minimum is not None:
        return "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    return "a single value, not a list"


def _check(key: str, f: dataclasses.Field, value: Any) -> None:
    minimum, choices = f.metadata["minimum"], f.metadata["choices"]
    per = " (or one per stage)" if f.metadata["per_stage"] else ""
    if choices is not None and value not in choices:
        raise ConfigError(f"model.{key}={value!r}: choose {_what(f)[len('one of '):]}")
    if minimum is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ConfigError(f"model.{key}={value} must be {_what(f)}{per}")
