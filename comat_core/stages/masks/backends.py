"""Grounded-SAM behind one interface: Grounding DINO boxes per noun, then SAM masks per box (docs/method.md §4).

``MaskBackend.detect_and_segment(images, nouns_per_image)`` takes a batch of images ``[B, 3, H, W]``
in [0, 1] (as the VAE decodes them, already on the device) and each image's nouns, and returns per
image ``{noun: (boxes [k, 4] xyxy pixels, scores [k], mask [H, W] bool or None)}``.

Both backends share the detector (transformers' ``GroundingDinoForObjectDetection``; the original
``groundingdino-py`` breaks under transformers 5 and pulls a CUDA torch) and differ in SAM:

The backend for a config is built by ``factory.make_backend``, which imports the segmenters;
this module imports neither, so each segmenter imports the interface here without a circle.

* ``hf`` (``hf.py``): transformers' ``SamModel`` (Hugging Face checkpoints, e.g. facebook/sam-vit-huge);
* ``gsam`` (``gsam.py``): the original ``segment_anything`` package (``.pth`` checkpoints, e.g.
  sam_vit_h_4b8939.pth), the ``gsam`` extra.

Detection, as Grounded-SAM does it: caption = the nouns joined by " . " plus a trailing " .";
a query is a box when its best token probability (over the whole caption, as the processor's
post-processing computes it) exceeds ``box_threshold``; it belongs to the noun whose caption
segment holds its most probable token, provided that token's probability exceeds
``text_threshold`` (the noun is in the query's thresholded phrase); the ``max_boxes_per_noun``
highest-scoring boxes of each noun go to SAM, and the masks of one noun are OR-ed. A noun with no
box, or whose OR-ed mask is empty, has mask ``None``: it is *not detected*, never an all-zero mask.

Preprocessing runs batched on the device with the processors' own settings (resize, ImageNet
normalisation, SAM's longest-side resize and padding), with no PIL round trip.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

from comat_core.errors import ConfigError

NounResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


class MaskBackend(ABC):
    """Images and their nouns → boxes, scores and one mask per noun."""

    @abstractmethod
    def detect_and_segment(self, images: torch.Tensor, nouns_per_image: list[list[str]]) -> list[dict[str, NounResult]]:
        ...


class BoxSegmenter(ABC):
    """SAM behind one call: per image, boxes (xyxy, pixels of ``images``) → one boolean mask per box.

    Both SAM flavours resize the longest side to ``longest`` px; images without boxes skip the model.
    """

    longest: int

    def resized(self, height: int, width: int) -> tuple[int, int]:
        """The model's input size for an image of ``height x width`` (longest side ``self.longest``)."""
        scale = self.longest / max(height, width)
        return int(height * scale + 0.5), int(width * scale + 0.5)

    @torch.no_grad()
    def segment(self, images: torch.Tensor, boxes: list[torch.Tensor]) -> list[torch.Tensor]:
        """``images [B, 3, H, W]`` in [0, 1], ``boxes[b]: [k_b, 4]`` → ``masks[b]: [k_b, H, W]`` bool."""
        height, width = images.shape[-2:]
        out = [torch.zeros(len(b), height, width, dtype=torch.bool) for b in boxes]
        todo = [i for i, b in enumerate(boxes) if len(b)]
        if not todo:
            return out
        new_h, new_w = self.resized(height, width)
        scale = torch.tensor([new_w / width, new_h / height, new_w / width, new_h / height])
        masks = self.segment_resized(images[todo], [boxes[i] * scale for i in todo], (new_h, new_w))
        for i, m in zip(todo, masks):
            out[i] = m
        return out

    @abstractmethod
    def segment_resized(self, images: torch.Tensor, boxes: list[torch.Tensor],
                        size: tuple[int, int]) -> list[torch.Tensor]:
        """Images that all have boxes; boxes already scaled to the resized ``size`` → masks at the images' size."""


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision on GPU (weights stay fp32, matmuls run in ``dtype``); a no-op on CPU or for fp32."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def resize_images(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize, antialiased when shrinking (as PIL's bilinear filter is)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    shrink = size[0] < images.shape[-2] or size[1] < images.shape[-1]
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def caption_for(nouns: list[str]) -> str:
    """Grounding DINO's caption: ``"cat . red car ."``."""
    return " . ".join(nouns) + " ."


# ----------------------------------------------------------------------------------------------
# Detection


