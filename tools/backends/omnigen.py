"""OmniGen: the `omnigen` generator family. References go in context (up to the profile's max_references), named
by numbered placeholders in the prompt (prompts/regenerate_omnigen.j2). OmniGen has no inpainting pipeline: an edit
redraws the whole image with the source in context as image 1, and says so (the pixels outside are not kept)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image

from imagerag.tools.backends.diffusion import DiffusersGenerator, StepCallback


class OmniGenGenerator(DiffusersGenerator):
    pipeline_class = "OmniGenPipeline"
    denoiser = "transformer"

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
        kwargs = self._arguments(prompt, seed, 1, [image.convert("RGB"), *references[: self.max_references]], on_step)
        with self._lock:
            return self.pipe(**kwargs).images[0], False

    def _reference_arguments(self, references: Sequence[Image.Image]) -> dict[str, Any]:
        return {"input_images": list(references) or None, "img_guidance_scale": self.spec.image_guidance_scale}
