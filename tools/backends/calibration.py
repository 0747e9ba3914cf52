"""Choose the CLIP judge and retrieval thresholds on the user's own collection (`imagerag calibrate`).

A cosine threshold only means something for one embedding model and one kind of image, so the profile's defaults
are starting points; this measures them on the images and captions already indexed (no image is embedded again).

Method: the captioned images are split in two halves by a seeded shuffle. In each half, a positive pair is an image
with its own caption; a negative pair is the image with another caption of the same half whose text differs (a
collection often holds near-duplicate captions, and an identical string is not a negative). The threshold that
maximises balanced accuracy on the first half is chosen and checked on the second, whose images and captions took
no part in the choice.

Corpus images stand in for generated ones, and the stand-in is imperfect: on the miniature world the held-out
balanced accuracy is 0.996, while the judge at that threshold agrees with the world's oracle on generated images at
0.87 (blurrier images, lower similarities; tests/test_calibration.py).

The file lands at `calibration_path(data_dir, collection)`, `<data_dir>/calibration/<collection>.json`, and
`read_calibration` gives it back only for the embedding model it was measured with.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from imagerag.tools.backends.clip import EmbeddingModelInfo
from imagerag.tools.backends.store import ReferenceStore
from imagerag.tools.errors import ImageRAGError
from imagerag.tools.files import atomic_write

log = logging.getLogger(__name__)

CALIBRATION_DIR = "calibration"  # below a data folder: one <collection>.json per calibrated collection
_TEXT_BATCH = 256  # captions per text-encoder forward: bounds memory on a large collection
_GET_BATCH = 1000  # rows per chromadb get: SQLite caps the variables of one query


class CalibrationError(ImageRAGError):
    """A collection that cannot be calibrated; the message says why and what to do."""


class ThresholdCheck(BaseModel):
    """One threshold and the evidence for it: balanced accuracy where it was chosen and where it was checked."""

    threshold: float
    balanced_accuracy_choosing: float
    balanced_accuracy_held_out: float
    true_positive_rate_held_out: float
    true_negative_rate_held_out: float


class Calibration(BaseModel):
    """What `imagerag calibrate` writes; `loading.calibrated()` reads the first two fields, the rest is evidence."""

    judge_threshold: float = Field(description="Cosine at which the CLIP judge accepts a concept.")
    retrieval_min_similarity: float = Field(description="Cosine below which a retrieval hit is dropped.")
    collection: str
    embedding_model: EmbeddingModelInfo
    seed: int
    images_choosing: int
    images_held_out: int
    images_without_caption: int = Field(description="Sampled images with an empty caption: left out.")
    negatives_per_image: int
    pairs_choosing: tuple[int, int] = Field(description="(positive, negative) pairs of the choosing half.")
    pairs_held_out: tuple[int, int] = Field(description="(positive, negative) pairs of the held-out half.")
    judge: ThresholdCheck
    retrieval: ThresholdCheck
    method: str = (
        "full captions; positives: image with its own caption; negatives: image with other captions (different "
        "text) of the same half; threshold maximising balanced accuracy on one half (plateau midpoint), checked on "
        "the other"
    )


def balanced_accuracy(positives: np.ndarray, negatives: np.ndarray, threshold: float) -> tuple[float, float, float]:
    """(balanced accuracy, true positive rate, true negative rate) of accepting a score >= `threshold`."""
    tpr = float(np.mean(positives >= threshold))
    tnr = float(np.mean(negatives < threshold))
    return 0.5 * (tpr + tnr), tpr, tnr


def best_threshold(positives: np.ndarray, negatives: np.ndarray) -> tuple[float, float]:
    """The threshold (accept score >= t) that maximises balanced accuracy, and that accuracy.

    Every threshold between two neighbouring observed scores decides alike, so the sweep tries one interval per
    gap. Several neighbouring gaps can tie at the best accuracy (a plateau); the answer is the midpoint of the widest
    best plateau (the lowest of equally wide ones), so the threshold keeps the largest margin from the scores on
    either side instead of sitting on one of them.
    """
    pos = np.asarray(positives, np.float64).ravel()
    neg = np.asarray(negatives, np.float64).ravel()
    if not (len(pos) and len(neg)):
        raise CalibrationError(f"a threshold needs positive and negative scores, got {len(pos)} and {len(neg)}")
    values = np.unique(np.concatenate([pos, neg]))
    if len(values) == 1:
        return float(values[0]), 0.5
    # Gap k (1..m-1) is (values[k-1], values[k]]: a threshold there accepts exactly the scores >= values[k].
    above = values[1:]
    tpr = 1.0 - np.searchsorted(np.sort(pos), above, side="left") / len(pos)
    tnr = np.searchsorted(np.sort(neg), above, side="left") / len(neg)
    accuracy = 0.5 * (tpr + tnr)
    best = float(accuracy.max())
    winners = np.flatnonzero(np.isclose(accuracy, best, rtol=0.0, atol=1e-12))
    # Runs of neighbouring winning gaps; run [a, b] spans values[a] .. values[b + 1].
    breaks = np.flatnonzero(np.diff(winners) > 1)
    starts = np.concatenate([winners[:1], winners[breaks + 1]])
    ends = np.concatenate([winners[breaks], winners[-1:]])
    widths = values[ends + 1] - values[starts]
    run = int(np.argmax(widths))  # argmax: the first (lowest) of equally wide runs
    return float(0.5 * (values[starts[run]] + values[ends[run] + 1])), best


def _captioned_sample(store: ReferenceStore, seed: int, max_images: int | None) -> tuple[np.ndarray, list[str], int]:
    """Embeddings and captions of a seeded sample of the collection, in shuffled order; and how many sampled images
    had no caption. Ids are sorted before the shuffle, so the sample does not depend on the database's order."""
    ids = sorted(store.collection.get(include=[])["ids"])
    order = np.random.default_rng(seed).permutation(len(ids))
    chosen = [ids[i] for i in order[: max_images if max_images is not None else len(ids)]]
    by_id: dict[str, tuple[np.ndarray, str]] = {}
    for start in range(0, len(chosen), _GET_BATCH):
        got = store.collection.get(ids=chosen[start : start + _GET_BATCH], include=["embeddings", "documents"])
        for image_id, vector, doc in zip(got["ids"], got["embeddings"], got["documents"], strict=True):
            by_id[image_id] = (np.asarray(vector, np.float32), (doc or "").strip())
    kept = [by_id[i] for i in chosen if i in by_id and by_id[i][1]]
    if not kept:
        return np.zeros((0, store.embedder.info.dim), np.float32), [], len(chosen)
    vectors = np.stack([v for v, _ in kept])
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)  # stored normalised; be sure
    return vectors, [c for _, c in kept], len(chosen) - len(kept)


