"""Stable Diffusion XL with an IP-Adapter (Plus): the `sdxl` generator family. It takes references and edits the
way the `sd` family does (tools.backends.sd), through the SDXL pipelines."""

from __future__ import annotations

from imagerag.tools.backends.sd import SDGenerator


class SDXLGenerator(SDGenerator):
    pipeline_class = "StableDiffusionXLPipeline"
    inpaint_class = "StableDiffusionXLInpaintPipeline"
