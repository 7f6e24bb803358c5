"""The offline tiny model zoo and the loaders: every kind builds, loads offline and runs.

Each tiny kind is built once per session into a temporary ``COMAT_CACHE`` (a few seconds in all).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comat_core.errors import ConfigError, InputError
from comat_core.models import loader, tiny
from comat_core.models.tiny import TINY_KINDS, build_tiny

PROMPT = "a red cube and a blue sphere"


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """COMAT_CACHE in a temporary folder, with every tiny kind built into it once."""
    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.mktemp("comat-cache")
        mp.setenv("COMAT_CACHE", str(cache))
        paths = {kind: Path(loader.resolve_model(f"tiny://{kind}")) for kind in TINY_KINDS}
        yield paths


@pytest.fixture(scope="session")
def sd15(tiny_cache):
    return loader.load_sd_pipeline("tiny://sd15", "sd15", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def sdxl(tiny_cache):
    return loader.load_sd_pipeline("tiny://sdxl", "sdxl", dtype=torch.float32, device="cpu")


@pytest.fixture(scope="session")
def captioner(tiny_cache):
    return loader.load_captioner("tiny://blip-caption")


def _image(seed: int, size: int = 64) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _weights_digest(folder: Path) -> dict[str, str]:
    files = sorted(folder.rglob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    return {f.relative_to(folder).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _assert_frozen(*modules: torch.nn.Module) -> None:
    for module in modules:
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())


# ----------------------------------------------------------------------------------------------
# Building and caching


def test_tiny_models_are_cached_by_builder_version(tiny_cache):
    for kind, path in tiny_cache.items():
        assert path == loader.cache_dir() / "tiny" / f"{kind}-{tiny.builder_version()}"
        assert _weights_digest(path)
        assert loader.resolve_model(f"tiny://{kind}") == str(path)  # second call: no rebuild
    assert not list((loader.cache_dir() / "tiny").glob(".tmp-*"))


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_build_is_deterministic(tiny_cache, tmp_path, kind):
    rebuilt = build_tiny(kind, tmp_path / kind, seed=0)
    assert _weights_digest(rebuilt) == _weights_digest(tiny_cache[kind])


def test_other_seed_gives_other_weights(tiny_cache, tmp_path):
    other = build_tiny("sam", tmp_path / "sam", seed=1)
    assert _weights_digest(other) != _weights_digest(tiny_cache["sam"])


def test_build_leaves_the_global_random_stream_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny("sam", tmp_path / "sam")
    assert torch.equal(torch.rand(3), expected)


def test_crashed_build_leaves_no_model(monkeypatch, tmp_path):
    monkeypatch.setenv("COMAT_CACHE", str(tmp_path))
    real_build = loader.build_tiny

    def crash_midway(kind, out_dir, seed=0):
        (Path(out_dir) / "config.json").write_text("{}")
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(loader, "build_tiny", crash_midway)
    with pytest.raises(RuntimeError):
        loader.resolve_model("tiny://sam")
    tiny_dir = tmp_path / "tiny"
    assert not loader.tiny_path("sam").exists()
    assert not list(tiny_dir.glob(".tmp-*"))

    monkeypatch.setattr(loader, "build_tiny", real_build)
    assert Path(loader.resolve_model("tiny://sam")) == loader.tiny_path("sam")
    assert (loader.tiny_path("sam") / "model.safetensors").is_file()


def test_concurrent_resolves_build_once(monkeypatch, tmp_path):
    monkeypatch.setenv("COMAT_CACHE", str(tmp_path))
    real_build = loader.build_tiny
    builds = []

    def counting_build(kind, out_dir, seed=0):
        builds.append(kind)
        return real_build(kind, out_dir, seed)

    monkeypatch.setattr(loader, "build_tiny", counting_build)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(loader.resolve_model("tiny://sam"))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [str(loader.tiny_path("sam"))] * 3
    assert builds == ["sam"]


# ----------------------------------------------------------------------------------------------
# Names, errors, fingerprints


def test_missing_local_path_is_an_input_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(InputError, match="model path does not exist: .*no-such-model.*models.captioner"):
        loader.resolve_model(str(missing), field="models.captioner")
    with pytest.raises(InputError, match="model path does not exist"):
        loader.load_sd_pipeline("./no-such-folder", "sd15")


def test_unknown_tiny_kind_is_an_input_error():
    with pytest.raises(InputError, match="tiny://sd15"):
        loader.resolve_model("tiny://sd3")


def test_uncached_hub_id_offline_is_an_input_error(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(InputError) as error:
        loader.load_captioner("comat-tests/not-downloaded", field="models.captioner")
    message = str(error.value)
    assert "\n" not in message
    assert "comat-tests/not-downloaded" in message and "HF_HUB_OFFLINE" in message
    assert "models.captioner" in message


def test_hub_ids_pass_through():
    assert loader.resolve_model("runwayml/stable-diffusion-v1-5") == "runwayml/stable-diffusion-v1-5"
    assert loader.model_fingerprint("runwayml/stable-diffusion-v1-5") == "runwayml/stable-diffusion-v1-5"


def test_fingerprints(tiny_cache, tmp_path):
    assert loader.model_fingerprint("tiny://sam") == f"tiny://sam@{tiny.builder_version()}"
    copy = shutil.copytree(tiny_cache["sam"], tmp_path / "sam")
    before = loader.model_fingerprint(str(copy))
    assert before.startswith(str(copy)) and before == loader.model_fingerprint(str(copy))
    config = json.loads((copy / "config.json").read_text())
    config["mask_threshold"] = 0.5
    (copy / "config.json").write_text(json.dumps(config))
    assert loader.model_fingerprint(str(copy)) != before


def test_a_model_retrained_in_place_gets_a_new_fingerprint(tiny_cache, tmp_path, monkeypatch):
    """Same files, same sizes, new weights (a captioner retrained into its folder): a new key, whole or sampled."""
    copy = shutil.copytree(tiny_cache["sam"], tmp_path / "sam")
    weights = next(copy.glob("*.safetensors"))
    for whole in (True, False):
        monkeypatch.setattr(loader, "WHOLE_FILE_BYTES", 1 << 40 if whole else 0)
        monkeypatch.setattr(loader, "BLOCK_BYTES", 16)
        before = loader.model_fingerprint(str(copy))
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF  # the last byte: the sampled read covers the file's end
        weights.write_bytes(bytes(data))
        assert loader.model_fingerprint(str(copy)) != before


def test_wrong_family_is_an_input_error(tiny_cache):
    with pytest.raises(InputError, match="StableDiffusionXLPipeline"):
        loader.load_sd_pipeline("tiny://sd15", "sdxl")


def test_dtype_names():
    assert loader.torch_dtype("bf16") is torch.bfloat16
    assert loader.torch_dtype(None) is torch.float32
    with pytest.raises(ConfigError, match="float16"):
        loader.torch_dtype("float8")


# ----------------------------------------------------------------------------------------------
# Diffusion pipelines


def _cross_attention_tokens(unet):
    """Hooks recording, per cross-attention module, how many latent pixels it attends from."""
    seen: dict[str, int] = {}

    def record(name):
        return lambda module, args, output: seen.__setitem__(name, output.shape[1])

    hooks = [m.register_forward_hook(record(name)) for name, m in unet.named_modules() if name.endswith("attn2")]
    return seen, hooks


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_pipeline_generates_64px_in_two_steps(request, family):
    pipe = request.getfixturevalue(family)
    _assert_frozen(pipe.unet, pipe.vae, pipe.text_encoder)
    assert pipe.scheduler.config.timestep_spacing == "leading" and pipe.scheduler.config.steps_offset == 1
    seen, hooks = _cross_attention_tokens(pipe.unet)
    try:
        out = pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt")
    finally:
        for hook in hooks:
            hook.remove()
    image = out.images
    assert image.shape == (1, 3, 64, 64)
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0
    resolutions = {name.split(".attentions")[0]: tokens for name, tokens in seen.items()}
    if family == "sd15":  # cross-attention in mid and both up blocks: 4x4, 4x4 and 8x8 latents
        expected = {"down_blocks.0": 64, "down_blocks.1": 16, "mid_block": 16, "up_blocks.0": 16, "up_blocks.1": 64}
        assert resolutions == expected
    else:  # SDXL layout: no attention in the full-resolution blocks
        assert resolutions == {"down_blocks.1": 16, "mid_block": 16, "up_blocks.0": 16}


def test_latents_are_image_over_8(sd15):
    latents = sd15(PROMPT, num_inference_steps=2, output_type="latent").images
    assert latents.shape == (1, 4, 8, 8)
    assert sd15.vae.config.scaling_factor == pytest.approx(0.18215)


def test_unet_override_replaces_the_unet(tiny_cache):
    pipe = loader.load_sd_pipeline("tiny://sdxl", "sdxl", unet_override=str(tiny_cache["sdxl"]))
    assert pipe.unet.config.addition_embed_type == "text_time"
    _assert_frozen(pipe.unet)


# ----------------------------------------------------------------------------------------------
# Tokenizers


def test_clip_tokenizer_gives_one_token_per_word_with_offsets(sd15):
    tokenizer = sd15.tokenizer
    encoding = tokenizer(PROMPT, return_offsets_mapping=True)
    words = PROMPT.split()
    assert len(encoding.input_ids) == len(words) + 2  # <|startoftext|> ... <|endoftext|>
    spans = encoding.offset_mapping[1:-1]
    assert [PROMPT[a:b] for a, b in spans] == words
    assert tokenizer.model_max_length == 77


def test_pipeline_tokenizers_load_alone(tiny_cache):
    for subfolder in ("tokenizer", "tokenizer_2"):
        tokenizer = loader.load_tokenizer("tiny://sdxl", subfolder)
        assert tokenizer.backend_tokenizer is not None  # fast: offsets available
        assert tokenizer.tokenize(PROMPT) == [w + "</w>" for w in PROMPT.split()]


def test_clip_tokenizer_keeps_every_listed_word_whole(sd15):
    words = list(tiny.tiny_words())
    lengths = {len(ids) for ids in sd15.tokenizer(words, add_special_tokens=False).input_ids}
    assert lengths == {1}


def test_bert_tokenizer_has_no_unknown_tokens(captioner):
    tokenizer = captioner[1].tokenizer
    text = "A photorealistic 3D render of Zyxwv's café, 12 chairs; a dog (brown) & a cat!"
    ids = tokenizer(text).input_ids
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.unk_token_id not in sum(tokenizer(list(tiny.tiny_words())[:2000]).input_ids, [])
    # Grounding DINO hard-codes bert-base-uncased's ids for [CLS], [SEP], "." and "?"
    assert tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]", ".", "?"]) == [101, 102, 1012, 1029]


# ----------------------------------------------------------------------------------------------
# Captioner, VQA, CLIP, detector, segmenter


def test_captioner_loss_depends_on_the_image(captioner):
    model, processor = captioner
    _assert_frozen(model)
    text = processor.tokenizer(["a photography of " + PROMPT], return_tensors="pt")
    input_ids = text.input_ids.clone()
    input_ids[:, 0] = model.config.text_config.bos_token_id  # BLIP's decoder starts with [DEC]
    assert processor.tokenizer.convert_ids_to_tokens(int(input_ids[0, 0])) == "[DEC]"
    pixels = processor(images=[_image(0), _image(1)], return_tensors="pt").pixel_values
    assert pixels.shape == (2, 3, 64, 64)
    pixels.requires_grad_(True)
    ids = input_ids.repeat(2, 1)
    loss = model(pixel_values=pixels, input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert pixels.grad.abs().mean() > 1e-6
    with torch.no_grad():
        first, second = (model(pixel_values=p[None], input_ids=input_ids, labels=input_ids).loss for p in pixels)
    assert abs(first - second) > 1e-4


def test_vqa_answers_with_whole_yes_and_no(tiny_cache):
    model, processor = loader.load_vqa("tiny://blip-vqa")
    _assert_frozen(model)
    tokenizer = processor.tokenizer
    assert tokenizer.tokenize("yes no") == ["yes", "no"]
    inputs = processor(images=_image(0), text="a red cube?", return_tensors="pt")
    answer = model.generate(**inputs, max_new_tokens=3)
    assert answer.shape[0] == 1 and int(answer[0, 0]) == model.config.text_config.bos_token_id


def test_clip_scores_image_text_pairs(tiny_cache):
    model, processor = loader.load_clip("tiny://clip")
    _assert_frozen(model)
    inputs = processor(text=[PROMPT, "a dog"], images=[_image(0)], return_tensors="pt", padding=True)
    logits = model(**inputs).logits_per_image
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()


def test_grounding_dino_detects_and_post_processes(tiny_cache):
    model, processor = loader.load_grounding_dino("tiny://grounding-dino")
    _assert_frozen(model)
    inputs = processor(images=_image(0), text="cat . dog .", return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    results = processor.post_process_grounded_object_detection(
        outputs, inputs.input_ids, threshold=0.0, text_threshold=0.0, target_sizes=[(64, 64)]
    )
    boxes = results[0]["boxes"]
    assert boxes.shape == (model.config.num_queries, 4)
    assert (boxes >= -1e-3).all() and (boxes <= 64 + 1e-3).all()


def test_sam_segments_a_box(tiny_cache):
    model, processor = loader.load_sam("tiny://sam")
    _assert_frozen(model)
    inputs = processor(images=_image(0), input_boxes=[[[4.0, 4.0, 40.0, 40.0]]], return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs, multimask_output=False)
    masks = processor.image_processor.post_process_masks(
        outputs.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"]
    )
    assert masks[0].shape == (1, 1, 64, 64) and masks[0].dtype == torch.bool
