"""Build the backends a profile names, once per process.

Model references are Hub ids, local folders, or two local schemes:
- `tiny:NAME`: a folder of tiny random models built offline on first use under the data folder;
- `mini:NAME`: a model of the miniature world shipped in evals/miniworld/models.
"""

from __future__ import annotations

import json
import logging
from functools import cache
from pathlib import Path

from agent.config import ClipSpec, ConfigError, Settings
from tools.backends.clip import LOCAL_DIR, ClipEmbedder
from tools.backends.diffusion import DiffusersGenerator, pick_device
from tools.backends.judges import ClipJudge, VLMJudge
from tools.backends.llm import make_chat_model
from tools.backends.planner import LLMDecomposer, RuleDecomposer
from tools.backends.store import ReferenceStore, chroma_client
from tools.toolkit import Backends

log = logging.getLogger(__name__)
MINI_MODELS = Path(__file__).resolve().parents[2] / "evals" / "miniworld" / "models"


def resolve(ref: str, data_dir: Path) -> str:
    """Turn a `tiny:`/`mini:` reference into a local folder path; other references pass through."""
    if ref.startswith("tiny:"):
        from tools.backends.tiny import build_tiny_models

        return str(build_tiny_models(Path(data_dir) / "tiny-models") / ref.removeprefix("tiny:"))
    if ref.startswith("mini:"):
        path = MINI_MODELS / ref.removeprefix("mini:")
        if not path.exists():
            raise ConfigError(f"the miniature world's model {path} is missing: train it with `python -m evals.miniworld.train`")
        return str(path)
    return ref


def load_embedder(settings: Settings) -> ClipEmbedder:
    clip = settings.resolved_profile().clip
    model = clip.model
    if model.startswith(("tiny:", "mini:")):
        model = LOCAL_DIR + resolve(model, settings.data_dir)
    return _embedder(model, clip.pretrained, pick_device(settings.device))


@cache
def _embedder(model: str, pretrained: str | None, device: str) -> ClipEmbedder:
    return ClipEmbedder.from_pretrained(model, pretrained, device)


def calibrated(settings: Settings) -> ClipSpec:
    """The profile's CLIP spec with thresholds from its calibration file, when it has one."""
    clip = settings.resolved_profile().clip
    if clip.calibration is None:
        return clip
    measured = json.loads(Path(resolve(clip.calibration, settings.data_dir)).read_text())
    return clip.model_copy(update={k: measured[k] for k in ("judge_threshold", "retrieval_min_similarity")})


def load_backends(settings: Settings) -> Backends:
    """The backends for `settings`; pipelines and CLIP are cached per process, so a second run reuses them."""
    profile = settings.resolved_profile()
    clip = calibrated(settings)
    embedder = load_embedder(settings)
    store = ReferenceStore.open(chroma_client(settings.data_dir, settings.chroma_url), settings.collection_name, embedder)
    llm = make_chat_model(settings.llm)
    retries = settings.llm.max_retries
    return Backends(
        profile=profile,
        generator=_generator(profile.name, settings.data_dir, pick_device(settings.device)),
        critic=VLMJudge(llm, retries) if llm else ClipJudge(embedder, clip.judge_threshold),
        store=store,
        decomposer=LLMDecomposer(llm, retries) if llm else RuleDecomposer(),
        llm=llm,
        min_similarity=clip.retrieval_min_similarity,
    )


@cache
def _generator(profile_name: str, data_dir: Path, device: str) -> DiffusersGenerator:
    from agent.config import PROFILES

    spec = PROFILES[profile_name].generator
    adapter = resolve(spec.ip_adapter.repo, data_dir) if spec.ip_adapter else None
    log.info("loading %s generator %s on %s", spec.family, spec.model_id, device)
    return DiffusersGenerator.from_pretrained(spec, resolve(spec.model_id, data_dir), adapter, device)
