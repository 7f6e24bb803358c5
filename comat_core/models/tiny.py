"""The offline tiny model zoo: small random models with the real architectures, built from code.

Every model the pipeline uses (SD1.5- and SDXL-style pipelines, BLIP captioner and VQA, CLIP,
Grounding DINO, SAM) has a tiny random twin here, so the `tiny` presets run the same
``from_pretrained`` code paths as real checkpoints, without any download. ``build_tiny`` writes a
model folder with ``save_pretrained`` (safetensors); the same seed gives byte-identical weights.

Tokenizers are built in memory from ``comat_core/data/tiny_words.txt`` (every word of the
training and evaluation prompts):

* CLIP: byte-level BPE whose merges turn each listed word into one token, so a prompt takes
  about one token per word (like the real CLIP vocabulary) and fits the 77-token context.
* BERT (BLIP, Grounding DINO): WordPiece with the listed words, single characters and
  ``##a``..``##z``/``##0``..``##9``, so any ASCII word tokenizes without ``[UNK]``. Special tokens
  sit at bert-base-uncased's ids ([CLS] 101, [SEP] 102, "." 1012, "?" 1029) because Grounding
  DINO hard-codes those ids for its text masks.

Sizes (see ``SD_IMAGE_SIZE``): images 64 px, latents 8x8 (VAE factor 8, like SD).
"""

from __future__ import annotations

import hashlib
import string
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch

from comat_core.errors import InputError

TINY_KINDS = ("sd15", "sdxl", "blip-caption", "blip-vqa", "clip", "grounding-dino", "sam")

SD_IMAGE_SIZE = 64  # pixels; latents are SD_IMAGE_SIZE // 8
CLIP_MAX_LENGTH = 77  # CLIP text context, as in SD
TEXT_HIDDEN = 32  # width of every tiny text/vision transformer

# Stable Diffusion's training noise schedule (SD1.5 and SDXL share it).
SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    timestep_spacing="leading",
    steps_offset=1,
    prediction_type="epsilon",
    clip_sample=False,
)

_WORDS_FILE = "tiny_words.txt"
_END_OF_WORD = "</w>"


# ----------------------------------------------------------------------------------------------
# Versioning


@lru_cache(maxsize=1)
def builder_version() -> str:
    """A short hash of this builder's source and word list: it names cache folders and fingerprints.

    Any change to a config or tokenizer here changes the version, so a stale tiny model is never
    reused (no manual version number to forget to bump).
    """
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(_words_path().read_bytes())
    return digest.hexdigest()[:12]


def _words_path() -> Path:
    return Path(str(resources.files("comat_core") / "data" / _WORDS_FILE))


@lru_cache(maxsize=1)
def tiny_words() -> tuple[str, ...]:
    """The word list shipped with the package (lowercase ASCII words, most frequent first)."""
    lines = _words_path().read_text(encoding="utf-8").splitlines()
    return tuple(w for w in (line.strip() for line in lines) if w and not w.startswith("#"))


# ----------------------------------------------------------------------------------------------
# Tokenizers


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: one printable unicode character per byte value."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _bpe_apply(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Greedy BPE: merge the lowest-ranked adjacent pair (all its occurrences) until none applies."""
    while len(symbols) > 1:
        candidates = [(ranks[p], p) for p in zip(symbols, symbols[1:]) if p in ranks]
        if not candidates:
            break
        _, (first, second) = min(candidates)
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


@lru_cache(maxsize=1)
def clip_bpe_merges(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """Merges that make every word one token: for each word, chain-merge what is left of it.

    New merges always rank after existing ones, so they never change how an earlier word is
    split; a word that still splits after its chain (repeated pieces) gets another chain.
    """
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = _bpe_apply(list(word[:-1]) + [word[-1] + _END_OF_WORD], ranks)
        while len(symbols) > 1:
            prefix = symbols[0]
            for piece in symbols[1:]:
                ranks.setdefault((prefix, piece), len(ranks))
                prefix += piece
            symbols = _bpe_apply(symbols, ranks)
    return sorted(ranks, key=ranks.__getitem__)


def build_clip_tokenizer():
    """A CLIP tokenizer (fast, byte-level BPE) whose vocabulary holds every listed word whole."""
    from transformers import CLIPTokenizer

    merges = clip_bpe_merges(tiny_words())
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + _END_OF_WORD for c in alphabet]
    tokens += [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def bert_vocab(extra_tokens: tuple[str, ...] = ()) -> dict[str, int]:
    """WordPiece vocabulary in bert-base-uncased's special-id layout, plus the listed words."""
    fixed = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]", 1012: ".", 1029: "?"}
    chars = [c for c in string.punctuation if c not in ".?"] + list(string.digits) + list(string.ascii_lowercase)
    free = iter(chars)
    tokens: list[str] = []
    unused = 0
    for index in range(1030):
        if index in fixed:
            tokens.append(fixed[index])
        elif index > 103 and (char := next(free, None)) is not None:
            tokens.append(char)
        else:
            tokens.append(f"[unused{unused}]")
            unused += 1
    tokens += list(tiny_words())
    tokens += [f"##{c}" for c in string.ascii_lowercase + string.digits]
    tokens += list(extra_tokens)
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab


