"""Named variants (attention pattern) x sizes (widths, depths) -> ``create_model``."""
from __future__ import annotations

import inspect
from typing import Any

from .attention import attention_class, attention_kinds, option_keys, validate_options
from .backbone import VisionAttnTransformer, stage_windows
from .errors import ConfigError

# Attention pattern per variant (it cycles over each stage's blocks) and its size family.
VARIANTS: dict[str, dict[str, Any]] = {
    "swin": dict(block_pattern=["window", "shifted_window"], family="swin"),
    "swin_window": dict(block_pattern=["window"], family="swin"),
    "swin_local": dict(block_pattern=["neighborhood"], family="nat"),
    "swin_dilated": dict(block_pattern=["neighborhood", "dilated"], family="nat"),
    "swin_global": dict(block_pattern=["global"], family="swin"),
    "maxvit_like": dict(block_pattern=["window", "grid"], family="swin"),
    # Beyond local windows: each entry's ``defaults`` are backbone kwargs (config keys may override).
    "swin_global_tokens": dict(block_pattern=["window", "shifted_window"], family="swin",
                               defaults=dict(global_tokens=4)),
    "swin_sr": dict(block_pattern=["spatial_reduction"], family="swin", defaults=dict(sr_ratio=[8, 4, 2, 1])),
    "swin_lsh": dict(block_pattern=["lsh"], family="swin"),
    "swin_routed": dict(block_pattern=["routed"], family="swin"),
}

# Swin-T/S/B for tiny/small/base; pico and nano train in minutes on a 2-core CPU and are
# shared by every variant, so small ablations compare attention kinds alone.
_SMALL = dict(stem="patch", downsample="merge", mlp_ratio=4.0)
SIZES: dict[str, dict[str, Any]] = {
    "pico": dict(embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], window_size=4, kernel_size=5,
                 drop_path_rate=0.1, **_SMALL),
    "nano": dict(embed_dim=48, depths=[2, 2, 4, 2], num_heads=[2, 4, 8, 16], window_size=4, kernel_size=5,
                 drop_path_rate=0.1, **_SMALL),
    "tiny": dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, kernel_size=7,
                 drop_path_rate=0.2, **_SMALL),
    "small": dict(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24], window_size=7, kernel_size=7,
                  drop_path_rate=0.3, **_SMALL),
    "base": dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=7, kernel_size=7,
                 drop_path_rate=0.5, **_SMALL),
}

# NAT-T/S/B (and DiNAT) shapes for the local kinds: conv tokenizer and downsampler.
_NAT = dict(stem="conv", downsample="conv", depths=[3, 4, 18, 5], window_size=7, kernel_size=7)
NAT_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dim=64, num_heads=[2, 4, 8, 16], mlp_ratio=3.0, drop_path_rate=0.2, **_NAT),
    "small": dict(embed_dim=96, num_heads=[3, 6, 12, 24], mlp_ratio=2.0, drop_path_rate=0.3,
                  layer_scale_init_value=1e-5, **_NAT),
    "base": dict(embed_dim=128, num_heads=[4, 8, 16, 32], mlp_ratio=2.0, drop_path_rate=0.5,
                 layer_scale_init_value=1e-5, **_NAT),
}

# DiNAT-style dilations per stage (cycled over a stage's blocks) for the dilated variant.
DILATIONS: dict[str, list[list[int]]] = {
    "pico": [[1, 2], [1, 1], [1], [1]],
    "nano": [[1, 2], [1, 1], [1], [1]],
    "tiny": [[1, 8], [1, 4], [1, 2], [1]],
    "small": [[1, 8], [1, 4], [1, 2], [1]],
    "base": [[1, 8], [1, 4], [1, 2], [1]],
}


def size_defaults(variant: str, size: str) -> dict[str, Any]:
    """Widths, depths and layer choices of ``size`` for the variant's family."""
    if VARIANTS[variant]["family"] == "nat" and size in NAT_SIZES:
        return dict(NAT_SIZES[size])
    return dict(SIZES[size])


