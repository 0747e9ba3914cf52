"""`imagerag eval miniworld`: does the loop make images match prompts of 2 to 10 concepts? Judged by an oracle.

Conditions, each run on the same prompts and seeds with the mini profile (N = the loop's image budget):
    text_alone   one image from text
    best_of_n    N images from text in one round, the best by the same critic (compute-matched parallel sampling)
    one_pass     the paper's procedure: an image, then one regeneration with references; the last image is kept
    loop         the imagerag policy for up to N rounds and N images, returning the best image, every round
                 redrawing the whole image
    loop_edits   the same, but a round edits the best image (redraws only the regions of what it misses) when it
                 holds some objects with all their concepts, each redrawn object with its own reference masked to
                 its region
    loop_edits_one_ref   the edits as they were before per-region references: one reference a round, conditioning
                 the whole edit, so only its object is redrawn (an ablation of the above)
Every chosen image is read by the oracle (evals/miniworld/oracle.py, never seen by the agent) and judged per concept
(grammar.judge). The report gives the share of prompts with every concept right by k and by rare/common, per-kind
rates, images and seconds per prompt, how often the critic agrees with the oracle per concept kind, and the paired
difference between the loop and each baseline with a 95% bootstrap interval (prompts resampled, seeds within them).

Results are appended to results.jsonl one (condition, prompt, seed) at a time; a rerun skips what is there, so an
interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from PIL import Image
from pydantic import BaseModel

from imagerag.agent.config import Settings
from imagerag.agent.result import RunResult
from imagerag.agent.run import prepare, run
from imagerag.evals.miniworld.common import ORACLE_DIR
from imagerag.evals.miniworld.grammar import CONCEPT_KINDS, Group, PromptSpec, concept_text, judge, sample_prompt
from imagerag.evals.miniworld.oracle import Oracle
from imagerag.graphs.state import Budget
from imagerag.tools.backends.loading import Backends
from imagerag.tools.miniworld.world import CELL_PHRASES, CELLS, COLOUR_NAMES, RARE_SHAPES, SHAPES, SIZE_NAMES

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
K_BUCKETS: dict[str, tuple[int, int]] = {"2-3": (2, 3), "4-5": (4, 5), "6-7": (6, 7), "8-10": (8, 10)}
# The prompt mix, fixed before any result was seen: prompts per (k bucket, with or without a rare object).
SPLITS: dict[str, tuple[int, int]] = {"dev": (6, 1_000), "test": (10, 2_000)}  # (per cell, seed)


BASELINES = ("text_alone", "best_of_n", "one_pass")


class Condition(BaseModel):
    name: str
    rounds: int
    samples: int = 1
    edits: bool = False
    region_references: bool = True
    pick: str = "best"  # "last": the last image, as the paper's one pass returns it


def conditions(images: int) -> list[Condition]:
    return [
        Condition(name="text_alone", rounds=1),
        Condition(name="best_of_n", rounds=1, samples=images),
        Condition(name="one_pass", rounds=2, pick="last"),
        Condition(name="loop", rounds=images),
        Condition(name="loop_edits", rounds=images, edits=True),
        Condition(name="loop_edits_one_ref", rounds=images, edits=True, region_references=False),
    ]


class Outcome(BaseModel):
    """One (condition, prompt, seed): the oracle on the chosen image, and the critic against the oracle on every
    image of the run."""

    condition: str
    prompt_id: str
    seed: int
    k: int
    rare: bool
    objects: int
    all_right: bool
    concepts: list[tuple[str, bool]]  # (kind, right) per concept of the prompt
    any_image_all_right: bool  # what a perfect critic could have picked among the run's images
    critic: list[tuple[str, bool, bool]]  # (kind, critic says satisfied, oracle says right) per concept and image
    generations: int
    seconds: float


# ----------------------------------------------------------------------------- prompts


def make_split(name: str) -> list[PromptSpec]:
    """A split's prompts, deterministic: per k bucket, prompts with and without one rare object, scenes drawn from
    the evaluation half of the scene space (never in the retrieval corpus nor in training) and the test split
    deduplicated against the dev split by scene specification."""
    per_cell, seed = SPLITS[name]
    taken = {p.scene_key for p in make_split("dev")} if name == "test" else set()
    rng = random.Random(seed)
    out: list[PromptSpec] = []
    for bucket, (lo, hi) in K_BUCKETS.items():
        for rare in (False, True):
            made = 0
            while made < per_cell:
                spec = sample_prompt(
                    rng, rng.randint(lo, hi), rare, f"{name}-{bucket}-{'rare' if rare else 'common'}-{made}", "eval"
                )
                if spec.scene_key in taken:
                    continue
                taken.add(spec.scene_key)
                out.append(spec)
                made += 1
    return out


def write_splits(folder: Path = PROMPTS_DIR) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        (folder / f"{name}.jsonl").write_text("".join(p.model_dump_json() + "\n" for p in make_split(name)))


def load_prompts(path: Path) -> list[PromptSpec]:
    """A JSONL file of PromptSpec objects (grammar.py documents the schema); errors name the line."""
    specs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                specs.append(PromptSpec.model_validate_json(line))
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not a prompt of the miniature world: {e}") from e
    if len({p.id for p in specs}) != len(specs):
        raise ValueError(f"{path}: prompt ids must be unique")
    return specs


# ----------------------------------------------------------------------------- running


def run_one(
    spec: PromptSpec,
    condition: Condition,
    seed: int,
    settings: Settings,
    backends: Backends,
    oracle: Oracle,
    runs: Path,
) -> Outcome:
    images = condition.rounds * condition.samples
    budget = Budget(max_rounds=condition.rounds, max_generations=images, max_seconds=None, max_tokens=None)
    update = {
        "budget": budget,
        "seed": seed,
        "samples": condition.samples,
        "edits": condition.edits,
        "region_references": condition.region_references,
    }
    settings = settings.model_copy(update=update)
    result = run(spec.prompt, settings, runs, backends=backends)
    chosen = result.candidates[-1] if condition.pick == "last" else result.best
    if chosen is None:
        raise RuntimeError(f"{spec.id}: the run drew no image ({result.stop_reason})")
    readings = oracle.read([_load(Path(result.run_dir) / "images" / f"{c.image_id}.png") for c in result.candidates])
    judged = {c.image_id: judge(spec, r) for c, r in zip(result.candidates, readings, strict=True)}
    verdict = judged[chosen.image_id]
    shutil.rmtree(result.run_dir, ignore_errors=True)
    return Outcome(
        condition=condition.name,
        prompt_id=spec.id,
        seed=seed,
        k=spec.k,
        rare=spec.has_rare,
        objects=sum(g.count for g in spec.groups),
        all_right=verdict.all_right,
        concepts=[(c.kind, ok) for c, ok in verdict.concepts],
        any_image_all_right=any(j.all_right for j in judged.values()),
        critic=critic_agreement(spec, result, judged),
        generations=result.generations,
        seconds=round(result.elapsed, 3),
    )


def critic_agreement(spec: PromptSpec, result: RunResult, judged: dict) -> list[tuple[str, bool, bool]]:
    """The critic's verdict next to the oracle's, for each concept of the run whose text is the grammar's text of a
    prompt concept (the offline planner writes them so) on each image the critic judged."""
    index = {concept_text(spec, c): i for i, c in enumerate(spec.concepts)}
    ids = {c.id: index[c.text] for c in result.concepts if c.text in index}
    out = []
    for cand in result.candidates:
        oracle = judged[cand.image_id].concepts
        for v in cand.verdicts:
            if (i := ids.get(v.concept_id)) is not None:
                out.append((oracle[i][0].kind, v.satisfied, oracle[i][1]))
    return out


def _load(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def done_keys(path: Path) -> set[tuple[str, str, int]]:
    if not path.exists():
        return set()
    out = set()
    for line in path.read_text().splitlines():
        if line.strip():  # a line cut by an interruption is simply redone
            try:
                o = Outcome.model_validate_json(line)
            except ValueError:
                continue
            out.add((o.condition, o.prompt_id, o.seed))
    return out


def read_outcomes(path: Path) -> list[Outcome]:
    outcomes: dict[tuple[str, str, int], Outcome] = {}
    for line in path.read_text().splitlines():
        try:
            o = Outcome.model_validate_json(line)
        except ValueError:
            continue
        outcomes[(o.condition, o.prompt_id, o.seed)] = o
    return list(outcomes.values())


def evaluate(
    prompts: Sequence[PromptSpec],
    out: Path,
    data_dir: Path | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    images: int = 4,
    names: Iterable[str] | None = None,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> dict:
    """Run every (condition, prompt, seed) not yet in out/results.jsonl, then write out/summary.json and
    out/summary.md from everything there."""
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = done_keys(results)
    chosen = [c for c in conditions(images) if names is None or c.name in set(names)]
    settings = Settings(profile="mini") if data_dir is None else Settings(profile="mini", data_dir=data_dir)
    backends = prepare(settings)
    oracle = Oracle.from_pretrained(ORACLE_DIR)
    with tempfile.TemporaryDirectory() as tmp:
        for spec in prompts:
            for seed in seeds:
                for condition in chosen:
                    if (condition.name, spec.id, seed) in done:
                        continue
                    outcome = run_one(spec, condition, seed, settings, backends, oracle, Path(tmp))
                    with results.open("a") as f:
                        f.write(outcome.model_dump_json() + "\n")
                    if on_outcome:
                        on_outcome(outcome)
    wanted = {p.id for p in prompts}
    report = summarise([o for o in read_outcomes(results) if o.prompt_id in wanted and o.seed in set(seeds)])
    retrieval = out / "retrieval.json"  # the collection's, measured once per results folder
    if not retrieval.exists():
        retrieval.write_text(json.dumps(retrieval_precision(backends), indent=2))
    report["retrieval_precision_at_1"] = json.loads(retrieval.read_text())
    (out / "summary.json").write_text(json.dumps(report, indent=2))
    (out / "summary.md").write_text(markdown(report))
    return report


# ----------------------------------------------------------------------------- summary


def bucket(k: int) -> str:
    return next((name for name, (lo, hi) in K_BUCKETS.items() if lo <= k <= hi), "other")


def pct(flags: Sequence[bool]) -> float | None:
    return round(100 * sum(flags) / len(flags), 1) if flags else None


def paired_bootstrap(
    a: dict[str, dict[int, bool]], b: dict[str, dict[int, bool]], n: int = 2000, seed: int = 0
) -> dict:
    """Mean difference (points) of all-right rates a - b over the prompts both have, with a 95% interval from a
    nested bootstrap: prompts resampled with replacement, then seeds within each drawn prompt."""
    prompts = sorted(set(a) & set(b))
    pairs = {p: [(a[p][s], b[p][s]) for s in sorted(set(a[p]) & set(b[p]))] for p in prompts}
    pairs = {p: v for p, v in pairs.items() if v}
    if not pairs:
        return {"prompts": 0}
    keys = list(pairs)

    def diff(draw: Iterable[list[tuple[bool, bool]]]) -> float:
        per_prompt = [statistics.mean(x - y for x, y in seeds) for seeds in draw]
        return 100 * statistics.mean(per_prompt)

    rng = random.Random(seed)
    stats = sorted(
        diff([rng.choices(pairs[p], k=len(pairs[p])) for p in rng.choices(keys, k=len(keys))]) for _ in range(n)
    )
    return {
        "prompts": len(keys),
        "difference_points": round(diff(pairs.values()), 1),
        "ci95": [round(stats[int(0.025 * n)], 1), round(stats[int(0.975 * n) - 1], 1)],
    }


SUBSETS: dict[str, Callable[[Outcome], bool]] = {
    "all": lambda o: True,
    "k>=5, rare": lambda o: o.k >= 5 and o.rare,
    "k>=5, common only": lambda o: o.k >= 5 and not o.rare,
    "several objects, rare": lambda o: o.objects >= 2 and o.rare,
}


def summarise(outcomes: list[Outcome]) -> dict:
    by_condition: dict[str, list[Outcome]] = defaultdict(list)
    for o in outcomes:
        by_condition[o.condition].append(o)
    report: dict = {"prompts": len({o.prompt_id for o in outcomes}), "seeds": sorted({o.seed for o in outcomes})}
    report["conditions"] = {}
    for name, items in by_condition.items():
        cells = {}
        for b in K_BUCKETS:
            for rare in (False, True):
                cells[f"k {b}, {'rare' if rare else 'common'}"] = pct(
                    [o.all_right for o in items if bucket(o.k) == b and o.rare == rare]
                )
        kinds = {kind: pct([ok for o in items for k, ok in o.concepts if k == kind]) for kind in CONCEPT_KINDS}
        critic = {kind: pct([c == r for o in items for k, c, r in o.critic if k == kind]) for kind in CONCEPT_KINDS}
        report["conditions"][name] = {
            "runs": len(items),
            "all_right_pct": pct([o.all_right for o in items]),
            "all_right_by_cell_pct": cells,
            "concepts_by_kind_pct": kinds,
            "any_image_all_right_pct": pct([o.any_image_all_right for o in items]),
            "critic_agrees_with_oracle_pct": critic,
            "images_per_prompt": round(statistics.mean(o.generations for o in items), 2),
            "seconds_per_prompt": round(statistics.mean(o.seconds for o in items), 2),
        }

    def table(name: str, subset: Callable[[Outcome], bool]) -> dict[str, dict[int, bool]]:
        t: dict[str, dict[int, bool]] = defaultdict(dict)
        for o in by_condition.get(name, []):
            if subset(o):
                t[o.prompt_id][o.seed] = o.all_right
        return t

    report["paired"] = {}
    # The loop with edits against every other condition (its ablation included); the whole-image loop against the
    # baselines.
    bases = {"loop_edits": [c for c in by_condition if c != "loop_edits"], "loop": list(BASELINES)}
    for method in (m for m in bases if m in by_condition):
        for base in (c for c in bases[method] if c in by_condition):
            report["paired"][f"{method} - {base}"] = {
                label: paired_bootstrap(table(method, f), table(base, f)) for label, f in SUBSETS.items()
            }
    return report


def markdown(report: dict) -> str:
    conds = report["conditions"]
    cells = next(iter(conds.values()))["all_right_by_cell_pct"] if conds else {}
    fmt = lambda x: "-" if x is None else f"{x}"
    rows = [
        f"{report['prompts']} prompts x seeds {report['seeds']}. Share of prompts with every concept right (%):",
        "",
        "| condition | all | " + " | ".join(cells) + " | images / prompt | s / prompt |",
        "|---|---|" + "---|" * len(cells) + "---|---|",
    ]
    for name, s in conds.items():
        rows.append(
            f"| {name} | {fmt(s['all_right_pct'])} | "
            + " | ".join(fmt(v) for v in s["all_right_by_cell_pct"].values())
            + f" | {s['images_per_prompt']} | {s['seconds_per_prompt']} |"
        )
    rows += ["", "Concepts right, by kind (%); in brackets, how often the critic agrees with the oracle:", ""]
    rows += [
        "| condition | " + " | ".join(CONCEPT_KINDS) + " | any image all right |",
        "|---|" + "---|" * (len(CONCEPT_KINDS) + 1),
    ]
    for name, s in conds.items():
        rows.append(
            f"| {name} | "
            + " | ".join(
                f"{fmt(s['concepts_by_kind_pct'][k])} ({fmt(s['critic_agrees_with_oracle_pct'][k])})"
                for k in CONCEPT_KINDS
            )
            + f" | {fmt(s['any_image_all_right_pct'])} |"
        )
    rows += ["", "Paired differences in all-right prompts (points, 95% bootstrap interval):", ""]
    rows += ["| comparison | " + " | ".join(SUBSETS) + " |", "|---|" + "---|" * len(SUBSETS)]
    for name, subsets in report["paired"].items():
        rows.append(
            f"| {name} | "
            + " | ".join(
                f"{d['difference_points']} [{d['ci95'][0]}, {d['ci95'][1]}] (n={d['prompts']})" if d["prompts"] else "-"
                for d in subsets.values()
            )
            + " |"
        )
    if r := report.get("retrieval_precision_at_1"):
        rows += ["", f"Retrieval precision@1 of object captions ({r['queries']} queries, {r['corpus']} images), %:", ""]
        kinds = list(r["clip"])
        rows += ["| order | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
        rows += [f"| {name} | " + " | ".join(fmt(r[name][k]) for k in kinds) + " |" for name in r if name in RANKINGS]
    return "\n".join(rows) + "\n"


# ----------------------------------------------------------------------------- retrieval


def parse_caption(caption: str) -> list[tuple[str, str, str, str]]:
    """A corpus caption back to (shape, colour, size, cell) per object."""
    phrases = {v: k for k, v in CELL_PHRASES.items()}
    out = []
    for part in caption.strip().split(" and "):
        words = part.split()
        cell = phrases.get(" ".join(words[4:]))
        if len(words) >= 5 and words[1] in SIZE_NAMES and words[2] in COLOUR_NAMES and words[3] in SHAPES and cell:
            out.append((words[3], words[2], words[1], cell))
    return out


RANKINGS = ("clip", "critic_reranked")


class RetrievalQuery(BaseModel):
    kind: str  # shape, colour, size, position, object (all three at once)
    group: Group  # what the top image must hold an object of

    @property
    def text(self) -> str:
        return self.group.phrase()


def retrieval_queries(seed: int = 0) -> list[RetrievalQuery]:
    """Object captions. Per shape: the shape alone, with each colour, each size, each cell, and 6 with size, colour
    and cell at once (drawn with `seed`)."""
    rng = random.Random(seed)
    out: list[RetrievalQuery] = []
    for shape in SHAPES:
        out.append(RetrievalQuery(kind="shape", group=Group(shape=shape)))
        out += [RetrievalQuery(kind="colour", group=Group(shape=shape, colour=c)) for c in COLOUR_NAMES]
        out += [RetrievalQuery(kind="size", group=Group(shape=shape, size=z)) for z in SIZE_NAMES]
        out += [RetrievalQuery(kind="position", group=Group(shape=shape, cell=c)) for c in CELLS]
        for _ in range(6):
            group = Group(
                shape=shape, colour=rng.choice(COLOUR_NAMES), size=rng.choice(SIZE_NAMES), cell=rng.choice(CELLS)
            )
            out.append(RetrievalQuery(kind="object", group=group))
    return out


def retrieval_precision(backends: Backends) -> dict:
    """Precision@1 of object captions on the profile's collection (does the top image hold an object with every
    attribute the caption names?), in CLIP's order and in the order the runtime retrieves (re-ranked by the critic
    when the profile says so), overall, for rare shapes and per kind of caption."""
    queries = retrieval_queries()
    rankings: dict[str, dict] = {RANKINGS[0]: {}}
    if backends.reranker is not None and backends.profile.rerank_k:
        rankings[RANKINGS[1]] = {"reranker": backends.reranker, "fetch_k": backends.profile.rerank_k}
    out: dict = {"queries": len(queries), "corpus": backends.store.count()}
    for name, options in rankings.items():
        hits: dict[str, list[bool]] = defaultdict(list)
        for q in queries:
            found = backends.store.search(q.text, 1, **options)
            g = q.group
            ok = any(
                (shape, colour, size, cell) == (g.shape, g.colour or colour, g.size or size, g.cell or cell)
                for shape, colour, size, cell in (parse_caption(found[0].caption) if found else [])
            )
            hits["all"].append(ok)
            hits[q.kind].append(ok)
            if g.shape in RARE_SHAPES:
                hits["rare"].append(ok)
        out[name] = {k: pct(v) for k, v in hits.items()}
    return out
