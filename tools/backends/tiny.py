"""Tiny random models built offline and saved as real checkpoints.

The `tiny` profile loads these folders through the very same code as the real profiles
(`StableDiffusionPipeline.from_pretrained`, `load_ip_adapter`, open_clip's `local-dir:`), so tests and CI
exercise the real loading path without the Hub. The models draw noise; they are for plumbing, not pictures.
"""

from __future__ import annotations

import gzip
import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

SD_DIR, IP_ADAPTER_DIR, CLIP_DIR = "sd", "ip_adapter", "clip"
HIDDEN = 8  # text hidden size == UNet cross-attention dim == image-encoder projection
# The text encoder and the IP-Adapter's image encoder are the same tiny transformer.
TOWER = {"hidden_size": HIDDEN, "intermediate_size": 16, "num_attention_heads": 2, "num_hidden_layers": 1}


def clip_bpe_tokenizer() -> CLIPTokenizer:
    """transformers' CLIPTokenizer over the BPE file open_clip ships (no Hub).

    Same construction as CLIP's own vocabulary (bytes, bytes+'</w>', merges, two specials), so token ids match
    open_clip's tokenizer.
    """
    import open_clip.tokenizer as oct
    from transformers import CLIPTokenizer

    with gzip.open(oct.default_bpe()) as bpe:
        merges = bpe.read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_tokens = list(oct.bytes_to_unicode().values())
    vocab = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    # Through files, which transformers 4 requires; the tokenizer reads them once, here.
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab_file.write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77)


def build_tiny_models(root: Path, seed: int = 0) -> Path:
    """Build the tiny SD pipeline, IP-Adapter and open_clip model under `root` (atomically); return root."""
    if (root / "done").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".tiny-"))
    torch.manual_seed(seed)
    _build_sd(tmp / SD_DIR)
    _build_ip_adapter(tmp / SD_DIR, tmp / IP_ADAPTER_DIR)
    _build_clip(tmp / CLIP_DIR)
    (tmp / "done").write_text("ok")
    if root.exists():  # a crashed earlier build left a partial folder
        shutil.rmtree(root)
    tmp.rename(root)
    return root


def _build_sd(folder: Path) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=HIDDEN,
        attention_head_dim=2,
        norm_num_groups=2,
    )
    vae = AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=2,
        sample_size=32,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            **TOWER,
            vocab_size=49408,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_bpe_tokenizer(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)


def _build_ip_adapter(sd_folder: Path, folder: Path) -> None:
    """Random weights in the original IP-Adapter layout ({'image_proj', 'ip_adapter'}) that load_ip_adapter reads."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    unet = UNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet")
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(**TOWER, image_size=32, patch_size=8, projection_dim=HIDDEN)
    )
    encoder.save_pretrained(folder / "image_encoder")
    cross = unet.config.cross_attention_dim
    tokens = 4  # the plain IP-Adapter projects one image embedding to 4 context tokens
    state = {
        "image_proj.proj.weight": torch.randn(cross * tokens, HIDDEN) * 0.1,
        "image_proj.proj.bias": torch.zeros(cross * tokens),
        "image_proj.norm.weight": torch.ones(cross),
        "image_proj.norm.bias": torch.zeros(cross),
    }
    # load_ip_adapter numbers the cross-attention layers 1, 3, 5, ... in attn_processors order.
    cross_attn = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    for i, name in enumerate(cross_attn):
        hidden = unet.get_submodule(name.removesuffix(".processor")).to_q.in_features
        for proj in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{2 * i + 1}.{proj}.weight"] = torch.randn(hidden, cross) * 0.1
    save_file(state, folder / "ip_adapter.safetensors")


def _build_clip(folder: Path) -> None:
    import open_clip
    from safetensors.torch import save_file

    model_cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic"},
    }
    folder.mkdir(parents=True, exist_ok=True)
    model = open_clip.CLIP(**model_cfg)
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    save_file(model.state_dict(), folder / "open_clip_model.safetensors")
