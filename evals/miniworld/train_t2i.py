"""Train the miniature text-to-image model (a real diffusers StableDiffusionPipeline) and its
IP-Adapter.

Like a real pipeline's CLIP text encoder, the text encoder is pretrained on captions before the UNet learns from it,
and frozen then: here on what each caption says (at the last token of each object's phrase, that object's shape,
colour, size, cell, count and relation; at the end token, what each named cell holds), so that the token a UNet
pixel attends to already carries the object bound to its attributes and place. Learning that binding through the
diffusion loss alone, from scratch, did not happen in 4,600 steps (position 5.5% for one object). And beside the
denoising loss, a grounding loss (see GROUNDING_WEIGHT) tells the UNet where each object's tokens act.

The text pathway never sees the words heart / crescent / star, nor a rare-shape image without a
reference: rare objects appear only in reference-conditioned steps, with their shape word replaced
by a random filler word. The reference is a different rendering of the same shape (other colour,
position, size), so the model learns to take the shape from the reference and colour and position
from the text. Text-only steps hide a common shape's word at times too (HIDE_IN_TEXT), so that an unknown word
alone means "some shape the text does not say", not "a rare shape". The UNet trains in two phases: two steps in five
with a reference, then a shorter phase at a lower rate with three in five, most of them rare (reference_steps). The
references, like every training scene, are of the corpus half of the scene space.

Both are written to tools/miniworld/models, the runtime's model folder. Load with:
    pipe = StableDiffusionPipeline.from_pretrained(".../tools/miniworld/models/t2i", torch_dtype=torch.float32)
    pipe.load_ip_adapter(".../tools/miniworld/models/ip_adapter", subfolder="", weight_name="ip_adapter.safetensors",
                         image_encoder_folder="image_encoder")
    pipe.set_ip_adapter_scale(0.8)  # the mini profile's scale
"""

from __future__ import annotations

import random
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from imagerag.evals.miniworld.common import (
    CHECKPOINTS_DIR,
    SEED_T2I,
    Pool,
    TokenCache,
    augment,
    fit,
    normalize_clip,
    seed_everything,
)
from imagerag.evals.miniworld.grammar import NUMBERS, Layout, PromptSpec, describe, prompt_text, sample_layout
from imagerag.tools.backends.tiny import clip_bpe_tokenizer
from imagerag.tools.miniworld import MODELS_DIR
from imagerag.tools.miniworld.world import (
    CELL_PHRASES,
    CELLS,
    COLOUR_NAMES,
    GRID,
    IMAGE_SIZE,
    MAX_OBJECTS,
    PLURALS,
    RARE_SHAPES,
    RELATION_PHRASES,
    RELATIONS,
    SHAPES,
    SIZE_NAMES,
    sample_scenes,
)

if TYPE_CHECKING:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPVisionModelWithProjection

