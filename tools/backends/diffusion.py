"""Text-to-image generators. One pipeline per process serves generate, regenerate and edit.

IP-Adapter pipelines (SD 1.5, SDXL) take one reference for a whole image: without one the adapter scale is set to 0,
so the same weights in memory produce plain text-to-image. An edit may give each region its own reference: the
adapter then attends to every reference, each masked to its region (diffusers' IPAdapterMaskProcessor masks, passed
as `ip_adapter_masks` in `cross_attention_kwargs`). OmniGen takes up to three references in context.

Edits redraw the white part of a mask. SD and SDXL inpaint through a pipeline built once with `from_pipe`, which
shares every loaded component (no second copy of the weights) and, with a plain 4-channel UNet, blends the known
latents back at every step; the source is then pasted back outside the mask, so those pixels are exactly kept.
OmniGen has no inpainting pipeline: it redraws the whole image with the source in context, and says so.

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


REGION_REFERENCES = 4  # the most objects one edit gives a reference of its own (a 3x3 layout rarely has more)


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
        # With masks each adapter reference acts in its own region; OmniGen takes its references in context.
        self.max_region_references = (
            REGION_REFERENCES if spec.family != "omnigen" and spec.ip_adapter is not None else spec.max_references
        )
        self._lock = threading.Lock()  # one call at a time on this pipeline (see the module's note)
        self._inpaint: DiffusionPipeline | None = None

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
        kwargs = self._arguments(prompt, seed, n, references[: self.max_references], on_step)
        with self._lock:
            self._set_adapter_scale(self.pipe, references)
            images: list[Image.Image] = self.pipe(**kwargs).images
        return images

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
        image = image.convert("RGB")
        if self.spec.family == "omnigen":  # the source goes in context as image 1, the references after it
            kwargs = self._arguments(prompt, seed, 1, [image, *references[: self.max_references]], on_step)
            with self._lock:
                return self.pipe(**kwargs).images[0], False
        kwargs = self._arguments(prompt, seed, 1, references, on_step)
        kwargs.update(image=image, mask_image=mask, strength=1.0)
        if reference_masks and self.spec.ip_adapter is not None:
            kwargs.update(self._masked_references(references, reference_masks))
        with self._lock:
            inpaint = self._inpainting()
            self._set_adapter_scale(inpaint, references)
            drawn: Image.Image = inpaint(**kwargs).images[0]
        return Image.composite(drawn.resize(image.size), image, mask.convert("L")), True

    def _inpainting(self) -> DiffusionPipeline:
        """The inpainting pipeline over the loaded components, built on first use (call under the lock). The dtype
        is passed on: from_pipe would otherwise convert the shared modules to float32."""
        if self._inpaint is None:
            from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline

            cls = StableDiffusionXLInpaintPipeline if self.spec.family == "sdxl" else StableDiffusionInpaintPipeline
            self._inpaint = cls.from_pipe(self.pipe, dtype=self.pipe.dtype)
            self._inpaint.set_progress_bar_config(disable=True)
        return self._inpaint

    def _masked_references(self, references: Sequence[Image.Image], masks: Sequence[Image.Image]) -> dict[str, Any]:
        """Pipeline arguments for one adapter attending to several references, each only inside its mask."""
        from diffusers.image_processor import IPAdapterMaskProcessor

        if len(masks) != len(references):
            raise ValueError(f"{len(references)} references but {len(masks)} reference masks: give one mask each")
        n = min(len(references), self.max_region_references)
        height, width = self.spec.height or masks[0].height, self.spec.width or masks[0].width
        stacked = IPAdapterMaskProcessor().preprocess(list(masks[:n]), height=height, width=width)
        return {
            "ip_adapter_image": [list(references[:n])],  # one adapter, n images
            "cross_attention_kwargs": {"ip_adapter_masks": [stacked.reshape(1, n, *stacked.shape[2:])]},
        }

    def _set_adapter_scale(self, pipe: DiffusionPipeline, references: Sequence[Image.Image]) -> None:
        if self.spec.family != "omnigen" and self.spec.ip_adapter is not None:
            # Scale 0 turns the adapter off exactly, so text-only calls share the loaded weights. Set under the
            # lock: another thread's call must not change it between here and this call's last step.
            pipe.set_ip_adapter_scale(self.spec.ip_adapter.scale if references else 0.0)

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
                on_step(step + 1, spec.steps)
                return tensors

            kwargs["callback_on_step_end"] = callback
        if spec.family == "omnigen":
            kwargs.update(
                input_images=list(references) or None,
                img_guidance_scale=spec.image_guidance_scale,
            )
        else:
            kwargs["negative_prompt"] = spec.negative_prompt or None
            if spec.ip_adapter is not None:
                kwargs["ip_adapter_image"] = references[0] if references else Image.new("RGB", (224, 224))
        return kwargs
