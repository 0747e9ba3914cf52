"""Train the mini OpenCLIP model on rendered scenes of world v2 and save it as an open_clip local-dir folder.

It serves the agent twice: retrieval (an object caption finds the nearest corpus image by cosine) and the critic
(one concept text against an image, accepted at cosine >= judge_threshold). Training therefore combines

    a CLIP contrastive loss on captions (whole, partial, or one object with some of its attributes), multi-positive:
        every caption in the batch that holds for an image counts as its positive;
    a sigmoid (SigLIP-style) loss on concept texts with one global scale and bias, so that one cosine threshold
        separates true concept texts from hard negatives (the same text with one thing changed).

Concept texts take the forms the agent's planner writes for this world (grammar.Group.phrase):
    "a star", "an arrow", "a red star", "a large star", "a star in the top left", "a large red star in the top left",
    "two stars", "three red rings", "a star to the left of a ring", "a star above a small blue ring".

Load with:
    open_clip.create_model_and_transforms("local-dir:/abs/tools/miniworld/models/clip")
    open_clip.get_tokenizer("local-dir:/abs/tools/miniworld/models/clip")
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from safetensors.torch import save_file

from imagerag.evals.miniworld.common import (
    CHECKPOINTS_DIR,
    CLIP_MEAN,
    CLIP_STD,
    SEED_CLIP,
    SEED_EVAL,
    Pool,
    TokenCache,
    augment,
    fit,
    normalize_clip,
    seed_everything,
)
from imagerag.evals.miniworld.grammar import NUMBERS, Group, sample_layout
from imagerag.tools.backends.calibration import best_threshold
from imagerag.tools.miniworld import MODELS_DIR
from imagerag.tools.miniworld.world import (
    CELLS,
    COLOUR_NAMES,
    GRID,
    MAX_OBJECTS,
    RARE_SHAPES,
    RELATION_PHRASES,
    RELATIONS,
    SHAPES,
    SIZE_NAMES,
    ObjectSpec,
    Scene,
    corpus_scenes,
    random_object,
    render_array,
    sample_scene,
    sample_scenes,
)

Log = Callable[[str], None]

# Patch 8 on 48 px: each 16 px cell is 2x2 patches, 36 tokens; the 49408-token embedding dominates the weight size.
CONTEXT_LENGTH = 77
MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 48, "layers": 4, "width": 128, "head_width": 32, "mlp_ratio": 2.0, "patch_size": 8},
    "text_cfg": {
        "context_length": CONTEXT_LENGTH,
        "vocab_size": 49408,
        "width": 64,
        "heads": 4,
        "layers": 3,
        "mlp_ratio": 2.0,
    },
}
PREPROCESS_CFG = {
    "size": 48,
    "mode": "RGB",
    "mean": list(CLIP_MEAN),
    "std": list(CLIP_STD),
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}

# ----------------------------------------------------------------------------- texts and their truth
#
# A text is a conjunction of up to MAX_OBJECTS atoms, each a row of ints (-1: not named). Truth is computed for
# whole (images x texts) matrices at once, so every text of a batch is a labelled pair with every image.
OBJ, COUNT, REL = 0, 1, 2
KIND, SHAPE, COLOUR, SIZE, CELL, N, RELATION, B_SHAPE, B_COLOUR, B_SIZE = range(10)
ATOM_FIELDS = 10
CONCEPT_KINDS = ("shape", "colour", "size", "position", "object", "count", "relation")
KIND_WEIGHTS = (0.1, 0.16, 0.1, 0.18, 0.14, 0.14, 0.18)
OPPOSITE = {0: 1, 1: 0, 2: 3, 3: 2}  # left of <-> right of, above <-> below (indices into RELATIONS)


def atom(kind: int, shape: int, colour: int = -1, size: int = -1, cell: int = -1, n: int = -1, rel: int = -1,
         b: tuple[int, int, int] = (-1, -1, -1)) -> tuple[int, ...]:  # fmt: skip
    return (kind, shape, colour, size, cell, n, rel, *b)


def scene_array(scenes: Sequence[Scene]) -> np.ndarray:
    """(N, MAX_OBJECTS, 4) ints: shape, colour, size, cell of each object; -1 rows pad."""
    out = np.full((len(scenes), MAX_OBJECTS, 4), -1, np.int64)
    for i, sc in enumerate(scenes):
        for j, o in enumerate(sc.objects):
            out[i, j] = (
                SHAPES.index(o.shape),
                COLOUR_NAMES.index(o.colour),
                SIZE_NAMES.index(o.size),
                CELLS.index(o.cell),
            )
    return out


def _match(
    o: np.ndarray, shape: np.ndarray, colour: np.ndarray, size: np.ndarray, cell: np.ndarray | np.integer
) -> np.ndarray:
    """(..., atoms, objects): the object has the atom's shape and every attribute the atom names (-1: any)."""
    ok = (o[..., 0] == shape) & (o[..., 0] >= 0)
    for field, want in ((1, colour), (2, size), (3, cell)):
        ok &= (want < 0) | (o[..., field] == want)
    return ok


