"""Tiny random models built offline and saved as real checkpoints, in the real repositories' file layouts.

The tiny profiles load these folders through the very same code as the real profiles (`from_pretrained` of
StableDiffusionPipeline, StableDiffusionXLPipeline and OmniGenPipeline, `load_ip_adapter`, open_clip's
`local-dir:`), so tests and CI exercise the real loading path without the Hub. The models draw noise; they are
for plumbing, not pictures. Each folder mirrors a real repository:

- `sd/`: stable-diffusion-v1-5/stable-diffusion-v1-5 (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
  scheduler/, feature_extractor/; no safety_checker/);
- `sdxl/`: stabilityai/stable-diffusion-xl-base-1.0 (model_index.json, unet/, vae/ with force_upcast,
  text_encoder/ (CLIPTextModel), text_encoder_2/ (CLIPTextModelWithProjection), tokenizer/, tokenizer_2/,
  scheduler/);
- `omnigen/`: Shitao/OmniGen-v1-diffusers (model_index.json, transformer/, vae/, scheduler/, tokenizer/);
- `ip_adapter/`: h94/IP-Adapter (models/image_encoder/, models/ip-adapter_sd15.safetensors,
  sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors), weights in float16 as published;
- `clip/`: an open_clip `local-dir:` folder (open_clip_config.json, open_clip_model.safetensors).

`build_tiny_owlv2` builds, on its own, a tiny google/owlv2-base-patch16-ensemble (Owlv2ForObjectDetection and its
Owlv2Processor) for the detector that locates objects in real images.
"""

from __future__ import annotations

import gzip
import json
import shutil
import string
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTokenizer, LlamaTokenizer

SD_DIR, SDXL_DIR, OMNIGEN_DIR, IP_ADAPTER_DIR, CLIP_DIR = "sd", "sdxl", "omnigen", "ip_adapter", "clip"
# h94/IP-Adapter: one ViT-H image encoder serves the SD 1.5 adapter and the SDXL Plus (vit-h) adapter.
IMAGE_ENCODER = "models/image_encoder"
SD15_ADAPTER = "models/ip-adapter_sd15.safetensors"
SDXL_PLUS_ADAPTER = "sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors"
# Written to `done` when a build finishes; a folder built to another layout is built again.
LAYOUT = "2: sd, sdxl, omnigen, h94 ip_adapter, clip"
HIDDEN = 8  # SD text hidden size == UNet cross-attention dim == image-encoder hidden size and projection
# The text encoder and the IP-Adapter's image encoder are the same tiny transformer.
TOWER = {"hidden_size": HIDDEN, "intermediate_size": 16, "num_attention_heads": 2, "num_hidden_layers": 1}
# SDXL's second text encoder is wider than its first (1280 vs 768 in the real one), so swapping them fails on shapes.
SDXL_HIDDEN_2 = 16
SDXL_TIME_EMBED = 8  # addition_time_embed_dim (256 in the real UNet)
# IP-Adapter Plus's resampler: 16 queries like the real one, width 8 (real: 1280). Its depth and head size are the
# real ones because diffusers' loader assumes them: it builds 4 blocks and counts heads as to_q rows // 64.
PLUS_QUERIES, PLUS_WIDTH, PLUS_DEPTH, PLUS_HEAD_DIM = 16, 8, 4, 64


