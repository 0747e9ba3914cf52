"""open_clip embeddings for retrieval and for the CLIP judge, loaded once per process."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel

from imagerag.tools.files import file_id

LOCAL_DIR = "local-dir:"

Preprocess = Callable[[Image.Image], torch.Tensor]
"""open_clip's image transform: one PIL image to one (3, H, W) tensor."""
Tokenizer = Callable[[list[str]], torch.Tensor]
"""open_clip's tokenizer: texts to a (N, context length) tensor of token ids."""


class ClipModel(Protocol):
    """What the embedder uses of an open_clip model (CLIP, CustomTextCLIP). open_clip ships no type information,
    and typed as a torch.nn.Module its methods would read as Module attributes (Tensor | Module)."""

    def encode_image(self, image: torch.Tensor, /) -> torch.Tensor: ...

    def encode_text(self, text: torch.Tensor, /) -> torch.Tensor: ...


class EmbeddingModelInfo(BaseModel):
    """Identifies the embedding space; a collection records it so a mismatched model is refused."""

    name: str
    pretrained: str
    dim: int


class ClipEmbedder:
    def __init__(
        self, model: ClipModel, preprocess: Preprocess, tokenizer: Tokenizer, info: EmbeddingModelInfo, device: str
    ):
        self.model, self.preprocess, self.tokenizer, self.info, self.device = model, preprocess, tokenizer, info, device

    @classmethod
    def from_pretrained(cls, model: str, pretrained: str | None = None, device: str = "cpu") -> ClipEmbedder:
        """`model` is an open_clip architecture ('ViT-B-32' with pretrained='openai') or 'local-dir:/folder'."""
        import open_clip

        clip, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained, device=device)
        clip.eval()
        dim = int(clip.text_projection.shape[1]) if hasattr(clip, "text_projection") else int(clip.embed_dim)
        if model.startswith(LOCAL_DIR):
            # A folder's path is not an identity (it moves); its weights are.
            folder = Path(model.removeprefix(LOCAL_DIR))
            weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
            digest = file_id(weights[0]) if weights else "unknown"
            info = EmbeddingModelInfo(name=LOCAL_DIR.rstrip(":"), pretrained=f"sha256:{digest}", dim=dim)
        else:
            info = EmbeddingModelInfo(name=model, pretrained=pretrained or "", dim=dim)
        return cls(clip, preprocess, open_clip.get_tokenizer(model), info, device)

    @torch.inference_mode()
    def embed_images(self, images: list[Image.Image] | torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """L2-normalised image embeddings; accepts PIL images or an already preprocessed batch tensor."""
        if isinstance(images, torch.Tensor):
            return self._normalise(self.model.encode_image(images.to(self.device)))
        chunks = []
        for start in range(0, len(images), batch_size):
            batch = torch.stack([self.preprocess(im.convert("RGB")) for im in images[start : start + batch_size]])
            chunks.append(self._normalise(self.model.encode_image(batch.to(self.device))))
        return np.concatenate(chunks) if chunks else np.zeros((0, self.info.dim), np.float32)

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """L2-normalised text embeddings. open_clip's tokenizer truncates past the context length (77 tokens)."""
        return self._normalise(self.model.encode_text(self.tokenizer(texts).to(self.device)))

    @staticmethod
    def _normalise(x: torch.Tensor) -> np.ndarray:
        return torch.nn.functional.normalize(x.float(), dim=-1).cpu().numpy()
