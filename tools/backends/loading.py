"""Build the backends a profile names (through the registries of tools.registry), once per process.

Model references are Hub ids, local folders, or two local schemes:
- `tiny:NAME`: a folder of tiny random models built offline on first use under the data folder;
- `mini:NAME`: a model of the miniature world shipped in tools/miniworld/models.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from langchain_core.language_models import BaseChatModel

from imagerag.tools.backends.calibration import calibration_path, read_calibration
from imagerag.tools.backends.clip import LOCAL_DIR, ClipEmbedder
from imagerag.tools.backends.diffusion import Generator, pick_device
from imagerag.tools.backends.judges import Critic, Locator
from imagerag.tools.backends.llm import make_chat_model
from imagerag.tools.backends.planner import Decomposer
from imagerag.tools.backends.registries import CRITICS, DECOMPOSERS, GENERATORS, BackendParts
from imagerag.tools.backends.store import ReferenceStore, Reranker, StoreError, chroma_client
from imagerag.tools.config import PROFILES, BackendConfig, ClipSpec, Offload, Profile
from imagerag.tools.errors import ConfigError
from imagerag.tools.miniworld import MODELS_DIR
from imagerag.tools.profiles import MINI_COLLECTION
from imagerag.tools.types import RetrievalHit

if TYPE_CHECKING:
    from imagerag.tools.backends.footprint import Footprint

log = logging.getLogger(__name__)


def critic_reranker(critic: Critic, decomposer: Decomposer) -> Reranker:
    """Hits ordered by how many of the caption's concepts the critic sees in each image, then by its mean score,
    then by CLIP's similarity: one cosine over the whole image cannot tell where an object is or which object has a
    colour, the critic's per-concept (and, offline, per-cell) reading can. Each hit gets the box where the critic
    found the caption's (first) object, so that the generator can be handed that object rather than the scene."""

    def rerank(caption: str, hits: list[RetrievalHit]) -> list[RetrievalHit]:
        concepts, _ = decomposer.decompose(caption)
        objects = {c.id for c in concepts if c.kind == "object"}
        judged = []
        for hit in hits:
            verdicts = critic.critique(ReferenceStore.load_image(hit), concepts, caption).verdicts
            box = next((v.box for v in verdicts if v.concept_id in objects and v.satisfied and v.box), None)
            key = sum(v.satisfied for v in verdicts), sum(v.score for v in verdicts) / len(verdicts), hit.similarity
            judged.append((key, hit.model_copy(update={"box": box})))
        return [hit for _, hit in sorted(judged, key=lambda pair: pair[0], reverse=True)]

    return rerank


@dataclass
class Backends:
    """Heavy objects, built once per process (tools.backends.loading) and shared by every run."""

    profile: Profile
    generator: Generator
    critic: Critic
    store: ReferenceStore
    decomposer: Decomposer
    llm: BaseChatModel | None
    min_similarity: float
    reranker: Reranker | None = None  # orders the nearest `profile.rerank_k` hits of a retrieval; None: CLIP's order
    locator: Locator | None = None  # locates each hit's object when no reranker does (profile.detector)


class CorpusSize(TypedDict):
    """Keyword arguments of tools.miniworld.world.write_corpus that fix a corpus."""

    n: int
    seed: int


MINI_CORPUS: CorpusSize = {"n": 20_000, "seed": 1}  # the mini profile's retrieval corpus, rendered on first use
_loading = threading.Lock()
_loaded: dict[str, Backends] = {}


