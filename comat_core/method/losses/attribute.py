"""Attribute concentration: keep each entity's attention inside its object's mask (docs/method.md §4).

For every entity (a noun and its attribute words) we know the text-encoder token positions and a
binary mask of the object. With ``A`` the head-averaged cross-attention map of one token:

* token loss, per layer and entity: ``(1 - sum_{u in mask} A_u / sum_u A_u)^2`` averaged over the
  entity's tokens, then over the image's entities;
* pixel loss, per resolution: the maps of that resolution's layers averaged, the entity's token
  maps summed, binary cross-entropy against the mask, averaged over entities.

Exactness notes (reference: CaraJ7/CoMat ``attn_utils/tc_loss_utils.py`` and
``attr_concen_utils/gsam_interface.py``):

* Layers: the token loss is summed over the captured layers (``layer_scale="sum"``, the reference:
  SD1.5's 10 layers at weight 1e-3 is the published recipe); the pixel loss is summed over
  resolutions. ``layer_scale="sd15"`` (the **Decision** for SDXL) multiplies the sum by
  ``10 / layers``, so SDXL's 46-layer sum weighs like SD1.5's 10 instead of 4.6 times more. A mean
  over layers would make SD1.5's term 10 times weaker than the recipe, and nearly inert under the
  0.1 gradient clip.
* Batch: both losses are divided by the batch size, counting images without entities (they add 0).
* Steps: the reference sums the losses of its captured steps; call this once per captured step
  and add the results.
* Heads: the reference takes the token ratio per head and averages over heads before squaring;
  we use the head-averaged map (the maps are averaged over heads), which the capture records.
* Mask resize: the reference resizes the mask with torchvision's antialiased bilinear ``Resize``
  and keeps every cell that gets any mask weight (``> 0``): a cell is on when the object touches
  it or comes within half a cell of it. :func:`resize_mask_bilinear_any` does the same (named after
  that rule; the masks stage's ``resize_mask_area_majority`` is another); a mask already at the map's
  resolution is unchanged.
* BCE: the reference uses ``nn.BCELoss`` on the summed map with no epsilon clamp (PyTorch floors
  each log term at -100). We do the same, in fp32 with autocast off; the summed map is only
  clamped into [0, 1] to absorb rounding (a sum of softmax probabilities can exceed 1 by an ulp,
  which BCE rejects). An (eps, 1 - eps) clamp would cut the gradient exactly at the pixels the
  loss most needs to move.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

SD15_LAYERS = 10  # cross-attention layers SD1.5 captures (mid block and up blocks 1-3): the recipe's scale


@dataclass
class EntityTarget:
    """One entity of one image: its token positions (attributes and noun) and its object mask."""

    token_indices: list[int]  # text-encoder token positions (BOS at 0)
    mask: Tensor  # [H, W], {0, 1}, any resolution


def resize_mask_bilinear_any(mask: Tensor, size: int) -> Tensor:
    """The mask at ``size x size`` as the reference resizes it: antialiased bilinear, then ``> 0``."""
    x = mask.detach().float().reshape(1, 1, *mask.shape[-2:])
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x[0, 0] > 0).float()


def _side(hw: int) -> int:
    side = math.isqrt(hw)
    if side * side != hw:
        raise ValueError(f"attention map has {hw} pixels: not a square latent")
    return side


def _token_columns(a: Tensor, token_indices: list[int]) -> Tensor:
    """``a[:, token_indices]`` with the index tensor copied to ``a``'s device without a host sync
    (indexing with a Python list copies it with a blocking transfer)."""
    index = torch.tensor(token_indices, dtype=torch.long).to(a.device, non_blocking=True)
    return a.index_select(-1, index)


def _check_tokens(entities: list[EntityTarget], n_tokens: int) -> None:
    for entity in entities:
        if not entity.token_indices:
            raise ValueError("an entity has no token indices")
        if min(entity.token_indices) < 0 or max(entity.token_indices) >= n_tokens:
            raise ValueError(f"entity token indices {entity.token_indices} are outside the {n_tokens} text tokens")


def token_loss(attention_map: Tensor, entities: list[EntityTarget]) -> Tensor:
    """One layer, one image. ``attention_map``: ``[h*w, T]``. Mean over entities of the mean over
    their tokens of ``(1 - attention inside the mask / total attention)^2``."""
    _check_tokens(entities, attention_map.shape[-1])
    side = _side(attention_map.shape[0])
    a = attention_map.float()
    per_entity = []
    for entity in entities:
        mask = resize_mask_bilinear_any(entity.mask, side).reshape(-1, 1).to(a.device, non_blocking=True)
        token_maps = _token_columns(a, entity.token_indices)  # [h*w, n]
        inside = (token_maps * mask).sum(0) / token_maps.sum(0).clamp(min=1e-12)
        per_entity.append(((1.0 - inside) ** 2).mean())
    return torch.stack(per_entity).mean()


def pixel_loss(attention_map: Tensor, entities: list[EntityTarget]) -> Tensor:
    """One resolution, one image. ``attention_map``: ``[h*w, T]`` (already averaged over the layers of
    that resolution). Mean over entities of BCE(sum of the entity's token maps, mask)."""
    _check_tokens(entities, attention_map.shape[-1])
    side = _side(attention_map.shape[0])
    a = attention_map.float()
    per_entity = []
    with torch.autocast(device_type=a.device.type, enabled=False):
        for entity in entities:
            mask = resize_mask_bilinear_any(entity.mask, side).reshape(-1).to(a.device, non_blocking=True)
            summed = _token_columns(a, entity.token_indices).sum(-1).clamp(0.0, 1.0)
            per_entity.append(F.binary_cross_entropy(summed, mask))
    return torch.stack(per_entity).mean()


def _zero(maps: dict[str, Tensor]) -> Tensor:
    """A zero loss on the maps' device, connected to their graph when they have one."""
    if not maps:
        return torch.zeros(())
    return sum(m.float().sum() for m in maps.values()) * 0.0


def _entities_at_resolutions(
    entities: list[EntityTarget], resolution_maps: dict[int, Tensor], device: torch.device
) -> dict[int, list[EntityTarget]]:
    """The entities with their masks resized once per map resolution (keyed by h*w) and moved to ``device``."""
    return {
        hw: [EntityTarget(e.token_indices, resize_mask_bilinear_any(e.mask, _side(hw)).to(device, non_blocking=True))
             for e in entities]
        for hw in resolution_maps
    }


def attribute_concentration_loss(
    maps: dict[str, Tensor], targets: list[list[EntityTarget]], layer_scale: str = "sum"
) -> tuple[Tensor, Tensor]:
    """Unweighted ``(token_loss, pixel_loss)`` for one captured step.

    ``maps``: layer name -> ``[B, h*w, T]`` (as ``AttentionCapture.pop()`` returns them);
    ``targets``: per image, its entities (possibly none). Both losses are averaged over the batch
    (images without entities count as 0); zeros when no image has an entity. ``layer_scale``: "sum"
    (the reference) or "sd15" (the sum times ``SD15_LAYERS / len(maps)``).
    """
    if layer_scale not in ("sum", "sd15"):
        raise ValueError(f"layer_scale must be 'sum' or 'sd15', got {layer_scale!r}")
    if not maps or not any(targets):
        zero = _zero(maps)
        return zero, zero.clone()
    first = next(iter(maps.values()))
    batch, device = first.shape[0], first.device
    if len(targets) != batch:
        raise ValueError(f"{len(targets)} target lists for a batch of {batch} attention maps")
    by_resolution: dict[int, list[Tensor]] = defaultdict(list)
    for layer_map in maps.values():
        if layer_map.shape[0] != batch:
            raise ValueError("attention maps of one step must share the batch size")
        by_resolution[layer_map.shape[1]].append(layer_map.float())
    resolution_maps = {hw: torch.stack(layer_maps).mean(0) for hw, layer_maps in by_resolution.items()}

    token_total, pixel_total = [], []
    for b, entities in enumerate(targets):
        if not entities:
            continue
        at = _entities_at_resolutions(entities, resolution_maps, device)
        token_total.append(torch.stack([token_loss(m[b], at[m.shape[1]]) for m in maps.values()]).sum())
        pixel_total.append(torch.stack([pixel_loss(m[b], at[hw]) for hw, m in resolution_maps.items()]).sum())
    tokens = torch.stack(token_total).sum() / batch
    if layer_scale == "sd15":
        tokens = tokens * (SD15_LAYERS / len(maps))
    return tokens, torch.stack(pixel_total).sum() / batch