def backbone_keys() -> set[str]:
    """The backbone's own arguments, and every registered kind's options (vision_attn/attention/options.py)."""
    params = inspect.signature(VisionAttnTransformer).parameters.values()
    own = {p.name for p in params if p.kind is not p.VAR_KEYWORD}
    return own | set(option_keys())


def model_kwargs(variant: str, size: str = "tiny", **overrides: Any) -> dict[str, Any]:
    """Resolve variant + size + overrides (None = keep the default) into backbone kwargs."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown model variant {variant!r} (model.variant); choose one of {sorted(VARIANTS)}")
    if size not in SIZES:
        raise ConfigError(f"unknown model.size={size!r}; choose one of {list(SIZES)}")
    kwargs: dict[str, Any] = {**size_defaults(variant, size), "block_pattern": VARIANTS[variant]["block_pattern"]}
    kwargs.update(VARIANTS[variant].get("defaults", {}))
    if "dilated" in kwargs["block_pattern"]:
        kwargs["dilations"] = DILATIONS[size]
    keys = backbone_keys()
    for key, value in overrides.items():
        if key not in keys:
            raise ConfigError(f"unknown model key model.{key}; valid keys: {sorted(keys)}")
        if value is not None:
            kwargs[key] = value
    validate(kwargs)
    return kwargs


def _positive(kwargs: dict[str, Any], key: str, minimum: int = 1) -> None:
    values = kwargs[key] if isinstance(kwargs[key], (list, tuple)) else [kwargs[key]]
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ConfigError(f"model.{key}={kwargs[key]} must be {what} (or one per stage)")


def _validate_global_tokens(kwargs: dict[str, Any]) -> None:
    """``model.global_tokens`` (and memory tokens): counts, and kinds that can read them."""
    if "global_tokens" in kwargs:
        _positive(kwargs, "global_tokens", minimum=0)
    tokens = kwargs.get("global_tokens", 0)
    for key, value in (("global_tokens", tokens), ("memory_tokens", kwargs.get("memory_tokens", 0))):
        if not (any(value) if isinstance(value, (list, tuple)) else value):
            continue
        kinds = dict.fromkeys(kwargs["block_pattern"])
        unsupported = [k for k in kinds if not attention_class(k).supports_global_tokens()]
        if unsupported:
            raise ConfigError(
                f"model.{key}={value} is not supported by attention kinds {unsupported} in "
                f"model.block_pattern; use 0 or kinds that expose attend_lse()"
            )


def _validate_option_owners(kwargs: dict[str, Any]) -> None:
    """A kind's option set (not None) on a model whose block pattern lacks that kind would do nothing."""
    pattern = list(dict.fromkeys(kwargs["block_pattern"]))
    used = {key for kind in pattern for key in attention_class(kind).options_class.keys()}
    for key in option_keys():
        if kwargs.get(key) is None or key in used:
            continue
        owners = [k for k in attention_kinds() if key in attention_class(k).options_class.keys()]
        variants = [v for v, d in VARIANTS.items() if set(owners) & set(d["block_pattern"])]
        raise ConfigError(
            f"model.{key}={kwargs[key]} is an option of the {' / '.join(owners)} attention, which this model's "
            f"block pattern {pattern} does not use, so it would do nothing: drop it, or pick a variant with that "
            f"kind ({', '.join(f'model={v}' for v in variants)})"
        )


def _validate_tiles(kwargs: dict[str, Any]) -> None:
    """``model.tile_size`` / ``memory_tokens`` / ``memory_bptt`` (vision_attn/tiling.py)."""
    def integer(key: str, minimum: int) -> Any:
        value = kwargs.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
            raise ConfigError(f"model.{key}={value} must be null or an integer >= {minimum}")
        return value

    reduction = kwargs.get("patch_size", 4) * 2 ** (len(kwargs["depths"]) - 1)
    tile = integer("tile_size", reduction)
    if tile is not None and tile % reduction:
        raise ConfigError(
            f"model.tile_size={tile} must be a multiple of the backbone's total stride {reduction} "
            f"(patch size x 2^(stages-1)), so that tiles cut the token maps of every stage cleanly; e.g. "
            f"{max(reduction, tile // reduction * reduction)}"
        )
    memory, bptt = integer("memory_tokens", 0), integer("memory_bptt", 1)
    if bptt is not None and not memory:
        raise ConfigError(f"model.memory_bptt={bptt} has no effect without memory: set model.memory_tokens >= 1 "
                          "or model.memory_bptt=null")