def resolve(ref: str, data_dir: Path) -> str:
    """Turn a `tiny:`/`mini:` reference into a local folder path; other references pass through."""
    if ref == "tiny:owlv2":  # built apart from the others: only profiles that locate with a detector need it
        from imagerag.tools.backends.tiny import build_tiny_owlv2

        return str(build_tiny_owlv2(Path(data_dir) / "tiny-owlv2"))
    if ref.startswith("tiny:"):
        from imagerag.tools.backends.tiny import build_tiny_models

        return str(build_tiny_models(Path(data_dir) / "tiny-models") / ref.removeprefix("tiny:"))
    if ref.startswith("mini:"):
        path = MODELS_DIR / ref.removeprefix("mini:")
        if not path.exists():
            raise ConfigError(
                f"the miniature world's model {path} is missing: train it with `python -m imagerag.evals.miniworld.train`"
            )
        return str(path)
    return ref


def load_embedder(config: BackendConfig) -> ClipEmbedder:
    clip = config.resolved_profile().clip
    model = clip.model
    if model.startswith(("tiny:", "mini:")):
        model = LOCAL_DIR + resolve(model, config.data_dir)
    return _embedder(model, clip.pretrained, pick_device(config.device))


@cache
def _embedder(model: str, pretrained: str | None, device: str) -> ClipEmbedder:
    return ClipEmbedder.from_pretrained(model, pretrained, device)


def calibrated(config: BackendConfig) -> ClipSpec:
    """The profile's CLIP spec with measured thresholds: `imagerag calibrate`'s for the active collection when it
    measured them with this embedding model (calibration_path), else the profile's calibration file's, else its own."""
    clip = config.resolved_profile().clip
    path = calibration_path(Path(config.data_dir), config.collection_name)
    own = read_calibration(path, load_embedder(config).info) if path.is_file() else None
    if own is not None:
        measured = own.model_dump()
    elif clip.calibration is not None:
        measured = json.loads(Path(resolve(clip.calibration, config.data_dir)).read_text())
    else:
        return clip
    return clip.model_copy(update={k: measured[k] for k in ("judge_threshold", "retrieval_min_similarity")})


def open_store(
    config: BackendConfig, on_progress: Callable[[str, int, int | None], None] | None = None
) -> ReferenceStore:
    """The profile's reference collection. A local profile (mini, tiny) builds its own on first use, reporting
    (stage, done, total) to `on_progress`; any other profile needs `imagerag index` first. The build holds the data
    folder's writer lock (store.writer_lock), so a second process starting at once waits and then finds it built."""
    from imagerag.tools.backends.indexer import index_folders
    from imagerag.tools.backends.store import writer_lock

    client = chroma_client(config.data_dir, config.chroma_url)
    embedder = load_embedder(config)
    profile = config.resolved_profile()
    own = profile.local and config.collection_name == profile.collection
    try:
        store = ReferenceStore.open(client, config.collection_name, embedder)
    except StoreError:
        if not own:
            raise
    else:
        if not own or store.roots is not None:
            return store
    with writer_lock(config.data_dir, config.chroma_url):
        try:  # again, holding the lock: the process this one waited for may have built it meanwhile
            store = ReferenceStore.open(client, config.collection_name, embedder)
        except StoreError:
            if config.collection_name in {getattr(c, "name", c) for c in client.list_collections()}:
                # Embedded with an earlier version of the profile's own CLIP: derived data, so it is built again.
                log.warning("re-indexing %s: it was embedded with another version of its CLIP", config.collection_name)
                client.delete_collection(config.collection_name)
        else:
            if store.roots is None:  # built before collections recorded their folders: record them once
                index_folders(store, [build_local_corpus(profile.collection, Path(config.data_dir))])
            return store
        corpus = build_local_corpus(profile.collection, Path(config.data_dir), on_progress)
        store = ReferenceStore.open(client, config.collection_name, embedder, create=True)
        total = len(list(corpus.glob("*.png")))
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if on_progress:
                on_progress("indexing", done, total)

        index_folders(store, [corpus], on_batch=advance)
        return store


