"""Stable Diffusion 1.x with an IP-Adapter: the `sd` generator family.

The adapter takes one reference for a whole image: without one its scale is set to 0, so the same weights in memory
draw plain text-to-image. An edit may give each region its own reference: the adapter then attends to every
reference, each masked to its region (diffusers' IPAdapterMaskProcessor masks, passed as `ip_adapter_masks` in
`cross_attention_kwargs`).

Edits redraw the white part of a mask through an inpainting pipeline built once with `from_pipe`, which shares every
loaded component (no second copy of the weights) and, with a plain 4-channel UNet, blends the known latents back at
every step; the source is then pasted back outside the mask, so those pixels are exactly kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from PIL import Image

from imagerag.tools.backends.diffusion import DiffusersGenerator, StepCallback
from imagerag.tools.config import GeneratorSpec

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

REGION_REFERENCES = 4  # the most objects one edit gives a reference of its own (a 3x3 layout rarely has more)


class SDGenerator(DiffusersGenerator):
    pipeline_class = "StableDiffusionPipeline"
    inpaint_class = "StableDiffusionInpaintPipeline"

    def __init__(self, pipe: DiffusionPipeline, spec: GeneratorSpec, device: str):
        super().__init__(pipe, spec, device)
        if spec.ip_adapter is not None:  # with masks each reference acts in its own region
            self.max_region_references = REGION_REFERENCES
        self._inpaint: DiffusionPipeline | None = None

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
            import diffusers

            self._inpaint = getattr(diffusers, self.inpaint_class).from_pipe(self.pipe, dtype=self.pipe.dtype)
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
        if self.spec.ip_adapter is not None:
            # Scale 0 turns the adapter off exactly, so text-only calls share the loaded weights. Set under the
            # lock: another thread's call must not change it between here and this call's last step.
            pipe.set_ip_adapter_scale(self.spec.ip_adapter.scale if references else 0.0)

    def _reference_arguments(self, references: Sequence[Image.Image]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"negative_prompt": self.spec.negative_prompt or None}
        if self.spec.ip_adapter is not None:
            kwargs["ip_adapter_image"] = references[0] if references else Image.new("RGB", (224, 224))
        return kwargs
