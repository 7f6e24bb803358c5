"""Load every model the pipeline uses from one kind of name: a Hub id, a local folder or ``tiny://<kind>``.

``resolve_model`` turns a configured name into what ``from_pretrained`` accepts: a Hub id is
passed through, a local folder must exist, and ``tiny://<kind>`` is built once (atomically) into
the cache folder (``$COMAT_CACHE`` or ``~/.cache/comat``). The typed ``load_*`` functions return
frozen models (no gradients, eval mode) and turn "not downloaded / not found" into a one-line
``InputError``. Remote code is never trusted; weights are read from safetensors only.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

from comat_core.errors import ConfigError, InputError
TINY_SCHEME = "tiny://"
WORLD_SCHEME = "world://"
# The tiny zoo's kinds and builder version, read without importing ``tiny`` (which imports torch);
# tests/test_hardening.py checks both against ``comat_core.models.tiny``.
TINY_KINDS = ("sd15", "sdxl", "blip-caption", "blip-vqa", "clip", "grounding-dino", "sam")
_LOCAL_PREFIXES = ("/", "./", "../", "~")
# torch is imported where a model is loaded, not here: naming and fingerprinting models (stage keys,
# ``comat status``, ``comat config``) must answer without it.
_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


# ----------------------------------------------------------------------------------------------
# Names


def cache_dir() -> Path:
    """The local cache folder: ``$COMAT_CACHE`` or ``~/.cache/comat``."""
    return Path(os.environ.get("COMAT_CACHE") or Path.home() / ".cache" / "comat").expanduser()


def is_tiny(name: str) -> bool:
    return name.startswith(TINY_SCHEME)


def is_local(name: str) -> bool:
    """A name is a local folder when it looks like a path or names an existing folder."""
    return name.startswith(_LOCAL_PREFIXES) or os.path.isdir(name)


def builder_version() -> str:
    """``comat_core.models.tiny.builder_version()``: a hash of the builder's source and word list."""
    return _builder_version(Path(__file__).with_name("tiny.py"))


@lru_cache(maxsize=1)
def _builder_version(source: Path) -> str:
    digest = hashlib.sha256(source.read_bytes())
    digest.update((Path(__file__).parents[1] / "data" / "tiny_words.txt").read_bytes())
    return digest.hexdigest()[:12]


def build_tiny(kind: str, out_dir: Path, seed: int = 0) -> Path:
    """``comat_core.models.tiny.build_tiny``, imported when a tiny model is first built (it imports torch)."""
    from comat_core.models import tiny

    return tiny.build_tiny(kind, out_dir, seed)


def _tiny_kind(name: str) -> str:
    kind = name[len(TINY_SCHEME) :]
    if kind not in TINY_KINDS:
        raise InputError(f"unknown tiny model {name!r}: use one of {', '.join(TINY_SCHEME + k for k in TINY_KINDS)}")
    return kind


def is_world(name: str) -> bool:
    """``world://base`` / ``world://captioner``: a model the pipeline's ``world`` stage trains."""
    return isinstance(name, str) and name.startswith(WORLD_SCHEME)


def resolve_model(name: str, field: str | None = None) -> str:
    """What ``from_pretrained`` should get for ``name``: a Hub id as is, or a local folder path.

    ``field`` is the config key the name came from (e.g. ``models.captioner``), for error messages.
    """
    if not name or not name.strip():
        raise InputError("model name is empty: set it to a Hugging Face id, a local folder or tiny://<kind>")
    if is_world(name):
        raise InputError(f"{field or 'a model setting'} is {name}: world:// models come from the world stage, "
                         "which the pipeline runs first and resolves for the stages that read it")
    if is_tiny(name):
        return str(_ensure_tiny(_tiny_kind(name)))
    if is_local(name):
        path = Path(name).expanduser().resolve()
        if not path.is_dir():
            raise InputError(
                f"model path does not exist: {name} "
                f"(set {field or 'the model setting'} to a Hugging Face id or an existing folder)"
            )
        return str(path)
    return name


def model_fingerprint(name: str) -> str:
    """A stable string that changes when the model behind ``name`` changes (part of stage keys).

    tiny:// -> kind and builder version; local folder -> path plus a digest of its files' content
    (``_folder_digest``); Hub id -> the id.
    """
    if is_tiny(name):
        return f"{TINY_SCHEME}{_tiny_kind(name)}@{builder_version()}"
    if is_world(name):  # the world stage is an input of every stage that reads it: its content enters the key
        return name
    if is_local(name):
        path = Path(resolve_model(name))
        return f"{path}#{_folder_digest(path)}"
    return name