def build_local_corpus(
    collection: str, data_dir: Path, on_progress: Callable[[str, int, int | None], None] | None = None
) -> Path:
    """Render a local profile's collection of reference images with captions into the data folder (once; a
    finished corpus is marked complete, so an interrupted one is rendered again). Profiles that share a
    collection (tiny, tiny-sdxl, tiny-omnigen) share its corpus."""
    from imagerag.tools.backends.store import writer_lock

    folder = data_dir / f"{collection}-corpus"
    done = folder / ".complete"
    if done.exists():
        return folder
    with writer_lock(data_dir):  # one renderer at a time (re-entrant under open_store's hold)
        if done.exists():  # rendered by the process this one waited for
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        if collection == MINI_COLLECTION:
            from imagerag.tools.miniworld.world import write_corpus

            write_corpus(
                folder, **MINI_CORPUS, on_image=(lambda i, n: on_progress("rendering", i, n)) if on_progress else None
            )
        else:  # tiny: plain colour squares are all its random models can be asked about
            from PIL import Image

            for colour in ("red", "green", "blue", "yellow", "purple", "orange", "black", "white"):
                Image.new("RGB", (32, 32), colour).save(folder / f"{colour}.png")
                (folder / f"{colour}.txt").write_text(f"a {colour} square\n")
        done.touch()
    return folder


def load_backends(config: BackendConfig) -> Backends:
    """The backends for `config`, loaded once per process and shared by every run with the same backend settings."""
    key = config.backend_key()
    with _loading:  # two first runs at once load the models once
        if key not in _loaded:
            _loaded[key] = _build(config)
        return _loaded[key]


def _build(config: BackendConfig) -> Backends:
    profile = config.resolved_profile()
    clip = calibrated(config)
    store = open_store(config)  # a missing collection fails in seconds, before the generator loads for minutes
    llm = make_chat_model(config.llm)
    parts = BackendParts(profile, clip, load_embedder(config), llm, config.llm.max_retries, Path(config.data_dir))
    critic = CRITICS[profile.critic or ("vlm" if llm else "clip")](parts)
    decomposer = DECOMPOSERS[profile.decomposer or ("llm" if llm else "rules")](parts)
    return Backends(
        profile=profile,
        generator=_generator(
            profile.name, Path(config.data_dir), pick_device(config.device), config.offload, config.compile
        ),
        critic=critic,
        store=store,
        decomposer=decomposer,
        llm=llm,
        min_similarity=clip.retrieval_min_similarity,
        # The profile's critic re-ranks retrieval (how many of a caption's concepts it sees in each hit).
        reranker=critic_reranker(critic, decomposer) if profile.rerank_k else None,
        locator=_detector(profile, Path(config.data_dir), pick_device(config.device)),
    )


def _detector(profile: Profile, data_dir: Path, device: str) -> Locator | None:
    if profile.detector is None or profile.rerank_k:  # the critic's re-ranking locates already
        return None
    from imagerag.tools.backends.detector import OwlDetector

    return OwlDetector.from_pretrained(resolve(profile.detector, data_dir), device)


@cache
def _generator(profile_name: str, data_dir: Path, device: str, offload: Offload, compile: bool) -> Generator:
    spec = PROFILES[profile_name].generator
    family = GENERATORS[spec.family]  # an unknown family fails before any weight is read
    adapter = resolve(spec.ip_adapter.repo, data_dir) if spec.ip_adapter else None
    log.info("loading %s generator %s on %s", spec.family, spec.model_id, device)
    return family.from_pretrained(spec, resolve(spec.model_id, data_dir), adapter, device, offload, compile)


def profile_footprint(config: BackendConfig) -> Footprint:
    """Parameters and weight memory of the profile's generator, from local or cached weights (never downloaded;
    a tiny profile's models are built first)."""
    from imagerag.tools.backends.footprint import footprint

    spec = config.resolved_profile().generator
    data_dir = Path(config.data_dir)
    adapter = resolve(spec.ip_adapter.repo, data_dir) if spec.ip_adapter else None
    return footprint(config.resolved_profile(), resolve(spec.model_id, data_dir), adapter)