def clip_bpe_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """transformers' CLIPTokenizer over the BPE file open_clip ships (no Hub).

    Same construction as CLIP's own vocabulary (bytes, bytes+'</w>', merges, two specials), so token ids match
    open_clip's tokenizer. SDXL's second tokenizer pads with "!" (id 0), its first with the end token.
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
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77, pad_token=pad_token)


def build_tiny_models(root: Path, seed: int = 0) -> Path:
    """Build every tiny checkpoint under `root` (atomically; a few seconds, about 24 MB); return root."""
    done = root / "done"
    if done.exists() and done.read_text() == LAYOUT:
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".tiny-"))
    # SD 1.5, its adapter and CLIP first, drawn from one seed in layout 1's order: the CLIP weights, which name the
    # 'tiny' collection they indexed, stay the same when an older data folder is rebuilt to this layout.
    torch.manual_seed(seed)
    _build_sd(tmp / SD_DIR)
    _build_ip_adapter(tmp / SD_DIR, tmp / IP_ADAPTER_DIR)
    _build_clip(tmp / CLIP_DIR)
    torch.manual_seed(seed + 1)
    _build_sdxl(tmp / SDXL_DIR)
    _build_ip_adapter_plus(tmp / SDXL_DIR, tmp / IP_ADAPTER_DIR / SDXL_PLUS_ADAPTER)
    torch.manual_seed(seed + 2)
    _build_omnigen(tmp / OMNIGEN_DIR)
    (tmp / "done").write_text(LAYOUT)
    if root.exists():  # a crashed earlier build, or an older layout
        shutil.rmtree(root)
    tmp.rename(root)
    return root


def _build_sd(folder: Path) -> None:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
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
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_bpe_tokenizer(),
        scheduler=PNDMScheduler(**_SD_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False),  # SD 1.5's
        safety_checker=None,
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)


# The noise schedule in the scheduler_config.json of both SD 1.5 and SDXL base.
_SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}


def _build_ip_adapter(sd_folder: Path, folder: Path) -> None:
    """The shared image encoder and the SD 1.5 adapter, in the original layout ({'image_proj', 'ip_adapter'})."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    unet = UNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet")
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(**TOWER, image_size=32, patch_size=8, projection_dim=HIDDEN)
    )
    cross = unet.config.cross_attention_dim
    tokens = 4  # the plain IP-Adapter projects one image embedding to 4 context tokens
    state = {
        "image_proj.proj.weight": torch.randn(cross * tokens, HIDDEN) * 0.1,
        "image_proj.proj.bias": torch.zeros(cross * tokens),
        "image_proj.norm.weight": torch.ones(cross),
        "image_proj.norm.bias": torch.zeros(cross),
    }
    state |= _ip_attention_weights(unet)
    encoder.half().save_pretrained(folder / IMAGE_ENCODER)
    _save_half(state, folder / SD15_ADAPTER)


def _ip_attention_weights(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """Keys and values projections of the image tokens for every cross-attention layer, numbered as
    load_ip_adapter reads them: 1, 3, 5, ... in attn_processors order (each attn2 follows its attn1)."""
    cross = unet.config.cross_attention_dim
    state = {}
    cross_attn = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    for i, name in enumerate(cross_attn):
        hidden = unet.get_submodule(name.removesuffix(".processor")).to_q.in_features
        for proj in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{2 * i + 1}.{proj}.weight"] = torch.randn(hidden, cross) * 0.1
    return state


def _save_half(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in state.items()}, path)


def _build_sdxl(folder: Path) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    text = {"vocab_size": 49408, "max_position_embeddings": 77, "bos_token_id": 49406, "eos_token_id": 49407}
    text_encoder = CLIPTextModel(CLIPTextConfig(**TOWER, **text, pad_token_id=49407))
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(
            **(TOWER | {"hidden_size": SDXL_HIDDEN_2, "intermediate_size": 32}),
            **text,
            pad_token_id=0,
            projection_dim=SDXL_HIDDEN_2,
        )
    )
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=8,  # 64 px through the 8x VAE, as 128 latents make SDXL's 1024 px
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        # SDXL's micro-conditioning: the pooled text embedding plus six size/crop numbers, each embedded.
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED + SDXL_HIDDEN_2,
        cross_attention_dim=HIDDEN + SDXL_HIDDEN_2,  # both encoders' hidden states, concatenated
        norm_num_groups=2,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae_8x(sample_size=64),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_bpe_tokenizer(),
        tokenizer_2=clip_bpe_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**_SD_SCHEDULE, timestep_spacing="leading"),  # SDXL base's
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(folder)


def _vae_8x(sample_size: int) -> AutoencoderKL:
    """An AutoencoderKL with the real 8x downsampling (four blocks) and the SDXL VAE's config: its scaling factor
    and force_upcast, which makes pipelines decode in float32 because the real one overflows in float16."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[4, 4, 4, 4],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        norm_num_groups=2,
        sample_size=sample_size,
        scaling_factor=0.13025,
        force_upcast=True,
    )


def _build_ip_adapter_plus(sdxl_folder: Path, path: Path) -> None:
    """IP-Adapter Plus for SDXL in the original key layout: a perceiver resampler ('image_proj.latents', 'proj_in',
    'proj_out', 'norm_out', 'layers.{i}.0' attention, 'layers.{i}.1' feed-forward) over the image encoder's
    penultimate hidden states, plus one key/value projection pair per cross-attention layer."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(sdxl_folder, subfolder="unet")
    cross, width, inner = unet.config.cross_attention_dim, PLUS_WIDTH, PLUS_HEAD_DIM  # one head

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape) * 0.1

    proj: dict[str, torch.Tensor] = {
        "latents": torch.randn(1, PLUS_QUERIES, width) / width**0.5,
        "proj_in.weight": rand(width, HIDDEN),  # from the image encoder's hidden size
        "proj_in.bias": torch.zeros(width),
        "proj_out.weight": rand(cross, width),
        "proj_out.bias": torch.zeros(cross),
        "norm_out.weight": torch.ones(cross),
        "norm_out.bias": torch.zeros(cross),
    }
    for i in range(PLUS_DEPTH):
        proj |= {
            f"layers.{i}.0.norm1.weight": torch.ones(width),
            f"layers.{i}.0.norm1.bias": torch.zeros(width),
            f"layers.{i}.0.norm2.weight": torch.ones(width),
            f"layers.{i}.0.norm2.bias": torch.zeros(width),
            f"layers.{i}.0.to_q.weight": rand(inner, width),
            f"layers.{i}.0.to_kv.weight": rand(2 * inner, width),
            f"layers.{i}.0.to_out.weight": rand(width, inner),
            f"layers.{i}.1.0.weight": torch.ones(width),
            f"layers.{i}.1.0.bias": torch.zeros(width),
            f"layers.{i}.1.1.weight": rand(4 * width, width),
            f"layers.{i}.1.3.weight": rand(width, 4 * width),
        }
    _save_half({f"image_proj.{k}": v for k, v in proj.items()} | _ip_attention_weights(unet), path)


