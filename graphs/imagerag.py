"""The deterministic policy: the paper's procedure, made iterative.

generate -> critique -> (all satisfied or budget spent? finish) -> retrieve for the missing concepts ->
regenerate with the references -> critique -> ... Each round targets the missing concepts that were tried
least so far, up to the generator's reference limit, and never reuses a reference; with no reference above
the relevance threshold it draws a fresh sample from text instead of conditioning on an unrelated image.
"""

from __future__ import annotations

from typing import Literal

from langgraph.graph import END, START, StateGraph

from agent.state import Concept, RunState, Step
from graphs.common import NODE_RETRY, clock, concepts_from_best, finish, judge_new, make_plan, stop_reason
from tools.toolkit import Toolkit


def build_imagerag_graph(toolkit: Toolkit, retrieve_k: int = 1) -> StateGraph:
    plan = make_plan(toolkit)

    def generate(state: RunState) -> dict:
        usage = state.usage.add(rounds=1, generations=1)
        [candidate] = toolkit.generate(state.prompt, state.seed, 1, round=usage.rounds)
        return {
            "candidates": [*state.candidates, candidate],
            "usage": clock(state, usage),
            "steps": [Step(node="generate", round=usage.rounds, summary=f"image {candidate.image_id} from text")],
        }

    def critique(state: RunState) -> dict:
        candidates, usage, steps = judge_new(toolkit, state, state.candidates)
        return {"candidates": candidates, "concepts": concepts_from_best(state.concepts, candidates), "usage": usage, "steps": steps}

    def route(state: RunState) -> Literal["retrieve", "finish"]:
        return "finish" if stop_reason(state) else "retrieve"

    def retrieve(state: RunState) -> dict:
        targets = targets_for_round(state, toolkit.max_references)
        best = state.best()
        captions_by_id = {v.concept_id: v.caption for v in best.verdicts} if best else {}
        captions = [captions_by_id.get(c.id) or c.text for c in targets]
        used = {h.id for cand in state.candidates for h in cand.references}
        hits = toolkit.retrieve_many(captions, k=retrieve_k, exclude=used)
        summary = f"for {', '.join(map(repr, captions))}: " + (", ".join(f"{h.caption!r} ({h.similarity:.2f})" for h in hits) or "nothing above the threshold")
        targeted = {c.id for c in targets}
        concepts = [c.model_copy(update={"attempts": c.attempts + 1}) if c.id in targeted else c for c in state.concepts]
        return {"hits": hits, "concepts": concepts, "usage": clock(state), "steps": [Step(node="retrieve", round=state.usage.rounds, summary=summary)]}

    def regenerate(state: RunState) -> dict:
        usage = state.usage.add(rounds=1, generations=1)
        # A new seed each round: with no usable reference the round is a fresh sample, not a repeat.
        candidate = toolkit.regenerate(state.prompt, state.hits, seed=state.seed + usage.rounds - 1, round=usage.rounds)
        refs = ", ".join(h.caption for h in candidate.references) or "no reference"
        return {
            "candidates": [*state.candidates, candidate],
            "usage": clock(state, usage),
            "steps": [Step(node="regenerate", round=usage.rounds, summary=f"image {candidate.image_id} with {refs}")],
        }

    builder = StateGraph(RunState)
    builder.add_node(plan)
    builder.add_node(generate, retry_policy=NODE_RETRY)
    builder.add_node(critique, retry_policy=NODE_RETRY)
    builder.add_node(retrieve, retry_policy=NODE_RETRY)
    builder.add_node(regenerate, retry_policy=NODE_RETRY)
    builder.add_node(finish)
    builder.add_edge(START, "plan")
    builder.add_edge("plan", "generate")
    builder.add_edge("generate", "critique")
    builder.add_conditional_edges("critique", route)
    builder.add_edge("retrieve", "regenerate")
    builder.add_edge("regenerate", "critique")
    builder.add_edge("finish", END)
    return builder


def targets_for_round(state: RunState, limit: int) -> list[Concept]:
    """Missing concepts targeted least often so far (ties in prompt order), at most `limit` of them."""
    return sorted(state.missing(), key=lambda c: c.attempts)[:limit]