def truth(s: np.ndarray, atoms: np.ndarray) -> np.ndarray:
    """Whether each text holds for each scene. s: (..., MAX_OBJECTS, 4) scenes, atoms: (..., M, ATOM_FIELDS) texts;
    the leading dims broadcast: s[:, None] with atoms[None] gives an (images, texts) matrix, equal leading dims
    give pairs."""
    o = s[..., None, :, :]  # (..., 1, objects, 4) against (..., M, 1) atom fields
    a = atoms[..., None]
    ma = _match(o, a[..., SHAPE, :], a[..., COLOUR, :], a[..., SIZE, :], a[..., CELL, :])
    mb = _match(o, a[..., B_SHAPE, :], a[..., B_COLOUR, :], a[..., B_SIZE, :], np.int64(-1))
    row, col = np.divmod(np.where(s[..., 3] >= 0, s[..., 3], 0), GRID)
    lt = col[..., :, None] < col[..., None, :]  # (..., subject object, other object)
    above = row[..., :, None] < row[..., None, :]
    rel = atoms[..., RELATION][..., None, None]  # ordered as RELATIONS
    on_grid = (
        ((rel == 0) & lt[..., None, :, :])
        | ((rel == 1) & np.swapaxes(lt, -1, -2)[..., None, :, :])
        | ((rel == 2) & above[..., None, :, :])
        | ((rel == 3) & np.swapaxes(above, -1, -2)[..., None, :, :])
    )
    rel_ok = (ma[..., :, None] & mb[..., None, :] & on_grid).any((-1, -2))
    kind = atoms[..., KIND]
    ok = np.where(kind == OBJ, ma.any(-1), True)
    ok = np.where(kind == COUNT, ma.sum(-1) == atoms[..., N], ok)
    ok = np.where(kind == REL, rel_ok, ok)
    return np.asarray(ok.all(-1))


@lru_cache(maxsize=200_000)
def _noun(shape: int, colour: int, size: int, cell: int, n: int = 1) -> str:
    """The planner's phrase for one group, article and plural included."""
    return Group(
        shape=SHAPES[shape],
        count=n,
        colour=COLOUR_NAMES[colour] if colour >= 0 else None,
        size=SIZE_NAMES[size] if size >= 0 else None,
        cell=CELLS[cell] if cell >= 0 else None,
    ).phrase()


def atom_text(a: Sequence[int]) -> str:
    if a[KIND] == COUNT:
        return _noun(a[SHAPE], a[COLOUR], -1, -1, a[N])
    subject = _noun(a[SHAPE], a[COLOUR], a[SIZE], a[CELL])
    if a[KIND] == REL:
        return f"{subject} {RELATION_PHRASES[RELATIONS[a[RELATION]]]} {_noun(a[B_SHAPE], a[B_COLOUR], a[B_SIZE], -1)}"
    return subject


