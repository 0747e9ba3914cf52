"""The whole loop as one call, for larger assistants: a service shared by the MCP server and a LangChain tool.

`ImageRAGAssistant` validates a request, runs it through `agent.run.stream` (backends loaded once and shared),
forwards the typed events to a callback, and answers with a `RunResult`: the thread to refine, the status, the best
image and the verdict of every concept. Anything a caller got wrong comes back as an `AssistantError` whose message
names the fix, so every surface can hand it on.

Runs of different threads go at once (a server has several users); each loaded generator serializes its own
pipeline calls (`DiffusersGenerator`), the one state that concurrent runs share and that is not thread-safe. A
thread has one run at a time: a second run of a busy thread is refused at once, not queued behind it, so that two
refinements can never both become the same turn.

`ImageRAGTool` is that call as a LangChain `BaseTool` with a pydantic schema, for a LangGraph or LangChain agent
to bind. Its ToolMessage content is a short summary for the LLM; the artifact is the `RunSummary` as a dict.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from langchain_core.callbacks import CallbackManagerForToolRun
from langchain_core.tools import BaseTool, ToolException
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from imagerag.agent.config import Settings
from imagerag.agent.events import (
    BudgetLeft,
    DiffusionStep,
    Finished,
    NodeFinished,
    NodeStarted,
    RetrievalHits,
    RunEvent,
    Verdicts,
)
from imagerag.agent.result import RunResult
from imagerag.graphs.state import MAX_PROMPT_CHARS, MAX_RETRIEVE_K, MAX_ROUNDS, THREAD_PATTERN, Budget, RunInput
from imagerag.tools.errors import ConfigError, ImageRAGError, user_errors, user_message
from imagerag.tools.toolkit import Backends
from imagerag.tools.types import RetrievalHit

if TYPE_CHECKING:
    from imagerag.graphs.nodes import ReviewDecision, ReviewRequest


PromptText = Annotated[
    str, Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="What to draw, in plain words.")
]
Instruction = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        description="How to change the thread's image, e.g. 'make the scarf green'.",
    ),
]
# Strict: JSON `true` is not a round count, nor "3" (pydantic's lax mode would take both as numbers).
Rounds = Annotated[
    int, Field(strict=True, ge=1, le=MAX_ROUNDS, description="Budget: policy rounds, the first generation included.")
]
ThreadName = Annotated[
    str,
    Field(
        pattern=THREAD_PATTERN, description="A thread id returned by an earlier call (letters, digits, '.', '_', '-')."
    ),
]
Caption = Annotated[
    str, Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="What the reference images should show.")
]
HitCount = Annotated[
    int, Field(strict=True, ge=1, le=MAX_RETRIEVE_K, description="Reference images to return at most.")
]


class AssistantError(ImageRAGError):
    """A request the assistant cannot run; the message says what is wrong and how to fix it."""


class ThreadStateError(AssistantError):
    """The thread exists where a new one was asked for, or does not where an existing one was; each surface words
    the fix in its own terms (an MCP tool name, a LangChain argument)."""

    def __init__(self, thread: str, exists: bool):
        self.thread, self.exists = thread, exists
        super().__init__(
            f"thread {thread!r} exists: continue it, or choose another thread name"
            if exists
            else f"unknown thread {thread!r}: pass a thread id that an earlier call returned"
        )


class SearchOutput(BaseModel):
    caption: str
    hits: list[RetrievalHit]


def describe_event(event: RunEvent) -> str | None:
    """One line of progress for a typed run event (None: nothing worth telling)."""
    match event:
        case NodeStarted():
            return event.node
        case DiffusionStep():
            return f"diffusion step {event.step}/{event.total}"
        case RetrievalHits():
            return f"retrieved {len(event.hits)} reference(s) for {', '.join(map(repr, event.captions))}"
        case Verdicts():
            satisfied = sum(v.satisfied for v in event.verdicts)
            return f"image {event.image_id[:12]}: {satisfied}/{len(event.verdicts)} concept(s) satisfied"
        case BudgetLeft():
            return f"budget left: {event.rounds} round(s), {event.generations} image(s)"
        case NodeFinished():
            return "; ".join(s.summary for s in event.steps) or None
        case Finished():
            return f"finished: {event.result.status}"
    return None


class _RunRequest(BaseModel):
    message: PromptText
    max_rounds: Rounds = 3
    thread: ThreadName | None = None


class ImageRAGAssistant:
    """The loop behind one call. Settings come from the caller (usually `Settings()`: IMAGERAG_* and the TOML file).

    Runs never pause for review (nobody is there to answer); images and reports go to `out`, by default
    `<data_dir>/runs`.
    """

    def __init__(self, settings: Settings, out: Path | None = None, backends: Backends | None = None):
        try:
            settings.resolved_profile()
        except ConfigError as error:
            raise AssistantError(str(error)) from None
        self.settings = settings.model_copy(update={"review": False})
        self.out = Path(out) if out is not None else Path(settings.data_dir) / "runs"
        self._backends = backends
        self._loading = threading.Lock()  # two first calls at once load the backends once
        self._busy: set[str] = set()  # threads with a run going in this process
        self._busy_guard = threading.Lock()

    def backends(self) -> Backends:
        with self._loading:
            if self._backends is None:
                from imagerag.tools.backends.loading import load_backends

                self._backends = load_backends(self.settings)
            return self._backends

    @contextmanager
    def _claim(self, thread: str | None) -> Iterator[None]:
        """Hold `thread` for one run. A new run without a name gets a folder of its own: nothing to claim."""
        if thread is None:
            yield
            return
        with self._busy_guard:
            if thread in self._busy:
                raise AssistantError(
                    f"thread {thread!r} is busy with another run: wait until that run returns, then send this again"
                )
            self._busy.add(thread)
        try:
            yield
        finally:
            with self._busy_guard:
                self._busy.discard(thread)

    def thread_exists(self, thread: str) -> bool:
        from imagerag.agent.run import RunError, history

        try:
            history(thread, self.settings)
        except RunError:
            return False
        return True

    def run(
        self,
        message: str,
        max_rounds: int = 3,
        thread: str | None = None,
        on_event: Callable[[RunEvent], None] | None = None,
        require: Literal["new", "existing"] | None = None,
    ) -> RunResult:
        """Draw `message`, or continue `thread` with it when the thread exists.

        `require` says which of the two the caller means: "new" refuses a thread that exists, "existing" one that
        does not (ThreadStateError). It is checked while the thread is held, so no other run can slip in between.
        """
        from imagerag.agent.run import drive, stream

        try:
            request = _RunRequest(message=message, max_rounds=max_rounds, thread=thread)
            RunInput(message=request.message)  # an empty prompt fails here, before any model is loaded
        except ValidationError as error:
            raise AssistantError(user_message(error).removeprefix("message: ")) from None
        budget = self.settings.budget.model_dump() | {
            "max_rounds": request.max_rounds,
            # Each round draws one image, so a rounds budget above the generations cap would never be reached.
            "max_generations": max(self.settings.budget.max_generations, request.max_rounds),
        }
        settings = self.settings.model_copy(update={"budget": Budget.model_validate(budget)})
        with self._claim(request.thread):
            try:
                if request.thread is not None and require is not None:
                    exists = self.thread_exists(request.thread)
                    if exists != (require == "existing"):
                        raise ThreadStateError(request.thread, exists)
                backends = self.backends()

                def unanswered(request: ReviewRequest) -> ReviewDecision:  # only a thread started with review on
                    raise AssistantError(f"thread {thread!r} waits for a review: answer it with `imagerag resume`")

                events = stream(request.message, settings, self.out, request.thread, backends)
                return drive(events, settings, backends, on_event, unanswered)
            except AssistantError:
                raise
            except user_errors() as error:
                raise AssistantError(user_message(error)) from None

    def search(self, caption: str, k: int = 5) -> SearchOutput:
        """Reference images in the collection for `caption`, none below the profile's relevance threshold."""
        try:
            request = _SearchRequest(caption=caption, k=k)
        except ValidationError as error:
            raise AssistantError(user_message(error)) from None
        if not request.caption.strip():
            raise AssistantError("the caption is empty: describe the reference image to find, e.g. 'a red square'")
        try:
            backends = self.backends()
            hits = backends.store.search(request.caption.strip(), request.k, backends.min_similarity)
        except user_errors() as error:
            raise AssistantError(user_message(error)) from None
        return SearchOutput(caption=request.caption.strip(), hits=hits)


