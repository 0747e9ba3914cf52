"""Profile sizes: parameters read from safetensors headers match the loaded models, and a profile whose weights are
neither local nor cached is reported as such without any download."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from imagerag.agent.cli import app
from imagerag.agent.config import Settings
from imagerag.tools.backends.loading import load_backends, profile_footprint


def test_tiny_footprint_counts_the_parameters_the_pipeline_loads(tiny_settings):
    size = profile_footprint(tiny_settings)
    pipe = load_backends(tiny_settings).generator.pipe  # type: ignore[attr-defined]  # the real DiffusersGenerator
    parts = {c.name: c.parameters for c in size.components}
    loaded = {
        name: sum(p.numel() for p in getattr(pipe, name).parameters())
        for name in ("unet", "vae", "text_encoder", "image_encoder")
    }
    assert parts["vae"] == loaded["vae"] and parts["text_encoder"] == loaded["text_encoder"]
    assert parts["image_encoder"] == loaded["image_encoder"]
    # The adapter's weights live inside the loaded UNet (its projection and attention layers).
    assert parts["unet"] + parts["ip_adapter"] == loaded["unet"]
    assert size.parameters == sum(loaded.values()) and size.weight_bytes == 4 * size.parameters  # tiny is float32


def test_a_hub_profile_without_cached_weights_is_reported_not_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    size = profile_footprint(Settings(profile="sdxl", data_dir=tmp_path))
    assert size.weights is None and size.components == [] and size.dtype == "float16"


def test_the_profiles_command_lists_every_profile(data_dir):
    result = CliRunner().invoke(app, ["profiles", "--data-dir", str(data_dir)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for name in ("sdxl", "omnigen", "sd15", "tiny", "tiny-sdxl", "tiny-omnigen", "mini"):
        assert f"│ {name} " in result.stdout
    assert "not here (downloaded on first use)" in result.stdout


def test_offload_on_a_cpu_is_a_clear_error(data_dir):
    with pytest.raises(Exception, match="offload 'model' moves components to a CUDA GPU"):
        load_backends(Settings(profile="tiny", data_dir=Path(data_dir), device="cpu", offload="model"))
