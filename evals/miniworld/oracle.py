"""Ground-truth oracle for the miniature world: a small CNN that reads, for each of the 3x3 cells, whether an object
is there and its shape, colour and size. It is trained on the world's own labels, never on anything the agent sees,
so that it can judge generated images independently of the agent's critic.

    oracle = Oracle.from_pretrained(ORACLE_DIR)
    readings = oracle.read(images)              # one list of Detected per image
    judgement = judge(spec, readings[0])        # grammar.judge: the prompt's concepts on that reading
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from imagerag.evals.miniworld.grammar import Detected
from imagerag.tools.miniworld.world import CELLS, COLOUR_NAMES, IMAGE_SIZE, SHAPES, SIZE_NAMES, Scene

EMPTY = "empty"
SHAPE_CLASSES: tuple[str, ...] = (EMPTY, *SHAPES)
IGNORE = -100  # colour and size targets of empty cells

Images = Image.Image | Sequence[Image.Image] | np.ndarray


class OracleNet(nn.Module):
    """Four conv stages, each halving the resolution: 48 -> 3, so each output position is exactly one 16-px cell,
    and 1x1 heads shared by all cells (the same object reads the same wherever it is). The input is inverted (ink =
    1 - pixel) so that zero padding looks like the white background and border cells read like the others."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.config = {"width": width}
        w = width

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)
            )

        self.features = nn.Sequential(stage(3, w), stage(w, 2 * w), stage(2 * w, 4 * w), stage(4 * w, 4 * w))
        self.head = nn.Sequential(
            nn.Conv2d(4 * w, 8 * w, 1),
            nn.ReLU(),
            nn.Conv2d(8 * w, len(SHAPE_CLASSES) + len(COLOUR_NAMES) + len(SIZE_NAMES), 1),
        )

    def forward(self, x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x01: (B, 3, 48, 48) in [0, 1] -> logits per cell (row by row): shape (B, 9, 13), colour (B, 9, 6),
        size (B, 9, 2)."""
        h = self.head(self.features(1.0 - x01)).flatten(2).transpose(1, 2)  # (B, 9, classes)
        n_shape, n_colour = len(SHAPE_CLASSES), len(COLOUR_NAMES)
        return h[..., :n_shape], h[..., n_shape : n_shape + n_colour], h[..., n_shape + n_colour :]


def scene_targets(scene: Scene) -> tuple[list[int], list[int], list[int]]:
    """Per cell, row by row: shape class (0 = empty), colour and size classes (IGNORE where empty)."""
    shapes, colours, sizes = [0] * len(CELLS), [IGNORE] * len(CELLS), [IGNORE] * len(CELLS)
    for o in scene.objects:
        k = CELLS.index(o.cell)
        shapes[k], colours[k], sizes[k] = (
            SHAPE_CLASSES.index(o.shape),
            COLOUR_NAMES.index(o.colour),
            SIZE_NAMES.index(o.size),
        )
    return shapes, colours, sizes


def _rgb48(image: Image.Image) -> np.ndarray:
    image = image.convert("RGB")
    size = (IMAGE_SIZE, IMAGE_SIZE)
    return np.asarray(image if image.size == size else image.resize(size, Image.Resampling.BILINEAR))


def to_tensor(images: Images) -> torch.Tensor:
    """PIL image(s) (resized to 48x48 if needed) or uint8 array (N, 48, 48, 3) -> float (N, 3, 48, 48) in [0, 1]."""
    if isinstance(images, np.ndarray):
        arr = images if images.ndim == 4 else images[None]
    else:
        ims = [images] if isinstance(images, Image.Image) else images
        arr = np.stack([_rgb48(im) for im in ims]) if len(ims) else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    return torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(0, 3, 1, 2).float() / 255.0


class Oracle:
    """Reads images into the objects they hold; evaluation-only ground truth."""

    def __init__(self, net: OracleNet) -> None:
        self.net = net.eval()

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> Oracle:
        folder = Path(folder)
        cfg = json.loads((folder / "config.json").read_text())
        net = OracleNet(**cfg["model"])
        net.load_state_dict(
            {
                k: v.float() if v.is_floating_point() else v
                for k, v in load_file(str(folder / "model.safetensors")).items()
            }
        )
        return cls(net)

    def save(self, folder: str | Path, extra: dict[str, Any] | None = None) -> None:
        """float16 safetensors and a config.json naming the classes (plus `extra`, e.g. held-out accuracy)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in self.net.state_dict().items()}
        save_file(sd, str(folder / "model.safetensors"))
        cfg = {
            "model": self.net.config,
            "cells": list(CELLS),
            "shape_classes": list(SHAPE_CLASSES),
            "colours": list(COLOUR_NAMES),
            "sizes": list(SIZE_NAMES),
            **(extra or {}),
        }
        (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    @torch.no_grad()
    def read(self, images: Images, batch: int = 256) -> list[list[Detected]]:
        """One list per image of the objects read in its non-empty cells, row by row."""
        x = to_tensor(images)
        out: list[list[Detected]] = []
        for i in range(0, len(x), batch):
            s_log, c_log, z_log = self.net(x[i : i + batch])
            s, c, z = s_log.argmax(-1).tolist(), c_log.argmax(-1).tolist(), z_log.argmax(-1).tolist()
            out += [
                [
                    Detected(SHAPE_CLASSES[s[b][k]], COLOUR_NAMES[c[b][k]], SIZE_NAMES[z[b][k]], cell)
                    for k, cell in enumerate(CELLS)
                    if s[b][k] != 0
                ]
                for b in range(len(s))
            ]
        return out