def texts_of(rows: Sequence[Sequence[tuple[int, ...]]]) -> tuple[list[str], np.ndarray]:
    """Each row of atoms as its text (atoms joined by "and") and as a padded atom array."""
    arr = np.full((len(rows), max(map(len, rows)), ATOM_FIELDS), -1, np.int64)
    for i, row in enumerate(rows):
        arr[i, : len(row)] = row
    return [" and ".join(atom_text(a) for a in row) for row in rows], arr


# ----------------------------------------------------------------------------- sampling texts for a scene


def _obj_atom(o: np.ndarray, named: Sequence[int]) -> tuple[int, ...]:
    """An OBJ atom about object o (shape, colour, size, cell) naming its shape and the fields in `named`."""
    vals = {f: int(o[f - 1]) if f in named else -1 for f in (COLOUR, SIZE, CELL)}
    return atom(OBJ, int(o[0]), vals[COLOUR], vals[SIZE], vals[CELL])


def caption_atoms(s: np.ndarray, rng: random.Random) -> list[tuple[int, ...]]:
    """What retrieval is asked: the whole caption, a part of it, or one object with some of its attributes."""
    objs = [o for o in s if o[0] >= 0]
    r = rng.random()
    if r < 0.2:
        return [_obj_atom(o, (COLOUR, SIZE, CELL)) for o in sorted(objs, key=lambda o: o[3])]
    if r < 0.35:
        part = sorted(rng.sample(objs, rng.randint(1, len(objs))), key=lambda o: o[3])
        return [_obj_atom(o, [f for f in (COLOUR, SIZE, CELL) if rng.random() < 0.5]) for o in part]
    return [_obj_atom(rng.choice(objs), [f for f in (COLOUR, SIZE, CELL) if rng.random() < 0.5])]


def _other(rng: random.Random, n: int, avoid: int, prefer: Sequence[int] = ()) -> int:
    """A value in range(n) other than `avoid`; half the time one of `prefer` (values elsewhere in the scene: the
    hardest negatives are a wrong binding of what is drawn)."""
    prefer = [p for p in prefer if p != avoid]
    if prefer and rng.random() < 0.5:
        return rng.choice(prefer)
    return rng.choice([v for v in range(n) if v != avoid])


