"""Build the backends a profile names, once per process.

Model references are Hub ids, local folders, or two local schemes:
- `tiny:NAME`: a folder of tiny random models built offline on first use under the data folder;
- `mini:NAME`: a model of the miniature world shipped in tools/miniworld/models.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from imagerag.tools.backends.calibration import calibration_path, read_calibration
from imagerag.tools.backends.clip import LOCAL_DIR, ClipEmbedder
from imagerag.tools.backends.diffusion import DiffusersGenerator, pick_device
from imagerag.tools.backends.judges import ClipJudge, VLMJudge
from imagerag.tools.backends.llm import make_chat_model
from imagerag.tools.backends.planner import LLMDecomposer, RuleDecomposer
from imagerag.tools.backends.store import ReferenceStore, StoreError, chroma_client
from imagerag.tools.config import MINI_COLLECTION, PROFILES, BackendConfig, ClipSpec, ConfigError, Offload
from imagerag.tools.miniworld import MODELS_DIR
from imagerag.tools.toolkit import Backends

if TYPE_CHECKING:
    from imagerag.tools.backends.footprint import Footprint

log = logging.getLogger(__name__)


class CorpusSize(TypedDict):
    """Keyword arguments of tools.miniworld.world.write_corpus that fix a corpus."""

    n: int
    seed: int


MINI_CORPUS: CorpusSize = {"n": 20_000, "seed": 1}  # the mini profile's retrieval corpus, rendered on first use
_loading = threading.Lock()
_loaded: dict[str, Backends] = {}


def resolve(ref: str, data_dir: Path) -> str:
    """Turn a `tiny:`/`mini:` reference into a local folder path; other references pass through."""
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
    (stage, done, total) to `on_progress`; any other profile needs `imagerag index` first."""
    client = chroma_client(config.data_dir, config.chroma_url)
    embedder = load_embedder(config)
    profile = config.resolved_profile()
    own = profile.local and config.collection_name == profile.collection
    try:
        store = ReferenceStore.open(client, config.collection_name, embedder)
    except StoreError:
        if not own:
            raise
        if config.collection_name in {getattr(c, "name", c) for c in client.list_collections()}:
            # Embedded with an earlier version of the profile's own CLIP: derived data, so it is built again.
            log.warning("re-indexing %s: it was embedded with another version of its CLIP", config.collection_name)
            client.delete_collection(config.collection_name)
    else:
        if own and store.roots is None:  # built before collections recorded their folders: record them once
            from imagerag.tools.backends.indexer import index_folders

            index_folders(store, [build_local_corpus(profile.collection, Path(config.data_dir))])
        return store
    from imagerag.tools.backends.indexer import index_folders

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
    folder = data_dir / f"{collection}-corpus"
    done = folder / ".complete"
    if done.exists():
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
    embedder = load_embedder(config)
    store = open_store(config)  # a missing collection fails in seconds, before the generator loads for minutes
    llm = make_chat_model(config.llm)
    retries = config.llm.max_retries
    return Backends(
        profile=profile,
        generator=_generator(
            profile.name, Path(config.data_dir), pick_device(config.device), config.offload, config.compile
        ),
        critic=VLMJudge(llm, retries) if llm else ClipJudge(embedder, clip.judge_threshold),
        store=store,
        decomposer=LLMDecomposer(llm, retries) if llm else RuleDecomposer(),
        llm=llm,
        min_similarity=clip.retrieval_min_similarity,
    )


@cache
def _generator(profile_name: str, data_dir: Path, device: str, offload: Offload, compile: bool) -> DiffusersGenerator:
    spec = PROFILES[profile_name].generator
    adapter = resolve(spec.ip_adapter.repo, data_dir) if spec.ip_adapter else None
    log.info("loading %s generator %s on %s", spec.family, spec.model_id, device)
    model = resolve(spec.model_id, data_dir)
    return DiffusersGenerator.from_pretrained(spec, model, adapter, device, offload, compile)


def profile_footprint(config: BackendConfig) -> Footprint:
    """Parameters and weight memory of the profile's generator, from local or cached weights (never downloaded;
    a tiny profile's models are built first)."""
    from imagerag.tools.backends.footprint import footprint

    spec = config.resolved_profile().generator
    data_dir = Path(config.data_dir)
    adapter = resolve(spec.ip_adapter.repo, data_dir) if spec.ip_adapter else None
    return footprint(config.resolved_profile(), resolve(spec.model_id, data_dir), adapter)
