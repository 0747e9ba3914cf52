"""The loop's rules, as pure functions of the state: which image is best, what a verdict may claim, what the next
round's references are for, and when the run stops. Both policies use them; tests/test_rules.py pins them down."""

from __future__ import annotations

from imagerag.graphs.state import RunState, Usage
from imagerag.tools.types import Candidate, Concept, ConceptVerdict

RankKey = tuple[int, int, int, float, int]


def drawn_from_text(candidates: list[Candidate]) -> set[str]:
    """Ids of the concepts that some image drawn without references was judged to show."""
    return {concept_id for c in candidates if not c.references for concept_id in c.satisfied_ids}


def rank_key(candidate: Candidate, roots: frozenset[str], hard: frozenset[str]) -> RankKey:
    """Ordering of candidates, best last. First the satisfied `roots` (the concepts that depend on nothing: objects,
    styles), as in DSG: an image missing an object is worse than one with a wrong attribute. Then the satisfied
    `hard` roots, those no image from text alone showed: between two images with as many objects, the one showing
    what only a reference could draw is the one a fresh sample would not give back. Then satisfied concepts, then
    the mean score, then the earlier image (cheaper to reproduce)."""
    satisfied = candidate.satisfied_ids
    return (len(satisfied & roots), len(satisfied & hard), len(satisfied), candidate.score, -candidate.round)


def best_candidate(candidates: list[Candidate], concepts: list[Concept]) -> Candidate | None:
    """The judged candidate ranked first (see rank_key)."""
    roots = frozenset(c.id for c in concepts if not c.depends_on)
    hard = roots - drawn_from_text(candidates)
    return max((c for c in candidates if c.judged), key=lambda c: rank_key(c, roots, hard), default=None)


def best_of_turn(state: RunState) -> Candidate | None:
    return best_candidate(state.current(), state.concepts)


def enforce_dependencies(verdicts: list[ConceptVerdict], concepts: list[Concept]) -> list[ConceptVerdict]:
    """A child concept (an attribute of an object) is never satisfied while a concept it depends on is missing,
    through any chain of dependencies and whatever order the concepts come in. Returned in the concepts' order."""
    by_id = {v.concept_id: v for v in verdicts}
    parents = {c.id: c.depends_on for c in concepts}
    changed = True
    while changed:  # each pass only turns satisfied into missing, so it ends
        changed = False
        for concept_id, verdict in by_id.items():
            missing = [p for p in parents.get(concept_id, []) if p in by_id and not by_id[p].satisfied]
            if verdict.satisfied and missing:
                evidence = f"{verdict.evidence} (needs {', '.join(missing)}, which is missing)".strip()
                by_id[concept_id] = verdict.model_copy(
                    update={"satisfied": False, "score": min(verdict.score, 0.49), "evidence": evidence}
                )
                changed = True
    order = {c.id: i for i, c in enumerate(concepts)}
    return sorted(by_id.values(), key=lambda v: order.get(v.concept_id, len(order)))


def concepts_from_best(concepts: list[Concept], candidates: list[Candidate]) -> list[Concept]:
    """Each concept carries its verdict on the best candidate of the latest turn: the image the run would return."""
    turn = max((c.turn for c in candidates), default=0)
    chosen = best_candidate([c for c in candidates if c.turn == turn], concepts)
    if chosen is None:
        return concepts
    best = {v.concept_id: v for v in chosen.verdicts}
    return [
        c.model_copy(
            update={"verdict": "satisfied" if v.satisfied else "missing", "score": v.score, "evidence": v.evidence}
        )
        if (v := best.get(c.id))
        else c
        for c in concepts
    ]


def targets_for_round(state: RunState, limit: int) -> list[Concept]:
    """Which concepts this round's references show, within the generator's reference limit.

    References go to what the generator cannot draw from text. A missing concept that an image drawn from text
    alone already showed needs another sample, not a reference (with one reference slot, spending it there would
    trade away the concept that did need it). When every missing concept is of that kind, the references go to the
    satisfied concepts that only reference-conditioned images showed, so the next sample keeps them. Within that:
    objects before attributes (an attribute cannot be right without its object; an attribute whose object is
    missing comes last), then the least tried, then prompt order.
    """
    from_text = drawn_from_text(state.current())
    missing = state.missing()
    missing_ids = {c.id for c in missing}
    needs_reference = [c for c in missing if c.id not in from_text]
    kept_by_reference = [c for c in state.concepts if c.id not in from_text and c.id not in missing_ids]
    targets = needs_reference or kept_by_reference or missing
    return sorted(targets, key=lambda c: (bool(c.depends_on), any(p in missing_ids for p in c.depends_on), c.attempts))[
        :limit
    ]


def clock(state: RunState, usage: Usage | None = None) -> Usage:
    """`usage` (default: the state's) with seconds brought up to now."""
    return (usage or state.usage).model_copy(update={"seconds": state.elapsed()})


def stop_reason(state: RunState) -> str | None:
    """The graph's stop rule, whatever the policy wants: a failure, every concept satisfied, or a budget spent."""
    if state.status == "failed":
        return "failed"
    if state.concepts and all(c.verdict == "satisfied" for c in state.concepts):
        return "satisfied"
    spent = clock(state).spent(state.budget)
    return f"budget_exhausted:{spent}" if spent else None