def concept_pair(s: np.ndarray, kind: str, rng: random.Random) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A concept text of `kind` meant true for scene s and the same text with one thing changed (meant false;
    the labels come from `truth`, so a change that happens to hold is labelled true)."""
    objs = [o for o in s if o[0] >= 0]
    o = rng.choice(objs)
    shapes_here = [int(p[0]) for p in objs]
    if kind == "shape":
        return _obj_atom(o, ()), atom(OBJ, _other(rng, len(SHAPES), int(o[0])))
    if kind in ("colour", "size", "position"):
        field = {"colour": COLOUR, "size": SIZE, "position": CELL}[kind]
        n = (len(COLOUR_NAMES), len(SIZE_NAMES), len(CELLS))[field - COLOUR]
        true = _obj_atom(o, (field,))
        changed = list(true)
        changed[field] = _other(rng, n, int(o[field - 1]), [int(p[field - 1]) for p in objs])
        return true, tuple(changed)
    if kind == "object":  # several attributes at once, one of them (or the shape) changed
        named = [f for f in (COLOUR, SIZE, CELL) if rng.random() < 0.6] or [COLOUR]
        true = _obj_atom(o, named)
        changed = list(true)
        field = rng.choice([SHAPE, *named])
        n = {SHAPE: len(SHAPES), COLOUR: len(COLOUR_NAMES), SIZE: len(SIZE_NAMES), CELL: len(CELLS)}[field]
        changed[field] = _other(
            rng, n, true[field], shapes_here if field == SHAPE else [int(p[field - 1]) for p in objs]
        )
        return true, tuple(changed)
    if kind == "count":
        # Prefer shapes drawn more than once; a colour is named 40% of the time (then only that colour counts).
        counts = {sh: shapes_here.count(sh) for sh in shapes_here}
        shape = rng.choice([sh for sh, k in counts.items() if k > 1] or list(counts))
        colour = int(rng.choice([p for p in objs if p[0] == shape])[1]) if rng.random() < 0.4 else -1
        k = sum(p[0] == shape and colour in (-1, p[1]) for p in objs)
        true = atom(COUNT, shape, colour, n=k if k > 1 else rng.choice((2, 3)))  # one is never counted in words
        r = rng.random()
        if r < 0.6:
            false = atom(COUNT, shape, colour, n=rng.choice([v for v in NUMBERS if v != true[N]]))
        elif r < 0.8 and colour >= 0:
            false = atom(COUNT, shape, _other(rng, len(COLOUR_NAMES), colour), n=true[N])
        else:
            false = atom(COUNT, _other(rng, len(SHAPES), shape, shapes_here), colour, n=true[N])
        return true, false
    # relation: two objects of different shapes (prompts give groups distinct shapes), a relation that holds
    pairs = [(a, b) for a in objs for b in objs if a[0] != b[0]]
    if not pairs:
        return concept_pair(s, "shape", rng)
    a, b = rng.choice(pairs)
    (ar, ac), (br, bc) = divmod(int(a[3]), GRID), divmod(int(b[3]), GRID)
    rel = rng.choice([i for i, ok in enumerate((ac < bc, ac > bc, ar < br, ar > br)) if ok])

    def side(o: np.ndarray, p: float) -> tuple[int, int, int]:
        return int(o[0]), int(o[1]) if rng.random() < p else -1, int(o[2]) if rng.random() < p else -1

    sa, sb = side(a, 0.15), side(b, 0.35)
    true = atom(REL, sa[0], sa[1], sa[2], rel=rel, b=sb)
    r = rng.random()
    if r < 0.35:
        false = atom(REL, sb[0], sb[1], sb[2], rel=rel, b=sa)  # swapped
    elif r < 0.65:
        false = atom(REL, *sa, rel=OPPOSITE[rel], b=sb)  # reversed
    elif r < 0.8:
        false = atom(REL, *sa, rel=rng.choice([i for i in range(4) if i != rel]), b=sb)
    elif r < 0.9:
        false = atom(REL, *sa, rel=rel, b=(sb[0], _other(rng, len(COLOUR_NAMES), int(b[1])), sb[2]))
    else:
        false = atom(REL, *sa, rel=rel, b=(_other(rng, len(SHAPES), sb[0], shapes_here), sb[1], sb[2]))
    return true, false


# ----------------------------------------------------------------------------- data


def training_scenes(seed: int, n: int) -> list[Scene]:
    """Random scenes, the prompt grammar's layouts (count groups of one colour) and scenes repeating one shape in
    mixed colours, so that counting, with and without a colour, has examples; of the corpus half only (no evaluation
    scene is trained or calibrated on)."""
    rng = random.Random(seed)
    out: list[Scene] = []
    while len(out) < n:
        r = rng.random()
        if r < 0.45:
            scene = sample_scene(rng, rng.choices((1, 2, 3, 4), (0.3, 0.3, 0.2, 0.2))[0])
        elif r < 0.75:
            scene = sample_layout(rng, rng.randint(2, MAX_OBJECTS), rare=rng.random() < 0.25, p_count=0.7).scene
        else:
            k = rng.randint(2, MAX_OBJECTS)
            shape = rng.choice(SHAPES)
            cells = rng.sample(CELLS, rng.randint(k, MAX_OBJECTS))
            objs = [random_object(rng, c) for c in cells]
            colour = rng.choice(COLOUR_NAMES)
            for i in range(k):
                o = objs[i]
                c = colour if rng.random() < 0.5 else rng.choice(COLOUR_NAMES)
                objs[i] = ObjectSpec(shape, c, o.size, o.cell, o.dx, o.dy)
            scene = Scene(tuple(objs))
        if scene.half == "corpus":
            out.append(scene)
    return out


def twin(scene: Scene, rng: random.Random) -> Scene:
    """The scene with two objects' shape, colour, size or cell swapped (the same attributes, bound otherwise), or
    with one object's changed. Beside the original in a batch it is a hard negative on the image side: without
    them, a query's best match is often a scene that has its attributes spread over several objects. Drawn again
    until it is of the corpus half (each draw is, half the time); the scene itself if 32 draws are not."""
    for _ in range(32):
        other = _changed(scene, rng)
        if other.half == "corpus":
            return other
    return scene


def _changed(scene: Scene, rng: random.Random) -> Scene:
    objs = list(scene.objects)
    if len(objs) > 1 and rng.random() < 0.5:
        i, j = rng.sample(range(len(objs)), 2)
        what = rng.choice(("shape", "colour", "size", "cell"))
        a, b = objs[i], objs[j]
        objs[i], objs[j] = replace(a, **{what: getattr(b, what)}), replace(b, **{what: getattr(a, what)})
        return Scene(tuple(objs))
    i = rng.randrange(len(objs))
    o = objs[i]
    free = [c for c in CELLS if c not in {p.cell for p in objs}]
    what = rng.choice(("shape", "colour", "size", "cell") if free else ("shape", "colour", "size"))
    if what == "shape":
        objs[i] = replace(o, shape=rng.choice([v for v in SHAPES if v != o.shape]))
    elif what == "colour":
        objs[i] = replace(o, colour=rng.choice([v for v in COLOUR_NAMES if v != o.colour]))
    elif what == "size":
        objs[i] = replace(o, size=rng.choice([v for v in SIZE_NAMES if v != o.size]))
    else:
        objs[i] = replace(o, cell=rng.choice(free))
    return Scene(tuple(objs))


def concept_rows(s: np.ndarray, rng: random.Random, pairs: int) -> tuple[list[tuple[int, ...]], list[str]]:
    """`pairs` (true, false) concept atoms about each scene of s, flattened, with each atom's kind."""
    atoms: list[tuple[int, ...]] = []
    kinds: list[str] = []
    for scene in s:
        for kind in rng.choices(CONCEPT_KINDS, KIND_WEIGHTS, k=pairs):
            atoms += concept_pair(scene, kind, rng)
            kinds += [kind, kind]
    return atoms, kinds