def _build_omnigen(folder: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, OmniGenPipeline, OmniGenTransformer2DModel

    tokenizer = _phi3_like_tokenizer()
    heads = 4
    transformer = OmniGenTransformer2DModel(
        in_channels=4,
        patch_size=2,
        hidden_size=16,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=32,
        num_layers=1,
        pad_token_id=tokenizer.pad_token_id,
        vocab_size=len(tokenizer),
        # Phi-3's "su" rotary scaling has one factor per pair of head dimensions.
        rope_scaling={"short_factor": [1.0] * (16 // heads // 2), "long_factor": [1.0] * (16 // heads // 2)},
        # 64 patches of 16 px cover the 1024 px the pipeline resizes input images to at most.
        pos_embed_max_size=64,
        time_step_dim=16,
    )
    pipe = OmniGenPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae_8x(sample_size=32),  # OmniGen decodes with SDXL's VAE
        tokenizer=tokenizer,
    )
    pipe.save_pretrained(folder)


def _phi3_like_tokenizer() -> LlamaTokenizer:
    """A LlamaTokenizer like OmniGen's (Phi-3's): byte-fallback BPE with <unk>=0, <s>=1, </s>=2 and the chat
    markers the pipeline's instruction template uses, over a tiny vocabulary (ASCII characters, no merges).

    It never sees `<|image_N|>`: the pipeline's processor cuts the prompt at those placeholders, tokenizes the
    pieces, drops the <s> (id 1) that starts each later piece and puts the image's latent tokens in between.
    """
    from transformers import LlamaTokenizer

    vocab = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁"]
    vocab += list(string.ascii_letters + string.digits + string.punctuation)
    tokenizer = LlamaTokenizer(
        vocab={t: i for i, t in enumerate(vocab)},
        merges=[],
        add_bos_token=True,  # Phi-3's setting, which the processor's piece-joining relies on
        model_max_length=131072,
        pad_token="<|endoftext|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|assistant|>", "<|end|>", "<|user|>"]})
    return tokenizer


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


def build_tiny_owlv2(folder: Path, seed: int = 0) -> Path:
    """A tiny OWLv2 in google/owlv2-base-patch16-ensemble's layout (config.json, model.safetensors, the processor
    and its tokenizer), built under `folder` unless already there (atomically; about a second); return folder.

    Kept out of build_tiny_models, which every test session pays for: only the detector's tests use it.
    Like the real one (transformers' OWLv2 conversion script): a CLIP BPE tokenizer that pads with "!" to 16
    tokens, text width == projection width (class logits compare them), and an image processor that pads to a
    square before it resizes (here to 32 px, 4x4 patches of 8; real: 960 px, 60x60 patches of 16).
    """
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    if folder.exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".owlv2-"))
    torch.manual_seed(seed)
    config = Owlv2Config(
        text_config=TOWER | {"max_position_embeddings": 16},
        vision_config=TOWER | {"image_size": 32, "patch_size": 8},
        projection_dim=HIDDEN,
    )
    tokenizer = clip_bpe_tokenizer(pad_token="!")
    tokenizer.model_max_length = 16
    processor = Owlv2Processor(
        image_processor=Owlv2ImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
    )
    Owlv2ForObjectDetection(config).save_pretrained(tmp)
    processor.save_pretrained(tmp)
    try:
        tmp.rename(folder)  # whole or absent: a folder that exists is complete
    except OSError:
        shutil.rmtree(tmp)
        if not folder.exists():
            raise
        # else another process built it first
    return folder
