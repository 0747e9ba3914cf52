"""The built-in critics and decomposers as their registries take them: functions of the shared BackendParts
(tools.backends.registries). The VLM critic and the LLM decomposer need an LLM; the CLIP critic and the rule-based
decomposer work offline. A decomposer reads messages against its profile's vocabulary: the miniature world's closed
one (an object the world does not know is refused), an open one for real models."""

from __future__ import annotations

from langchain_core.language_models import BaseChatModel

from imagerag.tools.backends.judges import CellCache, ClipJudge, Critic, VLMJudge
from imagerag.tools.backends.planner import Decomposer, LLMDecomposer, RuleDecomposer
from imagerag.tools.backends.registries import BackendParts
from imagerag.tools.errors import ConfigError
from imagerag.tools.files import content_id
from imagerag.tools.grid import singular
from imagerag.tools.revision import vocabulary_for


def _llm(parts: BackendParts, what: str) -> BaseChatModel:
    if parts.llm is None:
        raise ConfigError(
            f"profile {parts.profile.name!r} names the {what}, which needs an LLM: set IMAGERAG_LLM__MODEL (and "
            "IMAGERAG_LLM__BASE_URL for vLLM or Ollama)"
        )
    return parts.llm


def clip_judge(parts: BackendParts) -> Critic:
    # In a closed world an object is checked against the world's other nouns, and an attribute against the other
    # values of its kind, before a run stops on them.
    vocabulary = vocabulary_for(parts.profile.vocabulary)
    nouns = sorted({singular(n) for n in vocabulary.nouns or ()})
    # A collection image's cells are embedded once per CLIP (its weights are in its identity), then read from disk.
    cells = parts.data_dir / "cell-embeddings" / content_id(parts.embedder.info.model_dump_json().encode())
    return ClipJudge(
        parts.embedder,
        parts.clip.judge_threshold,
        {"object": nouns, **vocabulary.attributes} if nouns else {},
        CellCache(cells),
        parts.clip.stop_margin,
    )


def vlm_judge(parts: BackendParts) -> Critic:
    return VLMJudge(_llm(parts, "VLM critic"), parts.retries)


def rule_decomposer(parts: BackendParts) -> Decomposer:
    return RuleDecomposer(vocabulary_for(parts.profile.vocabulary))


def llm_decomposer(parts: BackendParts) -> Decomposer:
    return LLMDecomposer(_llm(parts, "LLM decomposer"), parts.retries, vocabulary_for(parts.profile.vocabulary))
