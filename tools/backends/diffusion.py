"""Text-to-image generators. One pipeline per process serves both generate and regenerate.

IP-Adapter pipelines (SD 1.5, SDXL) take at most one reference: without one the adapter scale is set to 0, so
the same weights in memory produce plain text-to-image. OmniGen takes up to three references in context.

A loaded pipeline is shared by every run in the process (a server serves several threads at once), but diffusers
pipelines are not thread-safe: the scheduler's timesteps and the IP-Adapter scale live on the pipeline. So each
`DiffusersGenerator` runs one call at a time, from setting the scale to the last denoising step.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
from PIL import Image

from imagerag.tools.config import ConfigError, GeneratorSpec, Offload

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

StepCallback = Callable[[int, int], None]  # (step, total)


class Generator(Protocol):
    max_references: int

    def generate(
        self,
        prompt: str,
        seed: int,
        n: int = 1,
        references: Sequence[Image.Image] = (),
        on_step: StepCallback | None = None,
    ) -> list[Image.Image]: ...


def pick_device(device: str) -> str:
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _dtype(spec_dtype: str, device: str) -> torch.dtype:
    # Half precision is slow or unsupported on CPU; keep float32 there whatever the profile says.
    return torch.float32 if device == "cpu" else getattr(torch, spec_dtype)


class DiffusersGenerator:
    def __init__(self, pipe: DiffusionPipeline, spec: GeneratorSpec, device: str):
        self.pipe, self.spec, self.device = pipe, spec, device
        self.max_references = spec.max_references
        self._lock = threading.Lock()  # one call at a time on this pipeline (see the module's note)

    @classmethod
    def from_pretrained(
        cls,
        spec: GeneratorSpec,
        model_path: str,
        ip_adapter_path: str | None,
        device: str = "auto",
        offload: Offload = "none",
        compile: bool = False,
    ) -> DiffusersGenerator:
        """Load the profile's pipeline (and IP-Adapter) once; `model_path` is a Hub id or a local folder. `offload`
        keeps components on the CPU until they run (a GPU only); `compile` wraps the denoiser in torch.compile."""
        from diffusers import OmniGenPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

        device = pick_device(device)
        if offload != "none" and not device.startswith("cuda"):
            raise ConfigError(
                f"offload {offload!r} moves components to a CUDA GPU as they run; on {device} use offload none"
            )
        pipeline_cls = {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline, "omnigen": OmniGenPipeline}[
            spec.family
        ]
        # `dtype` (diffusers 0.42 deprecates `torch_dtype`) applies to every component; load_ip_adapter then loads
        # the image encoder in the pipeline's dtype itself, so it takes none.
        pipe = pipeline_cls.from_pretrained(model_path, dtype=_dtype(spec.dtype, device))
        if spec.ip_adapter is not None:
            adapter = spec.ip_adapter
            pipe.load_ip_adapter(
                ip_adapter_path or adapter.repo,
                subfolder=adapter.subfolder,
                weight_name=adapter.weight_name,
                image_encoder_folder=adapter.image_encoder_folder,
            )
        if offload == "model":
            pipe.enable_model_cpu_offload(device=device)
        elif offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=device)
        else:
            pipe.to(device)
        if compile:  # the denoiser runs every step: the one component worth compiling
            denoiser = "transformer" if spec.family == "omnigen" else "unet"
            setattr(pipe, denoiser, torch.compile(getattr(pipe, denoiser)))
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, spec, device)

    def generate(
        self,
        prompt: str,
        seed: int,
        n: int = 1,
        references: Sequence[Image.Image] = (),
        on_step: StepCallback | None = None,
    ) -> list[Image.Image]:
        spec = self.spec
        kwargs: dict[str, Any] = {
            "prompt": prompt,
            "num_inference_steps": spec.steps,
            "guidance_scale": spec.guidance_scale,
            "height": spec.height,
            "width": spec.width,
            "num_images_per_prompt": n,
            # One generator per image: image i of a batch is exactly the image of seed + i drawn alone.
            "generator": [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)],
        }
        if on_step is not None:

            def callback(
                pipe: DiffusionPipeline, step: int, timestep: torch.Tensor, tensors: dict[str, torch.Tensor]
            ) -> dict[str, torch.Tensor]:
                on_step(step + 1, spec.steps)
                return tensors

            kwargs["callback_on_step_end"] = callback
        if spec.family == "omnigen":
            kwargs.update(
                input_images=list(references[: self.max_references]) or None,
                img_guidance_scale=spec.image_guidance_scale,
            )
        else:
            kwargs["negative_prompt"] = spec.negative_prompt or None
            if spec.ip_adapter is not None:
                kwargs["ip_adapter_image"] = references[0] if references else Image.new("RGB", (224, 224))
        with self._lock:
            if spec.family != "omnigen" and spec.ip_adapter is not None:
                # Scale 0 turns the adapter off exactly, so text-only calls share the loaded weights. Set under the
                # lock: another thread's call must not change it between here and this call's last step.
                self.pipe.set_ip_adapter_scale(spec.ip_adapter.scale if references else 0.0)
            images: list[Image.Image] = self.pipe(**kwargs).images
        return images
