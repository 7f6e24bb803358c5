"""The ``gsam`` segmenter: the original ``segment_anything`` package's SAM (the Grounded-SAM project's).

Needs the ``gsam`` extra (``pip install 'comat[gsam]'``): ``segment_anything`` imports torchvision,
which only imports beside the torch it was built for (torch 2.14.1 + torchvision 0.29.1 work
together; PyPI's torchvision 0.28 fails beside the CPU torch 2.13 wheel).

Models: ``models.sam_model_type`` picks a builder of ``segment_anything.sam_model_registry`` (vit_h,
vit_l, vit_b) or ``tiny`` (a small SAM built here from the same modules, for tests and the tiny
presets). The model is built with random weights, then ``models.sam_checkpoint`` (a local path or
fsspec URL to a ``.pth`` state dict, or ``.safetensors``) is loaded with ``torch.load(...,
weights_only=True)`` — never an unrestricted unpickle. A real model type needs a checkpoint; the
tiny one without a checkpoint gets seeded random weights.

The image encoder runs once per batch; the mask decoder once per image with all of that image's
boxes (as ``SamPredictor.predict_torch`` does). The resize is computed from (H, W) here:
``ResizeLongestSide.apply_image_torch`` takes its size from the batch and channel dimensions.
"""

from __future__ import annotations

from functools import partial

import torch

from comat_core.errors import ConfigError, InputError
from comat_core.stages.masks.backends import BoxSegmenter, autocast, resize_images

TINY_SAM_SEED = 0


def build_tiny_sam():
    """A 64-px SAM (8-px patches, 32-wide, 2 blocks) from ``segment_anything.modeling``, seeded random init."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    image_size, patch, width = 64, 8, 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SAM_SEED)
        sam = Sam(
            image_encoder=ImageEncoderViT(
                img_size=image_size, patch_size=patch, embed_dim=width, depth=2, num_heads=2, mlp_ratio=2,
                out_chans=width, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                window_size=4, global_attn_indexes=(1,),
            ),
            prompt_encoder=PromptEncoder(embed_dim=width, image_embedding_size=(image_size // patch,) * 2,
                                         input_image_size=(image_size, image_size), mask_in_chans=4),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=width, mlp_dim=64,
                                                                       num_heads=2),
                transformer_dim=width, iou_head_depth=3, iou_head_hidden_dim=width,
            ),
            pixel_mean=[123.675, 116.28, 103.53],
            pixel_std=[58.395, 57.12, 57.375],
        )
    return sam.eval()


def sam_builders() -> dict:
    """The package's registry (vit_h, vit_l, vit_b, default) plus ``tiny``."""
    try:
        from segment_anything import sam_model_registry
    except ImportError as exc:
        raise ConfigError("masks.backend=gsam needs the segment_anything package: pip install 'comat[gsam]' "
                          f"(with torch 2.14.1 + torchvision 0.29.1), or use masks.backend=hf ({exc})") from None
    return {**sam_model_registry, "tiny": build_tiny_sam}


def load_state_dict(checkpoint: str) -> dict:
    """Weights only: a ``.safetensors`` file or a ``.pth`` state dict read with ``weights_only=True``."""
    import fsspec

    try:
        with fsspec.open(checkpoint, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise InputError(f"SAM checkpoint not found: {checkpoint} (models.sam_checkpoint)") from None
    if checkpoint.endswith(".safetensors"):
        from safetensors.torch import load

        return load(data)
    import io

    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
        raise InputError(f"cannot read the SAM checkpoint {checkpoint} as a weights-only state dict: "
                         f"{str(exc).splitlines()[0]}") from None


def build_sam(model_type: str, checkpoint: str | None):
    """``segment_anything.Sam`` of ``model_type``, with ``checkpoint``'s weights when given."""
    builders = sam_builders()
    if model_type not in builders:
        raise ConfigError(f"unknown models.sam_model_type {model_type!r} for the gsam backend; "
                          f"use one of {', '.join(sorted(builders))}")
    if checkpoint is None and model_type != "tiny":
        raise ConfigError(f"the gsam backend needs models.sam_checkpoint for {model_type} "
                          "(e.g. sam_vit_h_4b8939.pth), or use masks.backend=hf")
    sam = builders[model_type](checkpoint=None) if model_type != "tiny" else build_tiny_sam()
    if checkpoint is not None:
        try:
            sam.load_state_dict(load_state_dict(checkpoint))
        except RuntimeError as exc:
            raise InputError(f"SAM checkpoint {checkpoint} does not fit sam_model_type {model_type}: "
                             f"{str(exc).splitlines()[0]}") from None
    return sam.eval().requires_grad_(False)


class SegmentAnythingSegmenter(BoxSegmenter):
    def __init__(self, sam, precision: torch.dtype = torch.float32):
        self.sam, self.precision = sam, precision
        self.longest = int(sam.image_encoder.img_size)

    @property
    def device(self) -> torch.device:
        return self.sam.device

    def segment_resized(self, images, boxes, size):
        height, width = images.shape[-2:]
        x = resize_images(images.to(self.device).float() * 255, size)
        out = []
        with autocast(self.device, self.precision):
            embeddings = self.sam.image_encoder(self.sam.preprocess(x))
            for j, b in enumerate(boxes):
                sparse, dense = self.sam.prompt_encoder(points=None, boxes=b.to(self.device), masks=None)
                low_res, _ = self.sam.mask_decoder(
                    image_embeddings=embeddings[j : j + 1], image_pe=self.sam.prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)
                masks = self.sam.postprocess_masks(low_res.float(), size, (height, width))
                out.append((masks[:, 0] > self.sam.mask_threshold).cpu())
        return out


def load_gsam_segmenter(model_type: str, checkpoint: str | None, device: torch.device,
                        precision: torch.dtype) -> SegmentAnythingSegmenter:
    return SegmentAnythingSegmenter(build_sam(model_type, checkpoint).to(device), precision)


__all__ = ["SegmentAnythingSegmenter", "build_sam", "build_tiny_sam", "load_gsam_segmenter", "sam_builders"]
