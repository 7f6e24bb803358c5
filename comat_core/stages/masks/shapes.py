"""The ``shapes`` masks backend: the shapes world's judge as the segmenter (the world's Grounded-SAM).

For each image the judge finds its objects (palette quantisation, connected components, shape from
geometry; see ``comat_core.worlds.shapes.judge``). A noun is a shape word ("circle"); its result is
every recognised object of that shape: one box per object (xyxy pixels, exclusive ends), its score
the object's IoU with the shape template, and the OR of their masks. A noun that names a colour too
("red circle") gets only the objects of that colour. The masks stage passes bare nouns (it keeps
only nouns that occur once in the prompt), so there a noun's mask covers all objects of its shape,
as Grounding DINO + SAM would give for the noun. A noun the world has no shape for, or a shape not
found, is *not detected* (mask ``None``).
"""

from __future__ import annotations

import torch

from comat_core.stages.masks.backends import MaskBackend, NounResult
from comat_core.worlds.shapes.judge import segment
from comat_core.worlds.shapes.vocab import COLOURS, SHAPES


def _wanted(noun: str) -> tuple[str | None, str | None]:
    """``(colour or None, shape or None)`` named by a noun phrase."""
    words = noun.lower().split()
    shape = next((w for w in reversed(words) if w.rstrip("s") in SHAPES), None)
    colour = next((w for w in words if w in COLOURS), None)
    return colour, shape.rstrip("s") if shape else None


class ShapesBackend(MaskBackend):
    """The judge's segmentation behind ``MaskBackend`` (CPU, no model)."""

    @torch.no_grad()
    def detect_and_segment(self, images: torch.Tensor, nouns_per_image: list[list[str]]) -> list[dict[str, NounResult]]:
        results = []
        for image, nouns in zip(images, nouns_per_image):
            found = segment(image.float().cpu()) if nouns else []
            per_noun = {}
            for noun in nouns:
                colour, shape = _wanted(noun)
                hits = [f for f in found if shape and f.shape == shape and (colour is None or f.colour == colour)]
                if not hits:
                    per_noun[noun] = (torch.zeros(0, 4), torch.zeros(0), None)
                    continue
                boxes = torch.tensor([f.box for f in hits], dtype=torch.float32)
                scores = torch.tensor([f.iou for f in hits], dtype=torch.float32)
                mask = torch.from_numpy(sum(f.mask.astype(bool) for f in hits).astype(bool))
                per_noun[noun] = (boxes, scores, mask)
            results.append(per_noun)
        return results
