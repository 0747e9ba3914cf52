"""Ground-truth oracle for the miniature world: a small CNN that reads, for each of the five
position slots, which shape is there (or none) and its colour. It is trained on the generator's
labels, independent of the agent's critic, and judges generated images per concept.

    oracle = Oracle.from_pretrained("evals/miniworld/models/oracle")
    verdicts = oracle.judge(image, scene)   # one ObjectVerdict per object
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from imagerag.tools.miniworld.world import COLOUR_NAMES, POSITION_NAMES, SHAPES, Scene

EMPTY = "empty"
SLOT_CLASSES: tuple[str, ...] = (EMPTY,) + SHAPES


class OracleNet(nn.Module):
    def __init__(
        self,
        width: int = 24,
        n_slots: int = len(POSITION_NAMES),
        n_shapes: int = len(SLOT_CLASSES),
        n_colours: int = len(COLOUR_NAMES),
    ):
        super().__init__()
        self.config = {"width": width, "n_slots": n_slots, "n_shapes": n_shapes, "n_colours": n_colours}
        w = width

        def block(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
            )

        self.features = nn.Sequential(  # 32x32 -> 4x4
            block(3, w), nn.MaxPool2d(2), block(w, 2 * w), nn.MaxPool2d(2), block(2 * w, 4 * w), nn.MaxPool2d(2)
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(4 * w * 16, 256),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(256, n_slots * (n_shapes + n_colours)),
        )
        self.n_slots, self.n_shapes, self.n_colours = n_slots, n_shapes, n_colours

    def forward(self, x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x01: (B, 3, 32, 32) in [0, 1] -> shape logits (B, slots, shapes), colour logits (B, slots, colours)."""
        h = self.head(self.features(x01 * 2 - 1)).view(-1, self.n_slots, self.n_shapes + self.n_colours)
        return h[..., : self.n_shapes], h[..., self.n_shapes :]


def scene_targets(scene: Scene) -> tuple[list[int], list[int]]:
    """Per slot: shape class (0 = empty) and colour class (-100 = ignore when empty)."""
    shapes = [0] * len(POSITION_NAMES)
    colours = [-100] * len(POSITION_NAMES)
    for o in scene.objects:
        k = POSITION_NAMES.index(o.position)
        shapes[k] = SLOT_CLASSES.index(o.shape)
        colours[k] = COLOUR_NAMES.index(o.colour)
    return shapes, colours


@dataclass(frozen=True)
class SlotReading:
    position: str
    shape: str
    colour: str | None


@dataclass(frozen=True)
class ObjectVerdict:
    """shape: the object's shape is somewhere in the image. position: the named slot holds that
    shape. colour: the object (at its slot if that slot is occupied, else wherever its shape is)
    has the named colour. occupied: something is in the named slot."""

    shape: bool
    colour: bool
    position: bool
    occupied: bool

    def as_dict(self) -> dict:
        return asdict(self)


def _to_tensor(images: Image.Image | Sequence[Image.Image] | np.ndarray) -> torch.Tensor:
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, np.ndarray):
        arr = images if images.ndim == 4 else images[None]
    else:
        arr = np.stack([np.asarray(im.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0


class Oracle:
    def __init__(self, net: OracleNet):
        self.net = net.eval()

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> Oracle:
        folder = Path(folder)
        cfg = json.loads((folder / "config.json").read_text())
        net = OracleNet(**cfg["model"])
        sd = {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}
        net.load_state_dict(sd)
        return cls(net)

    def save_pretrained(self, folder: str | Path, extra: dict | None = None) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in self.net.state_dict().items()}
        save_file(sd, str(folder / "model.safetensors"))
        cfg = {
            "model": self.net.config,
            "slots": list(POSITION_NAMES),
            "shape_classes": list(SLOT_CLASSES),
            "colours": list(COLOUR_NAMES),
        }
        if extra:
            cfg.update(extra)
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))

    @torch.no_grad()
    def read(self, images) -> list[list[SlotReading]]:
        x = _to_tensor(images)
        s_log, c_log = self.net(x)
        s_pred, c_pred = s_log.argmax(-1), c_log.argmax(-1)
        out = []
        for b in range(x.shape[0]):
            row = []
            for k, pos in enumerate(POSITION_NAMES):
                shape = SLOT_CLASSES[int(s_pred[b, k])]
                row.append(SlotReading(pos, shape, None if shape == EMPTY else COLOUR_NAMES[int(c_pred[b, k])]))
            out.append(row)
        return out

    def judge_reading(self, slots: list[SlotReading], scene: Scene) -> list[ObjectVerdict]:
        by_pos = {r.position: r for r in slots}
        verdicts = []
        for o in scene.objects:
            at = by_pos[o.position]
            with_shape = [r for r in slots if r.shape == o.shape]
            occupied = at.shape != EMPTY
            holder = at if occupied else (with_shape[0] if with_shape else None)
            verdicts.append(
                ObjectVerdict(
                    shape=bool(with_shape),
                    colour=bool(holder and holder.colour == o.colour),
                    position=at.shape == o.shape,
                    occupied=occupied,
                )
            )
        return verdicts

    def judge(self, image: Image.Image, scene: Scene) -> list[ObjectVerdict]:
        return self.judge_reading(self.read(image)[0], scene)

    def judge_many(self, images, scenes: Sequence[Scene], bs: int = 256) -> list[list[ObjectVerdict]]:
        out = []
        for i in range(0, len(scenes), bs):
            readings = self.read(images[i : i + bs])
            # Callers pass one image per scene, but nothing here checks it: keep zip's stop-at-the-shorter.
            out += [self.judge_reading(r, sc) for r, sc in zip(readings, scenes[i : i + bs], strict=False)]
        return out