def clip_tokens() -> TokenCache:
    """open_clip's own tokenizer, the one a `local-dir:` model loads."""
    from open_clip.tokenizer import SimpleTokenizer

    return TokenCache(SimpleTokenizer(context_length=CONTEXT_LENGTH))


def build_model() -> open_clip.CLIP:
    model = open_clip.CLIP(**MODEL_CFG)
    # open_clip's position embedding (std width**-0.5) is drowned by the white background's patch embedding after
    # ln_pre: such a ViT does not even learn which cell a lone object is in. At unit scale it does at once.
    torch.nn.init.normal_(model.visual.positional_embedding, std=1.0)
    return model


def encode_text_short(model: open_clip.CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """encode_text on tokens cut after the batch's longest text: the causal mask makes every position up to the
    end-of-text token (where the feature is pooled) independent of the padding, so the result is the same and
    concept texts (under 20 tokens) cost a fraction of the 77-token context."""
    n = int((tokens != 0).sum(1).max())
    t = tokens[:, :n]
    x = model.token_embedding(t) + model.positional_embedding[:n]
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:n, :n]))
    return text_global_pool(x, t, model.text_pool_type) @ model.text_projection


def embed_texts(model: open_clip.CLIP, tok: TokenCache, texts: list[str]) -> torch.Tensor:
    """Normalised text features, each distinct text encoded once (a batch repeats "a circle" and the like)."""
    uniq = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    feats = F.normalize(encode_text_short(model, tok(list(uniq))), dim=-1)
    return feats[torch.tensor([uniq[t] for t in texts])]


