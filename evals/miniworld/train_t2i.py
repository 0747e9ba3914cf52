"""Train the miniature text-to-image model (a real diffusers StableDiffusionPipeline) and its
IP-Adapter.

The text pathway never sees the words heart / crescent / star, nor a rare-shape image without a
reference: rare objects appear only in reference-conditioned steps, with their shape word replaced
by a random filler word. The reference is a different rendering of the same shape (other colour,
position, size), so the model learns to take the shape from the reference and colour and position
from the text.

Both are written to tools/miniworld/models, the runtime's model folder. Load with:
    pipe = StableDiffusionPipeline.from_pretrained(".../tools/miniworld/models/t2i", torch_dtype=torch.float32)
    pipe.load_ip_adapter(".../tools/miniworld/models/ip_adapter", subfolder="", weight_name="ip_adapter.safetensors",
                         image_encoder_folder="image_encoder")
    pipe.set_ip_adapter_scale(1.0)
"""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from imagerag.evals.miniworld.common import SEED_T2I, Pool, TokenCache, augment, fit, normalize_clip, seed_everything
from imagerag.tools.backends.tiny import clip_bpe_tokenizer
from imagerag.tools.miniworld import MODELS_DIR
from imagerag.tools.miniworld.world import POSITION_PHRASES, RARE_SHAPES, SHAPES, ObjectSpec, Scene

if TYPE_CHECKING:
    from diffusers import AutoencoderKL
    from transformers import CLIPVisionModelWithProjection

VAE_CFG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 16,
    "sample_size": 32,
}
UNET_CFG = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
}
TEXT_CFG = {
    "vocab_size": 49408,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
IMAGE_ENCODER_CFG = {
    "image_size": 32,
    "patch_size": 4,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 64,
}
TRAIN_TIMESTEPS = 1000
SCHED_CFG = {
    "num_train_timesteps": TRAIN_TIMESTEPS,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}

# Unrelated words that stand in for a shape word the model must not learn from text.
FILLER_WORDS = (
    "thing",
    "object",
    "item",
    "apple",
    "lamp",
    "river",
    "cloud",
    "chair",
    "table",
    "mountain",
    "bottle",
    "window",
    "garden",
    "pencil",
    "guitar",
    "rocket",
    "kettle",
    "ladder",
    "violin",
    "turtle",
    "candle",
    "basket",
    "anchor",
    "button",
    "carpet",
    "dragon",
    "feather",
    "helmet",
    "island",
    "jacket",
    "kitten",
    "lemon",
    "mirror",
    "needle",
    "onion",
    "parrot",
    "rabbit",
    "saddle",
    "tiger",
    "umbrella",
    "wagon",
    "zebra",
    "forest",
    "bridge",
    "castle",
    "engine",
    "flower",
    "hammer",
    "pillow",
    "spoon",
    "shoe",
    "piano",
    "tomato",
    "walrus",
    "sign",
    "token",
    "figure",
    "emblem",
    "symbol",
    "pattern",
    "glyph",
    "mark",
    "piece",
    "form",
    "badge",
    "sticker",
)
assert not any(r in w for w in FILLER_WORDS for r in RARE_SHAPES)


def unknown_words(tokenizer) -> list[str]:
    """Whole-word BPE tokens that the text pathway otherwise never sees. Drawn at random, each is
    used a handful of times at most, so its embedding stays near its initial value, like the
    embedding of a rare shape word at inference time."""
    from imagerag.tools.miniworld.world import COLOUR_NAMES, POSITION_PHRASES, SIZE_NAMES

    grammar = (
        set(SHAPES)
        | set(COLOUR_NAMES)
        | set(SIZE_NAMES)
        | set(FILLER_WORDS)
        | {w for ph in POSITION_PHRASES.values() for w in ph.split()}
        | {"a", "and", "according", "to", "this", "image", "of", "generate"}
    )
    out = []
    for tok in tokenizer.get_vocab():
        w = tok[:-4]
        if (
            tok.endswith("</w>")
            and w.isascii()
            and w.isalpha()
            and w.islower()
            and 3 <= len(w) <= 10
            and w not in grammar
            and not any(r in w for r in RARE_SHAPES)
        ):
            out.append(w)
    return sorted(out)


# ----------------------------------------------------------------------------- components


def feature_extractor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        do_resize=True,
        do_center_crop=True,
        do_normalize=True,
        do_convert_rgb=True,
        resample=3,
    )


# ----------------------------------------------------------------------------- captions