class _SearchRequest(BaseModel):
    caption: Caption
    k: HitCount = 5


def png_bytes(image: Image.Image, max_side: int | None = None) -> bytes:
    """An image as PNG bytes, optionally shrunk (references can be large photographs)."""
    image = image.convert("RGB")
    if max_side:
        image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class ImageRAGInput(BaseModel):
    """Draw an image that shows everything the prompt asks, or refine the image of an earlier thread."""

    prompt: PromptText = Field(description="What to draw; with an existing `thread`, how to change its image.")
    max_rounds: Rounds = 3
    thread: ThreadName | None = Field(
        default=None,
        description="Refine the image of this thread (an id an earlier call returned); omit to start a new image.",
    )


def _validation_message(error: ValidationError) -> str:
    return f"invalid arguments for imagerag: {user_message(error)}"


class ImageRAGTool(BaseTool):
    """The whole ImageRAG loop as one LangChain tool.

    Returns (summary, artifact): the summary tells the LLM what was drawn, what is still missing and which thread
    to refine; the artifact is the `RunSummary` as a dict (paths of the best image and report, every verdict).
    Bad input never raises into the agent: it comes back as an error ToolMessage the LLM can correct.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str = "imagerag"
    description: str = (
        "Generate an image for a text prompt and make sure every part of the prompt is drawn: the image is critiqued "
        "per concept, reference images are retrieved for missing concepts, and it is regenerated until satisfied or "
        "the round budget is spent. Pass `thread` from an earlier result to refine that image with an instruction."
    )
    args_schema: type[BaseModel] = ImageRAGInput
    response_format: Literal["content", "content_and_artifact"] = "content_and_artifact"
    handle_tool_error: bool = True
    handle_validation_error: Any = _validation_message
    assistant: ImageRAGAssistant

    @classmethod
    def from_settings(
        cls, settings: Settings | None = None, out: Path | None = None, backends: Backends | None = None
    ) -> ImageRAGTool:
        return cls(assistant=ImageRAGAssistant(settings or Settings(), out, backends))

    def _run(
        self,
        prompt: str,
        max_rounds: int = 3,
        thread: str | None = None,
        run_manager: CallbackManagerForToolRun | None = None,
    ) -> tuple[str, dict[str, Any]]:
        try:
            summary = self.assistant.run(prompt, max_rounds, thread, require="existing" if thread else None).brief()
        except ThreadStateError as error:
            raise ToolException(
                f"unknown thread {error.thread!r}: pass a thread id an earlier call returned, or none to start a new image"
            ) from None
        except AssistantError as error:
            raise ToolException(str(error)) from None
        return summary.summary(), summary.model_dump()
