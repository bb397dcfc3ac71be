"""Attention registry: one name -> one module class and its options. The backbone only looks names up here."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, Union

from timm.layers import register_notrace_module
from torch import nn

from .options import KindOptions, stage_values

_ATTENTION: dict[str, type[nn.Module]] = {}


@dataclass(frozen=True)
class AttnSpec:
    """What a stage's blocks share (geometry, projections, dropout, route) plus the kinds' own options.

    ``window_size``, ``kernel_size`` and ``dilation`` stay here: they are stage geometry that several
    kinds read (windows, grids, regions and bias extents; neighborhood and dilated kernels).
    """

    window_size: Union[int, tuple[int, int]] = 7  # window kinds take (wh, ww); the others a square int
    kernel_size: int = 7
    dilation: int = 1
    qkv_bias: bool = True
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    rel_pos_bias: bool = True
    attn_backend: str = "auto"  # the kernel route (attention/backends.py): auto, or route names per family
    #: Each kind's own options by flat config key, e.g. ``{"lsh_chunk": 32}``: a kind reads its
    #: registered :class:`~.options.KindOptions` from them and ignores the others' keys.
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @classmethod
    def of(cls, **values: Any) -> "AttnSpec":
        """A spec from flat keys as the config names them: ``AttnSpec.of(window_size=4, lsh_chunk=16)``."""
        own = {f.name for f in fields(cls)} - {"options"}
        unknown = sorted(set(values) - own - set(option_keys()))
        if unknown:
            raise TypeError(f"AttnSpec.of: unknown keys {unknown}; fields {sorted(own)}, kind options {option_keys()}")
        return cls(**{k: v for k, v in values.items() if k in own},
                   options={k: v for k, v in values.items() if k not in own})


def register_attention(name: str, options: type[KindOptions] = KindOptions
                       ) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator adding an attention kind under ``name``, with its options dataclass."""

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _ATTENTION:
            raise ValueError(f"attention kind {name!r} is registered twice")
        clash = set(options.keys()) & {k for o in _options_classes() if o is not options for k in o.keys()}
        if clash:
            raise ValueError(f"attention kind {name!r}: option keys {sorted(clash)} belong to another kind")
        _ATTENTION[name] = cls
        cls.kind = name
        cls.options_class = options
        # fx (timm's feature extraction, torchvision's create_feature_extractor): a kind is one leaf
        # call. Its route choice and geometry read concrete map sizes, which symbolic tracing cannot.
        register_notrace_module(cls)
        return cls

    return add


def attention_class(kind: str) -> type[nn.Module]:
    """The class registered as ``kind``."""
    try:
        return _ATTENTION[kind]
    except KeyError:
        raise KeyError(f"unknown attention kind {kind!r}; registered: {', '.join(attention_kinds())}") from None


def attention_kinds() -> list[str]:
    """Names of every registered attention kind."""
    return sorted(_ATTENTION)


def create_attention(kind: str, dim: int, num_heads: int, spec: AttnSpec) -> nn.Module:
    """Instantiate the attention module registered as ``kind``."""
    return attention_class(kind)(dim=dim, num_heads=num_heads, spec=spec)


def _options_classes() -> list[type[KindOptions]]:
    """Each registered options class once (kinds may share one, e.g. window and shifted_window)."""
    return list(dict.fromkeys(cls.options_class for cls in _ATTENTION.values()))


def option_keys() -> list[str]:
    """Every kind's flat config keys (``model.<key>``), sorted."""
    return sorted(k for o in _options_classes() for k in o.keys())


def validate_options(values: Mapping[str, Any], stages: int) -> None:
    """Each kind validates its keys in ``values`` (ConfigError naming ``model.<key>``)."""
    for options in _options_classes():
        options.validate_config(values, stages)


def stage_options(values: Mapping[str, Any], stage: int) -> dict[str, Any]:
    """The kinds' option values as stage ``stage`` sees them (per-stage lists indexed)."""
    out: dict[str, Any] = {}
    for options in _options_classes():
        out.update(stage_values(options, values, stage))
    return out