VAE_CFG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 16,
    "sample_size": IMAGE_SIZE,
}
UNET_CFG = {
    "sample_size": IMAGE_SIZE // 4,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (48, 96, 96),
    # Cross-attention at every level, the 12x12 one included: where an object goes is read from the text there.
    "down_block_types": ("CrossAttnDownBlock2D",) * 3,
    "up_block_types": ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
}
TEXT_CFG = {
    "vocab_size": 49408,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
IMAGE_ENCODER_CFG = {
    "image_size": IMAGE_SIZE,
    "patch_size": 6,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 64,
}
TRAIN_TIMESTEPS = 1000
# Weight of the grounding loss (each object's phrase-end token attends inside its cells) beside the denoising loss.
# Without it the UNet drew objects in the wrong cell (position 12.5% for one object after 1,800 steps, 5.5% after
# 4,600 with the earlier text encoder): nothing but the denoising loss told it where a token's object goes.
GROUNDING_WEIGHT = 0.05
# Share of text-only captions in which one object's shape word is replaced by a stand-in word.
HIDE_IN_TEXT = 0.15
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
    phrases = [*CELL_PHRASES.values(), *RELATION_PHRASES.values(), *NUMBERS.values()]
    grammar = (
        set(SHAPES)
        | set(PLURALS.values())
        | set(COLOUR_NAMES)
        | set(SIZE_NAMES)
        | set(FILLER_WORDS)
        | {w for ph in phrases for w in ph.split()}
        | {"a", "an", "and", "according", "to", "this", "image", "of", "generate"}
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
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_resize=True,
        do_center_crop=True,
        do_normalize=True,
        do_convert_rgb=True,
        resample=3,
    )


# ----------------------------------------------------------------------------- captions


def training_caption(layout: Layout, rng: random.Random, names: dict[int, str] | None = None) -> tuple[str, PromptSpec]:
    """A prompt about the layout, every attribute named half of the time, a random number of concepts otherwise;
    the groups in `names` are called by those words instead of their shapes."""
    k = layout.max_k if rng.random() < 0.5 else rng.randint(layout.base_k, layout.max_k)
    spec = describe(layout, k, rng)
    return (prompt_text(spec.groups, spec.relations, rng, names=names) if names else spec.prompt), spec


def hidden_word(rng: random.Random, unknown: Sequence[str]) -> str:
    """A filler word or a word the text pathway otherwise never sees, standing in for a shape word."""
    return rng.choice(FILLER_WORDS) if rng.random() < 0.5 else rng.choice(unknown)


# ----------------------------------------------------------------------------- text encoder pretraining

# What the text encoder learns to say at the last token of an object's phrase (the first causal position that has
# read the whole phrase): each attribute's class, the last class meaning "not named" (for shape: hidden behind
# another word); and at the end token, per cell, the shape and colour of the object the prompt puts there.
PHRASE_HEADS = {
    "shape": len(SHAPES) + 1,
    "colour": len(COLOUR_NAMES) + 1,
    "size": len(SIZE_NAMES) + 1,
    "cell": len(CELLS) + 1,
    "count": MAX_OBJECTS,
    "relation": len(RELATIONS) + 1,  # at the object of a relation: which relation its subject holds to it
}
CELL_HEADS = {"shape": len(SHAPES) + 2, "colour": len(COLOUR_NAMES) + 1}  # + hidden, + no object named there


class WordTokens:
    """Token ids of a caption built word by word (CLIP's BPE never merges across spaces or commas), so that each
    object's phrase end is known as a token position. Matches the tokenizer on whole captions (tested)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.words: dict[str, list[int]] = {}

    def word(self, w: str) -> list[int]:
        if w not in self.words:
            self.words[w] = self.tokenizer(w, add_special_tokens=False).input_ids
        return self.words[w]

    def __call__(self, text: str) -> tuple[list[int], dict[int, int]]:
        """Ids with the start and end tokens, and the token position at which each character offset that ends a
        word (commas excluded) is reached."""
        ids, ends, char = [self.tokenizer.bos_token_id], {}, 0
        for w in text.split(" "):
            core = w.rstrip(",")
            ids += self.word(core)
            ends[char + len(core)] = len(ids) - 1
            if core != w:
                ids += self.word(w[len(core) :])
            char += len(w) + 1
        return [*ids, self.tokenizer.eos_token_id], ends


def phrase_ends(text: str, spec: PromptSpec, names: dict[int, str], ends: dict[int, int]) -> list[int]:
    """The token position where each group's phrase ends in `text` (see WordTokens)."""
    out = []
    for i, g in enumerate(spec.groups):
        words = g.phrase(names.get(i))
        found = re.search(rf"(?<![\w-]){re.escape(words)}(?![\w-])", text)  # whole words: "a ring" is not in "a rings"
        assert found, (words, text)
        out.append(ends[found.start() + len(words)])
    return out


def parse_targets(text: str, spec: PromptSpec, names: dict[int, str], ends: dict[int, int]) -> tuple[dict, dict]:
    """Per phrase-end token position, its object's classes; per cell, the classes of what the prompt puts there."""
    related_object = {r.object: RELATIONS.index(r.relation) for r in spec.relations}
    phrase: dict[int, dict[str, int]] = {}
    cells = {
        "shape": [len(SHAPES) + 1] * len(CELLS),
        "colour": [len(COLOUR_NAMES)] * len(CELLS),
    }
    for i, (g, end) in enumerate(zip(spec.groups, phrase_ends(text, spec, names, ends), strict=True)):
        shape = len(SHAPES) if i in names else SHAPES.index(g.shape)
        colour = COLOUR_NAMES.index(g.colour) if g.colour else len(COLOUR_NAMES)
        phrase[end] = {
            "shape": shape,
            "colour": colour,
            "size": SIZE_NAMES.index(g.size) if g.size else len(SIZE_NAMES),
            "cell": CELLS.index(g.cell) if g.cell else len(CELLS),
            "count": g.count - 1,
            "relation": related_object.get(i, len(RELATIONS)),
        }
        if g.cell:
            cells["shape"][CELLS.index(g.cell)] = shape
            cells["colour"][CELLS.index(g.cell)] = colour
    return phrase, cells


def train_text_encoder(
    layouts: Sequence[Layout], heldout: Sequence[Layout], tokenizer, steps: int, log: Callable[[str], None],
    batch: int = 256,
) -> tuple[CLIPTextModel, dict]:  # fmt: skip
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = CHECKPOINTS_DIR / "text_encoder"
    words = WordTokens(tokenizer)
    unknown = unknown_words(tokenizer)
    hidden = TEXT_CFG["hidden_size"]
    phrase_head = nn.Linear(hidden, sum(PHRASE_HEADS.values()))
    cell_head = nn.Linear(hidden, len(CELLS) * sum(CELL_HEADS.values()))
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CFG))
    rng = random.Random(SEED_T2I + 3)

    def example(layout: Layout, rng: random.Random) -> tuple[list[int], dict, dict]:
        rare = [g for g, m in enumerate(layout.members) if layout.objects[m[0]].is_rare]
        common = [g for g in range(len(layout.members)) if g not in rare]
        hide = rare + ([rng.choice(common)] if common and rng.random() < 0.15 else [])
        names = {g: hidden_word(rng, unknown) for g in hide}
        text, spec = training_caption(layout, rng, names)
        ids, ends = words(text)
        return ids, *parse_targets(text, spec, names, ends)

    def forward(examples: list) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Summed cross-entropy, and per head its logits and targets."""
        length = max(len(ids) for ids, _, _ in examples)
        ids = torch.full((len(examples), length), tokenizer.eos_token_id)
        for b, (seq, _, _) in enumerate(examples):
            ids[b, : len(seq)] = torch.tensor(seq)
        states = text_encoder(ids).last_hidden_state
        rows = [(b, t) for b, (_, ph, _) in enumerate(examples) for t in ph]
        logits = phrase_head(states[[b for b, _ in rows], [t for _, t in rows]]).split(list(PHRASE_HEADS.values()), 1)
        eos = torch.tensor([len(seq) - 1 for seq, _, _ in examples])
        per_cell = cell_head(states[torch.arange(len(examples)), eos]).view(len(examples), len(CELLS), -1)
        out = {
            k: (lg, torch.tensor([examples[b][1][t][k] for b, t in rows]))
            for k, lg in zip(PHRASE_HEADS, logits, strict=True)
        }
        for k, lg in zip(CELL_HEADS, per_cell.split(list(CELL_HEADS.values()), 2), strict=True):
            out[f"cell_{k}"] = (lg.reshape(-1, lg.shape[-1]), torch.tensor([c for _, _, cl in examples for c in cl[k]]))
        return sum(F.cross_entropy(lg, y) for lg, y in out.values()), out  # type: ignore[return-value]

    if (folder / "config.json").exists():
        log(f"[t2i/text] finished earlier: {folder}")
        text_encoder = CLIPTextModel.from_pretrained(folder)
    else:

        def step_fn(step: int) -> tuple[torch.Tensor, str]:
            return forward([example(layouts[rng.randrange(len(layouts))], rng) for _ in range(batch)])[0], ""

        text_encoder.train()
        fit(
            [*text_encoder.parameters(), *phrase_head.parameters(), *cell_head.parameters()], steps, step_fn, log,
            tag="t2i/text", lr=2e-3, checkpoint=CHECKPOINTS_DIR / "text_encoder.pt",
            modules=[text_encoder, phrase_head, cell_head], rngs=[rng],
        )  # fmt: skip
        text_encoder.save_pretrained(folder)
        torch.save({"phrase": phrase_head.state_dict(), "cell": cell_head.state_dict()}, folder / "heads.pt")
    heads = torch.load(folder / "heads.pt")
    phrase_head.load_state_dict(heads["phrase"])
    cell_head.load_state_dict(heads["cell"])
    text_encoder.eval()
    # Held-out check: captions of evaluation-half scenes, rare shapes hidden as in training.
    hrng = random.Random(SEED_T2I + 4)
    with torch.no_grad():
        _, out = forward([example(lay, hrng) for lay in heldout])
    accuracy = {k: round((lg.argmax(1) == y).float().mean().item(), 4) for k, (lg, y) in out.items()}
    log(f"[t2i/text] held-out accuracy {accuracy}")
    return text_encoder.requires_grad_(False), accuracy


# ----------------------------------------------------------------------------- stages


def train_vae(
    pool: Pool, steps: int, decoder_steps: int, log: Callable[[str], None], batch: int = 32
) -> tuple[AutoencoderKL, dict]:
    """The autoencoder, then its decoder alone for `decoder_steps` more (as Stable Diffusion's decoder was fine-tuned
    after the fact): the latents the UNet learns from stay as they are, while fine detail (a small star's points)
    comes back sharper."""
    from diffusers import AutoencoderKL

    folder, refined = CHECKPOINTS_DIR / "vae", CHECKPOINTS_DIR / "vae_decoder"
    gen = torch.Generator().manual_seed(SEED_T2I + 1)

    def reconstruction_loss(vae: AutoencoderKL) -> tuple[torch.Tensor, str]:
        idx = torch.randint(0, len(pool), (batch,), generator=gen).tolist()
        x = pool.batch01(idx) * 2 - 1
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        kl = 0.5 * (post.mean.pow(2) + post.var - 1 - post.logvar).mean()
        # Object pixels weigh more than the white background, so that colours survive the round trip exactly.
        weight = 1.0 + 4.0 * (x < 0.95).any(1, keepdim=True).float()
        err = (rec - x).abs() + (rec - x).pow(2)
        return (weight * err).mean() + 1e-5 * kl, f"kl {kl.item():.3f}"

    if (refined / "config.json").exists():
        log(f"[t2i/vae] finished earlier: {refined}")
        vae = AutoencoderKL.from_pretrained(refined).eval()
        return vae, palette_fidelity(vae, pool)
    if (folder / "config.json").exists():
        log(f"[t2i/vae] autoencoder finished earlier: {folder}")
        vae = AutoencoderKL.from_pretrained(folder)
    else:
        vae = AutoencoderKL(**VAE_CFG)
        vae.train()
        fit(
            vae.parameters(), steps, lambda step: reconstruction_loss(vae), log, tag="t2i/vae", lr=2e-3,
            checkpoint=CHECKPOINTS_DIR / "vae.pt", modules=[vae], rngs=[gen],
        )  # fmt: skip
        vae.eval()
        with torch.no_grad():
            z = vae.encode(pool.batch01(range(512)) * 2 - 1).latent_dist.mean
        vae.register_to_config(scaling_factor=float(1.0 / z.std()))
        vae.save_pretrained(folder)
    gen.manual_seed(SEED_T2I + 6)  # the same draws whether or not the first phase ran in this process
    vae.train()
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    decoder = [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()]
    fit(
        decoder, decoder_steps, lambda step: reconstruction_loss(vae), log, tag="t2i/vae_decoder", lr=5e-4,
        checkpoint=CHECKPOINTS_DIR / "vae_decoder.pt", modules=[vae], rngs=[gen],
    )  # fmt: skip
    vae.requires_grad_(True).eval()
    vae.save_pretrained(refined)
    metrics = palette_fidelity(vae, pool)
    log(f"[t2i/vae] scaling_factor {vae.config.scaling_factor:.4f} {metrics}")
    return vae, metrics


@torch.no_grad()
def palette_fidelity(vae, pool: Pool, n: int = 512) -> dict:
    """How often an object's mean colour after the autoencoder's round trip is still nearest its own palette colour
    (the oracle's figure comes later; this one is the stage's own check)."""
    from imagerag.tools.miniworld.world import CELL, COLOURS, cell_row_col

    x = pool.batch01(range(n))
    rec = ((vae.decode(vae.encode(x * 2 - 1).latent_dist.mean).sample + 1) / 2).clamp(0, 1)
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 255
    hits = total = 0
    for i, sc in enumerate(pool.scenes[:n]):
        for o in sc.objects:
            r, c = cell_row_col(o.cell)
            box = (slice(None), slice(r * CELL, (r + 1) * CELL), slice(c * CELL, (c + 1) * CELL))
            mask = (x[i][box] < 0.9).any(0)
            if mask.sum() == 0:
                continue
            mean = rec[i][box][:, mask].mean(1)
            hits += int(COLOUR_NAMES[int(((palette - mean) ** 2).sum(1).argmin())] == o.colour)
            total += 1
    return {"palette_colour_kept": hits / max(1, total), "objects": total}


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
    fit(
        [*enc.parameters(), *head.parameters()], steps, step_fn, log, tag="t2i/image_encoder", lr=2e-3,
        checkpoint=CHECKPOINTS_DIR / "image_encoder.pt", modules=[enc, head], rngs=[gen],
    )  # fmt: skip
    enc.eval()
    return enc, head


@torch.no_grad()
def image_embeds(enc, images_u8: np.ndarray, bs: int = 512) -> torch.Tensor:
    """Same preprocessing as CLIPImageProcessor at the world's size (resize and crop are no-ops there)."""
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


class CrossAttentionMaps:
    """The text cross-attention of every attn2 layer of a UNet in its last forward pass, rebuilt from the queries
    and keys that forward hooks on to_q and to_k keep (averaged over heads): (batch, pixels, tokens) per layer."""

    def __init__(self, unet) -> None:
        self.layers = [(name, m) for name, m in unet.named_modules() if name.endswith("attn2")]
        self.kept: dict[tuple[str, str], torch.Tensor] = {}
        for name, m in self.layers:
            for part in ("to_q", "to_k"):
                getattr(m, part).register_forward_hook(lambda _m, _i, out, key=(name, part): self._keep(key, out))

    def _keep(self, key: tuple[str, str], out: torch.Tensor) -> None:
        self.kept[key] = out

    def maps(self) -> list[torch.Tensor]:
        out = []
        for name, m in self.layers:
            q, k = self.kept[(name, "to_q")], self.kept[(name, "to_k")]
            b, d = q.shape[0], q.shape[-1] // m.heads
            q, k = (x.view(b, -1, m.heads, d).transpose(1, 2) for x in (q, k))
            out.append((q @ k.transpose(-1, -2) * d**-0.5).softmax(-1).mean(1))
        return out


def grounding_loss(maps: list[torch.Tensor], tokens: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """How much of each object token's attention falls outside its objects' cells (TokenCompose's token loss, on
    grid cells): `tokens` (batch, groups) phrase-end positions, -1 for none; `cells` (batch, groups, 3, 3) masks."""
    valid = tokens >= 0
    if not valid.any():
        return torch.zeros(())
    losses = []
    for a in maps:
        side = int(a.shape[1] ** 0.5)
        mask = F.interpolate(cells, size=(side, side), mode="nearest").flatten(2)  # (batch, groups, pixels)
        at = a.gather(2, tokens.clamp(min=0)[:, None, :].expand(-1, a.shape[1], -1))  # (batch, pixels, groups)
        inside = (at * mask.transpose(1, 2)).sum(1) / at.sum(1).clamp(min=1e-8)
        losses.append(((1 - inside) ** 2)[valid].mean())
    return torch.stack(losses).mean()


# ----------------------------------------------------------------------------- main training


def train(
    out_dir: Path = MODELS_DIR,
    vae_steps: int = 600,
    decoder_steps: int = 400,
    enc_steps: int = 500,
    text_steps: int = 1200,
    unet_steps: int = 5000,
    reference_steps: int = 1500,
    batch: int = 32,
    log: Callable[[str], None] = print,
) -> dict:
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    seed_everything(SEED_T2I)
    t_start = time.time()
    timings = {}
    # Training scenes come from the corpus half of the scene space only: no evaluation scene is ever trained on.
    lrng = random.Random(SEED_T2I)
    layouts: list[Layout] = []
    while len(layouts) < 24000:
        n_objects = lrng.choices((1, 2, 3, 4), (0.2, 0.3, 0.25, 0.25))[0]
        layout = sample_layout(lrng, n_objects, rare=lrng.random() < 0.35)
        if layout.scene.half == "corpus":
            layouts.append(layout)
    pool = Pool([lay.scene for lay in layouts])
    # One-object scenes: the adapter's references and the image encoder's pretraining, of the corpus half too.
    singles = Pool([sc for sc in sample_scenes(SEED_T2I + 1, 24000, weights=(1.0,)) if sc.half == "corpus"][:8000])
    log(f"[t2i] pools rendered {time.time() - t_start:.0f}s")

    t0 = time.time()
    vae, vae_metrics = train_vae(pool, vae_steps, decoder_steps, log)
    timings["vae"] = round(time.time() - t0, 1)
    t0 = time.time()
    enc, enc_head = train_image_encoder(singles, enc_steps, log)
    timings["image_encoder"] = round(time.time() - t0, 1)

    t0 = time.time()
    with torch.no_grad():
        x = pool.batch01(range(len(pool))) * 2 - 1
        latents = torch.cat([vae.encode(x[i : i + 500]).latent_dist.mean for i in range(0, len(x), 500)])
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

    # Index the data: layouts with no rare object (text-only steps) and with one (reference steps).
    has_rare = np.array([lay.scene.has_rare for lay in layouts])
    common_idx, rare_idx = np.flatnonzero(~has_rare), np.flatnonzero(has_rare)
    refs_by_shape = {s: [i for i, sc in enumerate(singles.scenes) if sc.objects[0].shape == s] for s in SHAPES}

    tokenizer = clip_bpe_tokenizer()
    tcache = TokenCache(
        lambda texts: (
            tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        )
    )
    unknown = unknown_words(tokenizer)
    words = WordTokens(tokenizer)
    t0 = time.time()
    heldout: list[Layout] = []
    hrng = random.Random(SEED_T2I + 5)
    while len(heldout) < 2000:
        layout = sample_layout(hrng, hrng.choice((1, 2, 3, 4)), rare=hrng.random() < 0.35)
        if layout.scene.half == "eval":
            heldout.append(layout)
    text_encoder, text_accuracy = train_text_encoder(layouts, heldout, tokenizer, text_steps, log)
    timings["text_encoder"] = round(time.time() - t0, 1)
    unet = UNet2DConditionModel(**UNET_CFG)
    attach_ip_adapter(unet, IMAGE_ENCODER_CFG["projection_dim"], SEED_T2I)
    attention = CrossAttentionMaps(unet)
    noise_sched = DDPMScheduler(**SCHED_CFG)
    alphas = noise_sched.alphas_cumprod

    rng = random.Random(SEED_T2I)
    gen = torch.Generator().manual_seed(SEED_T2I)
    zero_emb = torch.zeros(IMAGE_ENCODER_CFG["projection_dim"])
    ema = None

    def reference_example(rare_share: float) -> tuple[int, str, torch.Tensor]:
        """A layout, its caption and one object's reference: another rendering of that object's shape (other colour
        and cell). A rare object's word is always hidden; a common one's half of the time."""
        rare = rng.random() < rare_share
        i = int((rare_idx if rare else common_idx)[rng.randrange(len(rare_idx if rare else common_idx))])
        layout = layouts[i]
        singles_of = [g for g, m in enumerate(layout.members) if len(m) == 1]
        g = next((g for g in singles_of if layout.objects[layout.members[g][0]].is_rare), None)
        if g is None:
            g = rng.choice(singles_of) if singles_of else 0
        obj = layout.objects[layout.members[g][0]]
        cands = [
            r
            for r in refs_by_shape[obj.shape]
            if singles.scenes[r].objects[0].colour != obj.colour and singles.scenes[r].objects[0].cell != obj.cell
        ]
        emb = ref_emb[cands[rng.randrange(len(cands))]]
        hide = obj.is_rare or rng.random() < 0.5
        text, _ = training_caption(layout, rng, {g: hidden_word(rng, unknown)} if hide else None)
        if rng.random() < 0.1:
            text = ""
        if not obj.is_rare and rng.random() < 0.15:
            emb = zero_emb  # image dropout for classifier-free guidance (never on rare targets)
        if not obj.is_rare and rng.random() < 0.08:
            text, emb = "", zero_emb  # the exact unconditional branch used with a reference
        return i, text, emb

    def step_fn(
        step: int, with_ref_of_5: tuple[int, ...] = (1, 3), rare_share: float = 0.6
    ) -> tuple[torch.Tensor, str]:
        nonlocal ema
        # Two steps in five with a reference (one in three drew a rare reference's shape 76% of the time): composing
        # from text is the harder task, and keeps the rest.
        with_ref = step % 5 in with_ref_of_5
        idx, texts, embs = [], [], []
        tokens = torch.full((batch, MAX_OBJECTS), -1)
        cells = torch.zeros(batch, MAX_OBJECTS, GRID, GRID)
        for b in range(batch):
            if with_ref:
                i, text, emb = reference_example(rare_share)
            else:
                i = int(common_idx[rng.randrange(len(common_idx))])
                text, emb = "", zero_emb
                if rng.random() >= 0.1:
                    # At times one object's shape word is hidden here too: from text alone an unknown word must mean
                    # "some common shape", or the model learns that it means a rare one (27% of rare shapes drawn
                    # from text when only reference steps hid words).
                    groups = len(layouts[i].members)
                    names = {rng.randrange(groups): hidden_word(rng, unknown)} if rng.random() < HIDE_IN_TEXT else {}
                    text, spec = training_caption(layouts[i], rng, names or None)
                    for g, end in enumerate(phrase_ends(text, spec, names, words(text)[1])):
                        tokens[b, g] = end
                        for o in layouts[i].members[g]:
                            cells[b, g].view(-1)[CELLS.index(layouts[i].objects[o].cell)] = 1.0
            idx.append(i)
            texts.append(text)
            embs.append(emb)
        set_ip_scale(unet, 1.0 if with_ref else 0.0)
        z0 = latents[idx]
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, TRAIN_TIMESTEPS, (batch,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        with torch.no_grad():  # frozen, as a real pipeline's CLIP text encoder is
            enc_h = text_encoder(tcache(texts)).last_hidden_state
        pred = unet(
            zt, t, encoder_hidden_states=enc_h, added_cond_kwargs={"image_embeds": [torch.stack(embs)[:, None, :]]}
        ).sample
        denoising = F.mse_loss(pred, noise)
        grounding = grounding_loss(attention.maps(), tokens, cells) if not with_ref else torch.zeros(())
        ema = denoising.item() if ema is None else 0.98 * ema + 0.02 * denoising.item()
        return denoising + GROUNDING_WEIGHT * grounding, f"ema {ema:.4f} grounding {grounding.item():.3f}"

    def fit_unet(steps: int, fn: Callable[[int], tuple[torch.Tensor, str]], tag: str, lr: float, name: str) -> float:
        seconds = fit(
            list(unet.parameters()),
            steps,
            fn,
            log,
            tag=tag,
            lr=lr,
            warmup=0.05,
            every=100,
            max_grad_norm=1.0,
            checkpoint=CHECKPOINTS_DIR / name,
            modules=[unet],
            rngs=[rng, gen],
            checkpoint_every=100,
        )
        return round(seconds, 1)

    unet.train()
    timings["unet_ip"] = fit_unet(unet_steps, step_fn, "t2i/unet", 6e-4, "unet.pt")
    # Then a shorter phase that leans on references, rare ones above all, at a lower rate: after the first phase one
    # generation with a rare reference drew its shape 70% of the time (74% for the model before, README).
    timings["unet_ip_references"] = fit_unet(
        reference_steps,
        lambda step: step_fn(step, with_ref_of_5=(1, 2, 3), rare_share=0.8),
        "t2i/unet-references",
        2e-4,
        "unet_references.pt",
    )

    # Save: the pipeline without the adapter, and the adapter in the original IP-Adapter format.
    unet.eval()
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
        "text_encoder_heldout_accuracy": text_accuracy,
        "steps": {
            "vae": vae_steps,
            "vae_decoder": decoder_steps,
            "image_encoder": enc_steps,
            "text_encoder": text_steps,
            "unet": unet_steps,
            "unet_references": reference_steps,
            "batch": batch,
        },
    }


if __name__ == "__main__":
    train()
