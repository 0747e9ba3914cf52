"""Open-vocabulary object detection for real images: where each text's object is in a reference, with OWLv2.

The CLIP critic locates objects on the miniature world's 3x3 grid; real photographs need real boxes, so the real
profiles locate with OWLv2 (transformers' Owlv2ForObjectDetection) behind the same `locate(image, texts)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from imagerag.tools.backends.judges import CellCache
from imagerag.tools.types import Box

if TYPE_CHECKING:
    from transformers import Owlv2ForObjectDetection, Owlv2Processor

# The image side of OWLv2 base is 3600 patches x (768 features + 4 box corners) in float32, about 11 MB an image,
# so far fewer images are kept in memory than the CLIP judge's nine cell embeddings allow.
MEMORY_IMAGES = 16


class OwlDetector:
    """The highest-scoring OWLv2 box for each text query, in fractions of the image; None below `threshold`.

    Everything OWLv2 computes from the image alone (per-patch features from `image_embedder`, and each patch's box
    from `box_predictor`) is computed once per image and kept in `cache`, packed as one (patches, features + 4)
    array whose last four columns are the box corners, already in the original image's fractions. A query then
    costs only the text tower and `class_predictor`. The cache must be the detector's own (not the CLIP judge's:
    both key an image the same way), and its folder one per detector model.
    """

    def __init__(
        self,
        model: Owlv2ForObjectDetection,
        processor: Owlv2Processor,
        threshold: float = 0.1,
        device: str = "cpu",
        cache: CellCache | None = None,
    ):
        self.model, self.processor, self.threshold, self.device = model, processor, threshold, device
        self.cache = cache or CellCache(size=MEMORY_IMAGES)

    @classmethod
    def from_pretrained(
        cls, model_id: str, device: str = "cpu", threshold: float = 0.1, cache: CellCache | None = None
    ) -> OwlDetector:
        """`model_id` is a Hub id or a local folder holding the model and its processor (tiny.build_tiny_owlv2)."""
        from transformers import Owlv2ForObjectDetection, Owlv2Processor

        model = Owlv2ForObjectDetection.from_pretrained(model_id).to(device).eval()
        return cls(model, Owlv2Processor.from_pretrained(model_id), threshold, device, cache)

    @torch.inference_mode()
    def locate(self, image: Image.Image, texts: list[str]) -> list[Box | None]:
        if not texts:
            return []
        packed = self.cache.get(image, lambda: self._image_side(image))
        features = torch.from_numpy(packed[:, :-4]).to(self.device, self.model.dtype)
        corners = packed[:, -4:]
        # OWLv2's text queries are 16 tokens; a longer caption is cut, not fatal.
        tokens = self.processor(text=texts, return_tensors="pt", truncation=True).to(self.device)
        queries = self.model.owlv2.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        ).pooler_output
        logits, _ = self.model.class_predictor(features[None], queries[None])
        scores = torch.sigmoid(logits[0].float()).cpu().numpy()  # (patches, texts)
        # A box wholly in the square's padding shows nothing of the image: it cannot be an object's.
        inside = (corners[:, 0] < corners[:, 2]) & (corners[:, 1] < corners[:, 3])
        scores[~inside] = -1.0
        out: list[Box | None] = []
        for column in scores.T:
            best = int(column.argmax())
            x0, y0, x1, y1 = corners[best].tolist()
            out.append(Box(x0=x0, y0=y0, x1=x1, y1=y1) if column[best] >= self.threshold else None)
        return out

    def _image_side(self, image: Image.Image) -> np.ndarray:
        pixels = self.processor(images=image, return_tensors="pt")["pixel_values"].to(self.device, self.model.dtype)
        feature_map, _ = self.model.image_embedder(pixel_values=pixels)
        features = feature_map.reshape(1, -1, feature_map.shape[-1])
        boxes = self.model.box_predictor(features, feature_map)[0].float().cpu().numpy()
        corners = padded_to_image(boxes, image.size)
        return np.concatenate([features[0].float().cpu().numpy(), corners], axis=1)


def padded_to_image(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """OWLv2 boxes (centre x, centre y, width, height, in fractions of the square the processor pads the image to,
    on the right or at the bottom) as corners (x0, y0, x1, y1) in fractions of the image itself, clipped to it."""
    width, height = size
    side = max(width, height)
    centre, extent = boxes[:, :2], boxes[:, 2:]
    corners = np.concatenate([centre - extent / 2, centre + extent / 2], axis=1)
    return np.clip(corners * side / np.array([width, height, width, height]), 0.0, 1.0).astype(np.float32)
