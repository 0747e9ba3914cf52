"""Text-to-image generators: the Generator contract, and the base of the diffusers families (one module each: sd,
sdxl, omnigen; registered in the `imagerag.generators` entry-point group, tools.registry). One pipeline per process
serves generate, regenerate and edit.

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

from imagerag.tools.config import GeneratorSpec, Offload
from imagerag.tools.errors import ConfigError

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

StepCallback = Callable[[int, int], None]  # (step, total)


class Generator(Protocol):
    max_references: int
    max_region_references: int  # references one edit takes when each acts only in its own region

    def generate(
        self,
        prompt: str,
        seed: int,
        n: int = 1,
        references: Sequence[Image.Image] = (),
        on_step: StepCallback | None = None,
    ) -> list[Image.Image]: ...

    def edit(
        self,
        image: Image.Image,
        mask: Image.Image,
        prompt: str,
        seed: int,
        references: Sequence[Image.Image] = (),
        reference_masks: Sequence[Image.Image] = (),
        on_step: StepCallback | None = None,
    ) -> tuple[Image.Image, bool]:
        """`image` redrawn where `mask` (mode L) is white; and whether every pixel where it is black was kept.
        `reference_masks`, one per reference: where each acts (mode L); empty: the references act over the mask."""
        ...


class GeneratorFamily(Protocol):
    """What the `imagerag.generators` registry holds: a class that loads a profile's generator."""

    @classmethod
    def from_pretrained(
        cls,
        spec: GeneratorSpec,
        model_path: str,
        ip_adapter_path: str | None,
        device: str = "auto",
        offload: Offload = "none",
        compile: bool = False,
    ) -> Generator: ...


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
    """A diffusers pipeline behind the Generator contract. A family subclass names its pipeline class, says how
    references reach it (`_reference_arguments`, `_set_adapter_scale`) and how it edits (`edit`)."""

    pipeline_class = "DiffusionPipeline"  # the diffusers class from_pretrained loads, by name
    denoiser = "unet"  # the component torch.compile wraps: it runs every step

    def __init__(self, pipe: DiffusionPipeline, spec: GeneratorSpec, device: str):
        self.pipe, self.spec, self.device = pipe, spec, device
        self.max_references = spec.max_references
        self.max_region_references = spec.max_references
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
        import diffusers

        device = pick_device(device)
        if offload != "none" and not device.startswith("cuda"):
            raise ConfigError(
                f"offload {offload!r} moves components to a CUDA GPU as they run; on {device} use offload none"
            )
        # `dtype` (diffusers 0.42 deprecates `torch_dtype`) applies to every component; load_ip_adapter then loads
        # the image encoder in the pipeline's dtype itself, so it takes none.
        pipe = getattr(diffusers, cls.pipeline_class).from_pretrained(model_path, dtype=_dtype(spec.dtype, device))
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
        if compile:
            setattr(pipe, cls.denoiser, torch.compile(getattr(pipe, cls.denoiser)))
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
        kwargs = self._arguments(prompt, seed, n, references[: self.max_references], on_step)
        with self._lock:
            self._set_adapter_scale(self.pipe, references)
            images: list[Image.Image] = self.pipe(**kwargs).images
        return images

    def _set_adapter_scale(self, pipe: DiffusionPipeline, references: Sequence[Image.Image]) -> None:
        """Switch reference conditioning on or off for one call (under the lock); a no-op for in-context families."""

    def _reference_arguments(self, references: Sequence[Image.Image]) -> dict[str, Any]:
        """Pipeline arguments that hand `references` to the model."""
        return {}

    def _arguments(
        self,
        prompt: str,
        seed: int,
        n: int,
        references: Sequence[Image.Image],
        on_step: StepCallback | None,
    ) -> dict[str, Any]:
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
                # The scheduler's own count: some (PNDM) run one step more than asked.
                on_step(step + 1, getattr(pipe, "num_timesteps", None) or spec.steps)
                return tensors

            kwargs["callback_on_step_end"] = callback
        return kwargs | self._reference_arguments(references)