def object_text(o: ObjectSpec, word: str | None, rng: random.Random) -> str:
    """The object's phrase with `word` for its shape (None: no shape word)."""
    size = o.size if (o.size == "large" or rng.random() < 0.3) else None
    return " ".join(w for w in ["a", size, o.colour, word, POSITION_PHRASES[o.position]] if w)


def training_caption(scene: Scene, rng: random.Random, hidden: int | None = None, filler: str | None = None) -> str:
    """Scene caption; object `hidden` gets `filler` instead of its shape word."""
    parts = [object_text(o, filler if i == hidden else o.shape, rng) for i, o in enumerate(scene.objects)]
    if len(parts) == 2 and rng.random() < 0.5:
        parts = parts[::-1]
    return " and ".join(parts)


# ----------------------------------------------------------------------------- stages


def train_vae(pool: Pool, steps: int, log: Callable[[str], None], batch: int = 64) -> tuple[AutoencoderKL, dict]:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**VAE_CFG)
    gen = torch.Generator().manual_seed(SEED_T2I + 1)

    def step_fn(step: int) -> tuple[torch.Tensor, str]:
        idx = torch.randint(0, len(pool), (batch,), generator=gen).tolist()
        x = pool.batch01(idx) * 2 - 1
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        kl = 0.5 * (post.mean.pow(2) + post.var - 1 - post.logvar).mean()
        return F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl, f"kl {kl.item():.3f}"

    vae.train()
    fit(vae.parameters(), steps, step_fn, log, tag="t2i/vae", lr=2e-3)
    vae.eval()
    with torch.no_grad():
        x = pool.batch01(range(512)) * 2 - 1
        z = vae.encode(x).latent_dist.mean
        scale = float(1.0 / z.std())
        mse = F.mse_loss(vae.decode(z).sample, x).item()
    vae.register_to_config(scaling_factor=scale)
    log(f"[t2i/vae] scaling_factor {scale:.4f} recon mse {mse:.5f}")
    return vae, {"scaling_factor": scale, "recon_mse": mse}


def train_image_encoder(
    pool: Pool, steps: int, log: Callable[[str], None], batch: int = 128
) -> tuple[CLIPVisionModelWithProjection, nn.Linear]:
    """Pretrain the IP-Adapter image encoder to embed shape (colour/position/size invariant)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    enc = CLIPVisionModelWithProjection(CLIPVisionConfig(**IMAGE_ENCODER_CFG))
    head = nn.Linear(IMAGE_ENCODER_CFG["projection_dim"], len(SHAPES))
    labels = torch.tensor([SHAPES.index(sc.objects[0].shape) for sc in pool.scenes])
    gen = torch.Generator().manual_seed(SEED_T2I + 2)

    def step_fn(step: int) -> tuple[torch.Tensor, str]:
        idx = torch.randint(0, len(pool), (batch,), generator=gen)
        x = normalize_clip(augment(pool.batch01(idx.tolist()), gen, p_blur=0.3, noise=0.03))
        return F.cross_entropy(head(enc(pixel_values=x).image_embeds), labels[idx]), ""

    enc.train()
    fit([*enc.parameters(), *head.parameters()], steps, step_fn, log, tag="t2i/image_encoder", lr=2e-3)
    enc.eval()
    return enc, head


@torch.no_grad()
def image_embeds(enc, images_u8: np.ndarray, bs: int = 512) -> torch.Tensor:
    """Same preprocessing as CLIPImageProcessor at 32 px (resize/crop are no-ops on 32x32 inputs)."""
    x = torch.from_numpy(images_u8).permute(0, 3, 1, 2).float() / 255
    return torch.cat([enc(pixel_values=normalize_clip(x[i : i + bs])).image_embeds for i in range(0, len(x), bs)])


def ip_processors(unet):
    from diffusers.models.attention_processor import IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0

    ip_types = (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0)
    return [p for p in unet.attn_processors.values() if isinstance(p, ip_types)]


def attach_ip_adapter(unet, embed_dim: int, seed: int):
    """Initial IP-Adapter weights in the original format, loaded through diffusers' converter."""
    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    proj = nn.Linear(embed_dim, 4 * cross)
    with torch.no_grad():
        proj.weight.copy_(torch.randn(proj.weight.shape, generator=g) * (1.0 / embed_dim**0.5))
        proj.bias.zero_()
    sd = {
        "image_proj": {
            "proj.weight": proj.weight.data.clone(),
            "proj.bias": proj.bias.data.clone(),
            "norm.weight": torch.ones(cross),
            "norm.bias": torch.zeros(cross),
        },
        "ip_adapter": {},
    }
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        attn = unet.get_submodule(name[: -len(".processor")])
        sd["ip_adapter"][f"{key_id}.to_k_ip.weight"] = attn.to_k.weight.detach().clone()
        sd["ip_adapter"][f"{key_id}.to_v_ip.weight"] = attn.to_v.weight.detach().clone()
        key_id += 2
    unet._load_ip_adapter_weights([sd], low_cpu_mem_usage=False)
    return unet


