"""Bad inputs, as an operator makes them: each is one line naming the input and the fix, exit status 2,
found before any work (no stage runs, no manifest is written, nothing is written outside the store).

One table, each case run through the ``comat`` command. The cases that would hang or eat the memory if
their check broke (a FIFO, ``/dev/zero``) run in a child process with a time and memory limit."""

import glob
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main

ROOT = Path(__file__).resolve().parents[1]
EVAL_PROMPTS = ROOT / "comat_core" / "data" / "t2i-compbench" / "color_val.txt"
SD15_PARTS = {"unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
              "text_encoder": ("transformers", "CLIPTextModel"), "tokenizer": ("transformers", "CLIPTokenizer"),
              "scheduler": ("diffusers", "DDPMScheduler")}


def pipeline_folder(root: Path, class_name="StableDiffusionPipeline", weights=True, parts=None) -> Path:
    """A diffusers pipeline folder as ``save_pretrained`` lays it out (weights are empty files: the checks
    before work read the JSON and list the files, they never load weights)."""
    parts = dict(SD15_PARTS, **(parts or {}))
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": class_name, **{k: list(v) for k, v in parts.items()}}))
    for part, (_, cls) in parts.items():
        (root / part).mkdir()
        (root / part / "config.json").write_text(json.dumps({"_class_name": cls}))
        if weights and part in ("unet", "vae", "text_encoder"):
            (root / part / ("model.safetensors" if part == "text_encoder" else "diffusion_pytorch_model.safetensors")
             ).write_bytes(b"")
    return root


def make_inputs(t: Path) -> None:
    (t / "eval_only.txt").write_text("".join(EVAL_PROMPTS.read_text().splitlines(keepends=True)[:5]))
    os.mkfifo(t / "fifo.txt")
    with open(t / "huge.txt", "wb") as f:  # sparse: over the size limit without writing 64 MiB
        f.truncate(64 * 2**20 + 1)
    (t / "binary.yaml").write_bytes(bytes(range(256)))
    (t / "conf.d").mkdir()
    broken = pipeline_folder(t / "broken")
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", ')
    pipeline_folder(t / "sdxl", class_name="StableDiffusionXLPipeline")
    pipeline_folder(t / "weightless", weights=False)
    custom = pipeline_folder(t / "custom", parts={"unet": ("my_unet", "MyUNet")})
    (custom / "unet" / "my_unet.py").write_text("from diffusers import UNet2DConditionModel as MyUNet\n")
    (t / "clip").mkdir()
    (t / "clip" / "config.json").write_text(json.dumps({"model_type": "clip"}))
    (t / "clip" / "model.safetensors").write_bytes(b"")


# (case, arguments after `comat run --storage <store>`, words the one line must hold, in a child process)
CASES = [
    ("s3 without bucket", ["--storage", "s3://"],
     ["storage.root", "'s3://' names no bucket", "s3://bucket/prefix"], False),
    ("only evaluation prompts", ["--prompts", "{t}/eval_only.txt"],
     ["eval_only.txt", "hold no training prompt", "all 5 unique prompt(s) are evaluation prompts", "--prompts"], False),
    ("prompt file /dev/zero", ["--prompts", "/dev/zero"],
     ["prompt file /dev/zero is a device, not a regular file", "give a file"], True),
    ("prompt file a FIFO", ["--prompts", "{t}/fifo.txt"],
     ["fifo.txt is a FIFO (named pipe), not a regular file", "give a file"], True),
    ("prompt file over the size limit", ["--prompts", "{t}/huge.txt"],
     ["huge.txt is larger than 64 MiB", "split a larger prompt set into several files"], False),
    ("model_index.json not JSON", ["--set", "models.pretrained={t}/broken"],
     ["models.pretrained", "model_index.json cannot be read as JSON", "re-download the model"], False),
    ("pipeline of the other family", ["--set", "models.pretrained={t}/sdxl"],
     ["models.pretrained", "holds a StableDiffusionXLPipeline, but it is loaded as a StableDiffusionPipeline",
      "set models.family"], False),
    ("pipeline without weights", ["--set", "models.pretrained={t}/weightless"],
     ["models.pretrained", "unet/ holds no .safetensors weights", "download them"], False),
    ("discriminator of the other family", ["--set", "models.discriminator={t}/sdxl"],
     ["models.discriminator", "holds a StableDiffusionXLPipeline", "use an SD1.5 pipeline folder"], False),
    ("pipeline with its own code", ["--set", "models.pretrained={t}/custom"],
     ["models.pretrained", "needs its own code (unet/my_unet.py), which comat never runs"], False),
    ("captioner of the wrong type", ["--set", "models.captioner={t}/clip"],
     ["models.captioner", "holds a clip model, but models.captioner needs a blip model"], False),
    ("learning rate inf", ["--set", "train.learning_rate=inf"],
     ["train.learning_rate: Input should be a finite number (got inf)"], False),
    ("learning rate nan", ["--set", "train.learning_rate=nan"],
     ["train.learning_rate: Input should be a finite number (got nan)"], False),
    ("resolution not a multiple of 8", ["--set", "train.resolution=68", "--set", "gan_gt.resolution=68"],
     ["gan_gt.resolution: Input should be a multiple of 8 (got 68)", "train.resolution"], False),
    ("binary config file", ["--config", "{t}/binary.yaml"],
     ["config file", "binary.yaml is not UTF-8 text (invalid byte at offset 128)", "give a YAML file"], False),
    ("config path a folder", ["--config", "{t}/conf.d"],
     ["config file", "conf.d is a folder; give a YAML file"], False),
    ("--stages blank", ["--stages", " , "],
     ["--stages ' , ' names no stage", "leave --stages out to run them all"], False),
    ("--stages empty variable", ["--stages", ""],
     ["--stages '' names no stage"], False),
]


