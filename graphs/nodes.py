"""Nodes both policies share: planning (and continuing a thread), judging new images, review pauses, finishing.

Nodes are module-level functions of (state, runtime); the heavy backends come from the runtime's context
(graphs.context), never from the state, which holds only ids, texts and verdicts.
"""

from __future__ import annotations

import base64
import binascii
import io
import time
from typing import Any, Literal, cast

from langgraph.runtime import Runtime, get_runtime
from langgraph.types import RetryPolicy, interrupt
from pydantic import BaseModel, Field, ValidationError, model_validator

from imagerag.graphs.context import RunContext, context_of, run_dir_of, toolkit
from imagerag.graphs.rules import (
    best_candidate,
    best_of_turn,
    claims_stop,
    clock,
    concepts_from_best,
    enforce_dependencies,
    stop_reason,
)
from imagerag.graphs.state import RunState, RunStatus, Step, Turn, Usage
from imagerag.tools.errors import ImageRAGError
from imagerag.tools.revision import Undo, objects_of_concepts
from imagerag.tools.toolkit import Toolkit, check_image, keep_upload
from imagerag.tools.types import Candidate, Concept, RetrievalHit, ScenePlan

# Critic and generator calls can fail transiently (a VLM refusal streak, a CUDA hiccup): retry the node a few
# times, then let the run fail cleanly with everything made so far kept in the checkpoint. A user error (a setting
# that cannot work) fails the same way every time: it is not retried.
NODE_RETRY = RetryPolicy(
    max_attempts=3, initial_interval=0.2, retry_on=lambda error: not isinstance(error, ImageRAGError)
)