STEMS, DOWNSAMPLERS = ("patch", "conv"), ("merge", "conv")


def _validate_per_stage(kwargs: dict[str, Any], stages: int) -> None:
    """Per-stage lists have one entry per stage; dilations are integers >= 1; layer choices exist."""
    for key in ("kernel_size", "global_tokens"):
        value = kwargs.get(key)
        if isinstance(value, (list, tuple)) and len(value) != stages:
            raise ConfigError(f"model.{key}={list(value)} must be an integer or one per stage ({stages})")
    dilations = kwargs.get("dilations")
    if dilations is not None:
        ok = isinstance(dilations, (list, tuple)) and len(dilations) == stages and all(
            isinstance(d, (list, tuple)) and d
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in d)
            for d in dilations
        )
        if not ok:
            raise ConfigError(
                f"model.dilations={dilations} must hold one list of integers >= 1 per stage ({stages}), "
                "e.g. [[1,8],[1,4],[1,2],[1]]"
            )
    for key, choices in (("stem", STEMS), ("downsample", DOWNSAMPLERS)):
        if key in kwargs and kwargs[key] not in choices:
            raise ConfigError(f"model.{key}={kwargs[key]!r}: choose one of {list(choices)}")
    ratio = kwargs.get("mlp_ratio", 4.0)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio <= 0:
        raise ConfigError(f"model.mlp_ratio={ratio} must be a number > 0")


def _validate_windows(kwargs: dict[str, Any], stages: int) -> None:
    """``model.window_size`` per :func:`stage_windows`; non-square only for kinds that take it."""
    windows = stage_windows(kwargs.get("window_size", 7), stages)
    rect = [w for w in windows if not isinstance(w, int)]
    square_only = [k for k in dict.fromkeys(kwargs["block_pattern"])
                   if not getattr(attention_class(k), "non_square_window", False)]
    if rect and square_only:
        raise ConfigError(
            f"model.window_size={kwargs['window_size']}: non-square windows {rect} need window kinds, but "
            f"{square_only} in model.block_pattern read window_size as a square size; use an integer per stage"
        )


def validate(kwargs: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` naming the key for any inconsistent model setting."""
    for key in ("embed_dim", "kernel_size", "patch_size"):
        if key in kwargs:
            _positive(kwargs, key)
    depths, heads = list(kwargs["depths"]), list(kwargs["num_heads"])
    _validate_per_stage(kwargs, len(depths))
    if len(depths) != len(heads):
        raise ConfigError(f"model.depths={depths} and model.num_heads={heads} must have one entry per stage")
    for i, h in enumerate(heads):
        dim = kwargs["embed_dim"] * 2**i
        if not isinstance(h, int) or h < 1 or dim % h:
            raise ConfigError(
                f"model.num_heads[{i}]={h} does not divide stage {i}'s width {dim} "
                f"(model.embed_dim * 2**{i}); pick a divisor of {dim}"
            )
    rate = kwargs.get("drop_path_rate", 0.0)
    if not 0.0 <= rate < 1.0:
        raise ConfigError(f"model.drop_path_rate={rate} must be in [0, 1)")
    unknown = [k for k in kwargs["block_pattern"] if k not in attention_kinds()]
    if unknown:
        raise ConfigError(f"model.block_pattern has unknown attention kinds {unknown}; registered: {attention_kinds()}")
    _validate_windows(kwargs, len(depths))
    validate_options(kwargs, len(depths))
    _validate_option_owners(kwargs)
    _validate_global_tokens(kwargs)
    _validate_tiles(kwargs)