WHOLE_FILE_BYTES = 64 << 20  # files up to this size are hashed whole
SAMPLED_BLOCKS, BLOCK_BYTES = 64, 64 << 10  # larger ones: this many blocks, evenly spread, first and last included


def _file_content(file: Path, digest) -> None:
    """Feed ``file``'s size and content into ``digest``: all of it when small, else evenly spread blocks.

    Retraining a model in place rewrites every weight with the same sizes, so sizes alone would keep a
    stale stage key; hashing a multi-gigabyte checkpoint whole at every key would cost seconds. 64
    blocks of 64 KiB (4 MiB read) see any retraining or fine-tune merged into the weights."""
    size = file.stat().st_size
    digest.update(str(size).encode() + b"\0")
    with file.open("rb") as handle:
        if size <= WHOLE_FILE_BYTES:
            digest.update(handle.read())
            return
        for k in range(SAMPLED_BLOCKS):
            handle.seek((size - BLOCK_BYTES) * k // (SAMPLED_BLOCKS - 1))
            digest.update(handle.read(BLOCK_BYTES))


def _folder_digest(root: Path) -> str:
    """A digest of every file under ``root``: its path and content (``_file_content``)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        _file_content(file, digest)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Tiny builds: once per (kind, builder version), atomically


def tiny_path(kind: str) -> Path:
    return cache_dir() / "tiny" / f"{kind}-{builder_version()}"


def _ensure_tiny(kind: str) -> Path:
    """Build ``kind`` into the cache unless it is there; safe across crashes and concurrent processes.

    The build goes to a temporary folder that is renamed into place (a crash leaves no half
    model), under an exclusive file lock (two processes do not build the same model twice).
    """
    final = tiny_path(kind)
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.parent / f".{final.name}.lock"):
        if final.is_dir():  # another process finished it while we waited
            return final
        for stale in final.parent.glob(f".tmp-{final.name}-*"):  # left by a crash
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        try:
            build_tiny(kind, tmp)
            # transformers' save_pretrained writes weights on distributed rank 0 only: never cache a
            # folder without them (a rank > 0 building first would otherwise poison the cache)
            if not any(tmp.rglob("*.safetensors")):
                raise RuntimeError(f"building tiny model {kind!r} wrote no weights (inside a non-zero distributed "
                                   "rank?); build it before the process group starts")
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------
# Loading


def torch_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """Accept a torch dtype or its config spelling ("float32", "fp16", "bf16", ...)."""
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return getattr(torch, _DTYPES[str(dtype).lower()])
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}: use one of {', '.join(_DTYPES)}") from None


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Frozen: no parameter takes gradients, and eval mode (no dropout)."""
    module.requires_grad_(False)
    return module.eval()


def _load(what: str, name: str, load: Callable[[str], T], field: str | None = None) -> T:
    """Run ``load`` on the resolved ``name``, turning "not found / not downloaded" into an InputError."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError

    source = resolve_model(name, field)
    try:
        return load(source)
    except (OSError, HFValidationError) as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if is_tiny(name) or is_local(name):
            raise InputError(f"cannot load {what} from {source}: {detail}") from exc
        target = field or "the model setting"
        if constants.HF_HUB_OFFLINE:
            raise InputError(
                f"cannot load {what} {name!r}: it is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 "
                f"forbids downloading; download it (hf download {name}) or set {target} to a local folder"
            ) from exc
        raise InputError(
            f"cannot load {what} {name!r} from the Hugging Face Hub ({detail}); "
            f"check the id and the network, or set {target} to a local folder"
        ) from exc
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise InputError(f"{field or 'the model setting'}: {name} needs its own code, which comat never runs; use a "
                         "model made of diffusers' and transformers' own classes") from exc


def _hf_model(cls, what: str, name: str, dtype, device, field: str | None):
    def load(source: str):
        return cls.from_pretrained(source, dtype=torch_dtype(dtype), use_safetensors=True, trust_remote_code=False)

    return freeze(_load(what, name, load, field).to(device))


def _hf_processor(cls, what: str, name: str, field: str | None):
    return _load(what, name, lambda source: cls.from_pretrained(source, trust_remote_code=False), field)


def load_sd_pipeline(
    name: str,
    family: Literal["sd15", "sdxl"],
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    unet_override: str | None = None,
    field: str | None = None,
    vae: str | None = None,
):
    """A frozen diffusers Stable Diffusion pipeline (``sd15`` or ``sdxl`` family), safety checker off.

    ``unet_override`` replaces the UNet: a UNet folder (``config.json``) or a pipeline folder
    (``model_index.json``, its ``unet/`` is used), e.g. the SDXL 512-px pre-finetuned UNet.
    ``vae`` replaces the VAE (``models.vae``, e.g. ``madebyollin/sdxl-vae-fp16-fix``), see ``load_vae``.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    classes = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}
    if family not in classes:
        raise ConfigError(f"unknown model family {family!r}: use sd15 or sdxl")
    cls = classes[family]
    _check_pipeline_class(name, family, field)
    dtype = torch_dtype(dtype)
    kwargs = {"safety_checker": None, "requires_safety_checker": False} if family == "sd15" else {}
    if unet_override is not None:
        kwargs["unet"] = _load_unet(unet_override, dtype)
    if vae is not None:
        kwargs["vae"] = load_vae(vae, dtype, field="models.vae")

    def load(source: str):
        return cls.from_pretrained(source, dtype=dtype, use_safetensors=True, **kwargs)

    import torch

    pipe = _load(f"{family} pipeline", name, load, field).to(device)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            freeze(component)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_pipeline_class(name: str, family: str, field: str | None) -> None:
    """A local pipeline folder of the other family fails here, with a message, not deep inside diffusers."""
    if not (is_tiny(name) or is_local(name)):
        return
    root = Path(resolve_model(name, field))
    if not (root / "model_index.json").is_file():
        raise InputError(f"{name} is not a diffusers pipeline folder (no model_index.json)")
    check_pipeline_folder(root, family, f"{field or 'the model setting'}: {name}")


