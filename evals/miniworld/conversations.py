"""`imagerag eval conversations`: does a thread converge on what a conversation asks for? Judged by the oracle after
every turn.

Conversations come from conversation_grammar.py (prompts/conversations-{dev,test}.jsonl): a first prompt, then
instructions of one kind (recolour, resize, move to a cell or beside another object, add a common or a rare object,
remove, replace, two or three at once, undo), each turn with the object list the conversation asks for after it.
Conditions, each on the same conversations and seeds with the mini profile (N images a turn):

    thread            one thread, message by message (as `imagerag chat`): each turn refines the previous one
    restated          every turn a fresh run of the whole request written out in full for that turn's target
    thread_no_edits   the thread with region edits off (every round redraws the whole image)

After every turn the oracle (oracle.py, never seen by the agent) reads the turn's best image, and the report counts:
the turn's target all right (every object's shape, colour, size and cell or relation, and nothing the conversation
took away drawn); objects the conversation took away this turn absent; objects the turn left alone unchanged
(shape, colour, size and cell equal to the oracle's reading of the previous turn's best image, counted where that
image had them); and concepts that the turn added naming no object of the world (read from the run's concepts).

A benchmark seed s runs the generator from seed s * SEED_SPACING: each turn draws at most N images from its base seed
on (seed + generation index), so no image is shared between seeds. Results are appended to results.jsonl one
(condition, conversation, seed) at a time; a rerun skips what is there. The test split is sealed: every choice is
made on dev, and test is run once, on the commit being reported.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from PIL import Image
from pydantic import BaseModel

from imagerag.agent.config import Settings
from imagerag.agent.result import RunResult
from imagerag.agent.run import delete_thread, prepare, run
from imagerag.evals.miniworld.benchmark import paired_bootstrap, pct
from imagerag.evals.miniworld.common import ORACLE_DIR
from imagerag.evals.miniworld.conversation_grammar import (
    CONVERSATION_KINDS,
    Conversation,
    ConversationTurn,
    gone_objects,
    judge_turn,
    match,
    names_a_world_object,
    untouched,
)
from imagerag.evals.miniworld.grammar import Detected
from imagerag.evals.miniworld.oracle import Oracle
from imagerag.graphs.state import Budget
from imagerag.tools.toolkit import Backends

SEED_SPACING = 1_000  # generator seed of benchmark seed s: s * SEED_SPACING (a turn draws at most N images)
CONDITIONS: dict[str, dict] = {
    "thread": {"thread": True, "edits": True},
    "restated": {"thread": False, "edits": True},
    "thread_no_edits": {"thread": True, "edits": False},
}
# Paired differences in final-turn all-right (method - base).
COMPARISONS = (("thread", "restated"), ("thread", "thread_no_edits"), ("restated", "thread_no_edits"))
Reading = list[tuple[str, str, str, str]]


class TurnOutcome(BaseModel):
    """One turn of one conversation under one condition, read by the oracle."""

    index: int
    kind: str
    status: str  # the run's status, or "error: ..." when the run raised
    drew: bool  # whether the turn has an image of its own (else the previous turn's image stands)
    all_right: bool
    concepts: list[tuple[str, bool]]  # (kind, right) per concept of the turn's target
    removed_absent: list[tuple[str, bool]]  # (shape, absent) per object the turn took away
    unchanged: list[tuple[str, bool]]  # (shape, unchanged) per object the turn left alone, read in the previous image
    invented: list[str]  # concepts the turn added that name no object of the world
    concepts_after: list[str]  # the run's concept texts after the turn
    reading: Reading  # (shape, colour, size, cell) per object the oracle read in the turn's image
    generations: int
    seconds: float


class ConversationOutcome(BaseModel):
    condition: str
    conversation_id: str
    kind: str
    seed: int
    turns: list[TurnOutcome]
    seconds: float

    @property
    def final_all_right(self) -> bool:
        return self.turns[-1].all_right


# ----------------------------------------------------------------------------- running


def _load(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _settings(base: Settings, seed: int, images: int, edits: bool) -> Settings:
    budget = Budget(max_rounds=images, max_generations=images, max_seconds=None, max_tokens=None)
    return base.model_copy(update={"budget": budget, "seed": seed * SEED_SPACING, "edits": edits})


def judge(
    conversation: Conversation,
    turn: ConversationTurn,
    reading: list[Detected],
    previous: tuple[ConversationTurn, list[Detected]] | None,
) -> dict:
    """The oracle's verdicts on one turn's image: target, removed objects, objects left alone."""
    gone = gone_objects(conversation, turn.index)
    judged = judge_turn(turn.target, gone, reading)
    removed_absent: list[tuple[str, bool]] = []
    unchanged: list[tuple[str, bool]] = []
    if previous is not None:
        before, before_reading = previous
        taken = {o.id for o in before.target} - {o.id for o in turn.target}
        removed_absent = [absent for o, absent in zip(gone, judged.absent, strict=True) if o.id in taken]
        keys = {(d.shape, d.colour, d.size, d.cell) for d in reading}
        was_read = match(before.target, before_reading)  # one to one, so two squares are each read as themselves
        for obj in untouched(before.target, turn.target):
            if (was := was_read[obj.id]) is not None:
                unchanged.append((obj.shape, (was.shape, was.colour, was.size, was.cell) in keys))
    return {
        "all_right": judged.all_right,
        "concepts": judged.concepts,
        "removed_absent": removed_absent,
        "unchanged": unchanged,
    }


def run_conversation(
    conversation: Conversation,
    condition: str,
    seed: int,
    settings: Settings,
    backends: Backends,
    oracle: Oracle,
    runs: Path,
    images: int = 4,
) -> ConversationOutcome:
    """Every turn of `conversation` under `condition`, each judged by the oracle as soon as it ends."""
    spec = CONDITIONS[condition]
    settings = _settings(settings, seed, images, spec["edits"])
    thread = f"conv-{condition}-{conversation.id}-s{seed}-{uuid.uuid4().hex[:8]}" if spec["thread"] else None
    started = time.time()
    turns: list[TurnOutcome] = []
    previous: tuple[ConversationTurn, list[Detected]] | None = None
    last_image: Image.Image | None = None
    concepts_before: set[str] = set()
    try:
        for turn in conversation.turns:
            t0 = time.time()
            message = turn.message if thread else turn.restated
            result: RunResult | None = None
            status: str
            try:
                result = run(message, settings, runs, thread=thread, backends=backends)
                status = result.status
            except Exception as error:  # noqa: BLE001 - a refused or failed turn is an outcome, not a crash
                status = f"error: {error.__class__.__name__}: {error}"
            image = _load(Path(result.best_image)) if result and result.best_image else None
            drew = image is not None
            image = image or last_image
            reading = oracle.read([image])[0] if image is not None else []
            concepts = [c.text for c in result.concepts] if result else sorted(concepts_before)
            verdicts = judge(conversation, turn, reading, previous)
            turns.append(
                TurnOutcome(
                    index=turn.index,
                    kind=turn.kind,
                    status=status,
                    drew=drew,
                    invented=[c for c in concepts if c not in concepts_before and not names_a_world_object(c)],
                    concepts_after=concepts,
                    reading=[(d.shape, d.colour, d.size, d.cell) for d in reading],
                    generations=result.generations if result else 0,
                    seconds=round(time.time() - t0, 3),
                    **verdicts,
                )
            )
            if result is not None and not thread:
                shutil.rmtree(result.run_dir, ignore_errors=True)
            previous, last_image, concepts_before = (turn, reading), image, set(concepts)
    finally:
        if thread:
            try:
                delete_thread(thread, settings, remove_folder=True)
            except Exception:  # noqa: BLE001 - a thread that never started has nothing to delete
                shutil.rmtree(runs / thread, ignore_errors=True)
    return ConversationOutcome(
        condition=condition,
        conversation_id=conversation.id,
        kind=conversation.kind,
        seed=seed,
        turns=turns,
        seconds=round(time.time() - started, 3),
    )


def read_outcomes(path: Path) -> list[ConversationOutcome]:
    """Outcomes in results.jsonl, the last one per (condition, conversation, seed); a cut line is skipped."""
    if not path.exists():
        return []
    found: dict[tuple[str, str, int], ConversationOutcome] = {}
    for line in path.read_text().splitlines():
        try:
            o = ConversationOutcome.model_validate_json(line)
        except ValueError:
            continue
        found[(o.condition, o.conversation_id, o.seed)] = o
    return list(found.values())


def evaluate_conversations(
    conversations: Sequence[Conversation],
    out: Path,
    data_dir: Path | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    images: int = 4,
    names: Iterable[str] | None = None,
    on_outcome: Callable[[ConversationOutcome], None] | None = None,
) -> dict:
    """Run every (condition, conversation, seed) not yet in out/results.jsonl, then write out/summary.json and
    out/summary.md from everything there for these conversations and seeds."""
    chosen = list(CONDITIONS) if names is None else list(names)
    if unknown := [n for n in chosen if n not in CONDITIONS]:
        raise ValueError(f"unknown condition(s) {', '.join(unknown)}: use {', '.join(CONDITIONS)}")
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = {(o.condition, o.conversation_id, o.seed) for o in read_outcomes(results)}
    todo = [
        (c, condition, seed)
        for c in conversations
        for seed in seeds
        for condition in chosen
        if (condition, c.id, seed) not in done
    ]
    if todo:
        settings = Settings(profile="mini") if data_dir is None else Settings(profile="mini", data_dir=data_dir)
        backends = prepare(settings)
        oracle = Oracle.from_pretrained(ORACLE_DIR)
        with tempfile.TemporaryDirectory() as tmp:
            for conversation, condition, seed in todo:
                outcome = run_conversation(conversation, condition, seed, settings, backends, oracle, Path(tmp), images)
                with results.open("a") as f:
                    f.write(outcome.model_dump_json() + "\n")
                if on_outcome:
                    on_outcome(outcome)
    wanted, seed_set = {c.id for c in conversations}, set(seeds)
    outcomes = [
        o
        for o in read_outcomes(results)
        if o.conversation_id in wanted and o.seed in seed_set and o.condition in chosen
    ]
    report = summarise(outcomes)
    (out / "summary.json").write_text(json.dumps(report, indent=2))
    (out / "summary.md").write_text(markdown(report))
    return report


# ----------------------------------------------------------------------------- summary


def summarise(outcomes: list[ConversationOutcome]) -> dict:
    by_condition: dict[str, list[ConversationOutcome]] = defaultdict(list)
    for o in outcomes:
        by_condition[o.condition].append(o)
    # the kinds these conversations have (every kind of a split; a file of one's own may hold a few)
    kinds_here = [k for k in CONVERSATION_KINDS if any(o.kind == k for o in outcomes)]
    report: dict = {
        "conversations": len({o.conversation_id for o in outcomes}),
        "seeds": sorted({o.seed for o in outcomes}),
        "conditions": {},
    }
    for name in (c for c in CONDITIONS if c in by_condition):
        items = by_condition[name]
        instructions = [t for o in items for t in o.turns[1:]]
        kinds = {}
        for kind in kinds_here:
            mine = [o for o in items if o.kind == kind]
            kinds[kind] = {
                "conversations": len(mine),
                # turns of the conversation's own kind (an undo conversation's changes before each undo are not, nor a
                # pronoun conversation's first change, which names its object)
                "turns_all_right_pct": pct([t.all_right for o in mine for t in o.turns[1:] if t.kind == kind]),
                "final_all_right_pct": pct([o.final_all_right for o in mine]),
            }
        report["conditions"][name] = {
            "runs": len(items),
            "turns": sum(len(o.turns) for o in items),
            "first_turn_all_right_pct": pct([o.turns[0].all_right for o in items]),
            "instruction_turns_all_right_pct": pct([t.all_right for t in instructions]),
            "final_turn_all_right_pct": pct([o.final_all_right for o in items]),
            "every_turn_all_right_pct": pct([all(t.all_right for t in o.turns) for o in items]),
            "unchanged_objects_pct": pct([ok for t in instructions for _, ok in t.unchanged]),
            "unchanged_objects": len([ok for t in instructions for _, ok in t.unchanged]),
            "removed_absent_pct": pct([ok for t in instructions for _, ok in t.removed_absent]),
            "removed_objects": len([ok for t in instructions for _, ok in t.removed_absent]),
            "invented_concepts": sum(len(t.invented) for o in items for t in o.turns),
            "invented_examples": sorted({c for o in items for t in o.turns for c in t.invented})[:12],
            "turns_without_image": sum(not t.drew for o in items for t in o.turns),
            "turn_errors": sum(t.status.startswith("error") for o in items for t in o.turns),
            "images_per_turn": round(statistics.mean(t.generations for o in items for t in o.turns), 2),
            "seconds_per_conversation": round(statistics.mean(o.seconds for o in items), 2),
            "by_kind": kinds,
        }

    def table(name: str, kind: str | None = None) -> dict[str, dict[int, bool]]:
        t: dict[str, dict[int, bool]] = defaultdict(dict)
        for o in by_condition.get(name, []):
            if kind is None or o.kind == kind:
                t[o.conversation_id][o.seed] = o.final_all_right
        return t

    report["paired_final_turn"] = {
        f"{a} - {b}": {label: paired_bootstrap(table(a, k), table(b, k)) for label, k in (("all", None),)}
        | {"by_kind": {kind: paired_bootstrap(table(a, kind), table(b, kind), n=1000) for kind in kinds_here}}
        for a, b in COMPARISONS
        if a in by_condition and b in by_condition
    }
    return report


def _fmt(x: object) -> str:
    return "-" if x is None else f"{x}"


def _diff(d: dict) -> str:
    return f"{d['difference_points']} [{d['ci95'][0]}, {d['ci95'][1]}] (n={d['prompts']})" if d.get("prompts") else "-"


def markdown(report: dict) -> str:
    conds = report["conditions"]
    kinds = list(next(iter(conds.values()))["by_kind"]) if conds else []
    rows = [
        (
            f"{report['conversations']} conversations x seeds {report['seeds']}. Share all right (%): the first turn, every"
            " instruction turn, the final turn, every turn of a conversation; objects left alone that stayed unchanged;"
            " objects taken away that are absent; concepts added that name no object of the world:"
        ),
        "",
        (
            "| condition | first turn | instruction turns | final turn | every turn | unchanged objects | removed absent |"
            " invented concepts | images / turn | s / conversation |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in conds.items():
        rows.append(
            f"| {name} | {_fmt(s['first_turn_all_right_pct'])} | {_fmt(s['instruction_turns_all_right_pct'])} | "
            f"{_fmt(s['final_turn_all_right_pct'])} | {_fmt(s['every_turn_all_right_pct'])} | "
            f"{_fmt(s['unchanged_objects_pct'])} (n={s['unchanged_objects']}) | "
            f"{_fmt(s['removed_absent_pct'])} (n={s['removed_objects']}) | {s['invented_concepts']} | "
            f"{s['images_per_turn']} | {s['seconds_per_conversation']} |"
        )
    rows += [
        "",
        "By instruction kind: turns of that kind all right (%) / final turn all right (%):",
        "",
        "| condition | " + " | ".join(kinds) + " |",
        "|---|" + "---|" * len(kinds),
    ]
    for name, s in conds.items():
        cells = [
            f"{_fmt(k['turns_all_right_pct'])} / {_fmt(k['final_all_right_pct'])}"
            for k in (s["by_kind"][kind] for kind in kinds)
        ]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    if report.get("paired_final_turn"):
        rows += [
            "",
            (
                "Paired differences in final-turn all right (points, 95% bootstrap interval: conversations resampled, "
                "seeds within them):"
            ),
            "",
            "| comparison | all | " + " | ".join(kinds) + " |",
            "|---|---|" + "---|" * len(kinds),
        ]
        for name, d in report["paired_final_turn"].items():
            rows.append(f"| {name} | {_diff(d['all'])} | " + " | ".join(_diff(d["by_kind"][k]) for k in kinds) + " |")
    examples = {n: s["invented_examples"] for n, s in conds.items() if s["invented_examples"]}
    if examples:
        rows += ["", "Invented concepts, examples:", ""]
        rows += [f"- {name}: " + "; ".join(repr(c) for c in found) for name, found in examples.items()]
    return "\n".join(rows) + "\n"