def export_ip_adapter(unet) -> dict[str, torch.Tensor]:
    """Trained adapter -> original IP-Adapter key layout (what load_ip_adapter expects)."""
    proj = unet.encoder_hid_proj.image_projection_layers[0]
    out = {
        "image_proj.proj.weight": proj.image_embeds.weight,
        "image_proj.proj.bias": proj.image_embeds.bias,
        "image_proj.norm.weight": proj.norm.weight,
        "image_proj.norm.bias": proj.norm.bias,
    }
    key_id = 1
    for name, proc in unet.attn_processors.items():
        if name.endswith("attn1.processor"):
            continue
        out[f"ip_adapter.{key_id}.to_k_ip.weight"] = proc.to_k_ip[0].weight
        out[f"ip_adapter.{key_id}.to_v_ip.weight"] = proc.to_v_ip[0].weight
        key_id += 2
    return {k: v.detach().to(torch.float16).contiguous() for k, v in out.items()}


def base_unet_from(unet):
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel(**UNET_CFG)
    sd = {k: v for k, v in unet.state_dict().items() if ".processor." not in k and not k.startswith("encoder_hid_proj")}
    base.load_state_dict(sd, strict=True)
    return base


def set_ip_scale(unet, scale: float) -> None:
    for p in ip_processors(unet):
        p.scale = [scale] * len(p.scale)


# ----------------------------------------------------------------------------- main training