def build_bert_tokenizer(extra_tokens: tuple[str, ...] = (), **kwargs):
    """A BERT (WordPiece, uncased) tokenizer over ``bert_vocab``."""
    from transformers import BertTokenizer

    return BertTokenizer(vocab=bert_vocab(extra_tokens), do_lower_case=True, model_max_length=512, **kwargs)


# ----------------------------------------------------------------------------------------------
# Shared tiny components


def _seeded(seed: int, part: str) -> None:
    """Seed torch per component, so each component's weights depend only on (seed, part)."""
    offset = int.from_bytes(hashlib.sha256(part.encode()).digest()[:4], "big")
    torch.manual_seed((seed * 1_000_003 + offset) % (2**63))


def _clip_text_config(vocab_size: int, bos: int, eos: int, **kwargs):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=TEXT_HIDDEN,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
        **kwargs,
    )


def _clip_text_encoder(tokenizer, seed: int, with_projection: bool = False):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    config = _clip_text_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    _seeded(seed, "text_encoder_2" if with_projection else "text_encoder")
    model = CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)
    return model.eval()


def _vae(seed: int, scaling_factor: float):
    """A 4-level VAE (3 downsamples: latents are image / 8, like SD's) with 4 latent channels."""
    from diffusers import AutoencoderKL

    _seeded(seed, "vae")
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=SD_IMAGE_SIZE,
        scaling_factor=scaling_factor,
    ).eval()


def _scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SD_SCHEDULER)


# ----------------------------------------------------------------------------------------------
# Kinds


def _build_sd15(out_dir: Path, seed: int) -> None:
    """SD1.5-style: cross-attention in both down blocks, the mid block and both up blocks.

    At 64 px (latents 8x8): down 8x8, 4x4; mid 4x4; up_blocks[0] 4x4, up_blocks[1] 8x8, each up
    block with 2 transformer blocks (self- and cross-attention).
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = build_clip_tokenizer()
    _seeded(seed, "unet")
    unet = UNet2DConditionModel(
        sample_size=SD_IMAGE_SIZE // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=(2, 4),  # diffusers' legacy name: heads per block
        cross_attention_dim=TEXT_HIDDEN,
        norm_num_groups=32,
    ).eval()
    pipe = StableDiffusionPipeline(
        vae=_vae(seed, 0.18215),
        text_encoder=_clip_text_encoder(tokenizer, seed),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)


def _build_sdxl(out_dir: Path, seed: int) -> None:
    """SDXL-style: two text encoders, ``text_time`` added conditioning, no attention at full res.

    At 64 px (latents 8x8): down_blocks[0] 8x8 without attention, down_blocks[1] 4x4 with 2
    transformer layers per attention; mid 4x4 (2 layers); up_blocks[0] 4x4 with attention
    (2 attentions x 2 layers), up_blocks[1] 8x8 without.
    """
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = build_clip_tokenizer()
    text_encoder = _clip_text_encoder(tokenizer, seed)
    text_encoder_2 = _clip_text_encoder(tokenizer, seed, with_projection=True)
    time_embed_dim = 8
    pooled_dim = text_encoder_2.config.projection_dim
    _seeded(seed, "unet")
    unet = UNet2DConditionModel(
        sample_size=SD_IMAGE_SIZE // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + pooled_dim,
        norm_num_groups=32,
    ).eval()
    pipe = StableDiffusionXLPipeline(
        vae=_vae(seed, 0.13025),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)


BLIP_IMAGE_SIZE = 64
BLIP_DECODER_BOS = "[DEC]"  # BLIP's decoder start token; generate() writes it over input_ids[:, 0]


def _blip_config(tokenizer):
    """BLIP with a 64-px ViT (8-px patches) and a 2-layer BERT, initialised so the image matters.

    The vision default init std (1e-10) makes the caption loss ignore the image, and even 0.02 leaves
    the pixel gradient at about 3e-7 in 32-wide layers; std 1/sqrt(width) keeps activations at unit
    scale, so the caption loss depends on the image (pixel gradient about 5e-4).
    """
    from transformers import BlipConfig

    init_std = TEXT_HIDDEN**-0.5
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        encoder_hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        projection_dim=TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        bos_token_id=tokenizer.convert_tokens_to_ids(BLIP_DECODER_BOS),
        eos_token_id=tokenizer.sep_token_id,
        sep_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=init_std,
    )
    vision_config = dict(
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        projection_dim=TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=BLIP_IMAGE_SIZE,
        patch_size=8,
        initializer_range=init_std,
    )
    return BlipConfig(
        text_config=text_config, vision_config=vision_config, projection_dim=TEXT_HIDDEN, image_text_hidden_size=32
    )


def _blip_processor():
    from transformers import BlipImageProcessor, BlipProcessor

    tokenizer = build_bert_tokenizer((BLIP_DECODER_BOS,), bos_token=BLIP_DECODER_BOS)
    image_processor = BlipImageProcessor(size={"height": BLIP_IMAGE_SIZE, "width": BLIP_IMAGE_SIZE})
    return BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _build_blip(out_dir: Path, seed: int, question_answering: bool) -> None:
    from transformers import BlipForConditionalGeneration, BlipForQuestionAnswering

    processor = _blip_processor()
    config = _blip_config(processor.tokenizer)
    _seeded(seed, "blip")
    model = (BlipForQuestionAnswering if question_answering else BlipForConditionalGeneration)(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)


CLIP_IMAGE_SIZE = 32


def _build_clip(out_dir: Path, seed: int) -> None:
    """CLIP with a 32-px ViT (4-px patches) and the tiny CLIP text encoder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = build_clip_tokenizer()
    text_config = _clip_text_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    vision_config = dict(
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=CLIP_IMAGE_SIZE,
        patch_size=4,
        projection_dim=TEXT_HIDDEN,
    )
    config = CLIPConfig(text_config=text_config.to_dict(), vision_config=vision_config, projection_dim=TEXT_HIDDEN)
    _seeded(seed, "clip")
    CLIPModel(config).save_pretrained(out_dir, safe_serialization=True)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": CLIP_IMAGE_SIZE}, crop_size={"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)


