"""The ``hf`` segmenter: transformers' ``SamModel`` on the detector's boxes, batched on the device.

Mirrors ``SamProcessor`` without its per-image NumPy/PIL path: resize the longest side to
``size.longest_edge`` (1024 for the real checkpoints), normalise, pad bottom/right to
``pad_size``; boxes scaled into that frame; the image encoder runs once per batch and the mask
decoder once per batch with every image's boxes (padded to the largest count, padding dropped);
the 256-px low-resolution masks are upsampled to the padded frame, cropped to the resized image,
resized to the input size and thresholded at 0 (``SamProcessor.post_process_masks``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from comat_core.stages.masks.backends import BoxSegmenter, autocast, resize_images


class HfSamSegmenter(BoxSegmenter):
    def __init__(self, model, processor, precision: torch.dtype = torch.float32):
        ip = processor.image_processor
        self.model, self.precision = model, precision
        self.longest = int(ip.size.longest_edge)
        self.pad = (int(ip.pad_size.height), int(ip.pad_size.width))
        self.mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(ip.image_std).view(1, 3, 1, 1)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        height, width = self.resized(*images.shape[-2:])
        x = resize_images(images.float(), (height, width))
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return F.pad(x, (0, self.pad[1] - width, 0, self.pad[0] - height))

    def segment_resized(self, images, boxes, size):
        height, width = images.shape[-2:]
        new_h, new_w = size
        most = max(len(b) for b in boxes)
        padded = torch.stack([torch.cat([b, b[:1].expand(most - len(b), 4)]) for b in boxes])
        dtype = next(self.model.parameters()).dtype
        with autocast(self.device, self.precision):
            embeddings = self.model.get_image_embeddings(self.pixel_values(images.to(self.device)).to(dtype))
            low_res = self.model(image_embeddings=embeddings, input_boxes=padded.to(self.device, dtype),
                                 multimask_output=False).pred_masks[:, :, 0]
        out = []
        for j, b in enumerate(boxes):
            masks = low_res[j, : len(b)].float()[:, None]
            masks = F.interpolate(masks, size=self.pad, mode="bilinear", align_corners=False)[..., :new_h, :new_w]
            masks = F.interpolate(masks, size=(height, width), mode="bilinear", align_corners=False)
            out.append((masks[:, 0] > 0).cpu())
        return out


def load_hf_segmenter(name: str, device: torch.device, precision: torch.dtype) -> HfSamSegmenter:
    from comat_core.models.loader import load_sam

    model, processor = load_sam(name, device=device, field="models.sam")
    return HfSamSegmenter(model, processor, precision)