# ----------------------------------------------------------------------------------------------
# What a local model folder must hold, checked before any work (comat_core.preflight) and before loading:
# readable JSON, the family it is loaded as, safetensors weights, and no code of its own.

PIPELINE_CLASSES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
# the components load_sd_pipeline reads from a pipeline folder; the first ones carry weights
_WEIGHTED_PARTS = {"sd15": ("unet", "vae", "text_encoder"), "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2")}
_OTHER_PARTS = {"sd15": ("tokenizer", "scheduler"), "sdxl": ("tokenizer", "tokenizer_2", "scheduler")}
_LIBRARIES = (None, "diffusers", "transformers")
# the ``model_type`` of each transformers model setting (its config.json)
MODEL_TYPES = {"captioner": "blip", "vqa": "blip", "clip": "clip", "grounding_dino": "grounding-dino", "sam": "sam"}


def _read_json(path: Path, label: str) -> dict:
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"{label}: {path.name} cannot be read as JSON ({detail}); re-download the model") from None
    if not isinstance(data, dict):
        raise InputError(f"{label}: {path.name} holds a {type(data).__name__}, not a JSON object; re-download the model")
    return data


def _refuse_custom_code(root: Path, label: str, config: dict | None = None) -> None:
    """Python files in the folder (or its component folders), or a config's ``auto_map``: the model would need
    its own code, which comat never runs (no trust_remote_code)."""
    code = sorted(p.relative_to(root).as_posix() for p in [*root.glob("*.py"), *root.glob("*/*.py")])
    if code or (config or {}).get("auto_map"):
        what = code[0] if code else "config.json auto_map"
        raise InputError(f"{label} needs its own code ({what}), which comat never runs; use a model made of "
                         "diffusers' and transformers' own classes")


def _require_weights(folder: Path, label: str) -> None:
    if not any(folder.glob("*.safetensors")):
        raise InputError(f"{label}: {folder.name}/ holds no .safetensors weights (comat reads only safetensors); "
                         "download them (hf download ... --include '*.safetensors')")


def check_pipeline_folder(root: Path, family: str, label: str, fix: str | None = None) -> None:
    """A diffusers pipeline folder of ``family``: its model_index.json names that family's pipeline class, every
    component load_sd_pipeline reads is a diffusers or transformers class with its folder, and the models have
    safetensors weights. ``label`` names the setting in messages, e.g. ``models.pretrained: /data/sd15``;
    ``fix`` says what to do about a pipeline of another family."""
    index = _read_json(root / "model_index.json", label)
    _refuse_custom_code(root, label)
    expected = PIPELINE_CLASSES[family]
    if index.get("_class_name") != expected:
        fix = fix or f"use a pipeline folder of the {family} family, or set models.family to the folder's family"
        raise InputError(f"{label} holds a {index.get('_class_name')}, but it is loaded as a {expected}; {fix}")
    for part, entry in index.items():
        if isinstance(entry, list) and len(entry) == 2 and entry[0] not in _LIBRARIES and part != "safety_checker":
            raise InputError(f"{label} needs its own code ({part} comes from {entry[0]!r}), which comat never runs; "
                             "use a model made of diffusers' and transformers' own classes")
    for part in _WEIGHTED_PARTS[family] + _OTHER_PARTS[family]:
        entry = index.get(part)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0]) or not (root / part).is_dir():
            raise InputError(f"{label}: the pipeline has no {part} (model_index.json and the {part}/ folder); "
                             "re-download the whole pipeline")
        if part in _WEIGHTED_PARTS[family]:
            _require_weights(root / part, label)