def train(
    out_dir: Path = MODELS_DIR,
    vae_steps: int = 400,
    enc_steps: int = 500,
    unet_steps: int = 3000,
    batch: int = 64,
    log: Callable[[str], None] = print,
) -> dict:
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    seed_everything(SEED_T2I)
    t_start = time.time()
    timings = {}
    pool = Pool.sample(SEED_T2I, 24000, p_two=0.45)
    singles = Pool.sample(SEED_T2I + 1, 8000, p_two=0.0)  # references and encoder pretraining
    log(f"[t2i] pools rendered {time.time() - t_start:.0f}s")

    t0 = time.time()
    vae, vae_metrics = train_vae(pool, vae_steps, log, batch=32)
    timings["vae"] = round(time.time() - t0, 1)
    t0 = time.time()
    enc, enc_head = train_image_encoder(singles, enc_steps, log)
    timings["image_encoder"] = round(time.time() - t0, 1)

    t0 = time.time()
    with torch.no_grad():
        x = pool.batch01(range(len(pool))) * 2 - 1
        latents = torch.cat([vae.encode(x[i : i + 1000]).latent_dist.mean for i in range(0, len(x), 1000)])
        latents = latents * vae.config.scaling_factor
        ref_emb = image_embeds(enc, singles.images)
        enc_acc = (
            (enc_head(ref_emb).argmax(1) == torch.tensor([SHAPES.index(s.objects[0].shape) for s in singles.scenes]))
            .float()
            .mean()
            .item()
        )
    log(
        f"[t2i] latents {tuple(latents.shape)} std {latents.std():.3f}; encoder shape acc (train refs) {enc_acc:.3f}; "
        f"{time.time() - t0:.0f}s"
    )

    # Index the data.
    n_rare = np.array([sum(o.is_rare for o in sc.objects) for sc in pool.scenes])
    common_idx = np.flatnonzero(n_rare == 0)
    one_rare_idx = np.flatnonzero(n_rare == 1)
    refs_by_shape = {s: [i for i, sc in enumerate(singles.scenes) if sc.objects[0].shape == s] for s in SHAPES}

    tokenizer = clip_bpe_tokenizer()
    tcache = TokenCache(
        lambda texts: (
            tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        )
    )
    unknown = unknown_words(tokenizer)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CFG))
    unet = UNet2DConditionModel(**UNET_CFG)
    attach_ip_adapter(unet, IMAGE_ENCODER_CFG["projection_dim"], SEED_T2I)
    noise_sched = DDPMScheduler(**SCHED_CFG)
    alphas = noise_sched.alphas_cumprod

    rng = random.Random(SEED_T2I)
    gen = torch.Generator().manual_seed(SEED_T2I)
    zero_emb = torch.zeros(IMAGE_ENCODER_CFG["projection_dim"])
    ema = None

    def step_fn(step: int) -> tuple[torch.Tensor, str]:
        nonlocal ema
        with_ref = step % 2 == 1
        idx, texts, embs = [], [], []
        for _ in range(batch):
            if not with_ref:
                i = int(common_idx[rng.randrange(len(common_idx))])
                sc = pool.scenes[i]
                text = "" if rng.random() < 0.1 else training_caption(sc, rng)
                emb = zero_emb
            else:
                rare = rng.random() < 0.6
                pool_idx = one_rare_idx if rare else common_idx
                i = int(pool_idx[rng.randrange(len(pool_idx))])
                sc = pool.scenes[i]
                k = next(j for j, o in enumerate(sc.objects) if o.is_rare) if rare else rng.randrange(len(sc.objects))
                obj = sc.objects[k]
                cands = [
                    r
                    for r in refs_by_shape[obj.shape]
                    if singles.scenes[r].objects[0].colour != obj.colour
                    and singles.scenes[r].objects[0].position != obj.position
                ]
                r = cands[rng.randrange(len(cands))]
                emb = ref_emb[r]
                hide = rare or rng.random() < 0.5
                word = obj.shape
                if hide:  # a filler word or an unknown word in place of the shape word
                    word = rng.choice(FILLER_WORDS) if rng.random() < 0.5 else rng.choice(unknown)
                text = training_caption(sc, rng, hidden=k if hide else None, filler=word)
                if rng.random() < 0.2:
                    text = f"according to this image of a {word}, generate {text}"
                if rng.random() < 0.1:
                    text = ""
                if not rare and rng.random() < 0.15:
                    emb = zero_emb  # image dropout for classifier-free guidance (never on rare targets)
                if not rare and rng.random() < 0.08:
                    text, emb = "", zero_emb  # the exact unconditional branch used with a reference
            idx.append(i)
            texts.append(text)
            embs.append(emb)
        set_ip_scale(unet, 1.0 if with_ref else 0.0)
        z0 = latents[idx]
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, TRAIN_TIMESTEPS, (batch,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        enc_h = text_encoder(tcache(texts)).last_hidden_state
        pred = unet(
            zt, t, encoder_hidden_states=enc_h, added_cond_kwargs={"image_embeds": [torch.stack(embs)[:, None, :]]}
        ).sample
        loss = F.mse_loss(pred, noise)
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        return loss, f"ema {ema:.4f}"

    unet.train()
    text_encoder.train()
    timings["unet_text_ip"] = round(
        fit(
            [*unet.parameters(), *text_encoder.parameters()],
            unet_steps,
            step_fn,
            log,
            tag="t2i/unet",
            lr=6e-4,
            warmup=0.05,
            every=100,
            max_grad_norm=1.0,
        ),
        1,
    )

    # Save: the pipeline without the adapter, and the adapter in the original IP-Adapter format.
    unet.eval()
    text_encoder.eval()
    base = base_unet_from(unet)
    sched = DDIMScheduler(**SCHED_CFG, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=base,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=feature_extractor(),
        image_encoder=None,
        requires_safety_checker=False,
    )
    t2i_dir, ip_dir = out_dir / "t2i", out_dir / "ip_adapter"
    for d in (t2i_dir, ip_dir):
        if d.exists():
            shutil.rmtree(d)
    pipe.to(torch.float16)
    pipe.save_pretrained(t2i_dir, safe_serialization=True)
    ip_dir.mkdir(parents=True)
    save_file(export_ip_adapter(unet), str(ip_dir / "ip_adapter.safetensors"))
    enc.to(torch.float16).save_pretrained(ip_dir / "image_encoder", safe_serialization=True)
    (ip_dir / "README.md").write_text(
        "Mini IP-Adapter for tools/miniworld/models/t2i (original IP-Adapter key layout).\n"
        "pipe.load_ip_adapter(<abs path of this folder>, subfolder='', weight_name='ip_adapter.safetensors', "
        "image_encoder_folder='image_encoder')\n"
    )
    log(f"[t2i] saved to {t2i_dir} and {ip_dir}; total {time.time() - t_start:.0f}s")
    return {
        "seconds": round(time.time() - t_start, 1),
        "timings": timings,
        "vae": vae_metrics,
        "image_encoder_shape_acc_train": enc_acc,
        "steps": {"vae": vae_steps, "image_encoder": enc_steps, "unet": unet_steps, "batch": batch},
    }


if __name__ == "__main__":
    train()
