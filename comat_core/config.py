"""Typed configuration for the whole pipeline.

A config is a preset (``tiny``, ``tiny-sdxl``, ``sd15``, ``sdxl``) plus, optionally, a YAML file plus
``--set a.b=c`` overrides, validated by pydantic before any work starts. Values of the real presets
follow ``docs/method.md``; every **Decision** there is a flag whose reference value is documented
next to it. ``build_config`` builds one from a request (``ConfigRequest``: the CLI's flags, the flows'
``config`` parameter, the request a launched training process reads).

Each stage reads only its own section (plus the models it uses), so the stage key of one stage never
changes when another stage's section does.
"""

from __future__ import annotations

import copy
import difflib
import logging
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from comat_core.errors import ConfigError

PRESETS = ("tiny", "tiny-sdxl", "sd15", "sdxl", "shapes")
STAGE_NAMES = ("world", "prompts", "sdxl_prefinetune", "gan_gt", "masks", "train", "evaluate")

# The reference drops these 58 background / non-object nouns from attribute concentration, and their
# plurals: a noun is dropped when it, or it without a final "s" (the reference's ``n[:-1]``), is listed
# ("walls", "streets"). See ``stages.masks.stage.is_background``.
BACKGROUND_NOUNS = [
    "scene", "surface", "area", "atmosphere", "noise", "place", "kitchen", "dream", "interior",
    "exterior", "meal", "background", "bathroom", "room", "scent", "street", "hillside",
    "mountain", "sky", "sea", "ocean", "lost", "language", "skill", "one", "night", "day",
    "morning", "space", "environment", "conditions", "field", "shore", "restroom", "party",
    "grass", "snow", "meadow", "water", "shadow", "waves", "song", "cycle", "sunlight",
    "mysteries", "wall", "salon", "range", "cry", "speech", "tone", "thing", "about", "activity",
    "air", "advertisement", "airport", "also",
]

EVAL_CATEGORIES = ("color", "shape", "texture", "spatial", "non_spatial", "complex")
# The shapes world's categories, scored by its judge: held-out two-object prompts, CoMat training prompts,
# single-object prompts.
SHAPES_HELD_OUT = ("shapes_val.txt", "shapes_new_val.txt", "shapes_three_val.txt", "shapes_relation_val.txt")
SHAPES_PRESET_CATEGORIES = ("shapes", "shapes_new", "shapes_single")
SHAPES_CATEGORIES = ("shapes", "shapes_new", "shapes_three", "shapes_relation", "shapes_train", "shapes_single")
WORLD_SCHEME = "world://"  # models.* = world://base or world://captioner: the world stage's trained models


class _Section(BaseModel):
    """Base for config sections: unknown keys are errors, values are validated on assignment, and a float
    must be finite (``inf`` or ``nan`` would pass every bound and fail mid-run)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # inf/nan: never a setting


class RuntimeConfig(_Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU")
    seed: int = 42


class WorldConfig(_Section):
    """A controlled world whose models the pipeline trains first (the ``world`` stage); ``none`` for real models."""

    kind: Literal["none", "shapes"] = "none"
    build: Literal["full", "smoke"] = Field(
        "full", description="full: the measured world; smoke: a build of about a minute that only checks the code runs")
    settings: dict[str, Any] = Field(
        default_factory=dict, description="overrides of the world's build settings (comat_core.worlds.shapes.build.WorldConfig)")
    use_shipped: bool = Field(
        True, description="when the settings are those of the models shipped in the package, copy them instead of "
                          "training (the world stage reproduces them bit for bit from their seed when this is false)")


class StorageConfig(_Section):
    root: str = Field("./comat-artifacts", description="fsspec URL: a local path, s3://bucket/prefix, gs://…, memory://…")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec storage options (e.g. {endpoint_url: …}); credentials are refused here: they come from "
                    "the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...)")
    timeout: float = Field(
        300.0, ge=0, description="seconds one remote storage operation (read, write, list) may take before it fails "
                                 "and the stage is retried; a slow one is logged while it waits (0: no bound)")

    @field_validator("root")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("is empty; give a folder or URL (an empty root would write into the current directory)")
        scheme, sep, rest = v.strip().partition("://")
        if sep and not rest.strip("/"):  # "s3://" alone would become a local folder named "s3:"
            raise ValueError(f"{v.strip()!r} names no bucket or location; give e.g. {scheme}://bucket/prefix")
        return v.strip()

    @field_validator("options")
    @classmethod
    def _no_credentials(cls, v: dict) -> dict:
        from comat_core.store.credentials import check_storage_options

        return check_storage_options(v)


class ModelsConfig(_Section):
    """Every model is a Hugging Face id, a local path, or ``tiny://<kind>`` (offline tiny zoo)."""

    family: Literal["sd15", "sdxl"] = "sd15"
    pretrained: str = Field(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        description="the model to fine-tune; SD1.5's maintained copy (runwayml/stable-diffusion-v1-5 was removed in 2024)")
    vae: str | None = Field(None, description="optional VAE override (e.g. an fp16-safe SDXL VAE)")
    captioner: str = "Salesforce/blip-image-captioning-large"
    vqa: str = "Salesforce/blip-vqa-base"
    clip: str = Field(
        "openai/clip-vit-base-patch32", description="T2I-CompBench's non-spatial score uses CLIP ViT-B/32")
    grounding_dino: str = "IDEA-Research/grounding-dino-base"
    sam: str = "facebook/sam-vit-huge"
    sam_checkpoint: str | None = Field(None, description="gsam backend: segment_anything .pth checkpoint (e.g. sam_vit_h_4b8939.pth)")
    sam_model_type: Literal["vit_h", "vit_l", "vit_b", "tiny"] = "vit_h"
    verdict: str | None = Field(
        None, description="shapes world diagnostics only: a folder holding a verdict classifier "
                          "(benchmarks/shapes_verdict_pilot.py), read by train.losses.concept_reward=shapes_verdict")
    discriminator: str = Field(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        description="SD1.5-architecture model whose UNet initialises the discriminator (the reference: SD1.5's)")


