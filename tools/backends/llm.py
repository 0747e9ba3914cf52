"""The chat model (any OpenAI-compatible endpoint) and one retrying structured call shared by its users."""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Callable
from typing import Generic, TypeVar, cast

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage
from PIL import Image
from pydantic import BaseModel
from typing_extensions import TypedDict  # typing.TypedDict takes Generic only from Python 3.11; 3.10 is supported

from imagerag.tools.config import LLMSettings

log = logging.getLogger(__name__)
T = TypeVar("T", bound=BaseModel)
TEMPERATURE_STEP = 0.3  # each retry samples hotter: a refusal or malformed answer at 0 tends to repeat itself


class StructuredAnswer(TypedDict, Generic[T]):
    """What `with_structured_output(..., include_raw=True)` returns: always this dict, never the bare model."""

    raw: BaseMessage
    parsed: T | None
    parsing_error: BaseException | None


class LLMOutputError(RuntimeError):
    """The model refused or answered off-schema on every attempt."""


def make_chat_model(settings: LLMSettings) -> BaseChatModel | None:
    """ChatOpenAI for the configured endpoint (OpenAI, vLLM, Ollama, ...), or None when no model is set."""
    if not settings.model:
        return None
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        model=settings.model,
        base_url=settings.base_url,
        api_key=settings.api_key,
        temperature=settings.temperature,
        timeout=settings.timeout,
        max_retries=2,  # transport-level retries; output-level retries are ours
    )


def image_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def tokens_of(message: BaseMessage | None) -> int:
    usage = getattr(message, "usage_metadata", None) or {}
    return int(usage.get("total_tokens", 0))


def structured_call(
    llm: BaseChatModel,
    schema: type[T],
    messages: list[BaseMessage],
    retries: int,
    check: Callable[[T], str | None] | None = None,
) -> tuple[T, int]:
    """Ask for `schema`; on refusal, parse failure or a failed `check`, retry hotter. Returns (answer, tokens)."""
    base = getattr(llm, "temperature", None) or 0.0
    tokens, problems = 0, []
    for attempt in range(retries + 1):
        model = llm.model_copy(update={"temperature": base + attempt * TEMPERATURE_STEP}) if attempt else llm
        try:
            # langchain types the answer as `dict | BaseModel` whatever include_raw says; with it, it is the dict.
            out = cast(
                "StructuredAnswer[T]",
                model.with_structured_output(schema, method="function_calling", include_raw=True).invoke(messages),
            )
        except Exception as error:  # noqa: BLE001 - transport errors after the client's own retries; retried here
            problems.append(f"call failed: {error}")
            continue
        tokens += tokens_of(out.get("raw"))
        parsed = out.get("parsed")
        problem: BaseException | str | None = out.get("parsing_error") or (
            None if parsed is not None else "no structured answer (refusal?)"
        )
        if parsed is not None and problem is None and check is not None:
            problem = check(parsed)
        if parsed is not None and problem is None:  # no problem implies an answer; mypy is told so here
            return parsed, tokens
        problems.append(str(problem))
        log.warning("structured output attempt %d failed: %s", attempt + 1, problem)
    raise LLMOutputError(f"{schema.__name__}: no valid answer after {retries + 1} attempts: {problems}")