@torch.no_grad()
def encode_images(model: open_clip.CLIP, x01: torch.Tensor, bs: int = 500) -> torch.Tensor:
    out = [F.normalize(model.encode_image(normalize_clip(x01[i : i + bs])), dim=-1) for i in range(0, len(x01), bs)]
    return torch.cat(out)


@torch.no_grad()
def encode_texts(model: open_clip.CLIP, tokens: torch.Tensor, bs: int = 500) -> torch.Tensor:
    return torch.cat(
        [F.normalize(encode_text_short(model, tokens[i : i + bs]), dim=-1) for i in range(0, len(tokens), bs)]
    )


def as01(images_u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_u8).permute(0, 3, 1, 2).float() / 255


class SigmoidHead(torch.nn.Module):
    """The sigmoid loss's global scale and bias: one cosine threshold (-bias / scale) for every concept text."""

    def __init__(self) -> None:
        super().__init__()
        self.log_scale = torch.nn.Parameter(torch.tensor(np.log(10.0), dtype=torch.float32))
        self.bias = torch.nn.Parameter(torch.tensor(-5.0))

    def forward(self, cos: torch.Tensor) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=100) * cos + self.bias


# ----------------------------------------------------------------------------- evaluation


def zero_shot_shape_accuracy(
    model: open_clip.CLIP, tok: TokenCache, scenes: list[Scene], images_u8: np.ndarray
) -> dict:
    """Each single-object image's shape read as the best of "a circle", "an arrow", ... (one per shape)."""
    model.eval()
    img = encode_images(model, as01(images_u8))
    txt = encode_texts(model, tok([_noun(k, -1, -1, -1) for k in range(len(SHAPES))]))
    pred = (img @ txt.T).argmax(1).numpy()
    truth_idx = np.array([SHAPES.index(sc.objects[0].shape) for sc in scenes])
    per = {
        s: round(float((pred[truth_idx == k] == k).mean()), 4) for k, s in enumerate(SHAPES) if (truth_idx == k).any()
    }
    return {"overall": round(float((pred == truth_idx).mean()), 4), "per_shape": per}


