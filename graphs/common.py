"""Pieces both policies share: planning (and revising a thread), judging, the stop rule, review, the answer.

Nodes are closures over a Toolkit (heavy backends) built by the graph factories; state holds only ids.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from langgraph.types import RetryPolicy, interrupt
from pydantic import BaseModel, Field

from agent.state import Candidate, Concept, ConceptVerdict, RetrievalHit, RunState, Step, Turn, Usage, best_candidate, drawn_from_text
from tools.toolkit import Toolkit

# Critic and generator calls can fail transiently (a VLM refusal streak, a CUDA hiccup): retry the node a few
# times, then let the run fail cleanly with everything made so far kept in the checkpoint.
NODE_RETRY = RetryPolicy(max_attempts=3, initial_interval=0.2, retry_on=Exception)


def clock(state: RunState, usage: Usage | None = None) -> Usage:
    """`usage` (default: the state's) with seconds brought up to now."""
    return (usage or state.usage).model_copy(update={"seconds": state.elapsed()})


def make_plan(toolkit: Toolkit) -> Callable[[RunState], dict]:
    """First turn: decompose the prompt. Later turns: revise prompt and concepts by the message, and carry the
    best image forward, judged again only on the concepts the message added or changed."""

    def plan(state: RunState) -> dict:
        if state.started_at is None:  # the run's first node starts its clock
            started = time.time()
            return {"started_at": started, **plan(state.model_copy(update={"started_at": started}))}
        if state.instruction is None:
            if state.concepts:  # a resumed run keeps its plan
                return {}
            concepts, tokens = toolkit.decompose(state.prompt)
            summary = "; ".join(f"{c.id} {c.kind}: {c.text}" for c in concepts)
            return {"concepts": concepts, "usage": clock(state, state.usage.add(llm_tokens=tokens)), "steps": [Step(node="plan", round=0, summary=summary)]}

        previous = best_candidate([c for c in state.candidates if c.turn == state.turn - 1], state.concepts)
        prompt, concepts, tokens = toolkit.revise(state.prompt, state.concepts, state.instruction)
        revised = state.model_copy(update={"prompt": prompt, "concepts": concepts, "usage": state.usage.add(llm_tokens=tokens)})
        kept = {c.id for c in concepts}
        carried = [
            previous.model_copy(update={"turn": state.turn, "round": 0, "verdicts": [v for v in previous.verdicts if v.concept_id in kept]})
        ] if previous else []
        judged, usage, steps = judge_new(toolkit, revised, carried)
        summary = f"{state.instruction!r} -> {prompt!r}: " + "; ".join(f"{c.id}: {c.text}" for c in concepts)
        return {
            "prompt": prompt,
            "concepts": concepts_from_best(concepts, judged),
            "candidates": [*state.candidates, *judged],
            "usage": usage,
            "steps": [Step(node="plan", round=0, summary=summary), *steps],
        }

    return plan


def judge_new(toolkit: Toolkit, state: RunState, candidates: list[Candidate]) -> tuple[list[Candidate], Usage, list[Step]]:
    """Critique each current-turn candidate on the concepts it has no verdict for yet.

    Returns the updated list, usage and step records. A child concept (an attribute of an object) is never
    satisfied while the concept it depends on is missing.
    """
    usage, steps, judged = state.usage, [], []
    for candidate in candidates:
        have = {v.concept_id for v in candidate.verdicts}
        todo = [c for c in state.concepts if c.id not in have]
        if candidate.turn == state.turn and todo:
            critique = toolkit.critique(candidate.image_id, todo, state.prompt)
            verdicts = enforce_dependencies([*candidate.verdicts, *critique.verdicts], state.concepts)
            candidate = candidate.model_copy(update={"verdicts": verdicts})
            usage = usage.add(critic_calls=1, llm_tokens=critique.tokens)
            steps.append(Step(node="critique", round=candidate.round, summary=f"{candidate.image_id}: {candidate.satisfied_count}/{len(state.concepts)} satisfied, score {candidate.score:.2f}"))
        judged.append(candidate)
    return judged, clock(state, usage), steps


def enforce_dependencies(verdicts: list[ConceptVerdict], concepts: list[Concept]) -> list[ConceptVerdict]:
    by_id = {v.concept_id: v for v in verdicts}
    order = {c.id: i for i, c in enumerate(concepts)}
    out = []
    for verdict in sorted(verdicts, key=lambda v: order.get(v.concept_id, len(order))):
        concept = next((c for c in concepts if c.id == verdict.concept_id), None)
        missing_parents = [p for p in (concept.depends_on if concept else []) if p in by_id and not by_id[p].satisfied]
        if verdict.satisfied and missing_parents:
            verdict = verdict.model_copy(update={"satisfied": False, "score": min(verdict.score, 0.49), "evidence": f"{verdict.evidence} (needs {', '.join(missing_parents)}, which is missing)".strip()})
            by_id[verdict.concept_id] = verdict
        out.append(verdict)
    return out


def concepts_from_best(concepts: list[Concept], candidates: list[Candidate]) -> list[Concept]:
    """Each concept carries its verdict on the best candidate: the image the run would return now."""
    turn = max((c.turn for c in candidates), default=0)
    chosen = best_candidate([c for c in candidates if c.turn == turn], concepts)
    if chosen is None:
        return concepts
    best = {v.concept_id: v for v in chosen.verdicts}
    return [
        c.model_copy(update={"verdict": "satisfied" if v.satisfied else "missing", "score": v.score, "evidence": v.evidence})
        if (v := best.get(c.id))
        else c
        for c in concepts
    ]


def targets_for_round(state: RunState, limit: int) -> list[Concept]:
    """Which concepts this round's references show, within the generator's reference limit.

    References go to what the generator cannot draw from text. A missing concept that an image drawn from text
    alone already showed needs another sample, not a reference (with one reference slot, spending it there
    would trade away the concept that did need it). When every missing concept is of that kind, the references
    go to the satisfied concepts that only reference-conditioned images showed, so the next sample keeps them.
    Within that: objects before attributes (an attribute cannot be right without its object; an attribute whose
    object is missing comes last), then the least tried, then prompt order.
    """
    from_text = drawn_from_text(state.current())
    missing = state.missing()
    missing_ids = {c.id for c in missing}
    needs_reference = [c for c in missing if c.id not in from_text]
    kept_by_reference = [c for c in state.concepts if c.id not in from_text and c.id not in missing_ids]
    targets = needs_reference or kept_by_reference or missing
    return sorted(targets, key=lambda c: (bool(c.depends_on), any(p in missing_ids for p in c.depends_on), c.attempts))[:limit]


def stop_reason(state: RunState) -> str | None:
    """The graph's stop rule, whatever the policy wants: every concept satisfied, or a budget spent."""
    if state.status == "failed":
        return "failed"
    if state.concepts and all(c.verdict == "satisfied" for c in state.concepts):
        return "satisfied"
    spent = clock(state).spent(state.budget)
    return f"budget_exhausted:{spent}" if spent else None


def finish(state: RunState) -> dict:
    # No stop reason here means the policy itself ended (the agent's final answer) with budget left.
    reason = stop_reason(state) or "stopped_by_policy"
    status = reason.split(":")[0] if reason != "stopped_by_policy" else "stopped"
    best = state.best()
    turn = Turn(
        index=state.turn,
        message=state.message(),
        prompt=state.prompt,
        status=status,
        stop_reason=reason,
        best_image=best.image_id if best else None,
        satisfied=[c.text for c in state.concepts if c.verdict == "satisfied"],
        missing=[c.text for c in state.concepts if c.verdict != "satisfied"],
        usage=clock(state),
    )
    summary = f"{reason}; best image {turn.best_image or 'none'}"
    return {"status": status, "stop_reason": reason, "usage": clock(state), "turns": [turn], "steps": [Step(node="finish", round=state.usage.rounds, summary=summary)]}


class ReviewRequest(BaseModel):
    """What a person sees before a regeneration."""

    round: int
    concepts: list[str] = Field(description="The missing concepts this regeneration targets.")
    hits: list[RetrievalHit]


class ReviewDecision(BaseModel):
    """A person's answer: keep the references (optionally only some), drop them all, or use their own images."""

    action: Literal["accept", "drop", "replace"] = "accept"
    keep: list[str] | None = Field(default=None, description="With accept: the hit ids to keep (default: all).")
    images: list[str] = Field(default_factory=list, description="With replace: paths of reference images to use.")
    caption: str | None = Field(default=None, description="With replace: what the images show.")


def ask_review(hits: list[RetrievalHit], concepts: list[str], round: int) -> list[RetrievalHit]:
    """Pause the graph (a LangGraph interrupt) until a person decides; return the references to use."""
    decision = ReviewDecision.model_validate(interrupt(ReviewRequest(round=round, concepts=concepts, hits=hits).model_dump()))
    if decision.action == "drop":
        return []
    if decision.action == "replace":
        missing = [p for p in decision.images if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"review: reference images not found: {missing}")
        query = hits[0].query if hits else (concepts[0] if concepts else "")
        return [
            RetrievalHit(id=hashlib.sha256(Path(p).read_bytes()).hexdigest()[:32], caption=decision.caption or Path(p).stem, similarity=1.0, source=str(Path(p).resolve()), query=query)
            for p in decision.images
        ]
    return [h for h in hits if decision.keep is None or h.id in decision.keep]