GROUNDING_DINO_IMAGE_SIZE = 64


def _build_grounding_dino(out_dir: Path, seed: int) -> None:
    """Grounding DINO: 4-stage Swin (feature maps 8, 4, 2 px at 64 px input), 1-layer BERT, 3 levels."""
    from transformers import (
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    tokenizer = build_bert_tokenizer()
    backbone = SwinConfig(
        image_size=GROUNDING_DINO_IMAGE_SIZE,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 2, 2, 4],
        window_size=4,
        out_indices=[2, 3, 4],
    )
    text = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = GroundingDinoConfig(
        backbone_config=backbone.to_dict(),
        text_config=text.to_dict(),
        d_model=TEXT_HIDDEN,
        num_queries=20,
        encoder_layers=1,
        decoder_layers=2,  # one layer breaks the tied bbox heads (bbox_embed.0 -> 1..n-1)
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_n_points=2,
        decoder_n_points=2,
        num_feature_levels=3,
    )
    _seeded(seed, "grounding-dino")
    GroundingDinoForObjectDetection(config).save_pretrained(out_dir, safe_serialization=True)
    size = {"shortest_edge": GROUNDING_DINO_IMAGE_SIZE, "longest_edge": GROUNDING_DINO_IMAGE_SIZE}
    processor = GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(size=size), tokenizer=tokenizer)
    processor.save_pretrained(out_dir)


SAM_IMAGE_SIZE = 64


def _build_sam(out_dir: Path, seed: int) -> None:
    """SAM with a 64-px ViT (8-px patches: 8x8 image embeddings, 32x32 low-res masks)."""
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    vision = dict(
        hidden_size=TEXT_HIDDEN,
        output_channels=TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=SAM_IMAGE_SIZE,
        patch_size=8,
        window_size=4,
        global_attn_indexes=[1],
        num_pos_feats=TEXT_HIDDEN // 2,
        mlp_dim=64,
        initializer_range=0.02,
    )
    prompt = dict(hidden_size=TEXT_HIDDEN, image_size=SAM_IMAGE_SIZE, patch_size=8, mask_input_channels=4)
    decoder = dict(
        hidden_size=TEXT_HIDDEN, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2, iou_head_hidden_dim=TEXT_HIDDEN
    )
    config = SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
    _seeded(seed, "sam")
    SamModel(config).save_pretrained(out_dir, safe_serialization=True)
    image_processor = SamImageProcessor(
        size={"longest_edge": SAM_IMAGE_SIZE},
        pad_size={"height": SAM_IMAGE_SIZE, "width": SAM_IMAGE_SIZE},
        mask_size={"longest_edge": SAM_IMAGE_SIZE // 4},
        mask_pad_size={"height": SAM_IMAGE_SIZE // 4, "width": SAM_IMAGE_SIZE // 4},
    )
    SamProcessor(image_processor=image_processor).save_pretrained(out_dir)


_BUILDERS = {
    "sd15": _build_sd15,
    "sdxl": _build_sdxl,
    "blip-caption": lambda out, seed: _build_blip(out, seed, question_answering=False),
    "blip-vqa": lambda out, seed: _build_blip(out, seed, question_answering=True),
    "clip": _build_clip,
    "grounding-dino": _build_grounding_dino,
    "sam": _build_sam,
}


def build_tiny(kind: str, out_dir: Path, seed: int = 0) -> Path:
    """Build the tiny random model ``kind`` into ``out_dir`` (created) and return ``out_dir``.

    Deterministic: the same kind and seed give byte-identical safetensors files. Use
    ``comat_core.models.loader.resolve_model("tiny://<kind>")`` for the cached, atomic build.
    """
    if kind not in _BUILDERS:
        raise InputError(f"unknown tiny model kind {kind!r}: use tiny://<kind> with one of {', '.join(TINY_KINDS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # leave the caller's random stream untouched
        _BUILDERS[kind](out_dir, seed)
    return out_dir