def judge_scores(
    model: open_clip.CLIP, tok: TokenCache, scenes: list[Scene], seed: int, pairs: int = 6, blur: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cosine, truth and kind of concept texts (true ones and their one-change negatives) on each scene's image."""
    rng = random.Random(seed)
    s = scene_array(scenes)
    x = as01(render_array(scenes))
    if blur:
        x = augment(x, torch.Generator().manual_seed(seed), p_blur=1.0, noise=0.02)
    img = encode_images(model, x)
    rows, kinds = concept_rows(s, rng, pairs)
    texts, arr = texts_of([[a] for a in rows])
    owner = np.repeat(np.arange(len(s)), 2 * pairs)
    labels = truth(s[owner], arr)
    cos = (encode_texts(model, tok(texts)) * img[torch.from_numpy(owner)]).sum(1).numpy()
    return cos, labels, np.array(kinds)


def retrieval_eval(model: open_clip.CLIP, tok: TokenCache, seed: int, n: int = 20_000) -> tuple[dict, float, float]:
    """Object-caption queries against a corpus drawn by corpus_scenes(n, seed): precision@1 (the top image has an
    object with every named attribute) and the threshold that tells a best match of a query whose concept the corpus
    holds from the best match among images that lack the query's shape."""
    rng = random.Random(seed)
    corpus = corpus_scenes(n, seed=seed)
    s = scene_array(corpus)
    cemb = encode_images(model, as01(render_array(corpus)))
    rows = []
    for k in range(len(SHAPES)):
        rows.append((_obj_atom(np.array([k, 0, 0, 0]), ()), "shape"))
        for _ in range(6):
            o = np.array(
                [k, rng.randrange(len(COLOUR_NAMES)), rng.randrange(len(SIZE_NAMES)), rng.randrange(len(CELLS))]
            )
            for named, what in (((COLOUR,), "colour"), ((SIZE,), "size"), ((CELL,), "position")):
                rows.append((_obj_atom(o, named), what))
            rows.append((_obj_atom(o, (COLOUR, SIZE)), "object"))
            rows.append((_obj_atom(o, (COLOUR, SIZE, CELL)), "object"))
    texts, arr = texts_of([[a] for a, _ in rows])
    sims = encode_texts(model, tok(texts)) @ cemb.T
    top = sims.argmax(1).numpy()
    hits = truth(s[top], arr)
    rare = np.array([SHAPES[a[SHAPE]] in RARE_SHAPES for a, _ in rows])
    has_shape = s[:, :, 0][None, :, :] == arr[:, 0, SHAPE][:, None, None]
    lacking = torch.from_numpy(~has_shape.any(-1))
    best = sims.max(1).values.numpy()
    best_without = sims.masked_fill(~lacking, -2).max(1).values.numpy()
    t, ba = best_threshold(best[hits], best_without)
    kinds = np.array([k for _, k in rows])
    figures = {
        "precision_at_1": round(float(hits.mean()), 4),
        "precision_at_1_rare": round(float(hits[rare].mean()), 4),
        "precision_at_1_by_kind": {k: round(float(hits[kinds == k].mean()), 4) for k in dict.fromkeys(kinds)},
        "n_queries": len(rows),
        "corpus_size": n,
        "min_similarity_balanced_accuracy": round(ba, 4),
    }
    return figures, t, ba


def calibrate(model: open_clip.CLIP, tok: TokenCache, seed: int = SEED_EVAL) -> dict:
    """judge_threshold: the cosine that best separates true from false concept texts (balanced accuracy) on held-out
    rendered scenes, also reported per concept kind and on blurred images (a stand-in for generated ones).
    retrieval_min_similarity: see retrieval_eval."""
    model.eval()
    scenes = training_scenes(seed, 1500)
    cos, labels, kinds = judge_scores(model, tok, scenes, seed)
    t, ba = best_threshold(cos[labels], cos[~labels])

    def bacc(c: np.ndarray, y: np.ndarray) -> float:
        return round(0.5 * float((c[y] >= t).mean() + (c[~y] < t).mean()), 4)

    per_kind = {k: bacc(cos[kinds == k], labels[kinds == k]) for k in CONCEPT_KINDS}
    bcos, blabels, _ = judge_scores(model, tok, scenes, seed, blur=True)
    retrieval, rt, _ = retrieval_eval(model, tok, seed + 7)
    return {
        "judge_threshold": round(t, 4),
        "judge_balanced_accuracy": round(ba, 4),
        "judge_balanced_accuracy_by_kind": per_kind,
        "judge_balanced_accuracy_blurred": bacc(bcos, blabels),
        "n_judge_pairs": [int(labels.sum()), int((~labels).sum())],
        "retrieval_min_similarity": round(rt, 4),
        "retrieval": retrieval,
    }


# ----------------------------------------------------------------------------- training


def save(model: open_clip.CLIP, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(out_dir / "open_clip_model.safetensors"))
    (out_dir / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG}, indent=2)
    )