class PromptsConfig(_Section):
    sources: list[str] = Field(default_factory=list, description="prompt files: fsspec URLs or globs, or builtin:NAME")
    exclude: list[str] = Field(default_factory=list, description="evaluation prompt files whose prompts are removed from training")
    parser: Literal["auto", "offline", "spacy"] = "auto"
    max_prompts: int | None = Field(None, ge=1, description="keep the first N unique prompts (None: all)")
    long_prompts: Literal["truncate", "error"] = Field(
        "truncate", description="prompts longer than max_tokens (the text encoder's window): cut them to it, so every "
                                "model (text encoder, captioner loss, entity spans) sees the same text, or stop with "
                                "an error naming the line")
    max_tokens: int = Field(77, ge=8)


class GanGtConfig(_Section):
    resolution: int = Field(512, ge=32, multiple_of=8)
    samples_per_prompt: int = Field(
        1, ge=1, description="ground-truth samples per prompt, each with its own seed, latent and masks; the trainer "
                             "draws one per visit. With train.noise=replay a prompt always starts from one "
                             "of these noises, so N > 1 buys diversity at N times the gan_gt and masks cost")
    num_inference_steps: int = Field(50, ge=1)
    guidance_scale: float = Field(7.5, ge=0)
    batch_size: int = Field(8, ge=1)
    shard_size: int = Field(256, ge=1)
    seed: int = 42
    preview_images: int = Field(8, ge=0)


class MasksConfig(_Section):
    backend: Literal["hf", "gsam", "shapes"] = "hf"
    box_threshold: float = Field(0.3, ge=0, le=1)
    text_threshold: float = Field(0.25, ge=0, le=1)
    resolution: int | None = Field(None, ge=64, description="stored mask resolution, at least 64 (None: the image resolution)")
    encoding: Literal["bitpack", "rle"] = "bitpack"
    batch_size: int = Field(8, ge=1)
    shard_size: int = Field(256, ge=1)
    max_boxes_per_noun: int = Field(4, ge=1)
    background_nouns: list[str] = Field(default_factory=lambda: list(BACKGROUND_NOUNS))
    drop_repeated_nouns: bool = Field(True, description="reference: nouns occurring twice in a prompt are dropped")
    detector_image_size: int | None = Field(None, ge=32, description="resize images for the detector (None: backend default)")


class SdxlPrefinetuneConfig(_Section):
    enabled: bool | None = Field(None, description="None: on for the sdxl family, off for sd15")
    generation_resolution: int = Field(1024, ge=32, multiple_of=8)
    resolution: int = Field(512, ge=32, multiple_of=8)
    num_images: int | None = Field(None, ge=1, description="images to generate (None: one per training prompt)")
    num_inference_steps: int = Field(50, ge=1)
    guidance_scale: float = Field(7.5, ge=0)
    generation_batch_size: int = Field(4, ge=1)
    shard_size: int = Field(256, ge=1)
    max_steps: int = Field(100, ge=1)
    batch_size: int = Field(4, ge=1)
    learning_rate: float = Field(1e-5, gt=0)
    seed: int = 42


