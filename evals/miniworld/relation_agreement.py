"""How often the critic agrees with the oracle on relations ("a heart to the left of a blue ring"), on images drawn
from text alone for the dev prompts with exactly one relation (seeds 0-7), so that the critic's rule can be changed
and compared on the same images:

    python -m imagerag.evals.miniworld.relation_agreement [--data-dir D] [--out FILE]

The images are kept in an `images` folder beside FILE and drawn only once; FILE gets one record per image (the
oracle's truth, the critic's verdict and evidence) and the counts of (truth, verdict) pairs.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from PIL import Image

from imagerag.agent.config import Settings
from imagerag.evals.miniworld.benchmark import PROMPTS_DIR, load_prompts
from imagerag.evals.miniworld.common import ORACLE_DIR
from imagerag.evals.miniworld.grammar import judge
from imagerag.evals.miniworld.oracle import Oracle
from imagerag.tools.backends.loading import load_backends

SEEDS = range(8)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m imagerag.evals.miniworld.relation_agreement")
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("evals/results/dev-choices/relations.json"))
    args = ap.parse_args()
    settings = Settings(profile="mini", device="cpu", **({"data_dir": args.data_dir} if args.data_dir else {}))
    backends, oracle = load_backends(settings), Oracle.from_pretrained(ORACLE_DIR)
    rows = []
    for spec in (p for p in load_prompts(PROMPTS_DIR / "dev.jsonl") if len(p.relations) == 1):
        concepts, _ = backends.decomposer.decompose(spec.prompt)
        # The decomposer's relation concept (a cell is a relation to the image: "a circle in the centre").
        [relation] = [
            c
            for c in concepts
            if c.kind == "relation" and c.text.split()[-1] not in ("centre", "left", "right", "top", "bottom")
        ]
        for seed in SEEDS:
            path = args.out.parent / "images" / f"{spec.id}-{seed}.png"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                backends.generator.generate(spec.prompt, seed, 1, [])[0].save(path)
            with Image.open(path) as file:
                image = file.convert("RGB")
            [truth] = [ok for c, ok in judge(spec, oracle.read([image])[0]).concepts if c.kind == "relation"]
            verdict = next(
                v
                for v in backends.critic.critique(image, concepts, spec.prompt).verdicts
                if v.concept_id == relation.id
            )
            rows.append(
                {
                    "prompt": spec.id,
                    "seed": seed,
                    "relation": relation.text,
                    "truth": truth,
                    "critic": verdict.satisfied,
                    "evidence": verdict.evidence,
                }
            )
    counts = collections.Counter(f"truth {r['truth']}, critic {r['critic']}" for r in rows)
    args.out.write_text(json.dumps({"counts": dict(sorted(counts.items())), "images": rows}, indent=1))
    print(dict(sorted(counts.items())))


if __name__ == "__main__":
    main()
