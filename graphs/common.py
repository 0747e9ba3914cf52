"""Pieces both policies share: planning, judging, the stop rule, and the final answer.

Nodes are closures over a Toolkit (heavy backends) built by the graph factories; state holds only ids.
"""

from __future__ import annotations

from collections.abc import Callable

from langgraph.types import RetryPolicy

from agent.state import Candidate, Concept, RunState, Step, Usage
from tools.toolkit import Toolkit

# Critic and generator calls can fail transiently (a VLM refusal streak, a CUDA hiccup): retry the node a few
# times, then let the run fail cleanly with everything made so far kept in the checkpoint.
NODE_RETRY = RetryPolicy(max_attempts=3, initial_interval=0.2, retry_on=Exception)


def clock(state: RunState, usage: Usage | None = None) -> Usage:
    """`usage` (default: the state's) with seconds brought up to now."""
    return (usage or state.usage).model_copy(update={"seconds": state.elapsed()})


def make_plan(toolkit: Toolkit) -> Callable[[RunState], dict]:
    def plan(state: RunState) -> dict:
        if state.concepts:  # a resumed or continued run keeps its concepts
            return {}
        concepts, tokens = toolkit.decompose(state.prompt)
        summary = "; ".join(f"{c.id} {c.kind}: {c.text}" for c in concepts)
        return {
            "concepts": concepts,
            "usage": clock(state, state.usage.add(llm_tokens=tokens)),
            "steps": [Step(node="plan", round=state.usage.rounds, summary=summary)],
        }

    return plan


def judge_new(toolkit: Toolkit, state: RunState, candidates: list[Candidate]) -> tuple[list[Candidate], Usage, list[Step]]:
    """Critique every candidate that has no verdicts yet. Returns the updated list, usage and step records."""
    usage, steps, judged = state.usage, [], []
    for candidate in candidates:
        if not candidate.judged:
            critique = toolkit.critique(candidate.image_id, state.concepts, state.prompt)
            candidate = candidate.model_copy(update={"verdicts": critique.verdicts})
            usage = usage.add(critic_calls=1, llm_tokens=critique.tokens)
            steps.append(Step(node="critique", round=candidate.round, summary=f"{candidate.image_id}: {candidate.satisfied_count}/{len(state.concepts)} satisfied, score {candidate.score:.2f}"))
        judged.append(candidate)
    return judged, clock(state, usage), steps


def concepts_from_best(concepts: list[Concept], candidates: list[Candidate]) -> list[Concept]:
    """Each concept carries its verdict on the best candidate: the image the run would return now."""
    judged = [c for c in candidates if c.judged]
    if not judged:
        return concepts
    best = {v.concept_id: v for v in max(judged, key=Candidate.rank_key).verdicts}
    return [
        c.model_copy(update={"verdict": "satisfied" if v.satisfied else "missing", "score": v.score, "evidence": v.evidence})
        if (v := best.get(c.id))
        else c
        for c in concepts
    ]


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
    summary = f"{reason}; best image {best.image_id if best else 'none'}"
    return {"status": status, "stop_reason": reason, "usage": clock(state), "steps": [Step(node="finish", round=state.usage.rounds, summary=summary)]}