def train(
    out_dir: Path = MODELS_DIR / "clip", steps: int = 2400, batch: int = 64, pairs: int = 4, log: Log = print
) -> dict:
    """`batch` images a step (half of them twins of the others), each with one caption (contrastive loss) and `pairs`
    true/false concept pairs (sigmoid loss against every image of the batch)."""
    seed_everything(SEED_CLIP, threads=1)
    t0 = time.time()
    pool = Pool(training_scenes(SEED_CLIP, 40_000))
    arr = scene_array(pool.scenes)
    log(f"[clip] pool rendered in {time.time() - t0:.1f}s")
    model, head, tok = build_model(), SigmoidHead(), clip_tokens()
    gen = torch.Generator().manual_seed(SEED_CLIP)
    rng = random.Random(SEED_CLIP)

    def step_fn(step: int) -> tuple[torch.Tensor, str]:
        idx = [rng.randrange(len(pool)) for _ in range(batch - batch // 2)]
        twins = [twin(pool.scenes[i], rng) for i in idx[: batch // 2]]
        s = np.concatenate([arr[idx], scene_array(twins)])
        x01 = torch.cat([pool.batch01(idx), as01(render_array(twins))])
        img = F.normalize(model.encode_image(normalize_clip(augment(x01, gen))), dim=-1)

        cap_texts, cap_atoms = texts_of([caption_atoms(sc, rng) for sc in s])
        target = torch.from_numpy(truth(s[:, None], cap_atoms[None])).float()
        logits = model.logit_scale.exp().clamp(max=100) * img @ embed_texts(model, tok, cap_texts).T
        loss_i = -(target / target.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1).mean()
        loss_t = -(target / target.sum(0, keepdim=True) * F.log_softmax(logits, 0)).sum(0).mean()

        rows, _ = concept_rows(s, rng, pairs)
        con_texts, con_atoms = texts_of([[a] for a in rows])
        label = torch.from_numpy(truth(s[:, None], con_atoms[None]))
        z = head(img @ embed_texts(model, tok, con_texts).T)
        own = torch.zeros_like(label)
        own[torch.arange(batch).repeat_interleave(2 * pairs), torch.arange(len(rows))] = True
        # Positives and own-image (hard) negatives weigh fully; other images' (mostly easy) negatives half.
        pos = F.softplus(-z[label]).mean()
        hard = F.softplus(z[own & ~label]).mean()
        easy = F.softplus(z[~own & ~label]).mean()
        loss_sig = pos + hard + 0.5 * easy
        with torch.no_grad():
            acc = ((z > 0) == label)[own].float().mean().item()
        return 0.5 * (loss_i + loss_t) + loss_sig, f"clip {0.5 * (loss_i + loss_t).item():.3f} own-acc {acc:.3f}"

    model.train()
    seconds = fit(
        [*model.parameters(), *head.parameters()],
        steps,
        step_fn,
        log,
        tag="clip",
        lr=1e-3,
        weight_decay=0.05,
        every=100,
        max_grad_norm=1.0,
        checkpoint=CHECKPOINTS_DIR / "clip.pt",
        modules=[model, head],
        rngs=[rng, gen],
    )
    save(model, out_dir)
    # Measure the shipped files through the real loader.
    loaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out_dir.resolve()}")
    ev = sample_scenes(SEED_EVAL + 1, 1200, weights=(1.0,))
    zs = zero_shot_shape_accuracy(loaded, tok, ev, render_array(ev))
    cal = calibrate(loaded, tok)
    (out_dir / "calibration.json").write_text(
        json.dumps(
            {
                "judge_threshold": cal["judge_threshold"],
                "retrieval_min_similarity": cal["retrieval_min_similarity"],
                "details": cal,
            },
            indent=2,
        )
    )
    log(f"[clip] zero-shot {zs}")
    log(f"[clip] calibration {json.dumps(cal)}")
    return {
        "seconds": round(time.time() - t0, 1),
        "train_seconds": round(seconds, 1),
        "steps": steps,
        "zero_shot": zs,
        "calibration": cal,
        "retrieval": cal["retrieval"],
    }


if __name__ == "__main__":
    import sys

    train(steps=int(sys.argv[1]) if len(sys.argv) > 1 else 2400)