class LoraConfig(_Section):
    rank: int = Field(128, ge=1)
    alpha: float = Field(128, gt=0)
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


class LossConfig(_Section):
    concept_weight: float = Field(1.0, ge=0)
    concept_reward: Literal["captioner", "shapes_judge", "shapes_verdict"] = Field(
        "captioner", description="what the concept term scores. captioner (CoMat): the captioner's loss for the prompt. "
                                 "shapes_judge (a diagnostic of the shapes world, never CoMat): the squared error to the "
                                 "judge's corrected image, right at its minimum (comat_core/worlds/shapes/oracle.py). "
                                 "shapes_verdict (a diagnostic too): the BCE of a classifier distilled from the judge "
                                 "(models.verdict; comat_core/worlds/shapes/verdict.py)")
    token_weight: float = Field(1e-3, ge=0)
    pixel_weight: float = Field(5e-5, ge=0)
    gan_weight: float = Field(1.0, ge=0, description="1.0 for SD1.5, 0.5 for SDXL (docs/method.md §5)")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="explicit: transformers' default changed to 0.0 in 4.38")
    caption_prefix: str = "a photography of "
    crop_max: int = Field(2, ge=0, description="random crop of 0..crop_max px per side before resizing")
    attention_blocks: list[str] = Field(
        default_factory=lambda: ["mid_block", "up_blocks.1", "up_blocks.2", "up_blocks.3"],
        description="UNet blocks whose cross-attention maps feed attribute concentration")
    attribute_steps: int = Field(2, ge=0, description="how many of the K gradient steps capture attention")
    attribute_steps_with_replacement: bool = Field(False, description="Decision; reference: True")
    token_loss_layer_scale: Literal["sum", "sd15"] = Field(
        "sum", description="how the per-layer token losses add up. sum: the reference (summed over the captured layers; "
                           "SD1.5's 10 layers at token_weight 1e-3 is the published recipe). sd15: Decision for SDXL, the "
                           "sum times 10 / (captured layers), so SDXL's 46-layer sum weighs like SD1.5's 10 (the "
                           "reference's plain sum makes SDXL's token term 4.6x SD1.5's). Not a mean over layers: that "
                           "would make SD1.5's term 10x weaker than the recipe")
    drop_undetected_nouns: bool = Field(True, description="Decision; reference: False (all-zero mask supervised)")


