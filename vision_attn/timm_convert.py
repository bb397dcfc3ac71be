"""timm's ``SwinTransformer`` <-> our ``swin``, same weights and outputs: :func:`from_timm`, :func:`to_timm`."""
from __future__ import annotations

from torch import nn

from .backbone import VisionAttnTransformer
from .variants import VARIANTS


def _stage_window(block: nn.Module, stage: int) -> tuple[int, int]:
    """A timm block's (possibly shrunk, possibly non-square) window, checked against our shrinking rule."""
    window = tuple(int(w) for w in block.window_size)
    if getattr(block, "always_partition", False) and any(r <= w for r, w in zip(block.input_resolution, window)):
        raise ValueError(
            f"stage {stage}: timm's always_partition=True keeps a {window} window (and its shift) on a "
            f"{tuple(block.input_resolution)} map; from_timm follows timm's default (shrink to the map)"
        )
    return window


def from_timm(model: nn.Module) -> VisionAttnTransformer:
    """Our ``swin`` variant with the weights of a timm ``SwinTransformer`` (v1) and its outputs.

    Per-stage ``(h, w)`` windows are taken from timm's blocks (timm shrinks windows on small
    maps, per axis), and ``window_padding="timm"`` reproduces timm's padding where a feature map
    is not a multiple of the window (roll, zero-pad, attend the padded keys).
    """
    if type(model).__name__ != "SwinTransformer":
        raise TypeError(f"from_timm expects timm's SwinTransformer, got {type(model).__name__}")
    stages = list(model.layers)
    blocks = [stage.blocks[0] for stage in stages]
    embed = model.patch_embed.proj
    ours = VisionAttnTransformer(
        img_size=model.patch_embed.img_size,
        patch_size=embed.kernel_size[0],
        in_chans=embed.in_channels,
        num_classes=model.num_classes,
        embed_dim=embed.out_channels,
        depths=[len(stage.blocks) for stage in stages],
        num_heads=[b.attn.num_heads for b in blocks],
        block_pattern=VARIANTS["swin"]["block_pattern"],
        window_size=[_stage_window(b, i) for i, b in enumerate(blocks)],
        window_padding="timm",
        mlp_ratio=blocks[0].mlp.fc1.out_features / blocks[0].mlp.fc1.in_features,
        qkv_bias=blocks[0].attn.qkv.bias is not None,
        drop_path_rate=0.0,
        global_pool=model.head.global_pool.pool_type if hasattr(model.head.global_pool, "pool_type") else "avg",
    )
    ours.load_state_dict(model.state_dict(), strict=True)
    return ours.train(model.training)


def to_timm(model: VisionAttnTransformer) -> nn.Module:
    """timm's ``SwinTransformer`` with ``model``'s weights and outputs: the inverse of :func:`from_timm`,
    for a model fine-tuned here and deployed with timm. ``model`` must be a Swin: window / shifted
    window blocks with a bias, the patch stem and merges, one window size (timm shrinks it per stage
    as we do), and ``window_padding="timm"`` wherever a map is not a multiple of the window."""
    from timm.models.swin_transformer import SwinTransformer

    blocks = [stage.blocks for stage in model.layers]
    attn = [b.attn for stage in blocks for b in stage]
    kinds = [a.kind for a in attn]
    if any(k != ("window" if i % 2 == 0 else "shifted_window") for stage in blocks for i, k in
           enumerate(b.attn.kind for b in stage)) or any(a.relative_position_bias_table is None for a in attn):
        raise ValueError(f"to_timm needs a Swin (window / shifted_window blocks with a bias), got {sorted(set(kinds))}")
    img = model.patch_embed.img_size
    window = max(a.window_size for a in attn)
    maps = [(-(-img[0] // info["reduction"]), -(-img[1] // info["reduction"])) for info in model.feature_info]
    shrunk = [tuple(min(w, r) for w, r in zip(window, m)) for m in maps]  # timm's rule: the window shrinks to the map
    if any(tuple(min(w, r) for w, r in zip(b[0].attn.window_size, m)) != s for b, m, s in zip(blocks, maps, shrunk)):
        raise ValueError(f"to_timm needs one window size (timm has one per model, shrunk to small maps), got "
                         f"{[b[0].attn.window_size for b in blocks]} on maps {maps}")
    embed = model.patch_embed.proj
    theirs = SwinTransformer(
        img_size=img, patch_size=embed.kernel_size[0], in_chans=embed.in_channels, num_classes=model.num_classes,
        embed_dim=embed.out_channels, depths=[len(b) for b in blocks], num_heads=[b[0].attn.num_heads for b in blocks],
        window_size=window, mlp_ratio=blocks[0][0].mlp.fc1.out_features / blocks[0][0].mlp.fc1.in_features,
        qkv_bias=attn[0].qkv.bias is not None, drop_path_rate=0.0, global_pool=model.head.global_pool.pool_type,
    )
    padded = [i for i, (st, b) in enumerate(zip(theirs.layers, blocks)) if
              any(r % w for r, w in zip(st.blocks[0].input_resolution, st.blocks[0].window_size))]
    if padded and any(a.padding != "timm" for a in attn):
        raise ValueError(f"stages {padded} pad their maps to the window: timm attends the padded keys, this model "
                         "masks them (model.window_padding=mask); build it with window_padding='timm' to match timm")
    theirs.load_state_dict(model.state_dict(), strict=False)  # timm's index / mask buffers are its own
    return theirs.train(model.training)
