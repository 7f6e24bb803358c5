"""Runtime resolution (device, precision) and the one VAE loader every stage uses."""

from pathlib import Path

import pytest
import torch

from comat_core.config import load_config
from comat_core.errors import ConfigError
from comat_core.models.loader import load_sd_pipeline, load_vae, resolve_model
from comat_core.runtime import mixed_precision, resolve_device, weight_dtype


def test_cpu_is_fp32_whatever_the_request():
    cpu = torch.device("cpu")
    for mp in ("auto", "no", "bf16", "fp16"):
        cfg = load_config("tiny", overrides=[f"runtime.mixed_precision={mp}", "runtime.device=cpu"])
        assert resolve_device(cfg) == cpu
        assert mixed_precision(cfg, cpu) == "no" and weight_dtype(cfg, cpu) == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_without_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match="cuda"):
        resolve_device(load_config("tiny", overrides=["runtime.device=cuda"]))


def test_vae_from_pipeline_folder_equals_vae_folder_and_overrides_the_pipeline():
    root = Path(resolve_model("tiny://sd15"))
    from_pipeline = load_vae(str(root))
    from_folder = load_vae(str(root / "vae"))
    a, b = from_pipeline.state_dict(), from_folder.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(p.requires_grad for p in from_pipeline.parameters())
    pipe = load_sd_pipeline("tiny://sd15", "sd15", torch.float32, "cpu", vae=str(root / "vae"))
    c = pipe.vae.state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)