def plan(state: RunState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    """A new thread: read the message into objects (each with an id) and their concepts. A thread that gets its
    next message: start the next turn (next_turn). A resumed run keeps its plan."""
    if state.status != "running":
        return next_turn(state, runtime)
    if state.concepts:
        return {}
    started = time.time()
    tools = toolkit(state, runtime)
    scene, concepts, tokens = tools.plan(state.message)
    summary = "; ".join(f"{c.id} {c.kind}: {c.text}" for c in concepts)
    usage = state.usage.add(llm_tokens=tokens).model_copy(update={"seconds": time.time() - started})
    return {
        "prompt": state.message,
        "run_dir": str(run_dir_of(state, context_of(runtime))),
        "started_at": started,
        "scene": scene,
        "concepts": concepts,
        "layout": tools.layout(concepts),
        "usage": usage,
        "steps": [Step(node="plan", round=0, summary=summary)],
    }


def next_turn(state: RunState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    """A thread's next message, read against the turn it continues from: the last one, or `from_turn` (a branch).

    The message becomes typed changes of that turn's objects (tools.revision): set an attribute, move, add,
    remove, replace, undo. When a clause cannot be mapped, or a reference could mean several objects, the turn ends
    as needs_clarification with a message quoting it, and the thread stays as it was. Otherwise the changes give the
    new objects, prompt and concepts; the base turn's best image (for an undo, the best image of the turn before
    it) is carried forward, keeping its verdicts on the concepts that did not change, and judged on the rest."""
    tools = toolkit(state, runtime)
    base = _base_turn(state)
    if isinstance(base, str):
        return _needs_clarification(base)
    scene, concepts, best = _turn_values(state, base)
    parent = _turn(state, base.parent) if base is not None and base.parent is not None else None
    seen = {v.concept_id: v.box for v in best.verdicts if v.box} if best else {}
    revision = tools.revise_turn(scene, concepts, state.message, seen, parent.scene if parent else None)
    applied = revision.applied
    if applied is None:
        return _needs_clarification(revision.understanding.message)
    if any(isinstance(change, Undo) for change in revision.understanding.changes) and parent is not None:
        _, concepts, best = _turn_values(state, parent)  # back to the image the undone turn started from
    turn = max((t.index for t in state.turns), default=state.turn) + 1
    revised = state.model_copy(
        update={
            "prompt": applied.prompt,
            "scene": applied.scene,
            "concepts": applied.concepts,
            "turn": turn,
            "turn_parent": base.index if base is not None else None,
            "from_turn": None,  # consumed: the next message continues from this turn unless it names another
            "instruction": state.message,
            "status": "running",
            "stop_reason": "",
            "error": None,
            "clarification": None,
            "hits": [],
            "layout": tools.layout(applied.concepts),
            "regions": [],
            "started_at": time.time(),
            "usage": Usage(llm_tokens=revision.understanding.tokens),
        }
    )
    # A verdict carries over only to the same concept: the same id with the same words as on the carried image.
    same = {c.id for c in applied.concepts} & {c.id for c in concepts if c.text == _text(applied.concepts, c.id)}
    carried = (
        [
            best.model_copy(
                update={"turn": turn, "round": 0, "verdicts": [v for v in best.verdicts if v.concept_id in same]}
            )
        ]
        if best
        else []
    )
    judged, usage, steps = judge_new(tools, revised, carried)
    changes = "; ".join(type(c).__name__ + ": " + c.clause for c in revision.understanding.changes)
    summary = f"{state.message!r} -> {changes} -> {applied.prompt!r}"
    fields = ("prompt", "scene", "turn", "turn_parent", "from_turn", "instruction", "status", "stop_reason", "error")
    update: dict[str, Any] = {
        name: getattr(revised, name) for name in (*fields, "clarification", "hits", "layout", "regions", "started_at")
    }
    if "tool_errors" in type(state).model_fields:
        update["tool_errors"] = 0
    return update | {
        "concepts": concepts_from_best(applied.concepts, judged),
        "candidates": [*state.candidates, *judged],
        "usage": usage,
        "steps": [Step(node="plan", round=0, summary=summary), *steps],
    }


def _text(concepts: list[Concept], concept_id: str) -> str | None:
    return next((c.text for c in concepts if c.id == concept_id), None)


def _turn(state: RunState, index: int) -> Turn | None:
    return next((t for t in state.turns if t.index == index), None)


def _base_turn(state: RunState) -> Turn | str | None:
    """The turn a message continues from (None for a thread whose turns predate their record), or why there is
    none to continue from."""
    if state.from_turn is None:
        return state.turns[-1] if state.turns else None
    base = _turn(state, state.from_turn)
    if base is None:
        return f"turn {state.from_turn} does not exist: this thread has turns 1 to {len(state.turns)}"
    if base.scene is None and base is not state.turns[-1]:
        return f"turn {state.from_turn} was recorded by an earlier version without its objects: it cannot be branched"
    return base


def _turn_values(state: RunState, turn: Turn | None) -> tuple[ScenePlan, list[Concept], Candidate | None]:
    """A turn's objects, concepts and best image (the state's own for the last turn of an older thread)."""
    if turn is not None and turn.scene is not None:
        scene, concepts = turn.scene, turn.concepts
    else:
        scene, concepts = (state.scene, state.concepts) if state.scene else objects_of_concepts(state.concepts)
    index = turn.index if turn is not None else state.turn
    image = turn.best_image if turn is not None else None
    found = [c for c in state.candidates if c.turn == index and (image is None or c.image_id == image)]
    best = found[0] if image is not None and found else best_of_turn(state) if turn is None else None
    return scene, concepts, best


def _needs_clarification(why: str) -> dict[str, Any]:
    """End the turn without touching the thread: its objects, concepts, images and turns stay as they were."""
    return {
        "status": "needs_clarification",
        "stop_reason": "needs_clarification",
        "clarification": why,
        "from_turn": None,
        "steps": [Step(node="plan", round=0, summary=f"needs clarification: {why}")],
    }


def judge_new(
    tools: Toolkit, state: RunState, candidates: list[Candidate]
) -> tuple[list[Candidate], Usage, list[Step]]:
    """Critique each current-turn candidate on the concepts it has no verdict for yet; returns the updated list,
    usage and step records."""
    usage, steps, judged = state.usage, [], []
    for candidate in candidates:
        have = {v.concept_id for v in candidate.verdicts}
        todo = [c for c in state.concepts if c.id not in have]
        if candidate.turn == state.turn and todo:
            critique = tools.critique(candidate.image_id, todo, state.prompt)
            verdicts = enforce_dependencies([*candidate.verdicts, *critique.verdicts], state.concepts)
            if claims_stop(verdicts, state.concepts):  # the checked stop: a second look before the run ends on it
                checked = tools.verify(candidate.image_id, state.concepts, verdicts)
                verdicts = enforce_dependencies(checked, state.concepts)
            strays = tools.strays(candidate.image_id, state.concepts, verdicts)
            candidate = candidate.model_copy(update={"verdicts": verdicts, "strays": strays})
            usage = usage.add(critic_calls=1, llm_tokens=critique.tokens)
            summary = f"{candidate.image_id}: {candidate.satisfied_count}/{len(state.concepts)} satisfied, score {candidate.score:.2f}"
            steps.append(Step(node="critique", round=candidate.round, summary=summary))
        judged.append(candidate)
    return judged, clock(state, usage), steps


def finish(state: RunState) -> dict[str, Any]:
    # No stop reason here means the policy itself ended (the agent's final answer) with budget left.
    reason = stop_reason(state) or "stopped_by_policy"
    status = "stopped" if reason == "stopped_by_policy" else cast(RunStatus, reason.split(":")[0])
    best = best_candidate(state.current(), state.concepts)
    turn = Turn(
        index=state.turn,
        parent=state.turn_parent,
        scene=state.scene,
        concepts=state.concepts,
        message=state.message,
        prompt=state.prompt,
        status=status,
        stop_reason=reason,
        best_image=best.image_id if best else None,
        satisfied=[c.text for c in state.concepts if c.verdict == "satisfied"],
        missing=[c.text for c in state.concepts if c.verdict != "satisfied"],
        usage=clock(state),
    )
    summary = f"{reason}; best image {turn.best_image or 'none'}"
    return {
        "status": status,
        "stop_reason": reason,
        "usage": clock(state),
        "turns": [turn],
        "steps": [Step(node="finish", round=state.usage.rounds, summary=summary)],
    }


class ReviewRequest(BaseModel):
    """What a person sees before a regeneration."""

    round: int
    concepts: list[str] = Field(description="The missing concepts this regeneration targets.")
    hits: list[RetrievalHit]
    error: str | None = Field(default=None, description="Why the previous answer was refused, when it was.")


class ReviewDecision(BaseModel):
    """A person's answer: keep the references (optionally only some), drop them all, or use their own images.

    The graph takes replacement images only as bytes (`uploads`, stored in the data folder's reference cache), so a
    client of a server can never make it read a path on the server; `images` (paths) is for a local caller, whose
    files agent.run.resume checks and sends as uploads."""

    action: Literal["accept", "drop", "replace"] = "accept"
    keep: list[str] | None = Field(default=None, description="With accept: the hit ids to keep (default: all).")
    images: list[str] = Field(
        default_factory=list, description="With replace, from a local caller: paths of reference images to use."
    )
    uploads: list[str] = Field(
        default_factory=list,
        description="With replace: reference images to use, as base64-encoded bytes or data: URLs.",
    )
    caption: str | None = Field(default=None, description="With replace: what the images show.")

    @model_validator(mode="after")
    def _replace_has_images(self) -> ReviewDecision:
        if self.action == "replace" and not (self.images or self.uploads):
            raise ValueError("a replace decision needs at least one image: pass image files, or uploads")
        return self


def ask_review(hits: list[RetrievalHit], concepts: list[str], round: int) -> list[RetrievalHit]:
    """Pause the graph (a LangGraph interrupt) until a person decides; return the references to use.

    An answer is stored in the checkpoint before this node runs again, so a refused one must not fail the node
    (every resume would fail on it again): the node asks again, saying why."""
    request = ReviewRequest(round=round, concepts=concepts, hits=hits)
    while True:
        answer = interrupt(request.model_dump())
        try:
            decision = ReviewDecision.model_validate(answer)
            uploads = review_uploads(decision)
            break
        except ValidationError as error:
            problem = "; ".join(e["msg"].removeprefix("Value error, ") for e in error.errors())
        except ValueError as error:
            problem = str(error)
        request = request.model_copy(update={"error": f"review answer refused: {problem}"})
    if decision.action == "drop":
        return []
    if decision.action == "accept":
        return [h for h in hits if decision.keep is None or h.id in decision.keep]
    data_dir = context_of(get_runtime(RunContext)).data_dir
    query = hits[0].query if hits else (concepts[0] if concepts else "")
    references = []
    for i, (data, kind) in enumerate(uploads, 1):
        image_id, path = keep_upload(data_dir, data, kind)
        caption = decision.caption or f"reference image {i} from the reviewer"
        references.append(RetrievalHit(id=image_id, caption=caption, similarity=1.0, source=str(path), query=query))
    return references


def review_uploads(decision: ReviewDecision) -> list[tuple[bytes, str]]:
    """The decoded, checked uploads of a decision with their formats, as the graph will take them; ValueError
    naming the problem on any path or bad upload."""
    if decision.images:
        raise ValueError(
            "reference images must be sent as image bytes (uploads: base64 or data: URLs), not as paths: a run "
            "reads no file a reviewer names"
        )
    return [_decode_upload(i, upload) for i, upload in enumerate(decision.uploads, 1)]


def _decode_upload(index: int, upload: str) -> tuple[bytes, str]:
    """The bytes of upload `index` (1-based) and their format, checked to be an image within the pixel limit."""
    encoded = upload
    if upload.startswith("data:"):
        header, _, encoded = upload.partition(",")
        if not header.endswith(";base64"):
            raise ValueError(f"upload {index} is a data: URL without ';base64': encode the image bytes in base64")
    try:
        data = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise ValueError(f"upload {index} is not base64: send the image file's bytes base64-encoded") from None
    return data, check_image(io.BytesIO(data), f"upload {index}")
