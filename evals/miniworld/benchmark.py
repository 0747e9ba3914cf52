"""`imagerag eval miniworld`: does the loop make images match their prompts? Measured by an independent oracle.

On held-out prompts (common, rare and two-object scenes) it compares, with the same mini models:
  (a) text-to-image alone          imagerag policy, 1 round;
  (b) the paper's one pass         imagerag policy, 2 rounds, returning the regenerated image as the paper does;
  (c) the loop                     imagerag policy, up to --rounds rounds, returning the best image.
Each chosen image is judged by the oracle (a classifier trained on the world's ground truth, never seen by the
agent), per object: shape, colour, position. It also measures mini CLIP's retrieval precision@1 for concept
captions, and the "concept not in the database" case (every heart removed from the corpus).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from pydantic import BaseModel

from imagerag.agent.config import Settings
from imagerag.agent.run import run
from imagerag.evals.miniworld.common import ORACLE_DIR
from imagerag.evals.miniworld.oracle import Oracle
from imagerag.graphs.state import Budget
from imagerag.tools.backends.indexer import index_folders
from imagerag.tools.backends.loading import load_backends, load_embedder
from imagerag.tools.backends.store import ReferenceStore, chroma_client
from imagerag.tools.miniworld.world import (
    COLOUR_NAMES,
    RARE_SHAPES,
    SHAPES,
    HeldoutPrompt,
    heldout_prompts,
    write_corpus,
)
from imagerag.tools.toolkit import Backends

ABSENT_SHAPE = "heart"
CORPUS_SIZE, CORPUS_SEED = 6000, 1


class Condition(BaseModel):
    name: str
    rounds: int
    pick: str  # "best": the run's answer; "last": the last image, as the one-pass paper method returns


class ImageVerdicts(BaseModel):
    """The oracle on one image of a run (every round's, not only the chosen one: shows what the critic picked from)."""

    round: int
    chosen: bool
    shape: list[bool]
    colour: list[bool]
    position: list[bool]


class PromptOutcome(BaseModel):
    condition: str
    group: str
    prompt: str
    shapes: list[str]
    rare_objects: list[bool]
    shape: list[bool]
    colour: list[bool]
    position: list[bool]
    generations: int
    seconds: float
    status: str
    images: list[ImageVerdicts]


def conditions(loop_rounds: int) -> list[Condition]:
    return [
        Condition(name="text_alone", rounds=1, pick="best"),
        Condition(name="one_pass", rounds=2, pick="last"),
        Condition(name=f"loop_{loop_rounds}_rounds", rounds=loop_rounds, pick="best"),
    ]


def ensure_collection(settings: Settings, name: str, corpus_dir: Path, exclude: tuple[str, ...] = ()) -> ReferenceStore:
    """The world's retrieval corpus, rendered deterministically and indexed with the project's own indexer."""
    if not any(corpus_dir.glob("*.png")):
        write_corpus(corpus_dir, CORPUS_SIZE, CORPUS_SEED, exclude)
    store = ReferenceStore.open(chroma_client(settings.data_dir), name, load_embedder(settings), create=True)
    index_folders(store, [corpus_dir])
    return store


def run_condition(
    prompts: list[HeldoutPrompt],
    condition: Condition,
    settings: Settings,
    backends: Backends,
    oracle: Oracle,
    runs: Path,
) -> list[PromptOutcome]:
    settings = settings.model_copy(
        update={
            "budget": Budget(
                max_rounds=condition.rounds, max_generations=condition.rounds, max_seconds=None, max_tokens=None
            )
        }
    )
    outcomes = []
    for item in prompts:
        result = run(item.prompt, settings, runs / condition.name, backends=backends)
        chosen = result.candidates[-1] if condition.pick == "last" else result.best
        images = [
            ImageVerdicts(
                round=c.round,
                chosen=chosen is not None and c.image_id == chosen.image_id,
                shape=[v.shape for v in vs],
                colour=[v.colour for v in vs],
                position=[v.position for v in vs],
            )
            for c in result.candidates
            for vs in [oracle.judge(_load(Path(result.run_dir) / "images" / f"{c.image_id}.png"), item.scene)]
        ]
        verdicts = next(i for i in images if i.chosen)
        outcomes.append(
            PromptOutcome(
                condition=condition.name,
                group=item.group,
                prompt=item.prompt,
                shapes=[o.shape for o in item.scene.objects],
                rare_objects=[o.is_rare for o in item.scene.objects],
                shape=verdicts.shape,
                colour=verdicts.colour,
                position=verdicts.position,
                generations=result.generations,
                seconds=result.elapsed,
                status=result.status,
                images=images,
            )
        )
    return outcomes


def _load(path: Path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def summarise(outcomes: list[PromptOutcome]) -> dict:
    """Oracle-judged per-concept satisfaction (share of objects whose shape/colour/position is right)."""

    def rate(flags: list[bool]) -> float:
        return round(100 * sum(flags) / len(flags), 1) if flags else float("nan")

    shape_common = [s for o in outcomes for s, rare in zip(o.shape, o.rare_objects, strict=False) if not rare]
    shape_rare = [s for o in outcomes for s, rare in zip(o.shape, o.rare_objects, strict=False) if rare]
    rare_all = [
        x
        for o in outcomes
        for i, rare in enumerate(o.rare_objects)
        if rare
        for x in (o.shape[i], o.colour[i], o.position[i])
    ]
    two = [o for o in outcomes if o.group == "two_object"]
    return {
        "prompts": len(outcomes),
        "shape_common_pct": rate(shape_common),
        "shape_rare_pct": rate(shape_rare),
        "rare_objects_all_concepts_pct": rate(rare_all),
        "two_object_all_concepts_pct": rate([all(o.shape + o.colour + o.position) for o in two]),
        "colour_pct": rate([c for o in outcomes for c in o.colour]),
        "position_pct": rate([p for o in outcomes for p in o.position]),
        "all_concepts_pct": rate([x for o in outcomes for x in o.shape + o.colour + o.position]),
        # What a perfect critic could have picked: the rare shape drawn in any image of the run.
        "shape_rare_any_image_pct": rate(
            [any(i.shape[k] for i in o.images) for o in outcomes for k, rare in enumerate(o.rare_objects) if rare]
        ),
        "generations_per_prompt": round(statistics.mean(o.generations for o in outcomes), 2),
        "seconds_per_prompt": round(statistics.mean(o.seconds for o in outcomes), 3),
    }


def retrieval_precision(store: ReferenceStore, min_similarity: float) -> dict:
    """Precision@1 of concept captions: does the top hit show the asked shape (and colour)?"""
    hits = defaultdict(list)
    for shape in SHAPES:
        for caption, colour in [(f"a {shape}", None)] + [(f"a {c} {shape}", c) for c in COLOUR_NAMES]:
            found = store.search(caption, k=1)
            top = found[0] if found else None
            ok = (
                top is not None
                and shape in top.caption.split()
                and (colour is None or f"{colour} {shape}" in top.caption)
            )
            hits["rare" if shape in RARE_SHAPES else "common"].append(ok)
    everything = hits["rare"] + hits["common"]
    return {
        "captions": len(everything),
        "precision_at_1_pct": round(100 * sum(everything) / len(everything), 1),
        "precision_at_1_rare_pct": round(100 * sum(hits["rare"]) / len(hits["rare"]), 1),
        "precision_at_1_common_pct": round(100 * sum(hits["common"]) / len(hits["common"]), 1),
    }


def absent_queries(store: ReferenceStore, min_similarity: float) -> dict:
    """With every heart removed from the corpus, heart captions should retrieve nothing above the threshold."""
    captions = [f"a {ABSENT_SHAPE}"] + [f"a {c} {ABSENT_SHAPE}" for c in COLOUR_NAMES]
    empty = [not store.search(c, k=1, min_similarity=min_similarity) for c in captions]
    return {"captions": len(captions), "empty_answers_pct": round(100 * sum(empty) / len(empty), 1)}


def markdown(report: dict) -> str:
    rows = [
        "| condition | shape, common | shape, rare | rare objects, shape+colour+position | two-object, all concepts | colour | position | all concepts | generations / prompt | seconds / prompt |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in report["conditions"].items():
        rows.append(
            f"| {name} | {s['shape_common_pct']}% | {s['shape_rare_pct']}% | {s['rare_objects_all_concepts_pct']}% | {s['two_object_all_concepts_pct']}% | {s['colour_pct']}% | {s['position_pct']}% | {s['all_concepts_pct']}% | {s['generations_per_prompt']} | {s['seconds_per_prompt']} |"
        )
    r, a = report["retrieval"], report["absent_concept"]
    rows += [
        "",
        "Rare shape drawn in any image of the run (what a perfect critic could pick): "
        + ", ".join(f"{name} {s['shape_rare_any_image_pct']}%" for name, s in report["conditions"].items())
        + ".",
        "",
        f"Mini CLIP retrieval precision@1 over {r['captions']} concept captions: {r['precision_at_1_pct']}% (rare {r['precision_at_1_rare_pct']}%, common {r['precision_at_1_common_pct']}%).",
        "",
        (
            f"Concept not in the database (every {ABSENT_SHAPE} removed): {a['retrieval']['empty_answers_pct']}% of {a['retrieval']['captions']} {ABSENT_SHAPE} captions retrieve nothing above the threshold; "
            f"on the {a['prompts']} prompts with a {ABSENT_SHAPE}, oracle shape satisfaction is {a['text_alone_shape_pct']}% for text alone and {a['loop_shape_pct']}% for the loop."
        ),
    ]
    return "\n".join(rows) + "\n"


def evaluate(data_dir: Path, out: Path, n_prompts: int | None = None, loop_rounds: int = 4, seed: int = 0) -> dict:
    """Run the whole benchmark; write out/miniworld.json and out/miniworld.md. Returns the report.
    `seed` is the generator's base seed for every run (the prompts and the corpus stay the same)."""
    started = time.time()
    settings = Settings(profile="mini", data_dir=data_dir, seed=seed)
    prompts = heldout_prompts()
    if n_prompts is not None:  # a quick look: keep the group mix
        prompts = prompts[:: max(1, len(prompts) // n_prompts)][:n_prompts]
    store = ensure_collection(settings, "miniworld", data_dir / "miniworld-corpus")
    backends = dataclasses.replace(load_backends(settings), store=store)
    oracle = Oracle.from_pretrained(ORACLE_DIR)
    report: dict = {"prompts": len(prompts), "seed": seed, "conditions": {}}
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp)
        outcomes: list[PromptOutcome] = []
        for condition in conditions(loop_rounds):
            done = run_condition(prompts, condition, settings, backends, oracle, runs)
            report["conditions"][condition.name] = summarise(done)
            outcomes += done
        report["retrieval"] = retrieval_precision(store, backends.min_similarity)

        absent_store = ensure_collection(
            settings, f"miniworld-no-{ABSENT_SHAPE}", data_dir / f"miniworld-corpus-no-{ABSENT_SHAPE}", (ABSENT_SHAPE,)
        )
        absent_backends = dataclasses.replace(backends, store=absent_store)
        with_absent = [p for p in prompts if any(o.shape == ABSENT_SHAPE for o in p.scene.objects)]
        text, loop = conditions(loop_rounds)[0], conditions(loop_rounds)[2]
        absent = {"prompts": len(with_absent), "retrieval": absent_queries(absent_store, backends.min_similarity)}
        for key, condition in (("text_alone_shape_pct", text), ("loop_shape_pct", loop)):
            done = run_condition(with_absent, condition, settings, absent_backends, oracle, runs / "absent")
            flags = [ok for o in done for ok, shape in zip(o.shape, o.shapes, strict=False) if shape == ABSENT_SHAPE]
            absent[key] = round(100 * sum(flags) / len(flags), 1) if flags else float("nan")
        report["absent_concept"] = absent
    report["seconds_total"] = round(time.time() - started, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "miniworld.json").write_text(json.dumps(report, indent=2))
    (out / "miniworld.md").write_text(markdown(report))
    (out / "miniworld-prompts.jsonl").write_text("".join(o.model_dump_json() + "\n" for o in outcomes))
    return report