def _pair_scores(
    images: np.ndarray, captions: list[str], store: ReferenceStore, rng: np.random.Generator, negatives: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cosines of each image with its own caption and with up to `negatives` other captions of the same half
    (distinct strings that differ from its own), drawn uniformly."""
    texts = sorted(set(captions))
    index = {t: i for i, t in enumerate(texts)}
    text_vectors = np.concatenate(
        [store.embedder.embed_texts(texts[s : s + _TEXT_BATCH]) for s in range(0, len(texts), _TEXT_BATCH)]
    ).astype(np.float32)
    own = np.array([index[c] for c in captions])
    positives = np.einsum("ij,ij->i", images, text_vectors[own])
    k = min(negatives, len(texts) - 1)
    if k <= 0:
        return positives, np.zeros(0, np.float32)
    draws = np.stack([rng.choice(len(texts) - 1, size=k, replace=False) for _ in own])
    draws += draws >= own[:, None]  # skip the image's own caption
    negative_scores = np.einsum("ij,ikj->ik", images, text_vectors[draws]).ravel()
    return positives, negative_scores


def calibrate(
    store: ReferenceStore, *, seed: int = 0, max_images: int | None = 2000, negatives_per_image: int = 4
) -> Calibration:
    """Choose the judge and retrieval thresholds on half of `store`'s captioned images and check them on the other.

    Both thresholds come from the same pairs, so they are equal: a cosine is symmetric, and a caption used as a
    query against an image (retrieval) scores exactly what the judge scores for that image and caption. They stay
    two fields because the profile carries both and either may be set apart by hand. What these pairs do not
    model is a concept the collection lacks: its best hit is a near miss, not a random image, and scores higher
    than these negatives (on the miniature world, heart captions against a corpus without hearts score 0.53-0.60,
    above the 0.47 chosen here). A stricter retrieval minimum from the best match with and without the concept
    was tried and reached only 0.85-0.91 balanced accuracy on the held-out half, so the simpler rule stands; raise
    `retrieval_min_similarity` by hand when an unrelated reference costs more than none. `max_images` bounds the
    work on a large collection (a seeded sample); None uses every image.
    """
    if negatives_per_image < 1:
        raise CalibrationError(f"negatives_per_image must be at least 1, got {negatives_per_image}")
    name = store.collection.name
    vectors, captions, uncaptioned = _captioned_sample(store, seed, max_images)
    if len(captions) < 4 or len(set(captions)) < 2:
        raise CalibrationError(
            f"collection {name!r} has {len(captions)} captioned image(s) with {len(set(captions))} distinct "
            "caption(s) in the sample: calibration needs at least 4 images and 2 different captions (index images "
            "with caption sidecars, e.g. photo.jpg + photo.txt)"
        )
    half = (len(captions) + 1) // 2
    rng = np.random.default_rng(seed)
    pos_a, neg_a = _pair_scores(vectors[:half], captions[:half], store, rng, negatives_per_image)
    pos_b, neg_b = _pair_scores(vectors[half:], captions[half:], store, rng, negatives_per_image)
    if not (len(neg_a) and len(neg_b)):
        raise CalibrationError(
            f"collection {name!r}: a half of the sample holds a single distinct caption, so there is no negative "
            "pair; calibrate on a collection with varied captions"
        )
    threshold, accuracy_a = best_threshold(pos_a, neg_a)
    accuracy_b, tpr_b, tnr_b = balanced_accuracy(pos_b, neg_b, threshold)
    check = ThresholdCheck(
        threshold=round(threshold, 4),
        balanced_accuracy_choosing=round(accuracy_a, 4),
        balanced_accuracy_held_out=round(accuracy_b, 4),
        true_positive_rate_held_out=round(tpr_b, 4),
        true_negative_rate_held_out=round(tnr_b, 4),
    )
    log.info("calibrated %r: threshold %.4f, balanced accuracy %.4f held out", name, threshold, accuracy_b)
    return Calibration(
        judge_threshold=check.threshold,
        retrieval_min_similarity=check.threshold,
        collection=name,
        embedding_model=store.embedder.info,
        seed=seed,
        images_choosing=half,
        images_held_out=len(captions) - half,
        images_without_caption=uncaptioned,
        negatives_per_image=negatives_per_image,
        pairs_choosing=(len(pos_a), len(neg_a)),
        pairs_held_out=(len(pos_b), len(neg_b)),
        judge=check,
        retrieval=check,
    )


def calibration_path(data_dir: Path, collection: str) -> Path:
    """Where the calibration of `collection` lives: `<data_dir>/calibration/<collection>.json` (chromadb names are
    3-512 characters of [a-zA-Z0-9._-], so a name is a safe file name)."""
    return Path(data_dir) / CALIBRATION_DIR / f"{collection}.json"


def write_calibration(calibration: Calibration, path: Path) -> Path:
    """Write `calibration` as JSON atomically (a reader never sees half a file); returns `path`."""
    return atomic_write(Path(path), calibration.model_dump_json(indent=2) + "\n")


def read_calibration(path: Path, model: EmbeddingModelInfo) -> Calibration | None:
    """The calibration at `path` when it exists, parses and was measured with `model`; else None (logged when the
    file is there but unusable), so a stale or foreign file falls back to the profile's thresholds."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        calibration = Calibration.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, ValidationError) as error:
        log.warning("ignoring calibration file %s: %s", path, error)
        return None
    if calibration.embedding_model != model:
        log.warning(
            "ignoring calibration file %s: measured with %s (%s), the collection is searched with %s (%s); run "
            "`imagerag calibrate` again",
            path,
            calibration.embedding_model.name,
            calibration.embedding_model.pretrained,
            model.name,
            model.pretrained,
        )
        return None
    return calibration