def run_isolated(args: list[str], cwd: Path) -> tuple[int, str, str]:
    """``comat`` in a child process limited to 2 GiB of memory and 60 s: a broken check fails, not the machine."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30, 2 * 2**30))

    out = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=60, preexec_fn=limit, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return out.returncode, out.stdout, out.stderr


@pytest.mark.parametrize("args, words, isolated", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_before_any_work(capsys, tmp_path, monkeypatch, args, words, isolated):
    make_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)  # a relative store (such as "s3:") would appear here
    argv = ["run", "--storage", str(tmp_path / "store"), *[a.format(t=tmp_path) for a in args]]
    if isolated:
        rc, out, err = run_isolated(argv, tmp_path)
    else:
        rc = main(argv)
        out, err = capsys.readouterr()
    assert rc == 2, err
    assert out == "" and err.startswith("comat: error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, f"{word!r} not in {err!r}"
    assert not glob.glob(f"{tmp_path}/**/_manifest.json", recursive=True)
    assert not (tmp_path / "s3:").exists()


def test_the_model_folder_checks_pass_a_complete_folder(tmp_path):
    """The control of the table's model cases: the same folders, complete, pass."""
    from comat_core.config import load_config
    from comat_core.preflight import check_model_paths

    pipeline_folder(tmp_path / "sd15")
    (tmp_path / "blip").mkdir()
    (tmp_path / "blip" / "config.json").write_text(json.dumps({"model_type": "blip"}))
    (tmp_path / "blip" / "model.safetensors").write_bytes(b"")
    check_model_paths(load_config("tiny", overrides=[f"models.pretrained={tmp_path}/sd15",
                                                     f"models.discriminator={tmp_path}/sd15",
                                                     f"models.captioner={tmp_path}/blip"]))


def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path):
    """A file saved with a UTF-8 BOM gives the same prompts and prompt ids as the file without it."""
    from comat_core.config import PromptsConfig
    from comat_core.stages.prompts import collect_prompts, prompt_id

    text = "a red cube and a blue sphere\na green bench\n"
    (tmp_path / "plain.txt").write_text(text, encoding="utf-8")
    (tmp_path / "bom.txt").write_text(text, encoding="utf-8-sig")
    assert (tmp_path / "bom.txt").read_bytes().startswith(b"\xef\xbb\xbf")
    got = {name: collect_prompts(PromptsConfig(sources=[str(tmp_path / name)]))[0] for name in ("plain.txt", "bom.txt")}
    assert [p.text for p in got["bom.txt"]] == [p.text for p in got["plain.txt"]] == text.splitlines()
    assert prompt_id(got["bom.txt"][0].text) == prompt_id("a red cube and a blue sphere")
