"""The deterministic policy: the paper's procedure, made iterative.

plan -> generate -> critique -> (all satisfied or budget spent? finish) -> retrieve for the missing concepts ->
[review] -> regenerate with the references, or edit -> critique -> ... When the best image holds some objects with
all their concepts and misses something of others, the round edits it: only those objects' regions are redrawn
(rules.edit_regions) and the verdicts on the rest stand (rules.kept_verdicts). Each round spends the generator's
reference slots on
what it could not draw from text (rules.targets_for_round), objects before their attributes, the least tried
first; it never reuses a reference, and with no reference above the relevance threshold draws a fresh sample from
text instead of conditioning on an unrelated image. A later turn of a thread starts from its best image.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime

from imagerag.graphs.context import RunContext, context_of, toolkit
from imagerag.graphs.nodes import NODE_RETRY, ask_review, finish, judge_new, plan
from imagerag.graphs.rules import (
    best_of_turn,
    clock,
    concepts_from_best,
    edit_regions,
    kept_boxes,
    kept_verdicts,
    query_for,
    stop_reason,
    targets_for_regions,
    targets_for_round,
)
from imagerag.graphs.state import RunInput, RunOutput, RunState, Step


def after_plan(state: RunState) -> Literal["generate", "retrieve", "finish", "__end__"]:
    if state.status == "needs_clarification":  # the turn did not start: nothing to draw, no turn to record
        return "__end__"
    if not state.current():  # every turn that has no image yet draws one, whatever the budget
        return "generate"
    return "finish" if stop_reason(state) else "retrieve"


def batch_size(state: RunState, runtime: Runtime[RunContext]) -> int:
    """This round's images: the context's samples, never past the generation budget (a turn's first image is
    always drawn)."""
    return max(1, min(context_of(runtime).samples, state.budget.max_generations - state.usage.generations))


def generate(state: RunState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    n = batch_size(state, runtime)
    usage = state.usage.add(rounds=1, generations=n)
    seed = state.seed + state.usage.generations
    drawn = toolkit(state, runtime).generate(state.prompt, seed, n, round=usage.rounds, turn=state.turn)
    summary = f"image {', '.join(c.image_id for c in drawn)} from text"
    return {
        "candidates": [*state.candidates, *drawn],
        "usage": clock(state, usage),
        "steps": [Step(node="generate", round=usage.rounds, summary=summary)],
    }


def critique(state: RunState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    candidates, usage, steps = judge_new(toolkit(state, runtime), state, state.candidates)
    return {
        "candidates": candidates,
        "concepts": concepts_from_best(state.concepts, candidates),
        "usage": usage,
        "steps": steps,
    }


def after_critique(state: RunState) -> Literal["retrieve", "finish"]:
    return "finish" if stop_reason(state) else "retrieve"


def retrieve(state: RunState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    """Find references for what the best image misses, and decide how the next image is made.

    With edits on and a best image to keep, the missing objects become regions to redraw: with per-region
    references (a generator that masks references) every broken object gets a region and a reference retrieved
    for what text alone never drew, so one edit fixes them all; otherwise the round's targets are retrieved for and
    the edit redraws the regions of the targets that found a reference; when no object is whole and more objects
    need a reference than a whole image takes, the edit composes the image, object by object, each region with its
    own reference. No regions means: draw the whole image again with the references. What is retrieved for each
    target: rules.query_for (a query the critic wrote, else the whole phrase of the concept's object, 'a large red
    star', so the reference carries the asked look too). An image already used as a reference is not retrieved
    again, and each target's attempts count up."""
    tools, ctx = toolkit(state, runtime), context_of(runtime)
    best = best_of_turn(state)
    occupied = tools.occupied_cells(best.image_id) if best is not None and ctx.edits else set()
    # With references masked to regions, one edit redraws every object it misses, each with its own reference.
    per_region = best is not None and ctx.edits and ctx.region_references and tools.max_region_references > 1
    regions = edit_regions(state, occupied, compose_over=tools.max_references) if per_region else []
    pairs = targets_for_regions(state, regions, tools.max_region_references) if regions else []
    targets = [c for _, c in pairs] if regions else targets_for_round(state, tools.max_references)
    captions_by_id = {v.concept_id: v.caption for v in best.verdicts} if best else {}
    captions = [query_for(c, state.concepts, captions_by_id.get(c.id)) for c in targets]
    used = {h.id for cand in state.candidates for h in cand.references}
    hits = tools.retrieve_many(captions, k=ctx.retrieve_k, exclude=used)
    targeted = {c.id for c in targets}
    concepts = [c.model_copy(update={"attempts": c.attempts + 1}) if c.id in targeted else c for c in state.concepts]
    found = ", ".join(f"{h.caption!r} ({h.similarity:.2f})" for h in hits) or "nothing above the threshold"
    summary = f"for {', '.join(map(repr, captions))}: {found}"
    if regions:
        for (i, _), caption in zip(pairs, captions, strict=True):
            regions[i] = regions[i].model_copy(update={"reference_ids": [h.id for h in hits if h.query == caption]})
    elif best is not None and ctx.edits and not per_region:  # per region, [] already said: redraw the whole image
        focus = {c.id for c in targets} if hits else set()
        regions = edit_regions(state, occupied, focus)
    return {
        "hits": hits,
        "regions": regions,
        "concepts": concepts,
        "usage": clock(state),
        "steps": [Step(node="retrieve", round=state.usage.rounds, summary=summary)],
    }


def after_retrieve(state: RunState) -> Literal["review", "regenerate", "edit"]:
    return "review" if state.review else after_review(state)


def after_review(state: RunState) -> Literal["regenerate", "edit"]:
    return "edit" if state.regions else "regenerate"


def review(state: RunState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    targets = [c.text for c in targets_for_round(state, toolkit(state, runtime).max_references)]
    hits = ask_review(state.hits, targets, state.usage.rounds + 1)
    summary = ", ".join(h.caption for h in hits) or "no reference"
    return {"hits": hits, "steps": [Step(node="review", round=state.usage.rounds, summary=f"reviewed: {summary}")]}


def regenerate(state: RunState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    n = batch_size(state, runtime)
    usage = state.usage.add(rounds=1, generations=n)
    # Seeds no earlier image of the turn used: with no usable reference the round is a fresh sample, not a repeat.
    seed = state.seed + state.usage.generations
    drawn = toolkit(state, runtime).regenerate(
        state.prompt, state.hits, seed=seed, round=usage.rounds, turn=state.turn, n=n
    )
    refs = ", ".join(h.caption for h in drawn[0].references) or "no reference"
    summary = f"image {', '.join(c.image_id for c in drawn)} with {refs}"
    return {
        "candidates": [*state.candidates, *drawn],
        "usage": clock(state, usage),
        "steps": [Step(node="regenerate", round=usage.rounds, summary=summary)],
    }


def edit(state: RunState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    best = best_of_turn(state)
    assert best is not None  # rules.edit_regions plans an edit only of a judged image
    usage = state.usage.add(rounds=1, generations=1)
    seed = state.seed + state.usage.generations
    keep = kept_boxes(best, state.regions, state.concepts)
    drawn = toolkit(state, runtime).edit(
        best.image_id, state.regions, state.hits, seed=seed, round=usage.rounds, turn=state.turn, keep=keep
    )
    assert drawn.edit is not None
    drawn = drawn.model_copy(update={"verdicts": kept_verdicts(best, drawn.edit, state.concepts)})
    redrawn = "; ".join(r.text or "cleared" for r in state.regions)
    refs = ", ".join(h.caption for h in drawn.references) or "no reference"
    summary = f"image {drawn.image_id}: {best.image_id} with its regions redrawn ({redrawn}) with {refs}"
    return {
        "candidates": [*state.candidates, drawn],
        "usage": clock(state, usage),
        "steps": [Step(node="edit", round=usage.rounds, summary=summary)],
    }


def build_imagerag_graph(
    context: type[RunContext] = RunContext, reply: Callable[..., dict[str, Any]] | None = None
) -> StateGraph[RunState, RunContext, RunInput, RunOutput]:
    builder = StateGraph(RunState, context_schema=context, input_schema=RunInput, output_schema=RunOutput)
    builder.add_node(plan, retry_policy=NODE_RETRY)
    builder.add_node(generate, retry_policy=NODE_RETRY)
    builder.add_node(critique, retry_policy=NODE_RETRY)
    builder.add_node(retrieve, retry_policy=NODE_RETRY)
    builder.add_node(review)
    builder.add_node(regenerate, retry_policy=NODE_RETRY)
    builder.add_node(edit, retry_policy=NODE_RETRY)
    builder.add_node(finish)
    # A served graph ends every turn with its reply to the chat (agent/langgraph_app.py), a refused message too.
    end = END
    if reply is not None:
        builder.add_node("reply", reply)
        builder.add_edge("reply", END)
        end = "reply"
    builder.add_edge(START, "plan")
    builder.add_conditional_edges(
        "plan", after_plan, {"generate": "generate", "retrieve": "retrieve", "finish": "finish", END: end}
    )
    builder.add_edge("generate", "critique")
    builder.add_conditional_edges("critique", after_critique)
    builder.add_conditional_edges("retrieve", after_retrieve)
    builder.add_conditional_edges("review", after_review)
    builder.add_edge("regenerate", "critique")
    builder.add_edge("edit", "critique")
    builder.add_edge("finish", end)
    return builder
