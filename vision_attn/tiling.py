"""Images larger than memory: tiles in raster order with a recurrent memory (RMT / Transformer-XL style).

With ``model.tile_size=T`` the backbone cuts an image into ``T x T`` tiles (the last row and
column may be narrower) and runs them one after another, top-left to bottom-right, row by row.
With ``model.memory_tokens=M`` every stage keeps ``M`` memory tokens for the image: each tile's
map attends to them like global tokens (read), the same blocks update them from the tile's tokens
(write), and the updated memory is what the next tile reads. The state lives in the forward call:
each image starts from the stage's learned initial memory, nothing is kept on the module, so a
checkpoint taken between any two batches resumes exactly.

* Where: before a tile reads the memory, each stage adds a learned projection of the tile's
  position (Fourier features of its centre as a fraction of the image height and width) to the
  memory tokens, so the memory knows where what it writes came from. The tiles themselves see no
  absolute position (the backbone has relative position biases only), so independent tiles
  cannot tell where they lie.
* Features: the area-weighted mean of the tiles' pooled, normed feature maps; with memory, the
  mean of the last stage's final memory tokens (normed) is concatenated to it, and the head reads
  both. ``memory_tokens=0`` with tiles is the baseline: independent tiles, pooled and averaged.
* Gradients flow through the memory across tiles; ``memory_bptt=K`` cuts them every ``K`` tiles
  (the memory is detached before tiles ``K, 2K, ...``).
* While gradients are on, every tile runs under activation checkpointing: the step keeps one
  tile's activations at a time (its forward is recomputed in backward), so peak memory is bounded
  by a tile, not by the image.
* Input: the image may stay uint8 with a ``prepare`` function (the data's normalisation) applied
  to each tile inside its checkpointed forward, so no float copy of the whole image exists: memory
  is the image's own bytes plus one tile's activations.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch.utils.checkpoint import checkpoint

Box = tuple[int, int, int, int]  # top, left, bottom, right (pixels, exclusive ends)
TileFn = Callable[..., tuple[torch.Tensor, tuple[torch.Tensor, ...]]]
Prepare = Callable[[torch.Tensor], torch.Tensor]  # a tile image -> the model's input (e.g. uint8 -> normalised)
POSITION_BANDS = 4  # frequencies 1, 2, 4, 8 (times pi) per axis: 16 features


def position_features(box: Box, height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """Fourier features ``(4 * POSITION_BANDS,)`` of a tile's centre as a fraction of the image size."""
    top, left, bottom, right = box
    centre = torch.tensor([(top + bottom) / (2 * height), (left + right) / (2 * width)], device=device)
    angles = centre[:, None] * (torch.pi * 2.0 ** torch.arange(POSITION_BANDS, device=device))
    return torch.cat([angles.sin(), angles.cos()], -1).flatten()


def tile_boxes(height: int, width: int, tile: int) -> list[Box]:
    """``T x T`` tiles covering ``height x width`` in raster order (row by row, left to right)."""
    return [
        (top, left, min(top + tile, height), min(left + tile, width))
        for top in range(0, height, tile)
        for left in range(0, width, tile)
    ]


def run_tiles(
    image: torch.Tensor,
    tile: int,
    tile_fn: TileFn,
    memory: Sequence[torch.Tensor],
    bptt: Optional[int] = None,
    checkpoint_tiles: bool = True,
    prepare: Optional[Prepare] = None,
    stitch: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Run ``tile_fn(tile_image, position, *memory) -> (pooled (B, F), new memory)`` over the tiles.

    ``position`` is the tile's :func:`position_features`. ``prepare``: applied to each tile's crop
    first (e.g. uint8 -> normalised float), inside the checkpoint, so only the crop is kept.

    Returns the area-weighted mean of the pooled features and the memory after the last tile;
    ``stitch``: ``tile_fn`` returns each tile's map ``(B, h, w, F)`` instead, and the maps are joined
    in the image's layout (rows of tiles side by side, rows stacked).
    ``bptt``: detach the memory every ``bptt`` tiles (None = full backpropagation through tiles).
    ``checkpoint_tiles``: recompute each tile in backward (only where gradients are on).
    """
    H, W = image.shape[-2:]
    boxes = tile_boxes(H, W, tile)
    memory = tuple(memory)
    pooled_sum: Optional[torch.Tensor] = None
    rows: list[tuple[int, list[torch.Tensor]]] = []  # stitch: (top, the row's tile maps)
    use_ckpt = checkpoint_tiles and torch.is_grad_enabled() and len(boxes) > 1
    run = tile_fn if prepare is None else _prepared(tile_fn, prepare)
    dtype = image.dtype if image.is_floating_point() else torch.get_default_dtype()
    for t, (top, left, bottom, right) in enumerate(boxes):
        if bptt and t and t % bptt == 0:
            memory = tuple(m.detach() for m in memory)
        crop = image[..., top:bottom, left:right]
        where = position_features((top, left, bottom, right), H, W, image.device).to(dtype)
        if use_ckpt:
            out, memory = checkpoint(run, crop, where, *memory, use_reentrant=False)
        else:
            out, memory = run(crop, where, *memory)
        if stitch:  # out: the tile's map
            if not rows or rows[-1][0] != top:
                rows.append((top, []))
            rows[-1][1].append(out)
            continue
        weighted = out * ((bottom - top) * (right - left) / (H * W))
        pooled_sum = weighted if pooled_sum is None else pooled_sum + weighted
    if stitch:
        return torch.cat([torch.cat(maps, dim=2) for _, maps in rows], dim=1), tuple(memory)
    return pooled_sum, tuple(memory)


def _prepared(tile_fn: TileFn, prepare: Prepare) -> TileFn:
    """``tile_fn`` with ``prepare`` applied to its tile image first."""

    def run(crop: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        return tile_fn(prepare(crop), *rest)

    return run