def check_model_folder(field: str, root: Path, label: str) -> None:
    """A local folder for ``models.<field>`` other than a pipeline: readable config.json, the model type the
    setting needs (a VAE for ``vae``), safetensors weights, no code of its own."""
    if field == "vae":  # a VAE folder, or a pipeline folder whose vae/ is read (as load_vae does)
        folder = root / "vae" if (root / "model_index.json").is_file() else root
        config = _read_json(folder / "config.json", label)
        _refuse_custom_code(root, label, config)
        if config.get("_class_name") != "AutoencoderKL":
            raise InputError(f"{label} holds a {config.get('_class_name')}, not an AutoencoderKL; use a VAE folder")
        _require_weights(folder, label)
        return
    config = _read_json(root / "config.json", label)
    _refuse_custom_code(root, label, config)
    expected = MODEL_TYPES.get(field)
    if expected and config.get("model_type") != expected:
        raise InputError(f"{label} holds a {config.get('model_type')} model, but models.{field} needs a {expected} "
                         "model")
    _require_weights(root, label)


def _load_unet(name: str, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    def load(source: str):
        subfolder = "unet" if (Path(source) / "model_index.json").is_file() else None
        return UNet2DConditionModel.from_pretrained(
            source, subfolder=subfolder, dtype=dtype, use_safetensors=True
        )

    return _load("UNet", name, load)


def load_vae(name: str, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu",
             field: str | None = None, *, pipeline: bool | None = None):
    """A frozen ``AutoencoderKL`` from a VAE folder or a pipeline folder's ``vae/``.

    ``pipeline``: None detects a local pipeline folder (``model_index.json``); True reads ``vae/``
    of any name (a Hub pipeline id, whose files are not local); False reads the folder itself.
    """
    from diffusers import AutoencoderKL

    def load(source: str):
        is_pipeline = (Path(source) / "model_index.json").is_file() if pipeline is None else pipeline
        return AutoencoderKL.from_pretrained(source, subfolder="vae" if is_pipeline else None,
                                             dtype=torch_dtype(dtype), use_safetensors=True)

    return freeze(_load("VAE", name, load, field).to(device))


def load_tokenizer(name: str, subfolder: str | None = "tokenizer", field: str | None = None):
    """A pipeline's tokenizer (``subfolder="tokenizer"``, or ``"tokenizer_2"``; None for a model folder)."""
    from transformers import AutoTokenizer

    def load(source: str):
        return AutoTokenizer.from_pretrained(source, subfolder=subfolder or "", trust_remote_code=False)

    return _load("tokenizer", name, load, field)


def load_captioner(name: str, dtype=None, device="cpu", field: str | None = None):
    """Frozen BLIP captioner and its processor: ``(BlipForConditionalGeneration, BlipProcessor)``."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    model = _hf_model(BlipForConditionalGeneration, "BLIP captioner", name, dtype, device, field)
    return model, _hf_processor(BlipProcessor, "BLIP processor", name, field)


def load_vqa(name: str, dtype=None, device="cpu", field: str | None = None):
    """Frozen BLIP-VQA model and its processor: ``(BlipForQuestionAnswering, BlipProcessor)``."""
    from transformers import BlipForQuestionAnswering, BlipProcessor

    model = _hf_model(BlipForQuestionAnswering, "BLIP-VQA model", name, dtype, device, field)
    return model, _hf_processor(BlipProcessor, "BLIP processor", name, field)


def load_clip(name: str, dtype=None, device="cpu", field: str | None = None):
    """Frozen CLIP and its processor: ``(CLIPModel, CLIPProcessor)``."""
    from transformers import CLIPModel, CLIPProcessor

    model = _hf_model(CLIPModel, "CLIP model", name, dtype, device, field)
    return model, _hf_processor(CLIPProcessor, "CLIP processor", name, field)


def load_grounding_dino(name: str, dtype=None, device="cpu", field: str | None = None):
    """Frozen Grounding DINO and its processor: ``(GroundingDinoForObjectDetection, GroundingDinoProcessor)``."""
    from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor

    model = _hf_model(GroundingDinoForObjectDetection, "Grounding DINO model", name, dtype, device, field)
    return model, _hf_processor(GroundingDinoProcessor, "Grounding DINO processor", name, field)


def load_sam(name: str, dtype=None, device="cpu", field: str | None = None):
    """Frozen SAM and its processor: ``(SamModel, SamProcessor)``."""
    from transformers import SamModel, SamProcessor

    model = _hf_model(SamModel, "SAM model", name, dtype, device, field)
    return model, _hf_processor(SamProcessor, "SAM processor", name, field)