class GroundingDinoDetector:
    """Grounding DINO (transformers) → per image ``{noun: (boxes [k, 4], scores [k])}`` for detected nouns."""

    def __init__(self, model, processor, *, box_threshold: float, text_threshold: float, max_boxes_per_noun: int,
                 image_size: int | None = None, precision: torch.dtype = torch.float32):
        self.model, self.tokenizer = model, processor.tokenizer
        ip = processor.image_processor
        self.shortest = image_size or ip.size.shortest_edge
        self.longest = None if image_size else ip.size.longest_edge
        self.mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(ip.image_std).view(1, 3, 1, 1)
        self.box_threshold, self.text_threshold = box_threshold, text_threshold
        self.max_boxes = max_boxes_per_noun
        self.precision = precision
        self.max_text_len = int(getattr(model.config, "max_text_len", 256))
        self.dot_id = self.tokenizer.convert_tokens_to_ids(".")
        self.skip_ids = {self.tokenizer.cls_token_id, self.tokenizer.pad_token_id}
        if self.shortest is None:
            raise ConfigError("the Grounding DINO processor has no shortest_edge size; set masks.detector_image_size")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The processor's resize rule: shortest side to ``shortest_edge``, longest side at most ``longest_edge``."""
        scale = self.shortest / min(height, width)
        if self.longest is not None and max(height, width) * scale > self.longest:
            scale = self.longest / max(height, width)
        return round(height * scale), round(width * scale)

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        x = resize_images(images.float(), self.input_size(*images.shape[-2:]))
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def noun_positions(self, input_ids: list[int], n_nouns: int) -> list[list[int]]:
        """Token positions of each noun: the caption's segments between "." tokens, up to [SEP]."""
        segments, current = [], []
        for pos, tok in enumerate(input_ids):
            if tok in self.skip_ids:
                continue
            if tok == self.dot_id or tok == self.tokenizer.sep_token_id:
                if current:
                    segments.append(current)
                current = []
                if tok == self.tokenizer.sep_token_id:
                    break
            else:
                current.append(pos)
        return (segments + [[]] * n_nouns)[:n_nouns]  # a truncated caption loses its last nouns

    @torch.no_grad()
    def detect(self, images: torch.Tensor, nouns_per_image: list[list[str]]) -> list[dict[str, tuple]]:
        out: list[dict[str, tuple]] = [{} for _ in nouns_per_image]
        todo = [b for b, nouns in enumerate(nouns_per_image) if nouns]
        if not todo:
            return out
        text = self.tokenizer([caption_for(nouns_per_image[b]) for b in todo], padding="longest", truncation=True,
                              max_length=self.max_text_len, return_tensors="pt").to(self.device)
        pixels = self.pixel_values(images[todo].to(self.device))
        with autocast(self.device, self.precision):
            result = self.model(pixel_values=pixels.to(next(self.model.parameters()).dtype),
                                pixel_mask=torch.ones(pixels.shape[0], *pixels.shape[-2:], dtype=torch.long,
                                                      device=self.device), **text)
        probs = result.logits.float().sigmoid()  # [n, queries, text positions]
        boxes = _to_pixels(result.pred_boxes.float(), *images.shape[-2:])
        for i, b in enumerate(todo):
            positions = self.noun_positions(text["input_ids"][i].tolist(), len(nouns_per_image[b]))
            out[b] = self._assign(probs[i], boxes[i], nouns_per_image[b], positions)
        return out

    def _assign(self, probs: torch.Tensor, boxes: torch.Tensor, nouns: list[str], positions: list[list[int]]):
        """Boxes over ``box_threshold`` → the noun holding their best token (over ``text_threshold``)."""
        scores = probs.max(-1).values
        noun_probs = torch.stack([probs[:, p].max(-1).values if p else torch.zeros_like(scores) for p in positions], -1)
        best_prob, best_noun = noun_probs.max(-1)
        valid = (scores > self.box_threshold) & (best_prob > self.text_threshold)
        found = {}
        for k, noun in enumerate(nouns):
            idx = torch.nonzero(valid & (best_noun == k)).flatten()
            if idx.numel():
                idx = idx[scores[idx].argsort(descending=True)[: self.max_boxes]]
                found[noun] = (boxes[idx], scores[idx])
        return found


def _to_pixels(cxcywh: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Relative (cx, cy, w, h) → absolute (x0, y0, x1, y1), clipped to the image."""
    cx, cy, w, h = cxcywh.unbind(-1)
    xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
    scale = torch.tensor([width, height, width, height], dtype=xyxy.dtype, device=xyxy.device)
    return (xyxy.clamp(0, 1) * scale).cpu()


# ----------------------------------------------------------------------------------------------
# Detection + segmentation


class GroundedSam(MaskBackend):
    """The detector's boxes → a SAM segmenter (batched per image) → one OR-ed mask per noun."""

    def __init__(self, detector: GroundingDinoDetector, segmenter: BoxSegmenter):
        self.detector, self.segmenter = detector, segmenter

    @torch.no_grad()
    def detect_and_segment(self, images, nouns_per_image):
        detections = self.detector.detect(images, nouns_per_image)
        boxes = [torch.cat([d[n][0] for n in d]) if d else torch.zeros(0, 4) for d in detections]
        masks = self.segmenter.segment(images, boxes)
        results = []
        for nouns, found, image_masks in zip(nouns_per_image, detections, masks):
            per_noun, offset = {}, 0
            for noun, (noun_boxes, scores) in found.items():  # the order ``boxes`` was built in
                mask = image_masks[offset : offset + len(noun_boxes)].any(0).cpu()
                offset += len(noun_boxes)
                per_noun[noun] = (noun_boxes, scores.cpu(), mask if mask.any() else None)
            results.append({n: per_noun.get(n, (torch.zeros(0, 4), torch.zeros(0), None)) for n in nouns})
        return results
