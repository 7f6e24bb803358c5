"""Concept activation: the BLIP captioner's loss for the prompt, given the generated image (docs/method.md §3).

The frozen captioner scores how well the image explains the prompt: the token-mean,
label-smoothed cross-entropy of ``"a photography of " + prompt`` under
``BlipForConditionalGeneration``, computed on a differentiably preprocessed image so that the
gradient reaches the generator.

Exactness notes (reference: CaraJ7/CoMat ``concept_mat_utils/caption_blip.py`` with transformers
< 4.38):

* Preprocessing: one random crop offset per axis (0..crop_max, shared by the batch) keeping a
  ``(H - crop_max) x (W - crop_max)`` window (512 -> 510), bicubic antialiased resize to the
  captioner's size, CLIP mean/std normalisation. Done on the tensor, never through PIL.
* Labels: the input ids with padding and the prefix ``[CLS] a photography of`` set to -100; the
  prompt tokens and the final ``[SEP]`` are scored.
* Loss: transformers' BLIP text decoder predicts token ``i + 1`` from position ``i`` (logits
  ``[:, :-1]`` against labels ``[:, 1:]``) and ``BlipForConditionalGeneration.forward`` feeds the
  input ids as given, so position 0 holds ``[CLS]``, not the ``[DEC]`` bos that ``generate()``
  writes there. We do the same. The reference's CrossEntropyLoss had label smoothing 0.1
  hard-coded; transformers >= 4.38 reads it from the config (default 0.0), so we compute the
  smoothed cross-entropy ourselves: per scored token ``(1 - eps) * NLL + eps * mean_v(-log p_v)``,
  averaged over all scored tokens of the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from comat_core.errors import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IGNORE_INDEX = -100


def smoothed_cross_entropy(logits: Tensor, labels: Tensor, label_smoothing: float) -> Tensor:
    """Token-mean cross-entropy with label smoothing over the positions whose label is not -100.

    ``logits``: ``[..., V]``; ``labels``: ``[...]``. Equals
    ``F.cross_entropy(logits, labels, ignore_index=-100, label_smoothing=eps)`` (mean reduction).
    """
    log_probs = logits.float().log_softmax(dim=-1)
    scored = labels != IGNORE_INDEX
    nll = -log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    uniform = -log_probs.mean(dim=-1)
    per_token = (1.0 - label_smoothing) * nll + label_smoothing * uniform
    return per_token.masked_fill(~scored, 0.0).sum() / scored.sum().clamp(min=1)


def next_token_loss(logits: Tensor, labels: Tensor, label_smoothing: float) -> Tensor:
    """The BLIP text decoder's loss: logits at position i predict the label at i + 1."""
    return smoothed_cross_entropy(logits[:, :-1], labels[:, 1:], label_smoothing)


def _image_size(image_processor) -> tuple[int, int]:
    size = image_processor.size
    height, width = size.get("height"), size.get("width")
    if height and width:
        return int(height), int(width)
    edge = size.get("shortest_edge")
    if edge:
        return int(edge), int(edge)
    raise ConfigError(f"captioner image processor has no usable size ({size}): give it height and width")


class ConceptActivationLoss:
    """``loss(images01, prompts, generator)``: the captioner's smoothed NLL of the prompts (scalar).

    ``images01``: ``[B, 3, H, W]`` in [0, 1], with autograd; the gradient flows to it.
    """

    def __init__(self, model, processor, prefix: str = "a photography of ", label_smoothing: float = 0.1,
                 crop_max: int = 2):
        if not prefix.endswith(" "):
            raise ConfigError(f"caption prefix {prefix!r} must end with a space so the prompt starts a new word")
        self.model = model
        self.tokenizer = processor.tokenizer
        self.image_size = _image_size(processor.image_processor)
        self.prefix = prefix
        self.label_smoothing = label_smoothing
        self.crop_max = crop_max
        # [CLS] + the prefix's word pieces (the tokenizer's trailing [SEP] dropped).
        self.prefix_ids = self.tokenizer(prefix.strip()).input_ids[:-1]

    # -- image -----------------------------------------------------------------------------------

    def crop_offsets(self, generator: torch.Generator | None = None) -> tuple[int, int]:
        """(top, left) offsets of the crop window, each uniform in 0..crop_max."""
        device = generator.device if generator is not None else "cpu"
        top, left = torch.randint(0, self.crop_max + 1, (2,), generator=generator, device=device).tolist()
        return top, left

    def preprocess(self, images01: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Crop, resize (bicubic, antialiased) and normalise, differentiably; in the captioner's dtype."""
        height, width = images01.shape[-2:]
        if height <= self.crop_max or width <= self.crop_max:
            raise ValueError(f"image {height}x{width} is too small for a crop of {self.crop_max} px")
        top, left = self.crop_offsets(generator)
        x = images01.float()[:, :, top : top + height - self.crop_max, left : left + width - self.crop_max]
        x = F.interpolate(x, size=self.image_size, mode="bicubic", antialias=True, align_corners=False)
        mean = x.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = x.new_tensor(CLIP_STD).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.model.dtype)

    # -- text ------------------------------------------------------------------------------------

    def tokenize(self, prompts: list[str], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor]:
        """``(input_ids, attention_mask, labels)`` for ``prefix + prompt.lower()``, padded to the longest."""
        texts = [self.prefix + prompt.lower() for prompt in prompts]
        encoded = self.tokenizer(texts, padding="longest", truncation=True, return_tensors="pt")
        n_prefix = len(self.prefix_ids)
        # checked on the host copy: reading a device tensor back would wait for the GPU queue
        if not torch.equal(encoded.input_ids[:, :n_prefix], torch.tensor([self.prefix_ids] * len(texts))):
            raise ConfigError(f"caption prefix {self.prefix!r} does not tokenize the same inside the prompts")
        input_ids = encoded.input_ids.to(device, non_blocking=True)
        attention_mask = encoded.attention_mask.to(device, non_blocking=True)
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        labels[:, :n_prefix] = IGNORE_INDEX
        return input_ids, attention_mask, labels

    # -- loss ------------------------------------------------------------------------------------

    def __call__(self, images01: Tensor, prompts: list[str], generator: torch.Generator | None = None) -> Tensor:
        if len(prompts) != images01.shape[0]:
            raise ValueError(f"{images01.shape[0]} images but {len(prompts)} prompts")
        pixel_values = self.preprocess(images01, generator)
        input_ids, attention_mask, labels = self.tokenize(prompts, images01.device)
        logits = self.model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask).logits
        return next_token_loss(logits, labels, self.label_smoothing)