class DiscriminatorConfig(_Section):
    lora_rank: int = Field(128, ge=1)
    learning_rate: float = Field(2e-5, gt=0)
    betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = Field(1e-2, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    timestep: int = Field(1, ge=0)


# The deprecated ``train.attribute_masks`` as (train.noise, train.masks).
ATTRIBUTE_MASKS_ALIAS = {"gt_noise": ("replay", "offline"), "online": ("fresh", "online")}

LAUNCH_FIELDS = ("num_processes", "num_machines", "machine_rank", "main_process_ip", "main_process_port")


# Switches that change speed and memory, not the method (tests/test_perf_switches.py): not in the key.
PERF_FIELDS = ("merge_lora_for_nograd", "compile_nograd_unet", "nograd_compile_mode", "nograd_compile_max_shapes",
               "vae_decode_checkpointing")


class TrainConfig(_Section):
    max_steps: int = Field(2000, ge=1)
    batch_size: int = Field(4, ge=1, description="prompts per process per step")
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(5e-5, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(1e-2, ge=0)
    lr_scheduler: Literal["constant", "constant_with_warmup"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float = Field(0.1, gt=0)
    seed: int = 42
    resolution: int = Field(512, ge=32, multiple_of=8)
    num_inference_steps: int = Field(50, ge=2)
    guidance_scale: float = Field(7.5, ge=0)
    grad_steps: int = Field(5, ge=1, description="K: UNet calls with autograd, at start + j*(T/K)")
    gradient_checkpointing: bool = True
    backprop_through_unet_input: bool = Field(True, description="Decision; reference: True for SD1.5, False for SDXL")
    decode_to_unit_range: bool = Field(True, description="Decision: losses get [0,1] images; reference SDXL hands [-1,1]")
    p_mixed: float = Field(0.0, ge=0, le=1, description="Mixed Latent probability (see docs/method.md); default off")
    noise: Literal["replay", "fresh"] = Field(
        "replay", description="which noise every loss term sees. replay (Decision, default): a sample of prompt p starts "
                              "from its gan_gt sample's noise and uses that sample's variance-noise stream, so at the "
                              "LoRA's initial state the trained image is the gan_gt image (same sampler, same precision); "
                              "needs train's resolution, num_inference_steps and guidance_scale equal to gan_gt's. fresh "
                              "(the reference): new noise at every step")
    masks: Literal["offline", "online"] = Field(
        "offline", description="where the attribute-concentration masks come from. offline (Decision, default): the masks "
                               "stage's masks of the sample's gan_gt image; they describe the trained image only with "
                               "noise=replay (with fresh noise they describe another image of the prompt). online (the "
                               "reference): the online image is segmented (detached) with masks.backend, in the "
                               "training precision, at every attribute step; the masks stage is then not run")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    losses: LossConfig = Field(default_factory=LossConfig)
    discriminator: DiscriminatorConfig = Field(default_factory=DiscriminatorConfig)
    checkpoint_every: int = Field(200, ge=1)
    keep_last: int = Field(3, ge=1)
    validation_every: int = Field(200, ge=1)
    validation_prompts: list[str] = Field(default_factory=lambda: [
        "A black truck has a red dog in the drivers chair.", "a green bench and a blue bowl"])
    log_every: int = Field(10, ge=1)
    trackers: list[Literal["tensorboard", "wandb"]] = Field(default_factory=lambda: ["tensorboard"])
    # Data parallel under `accelerate launch` (comat_core/stages/train/launch.py); 1 process trains in-process.
    num_processes: int = Field(1, ge=1, description="processes in all (GPUs over all machines); global batch = "
                                                    "batch_size x num_processes x gradient_accumulation_steps")
    num_machines: int = Field(1, ge=1, description="machines; each runs num_processes / num_machines processes")
    machine_rank: int = Field(0, ge=0, description="this machine's rank; machine 0 runs the train stage, the others join")
    main_process_ip: str | None = Field(None, description="address of machine 0 (rendezvous), when num_machines > 1")
    main_process_port: int = Field(29500, ge=1, le=65535, description="rendezvous port on machine 0 (num_machines > 1)")
    # Performance switches; the defaults are the safe, plain paths. See comat_core/method/nograd.py and
    # benchmarks/RESULTS.md for what each is expected to buy.
    merge_lora_for_nograd: bool = Field(
        False, description="no-grad sampling calls use a copy of the UNet with the LoRA merged into its weights "
                            "(re-merged after each optimizer step; same function, no LoRA kernels)")
    compile_nograd_unet: bool = Field(
        False, description="torch.compile (dynamic=False) the UNet used for the no-grad sampling calls")
    nograd_compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "reduce-overhead", description="torch.compile mode of the no-grad UNet; reduce-overhead adds CUDA graphs on GPU")
    nograd_compile_max_shapes: int = Field(
        4, ge=1, description="input shapes compiled at most (train batch, validation batch, ...); others run eagerly")
    vae_decode_checkpointing: bool = Field(
        False, description="gradient-checkpoint the VAE decoder (saves the decode-backward peak)")

    @model_validator(mode="before")
    @classmethod
    def _attribute_masks_alias(cls, data: Any) -> Any:
        """The deprecated ``attribute_masks`` (gt_noise | online) decided both fields at once; map it, warn once."""
        if not isinstance(data, dict) or "attribute_masks" not in data:
            return data
        data = dict(data)
        old = data.pop("attribute_masks")
        if old not in ATTRIBUTE_MASKS_ALIAS:
            raise ValueError(f"train.attribute_masks must be gt_noise or online, not {old!r} (deprecated: use "
                             "train.noise and train.masks)")
        noise, masks = ATTRIBUTE_MASKS_ALIAS[old]
        for name, value in (("noise", noise), ("masks", masks)):
            if data.setdefault(name, value) != value:
                raise ValueError(f"train.attribute_masks={old} means train.{name}={value}, but train.{name} is "
                                 f"{data[name]}; drop the deprecated train.attribute_masks")
        logging.getLogger("comat").warning("train.attribute_masks=%s is deprecated: use train.noise=%s train.masks=%s",
                                           old, noise, masks)
        return data

    @property
    def offline_masks(self) -> bool:
        """Whether training reads the masks stage (``masks: offline``)."""
        return self.masks == "offline"

    def key_dump(self) -> dict:
        """The section as it enters the stage key: the process layout and the performance switches
        (same function, tested equal to the plain path) are not part of the result.

        Micro-batch k of a step is the same prompts and the same random draws whichever process
        runs it (trainer.py seeds by the micro-batch's slot in the global batch), so 2 processes x 1
        micro-batch train exactly like 1 process x 2. The key holds the micro-batches per step
        (``gradient_accumulation_steps`` x ``num_processes``) and the launch fields at their
        defaults; a run may then resume its checkpoints with another process count.
        """
        out = self.model_dump(mode="json")
        out["gradient_accumulation_steps"] = self.gradient_accumulation_steps * self.num_processes
        legacy = {v: k for k, v in ATTRIBUTE_MASKS_ALIAS.items()}.get((self.noise, self.masks))
        if legacy is not None:  # the two combinations the old single field named keep their keys
            del out["noise"], out["masks"]
            out["attribute_masks"] = legacy
        if out["losses"]["concept_reward"] == "captioner":  # CoMat's reward keeps the keys made before the field
            del out["losses"]["concept_reward"]
        for name in LAUNCH_FIELDS + PERF_FIELDS:
            out[name] = type(self).model_fields[name].default
        return out

    @model_validator(mode="after")
    def _check_steps(self) -> "TrainConfig":
        if self.grad_steps > self.num_inference_steps:
            raise ValueError(f"grad_steps ({self.grad_steps}) must be <= num_inference_steps ({self.num_inference_steps})")
        if self.losses.attribute_steps > self.grad_steps:
            raise ValueError(f"losses.attribute_steps ({self.losses.attribute_steps}) must be <= grad_steps ({self.grad_steps})")
        return self


class EvaluateConfig(_Section):
    categories: list[Literal["color", "shape", "texture", "spatial", "non_spatial", "complex", "shapes", "shapes_new",
                             "shapes_three", "shapes_relation", "shapes_train", "shapes_single"]] = Field(
        default_factory=lambda: list(EVAL_CATEGORIES))
    prompt_dir: str = Field("builtin:t2i-compbench", description="folder holding <category>_val.txt files (URL or builtin:)")
    prompts_per_category: int | None = Field(None, ge=1, description="None: all 300")
    images_per_prompt: int = Field(10, ge=1)
    seed: int = 0
    resolution: int = Field(512, ge=32, multiple_of=8)
    num_inference_steps: int = Field(50, ge=1)
    guidance_scale: float = Field(7.5, ge=0)
    batch_size: int = Field(8, ge=1)
    shard_size: int = Field(256, ge=1)
    bootstrap_samples: int = Field(1000, ge=10)
    grid_prompts: int = Field(4, ge=1)
    detector_box_threshold: float = Field(
        0.3, ge=0, le=1, description="spatial metric: a noun counts as detected when its best Grounding DINO box scores above this")
    parser: Literal["auto", "offline", "spacy"] = Field(
        "offline", description="noun-phrase parser for BLIP-VQA questions and spatial objects (offline: reproducible without spaCy)")


class ComatConfig(_Section):
    preset: str = "sd15"
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    world: WorldConfig = Field(default_factory=WorldConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    sdxl_prefinetune: SdxlPrefinetuneConfig = Field(default_factory=SdxlPrefinetuneConfig)
    gan_gt: GanGtConfig = Field(default_factory=GanGtConfig)
    masks: MasksConfig = Field(default_factory=MasksConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        if v not in PRESETS:
            raise ValueError(f"unknown preset {v!r}; choose one of {', '.join(PRESETS)}")
        return v

    @model_validator(mode="after")
    def _replay_needs_the_gan_gt_sampler(self) -> "ComatConfig":
        """With ``train.noise=replay`` the trainer replays gan_gt's draws: the sampler must be the same."""
        if self.train.noise != "replay":
            return self
        pairs = [("resolution", "resolution"), ("num_inference_steps", "num_inference_steps"),
                 ("guidance_scale", "guidance_scale")]
        for t_name, g_name in pairs:
            t, g = getattr(self.train, t_name), getattr(self.gan_gt, g_name)
            if t != g:
                raise ValueError(f"train.noise=replay replays the gan_gt samples, so train.{t_name} ({t}) "
                                 f"must equal gan_gt.{g_name} ({g}); make them equal or use train.noise=fresh")
        return self

    @property
    def prefinetune_enabled(self) -> bool:
        enabled = self.sdxl_prefinetune.enabled
        return self.models.family == "sdxl" if enabled is None else enabled

    def stage_order(self) -> list[str]:
        """The stages this config runs, in dependency order."""
        skip = {"sdxl_prefinetune"} if not self.prefinetune_enabled else set()
        if not self.train.offline_masks:  # nothing else reads the masks stage
            skip.add("masks")
        if self.world.kind == "none":
            skip.add("world")
        return [s for s in STAGE_NAMES if s not in skip]

    @model_validator(mode="after")
    def _world_models_need_a_world(self) -> "ComatConfig":
        uses = [f"models.{k}" for k, v in self.models.model_dump().items() if isinstance(v, str) and v.startswith(WORLD_SCHEME)]
        if uses and self.world.kind == "none":
            raise ValueError(f"{', '.join(uses)} name world:// models but world.kind is none; set world.kind=shapes")
        if self.train.losses.concept_reward == "shapes_judge" and self.world.kind != "shapes":
            raise ValueError("train.losses.concept_reward=shapes_judge scores images with the shapes world's judge; "
                             "it needs world.kind=shapes (the shapes preset)")
        if self.train.losses.concept_reward == "shapes_verdict":
            if self.world.kind != "shapes":
                raise ValueError("train.losses.concept_reward=shapes_verdict scores shapes-world images; it needs "
                                 "world.kind=shapes (the shapes preset)")
            if not self.models.verdict:
                raise ValueError("train.losses.concept_reward=shapes_verdict needs models.verdict: the folder "
                                 "benchmarks/shapes_verdict_pilot.py OUT wrote")
        return self


# --------------------------------------------------------------------------------------------------
# Presets

_TINY_EVAL_DIR = "builtin:t2i-compbench"


def _preset_sd15() -> dict:
    return {"preset": "sd15"}


def _preset_sdxl() -> dict:
    return {
        "preset": "sdxl",
        "models": {
            "family": "sdxl",
            "pretrained": "stabilityai/stable-diffusion-xl-base-1.0",
            "vae": "madebyollin/sdxl-vae-fp16-fix",
        },
        "gan_gt": {"batch_size": 8},
        "train": {
            "batch_size": 6,
            "learning_rate": 2e-5,
            "losses": {"gan_weight": 0.5, "attention_blocks": ["mid_block", "up_blocks.0", "up_blocks.1"],
                       "token_loss_layer_scale": "sd15"},
            "discriminator": {"learning_rate": 5e-5},
        },
        "evaluate": {"resolution": 512},
    }


def _tiny_common(family: str) -> dict:
    return {
        "models": {
            "family": family,
            "pretrained": f"tiny://{family}",
            "captioner": "tiny://blip-caption",
            "vqa": "tiny://blip-vqa",
            "clip": "tiny://clip",
            "grounding_dino": "tiny://grounding-dino",
            "sam": "tiny://sam",
            "sam_model_type": "tiny",
            "discriminator": "tiny://sd15",
        },
        "storage": {"root": "./comat-artifacts/tiny" if family == "sd15" else "./comat-artifacts/tiny-sdxl"},
        "prompts": {"sources": ["builtin:tiny_prompts.txt"], "exclude": [f"{_TINY_EVAL_DIR}/*_val*.txt"]},
        "sdxl_prefinetune": {"generation_resolution": 128, "resolution": 64, "num_images": 8,
                             "num_inference_steps": 4, "generation_batch_size": 4, "shard_size": 4,
                             "max_steps": 4, "batch_size": 2, "learning_rate": 1e-4},
        "gan_gt": {"resolution": 64, "num_inference_steps": 6, "batch_size": 8, "shard_size": 16,
                   "preview_images": 4},
        "masks": {"batch_size": 8, "shard_size": 16, "box_threshold": 0.05, "text_threshold": 0.05},
        "train": {
            "max_steps": 6, "batch_size": 2, "learning_rate": 1e-4, "resolution": 64,
            "num_inference_steps": 6, "grad_steps": 2, "checkpoint_every": 3, "keep_last": 2,
            "validation_every": 3, "log_every": 1, "trackers": [],
            "lora": {"rank": 4, "alpha": 4},
            "losses": {"attribute_steps": 1, "attention_blocks": ["mid_block", "up_blocks.0", "up_blocks.1"]},
            "discriminator": {"lora_rank": 4},
            "validation_prompts": ["a red cube and a blue sphere"],
        },
        "evaluate": {"prompts_per_category": 2, "images_per_prompt": 2, "resolution": 64,
                     "num_inference_steps": 4, "batch_size": 8, "shard_size": 8, "bootstrap_samples": 200,
                     "grid_prompts": 2, "detector_box_threshold": 0.05},
    }


def _preset_tiny() -> dict:
    d = _tiny_common("sd15")
    d["preset"] = "tiny"
    d["runtime"] = {"mixed_precision": "no"}
    return d


def _preset_tiny_sdxl() -> dict:
    d = _tiny_common("sdxl")
    d["preset"] = "tiny-sdxl"
    d["runtime"] = {"mixed_precision": "no"}
    d["train"]["losses"]["gan_weight"] = 0.5
    d["train"]["losses"]["token_loss_layer_scale"] = "sd15"
    # the tiny SDXL UNet, like the real one, has no attention in its full-resolution blocks
    d["train"]["losses"]["attention_blocks"] = ["mid_block", "up_blocks.0"]
    return d


def _preset_shapes() -> dict:
    """The shapes world end to end on a CPU: the world stage trains the base model and the captioner
    (or copies the shipped ones), then CoMat fine-tunes the base model on the world's training prompts
    and the judge scores base vs tuned on held-out prompts."""
    steps, guidance = 25, 7.5
    return {
        "preset": "shapes",
        "world": {"kind": "shapes"},
        "runtime": {"mixed_precision": "no"},
        "storage": {"root": "./comat-artifacts/shapes"},
        "models": {
            "family": "sd15", "pretrained": "world://base", "captioner": "world://captioner",
            "discriminator": "world://base", "vqa": "tiny://blip-vqa", "clip": "tiny://clip",
            "grounding_dino": "tiny://grounding-dino", "sam": "tiny://sam", "sam_model_type": "tiny",
        },
        "prompts": {"sources": ["builtin:shapes/train.txt"],
                    "exclude": [f"builtin:shapes/{name}" for name in SHAPES_HELD_OUT],
                    "parser": "offline"},
        "gan_gt": {"resolution": 64, "num_inference_steps": steps, "guidance_scale": guidance, "batch_size": 64,
                   "shard_size": 256, "preview_images": 16},
        "masks": {"backend": "shapes", "batch_size": 64, "shard_size": 256},
        "train": {
            "max_steps": 200, "batch_size": 8, "learning_rate": 1e-3, "resolution": 64,
            "num_inference_steps": steps, "guidance_scale": guidance, "grad_steps": 5, "checkpoint_every": 50,
            "keep_last": 10, "validation_every": 50, "log_every": 10, "trackers": [],
            "lora": {"rank": 8, "alpha": 8},
            "losses": {"attention_blocks": ["mid_block", "up_blocks.0", "up_blocks.1"]},
            "discriminator": {"lora_rank": 8},
            "validation_prompts": ["a red circle and a blue square", "a green triangle and a yellow diamond"],
        },
        # the headline, the harder generalisation and single objects; shapes_three, shapes_relation and
        # shapes_train are one override away (evaluate.categories), kept out to hold the preset's CoMat
        # part under 25 minutes on two cores
        "evaluate": {"categories": list(SHAPES_PRESET_CATEGORIES), "prompt_dir": "builtin:shapes", "images_per_prompt": 4,
                     "resolution": 64, "num_inference_steps": steps, "guidance_scale": guidance, "batch_size": 64,
                     "shard_size": 512, "bootstrap_samples": 1000, "grid_prompts": 8, "parser": "offline"},
    }


_PRESET_BUILDERS = {"tiny": _preset_tiny, "tiny-sdxl": _preset_tiny_sdxl, "sd15": _preset_sd15, "sdxl": _preset_sdxl,
                    "shapes": _preset_shapes}


def preset_dict(name: str) -> dict:
    if name not in _PRESET_BUILDERS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return _PRESET_BUILDERS[name]()


# --------------------------------------------------------------------------------------------------
# Loading: preset + YAML + overrides


def deep_merge(base: dict, override: dict) -> dict:
    """Merge ``override`` into a copy of ``base``; nested dicts merge, everything else replaces."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_known_keys(ann, dotted + "."))
    return keys


def _check_key(dotted: str) -> None:
    known = _known_keys(ComatConfig) + ["train.attribute_masks"]  # deprecated, mapped by TrainConfig
    if dotted not in known:
        hint = difflib.get_close_matches(dotted, known, n=1)
        extra = f" (did you mean {hint[0]}?)" if hint else ""
        raise ConfigError(f"unknown config key {dotted!r}{extra}")


_YAML11_WORDS = {"yes", "no", "on", "off", "y", "n"}


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=c`` → (``a.b``, value parsed as YAML so numbers, booleans and lists get their types)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like KEY=VALUE, e.g. train.learning_rate=1e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    _check_key(key)
    if raw.strip().lower() in _YAML11_WORDS:  # YAML 1.1 reads "no" as False: keep it text for Literal fields
        return key, raw.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _looks_like_float(raw):
        value = float(raw)
    return key, value


def _looks_like_float(raw: str) -> bool:
    try:
        float(raw)
        return True
    except ValueError:
        return False


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        nxt = d.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            d[p] = nxt
        d = nxt
    d[parts[-1]] = value


def _format_validation_error(err: ValidationError) -> str:
    msgs = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            hint = difflib.get_close_matches(loc, _known_keys(ComatConfig), n=1)
            msg = "unknown key" + (f" (did you mean {hint[0]}?)" if hint else "")
        elif "input" in e and not isinstance(e["input"], (dict, list)):
            msg = f"{msg} (got {e['input']!r})"
        msgs.append(f"{loc}: {msg}")
    return "invalid config: " + "; ".join(msgs)


def _check_yaml_keys(data: dict, model: type[BaseModel] = None, prefix: str = "") -> None:
    model = model or ComatConfig
    for k, v in data.items():
        dotted = f"{prefix}{k}"
        if k not in model.model_fields:
            _check_key(dotted)
        ann = model.model_fields[k].annotation
        if isinstance(v, dict) and isinstance(ann, type) and issubclass(ann, BaseModel):
            _check_yaml_keys(v, ann, dotted + ".")


def load_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    extra: dict | None = None,
) -> ComatConfig:
    """Build and validate the config: preset, then YAML file, then ``extra`` (CLI flags), then ``--set``s.

    The YAML file may name its own ``preset``; an explicit ``preset`` argument wins. Raises
    ``ConfigError`` with a one-line message naming the field and what is allowed.
    """
    file_data: dict = {}
    if config_file is not None:
        path = Path(config_file)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder; give a YAML file (e.g. {path}/comat.yaml)")
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}" if not path.exists() else
                              f"config file {path} is not a regular file; give a YAML file")
        try:
            file_data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path} is not UTF-8 text (invalid byte at offset {e.start}); "
                              "give a YAML file") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(file_data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(file_data).__name__}")
        _check_yaml_keys(file_data)
    name = preset or file_data.get("preset") or "tiny"
    data = preset_dict(name)
    data = deep_merge(data, {k: v for k, v in file_data.items() if k != "preset"})
    if extra:
        data = deep_merge(data, extra)
    for text in overrides or []:
        key, value = parse_override(text)
        if key == "preset":
            raise ConfigError("choose the preset with --preset, not --set preset=…")
        _set_dotted(data, key, value)
    data["preset"] = name
    try:
        return ComatConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None


def config_to_yaml(cfg: ComatConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------- a config from a request

Preset = Literal[PRESETS]  # the run form's choices, from the one list of presets and of stages
StageName = Literal[STAGE_NAMES]


class ConfigRequest(BaseModel):
    """What to build the config from: the CLI's flags, and the ``config`` parameter of the flows.

    Typed so that Prefect's run form shows fields (the preset as a choice, overrides as a list) and
    a deployment refuses a bad value when the run is submitted.
    """

    model_config = ConfigDict(extra="forbid")

    preset: Preset | None = Field(None, description="base configuration (default tiny, or the one in config_file)")
    config_file: str | None = Field(None, description="YAML file merged over the preset (a path on the worker)")
    overrides: list[str] = Field(default_factory=list, description="KEY=VALUE, e.g. train.max_steps=500")
    storage: str | None = Field(None, description="artifact store root: a local folder, s3://bucket/prefix, gs://...")
    prompts: list[str] | None = Field(None, description="prompt files or globs replacing the preset's sources")
    values: dict[str, Any] | None = Field(None, description="a resolved configuration (set by the pipeline for the "
                                                            "runs it starts; leave empty)")


def build_config(request: dict | ConfigRequest | ComatConfig | None) -> ComatConfig:
    """``{"preset", "config_file", "overrides", "storage", "prompts"}`` → a validated ``ComatConfig``."""
    if isinstance(request, ComatConfig):
        return request
    if isinstance(request, ConfigRequest):
        request = request.model_dump(exclude_none=True)
    request = dict(request or {})
    unknown = set(request) - {"preset", "config_file", "overrides", "storage", "prompts", "values"}
    if unknown:
        raise ConfigError(f"unknown config request field(s) {sorted(unknown)}; "
                          "use preset, config_file, overrides, storage, prompts, values")
    extra: dict = dict(request.get("values") or {})
    if request.get("storage") is not None:  # an empty --storage is an error, not the default
        extra.setdefault("storage", {})["root"] = request["storage"]
    if request.get("prompts"):
        extra.setdefault("prompts", {})["sources"] = list(request["prompts"])
    return load_config(request.get("preset"), request.get("config_file"), request.get("overrides"), extra)
