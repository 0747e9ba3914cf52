"""Retrieval benchmark: chromadb's HNSW index against exact search, and indexing throughput against the raw
open_clip forward pass.

    python -m imagerag.evals.bench_retrieval              # everything: 10K, 100K, 1M vectors + throughput
    python -m imagerag.evals.bench_retrieval --sizes 10000 --no-throughput --out /tmp/r   # a quick look

Search: synthetic L2-normalised 512-d vectors with cluster structure (a mixture of Gaussian clusters around
random centres, each point also varying along a low-rank subspace, like real image embeddings; uniform random
vectors on the sphere are a known worst case for HNSW and are not used). Queries are held-out draws from the
same mixture, never inserted. Exact search is the reference: one normalised matrix product over all
embeddings plus argpartition, per query. Recall@10 is |chroma top-10 ∩ exact top-10| / 10.

Throughput: the same rendered PNG files and batch size for both; raw = open_clip's encode_image on
already-preprocessed tensors (the physical limit), end to end = `index_sources` (read, hash, decode,
preprocess, embed, chromadb write) into a fresh collection.

Results go to OUT/retrieval.json and OUT/retrieval.md; levels and throughput rows (model, image size) measured by
an earlier run are kept unless measured again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

HNSW = {
    "space": "cosine",
    "max_neighbors": 16,
    "ef_construction": 100,
    "ef_search": 128,
    "num_threads": 2,
    "batch_size": 5000,
    "sync_threshold": 100_000,
}
ADD_BATCH = 5000
RECALL_TARGET = 0.95


def clustered_vectors(n: int, dim: int, rng: np.random.Generator, centres: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """n unit vectors: a random centre + a low-rank (basis) offset + small isotropic noise, normalised."""
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        c = centres[rng.integers(0, len(centres), m)]
        low_rank = rng.standard_normal((m, basis.shape[0]), dtype=np.float32) @ basis * 0.45
        noise = rng.standard_normal((m, dim), dtype=np.float32) * (0.15 / np.sqrt(dim))
        x = c + low_rank + noise
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def bench_search(
    n: int, dim: int, queries: int, seed: int, insert_limit_s: float, workdir: Path, ef_searches: list[int]
) -> dict:
    import chromadb
    from chromadb.config import Settings

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(16, n // 1000), dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    basis = rng.standard_normal((32, dim), dtype=np.float32) / np.sqrt(dim)
    data = clustered_vectors(n, dim, rng, centres, basis)
    held_out = clustered_vectors(queries, dim, rng, centres, basis)

    # Exact search, the reference method.
    exact_ids, exact_times = [], []
    for q in held_out:
        t = time.perf_counter()
        scores = data @ q
        top = np.argpartition(-scores, 10)[:10]
        top = top[np.argsort(-scores[top])]
        exact_times.append(time.perf_counter() - t)
        exact_ids.append(set(top.tolist()))

    path = Path(tempfile.mkdtemp(dir=workdir, prefix=f"chroma-{n}-"))
    client = chromadb.PersistentClient(path=str(path), settings=Settings(anonymized_telemetry=False))
    collection = client.create_collection("bench", embedding_function=None, configuration={"hnsw": HNSW})
    started, inserted, partial = time.perf_counter(), 0, False
    for start in range(0, n, ADD_BATCH):
        chunk = data[start : start + ADD_BATCH]
        collection.add(ids=[str(i) for i in range(start, start + len(chunk))], embeddings=chunk)
        inserted += len(chunk)
        if time.perf_counter() - started > insert_limit_s and inserted < n:
            partial = True
            break
    insert_s = time.perf_counter() - started
    if partial:  # measure what got in, against exact search over the same vectors
        data = data[:inserted]
        exact_ids = []
        for q in held_out:
            scores = data @ q
            exact_ids.append(set(np.argpartition(-scores, 10)[:10].tolist()))

    del client, collection
    # ef_search is a search-time knob, but chromadb applies a changed value only when a process loads the
    # index: each point of the sweep is measured by a fresh process over the same persisted index.
    np.save(path / "queries.npy", held_out)
    (path / "truth.json").write_text(json.dumps([sorted(t) for t in exact_ids]))
    sweep = {}
    for ef in ef_searches:
        client = chromadb.PersistentClient(path=str(path), settings=Settings(anonymized_telemetry=False))
        client.get_collection("bench").modify(configuration={"hnsw": {"ef_search": ef}})
        del client
        measured = subprocess.run(
            [sys.executable, "-m", "imagerag.evals.bench_retrieval", "--measure-queries", str(path)],
            capture_output=True,
            text=True,
            check=True,
        )
        sweep[ef] = json.loads(measured.stdout.strip().splitlines()[-1])
        print(f"  n={n} ef_search={ef}: {sweep[ef]}", flush=True)
    shutil.rmtree(path, ignore_errors=True)
    # The headline: the cheapest ef_search that reaches the recall target, else the most accurate one.
    meeting = [ef for ef in ef_searches if sweep[ef]["recall_at_10"] >= RECALL_TARGET]
    best = min(meeting) if meeting else max(ef_searches, key=lambda ef: sweep[ef]["recall_at_10"])
    return {
        "vectors": n,
        "inserted": inserted,
        "partial": partial,
        "dim": dim,
        "queries": queries,
        "insert_s": round(insert_s, 1),
        "insert_per_s": round(inserted / insert_s, 1),
        "ef_search": best,
        "chroma": {k: sweep[best][k] for k in ("p50_ms", "p99_ms")},
        "exact": percentiles(exact_times),
        "recall_at_10": sweep[best]["recall_at_10"],
        "ef_search_sweep": {str(k): v for k, v in sweep.items()},
    }


def measure_queries(path: Path) -> dict:
    """In a fresh process: load the persisted index, time the held-out queries one by one, score recall@10."""
    import chromadb
    from chromadb.config import Settings

    held_out = np.load(path / "queries.npy")
    truth = [set(t) for t in json.loads((path / "truth.json").read_text())]
    collection = chromadb.PersistentClient(
        path=str(path), settings=Settings(anonymized_telemetry=False)
    ).get_collection("bench")
    collection.query(query_embeddings=held_out[:1], n_results=10, include=["distances"])  # loads the index
    times, recalls = [], []
    for q, t in zip(held_out, truth, strict=True):
        started = time.perf_counter()
        found = collection.query(query_embeddings=q[None], n_results=10, include=["distances"])
        times.append(time.perf_counter() - started)
        recalls.append(len({int(i) for i in found["ids"][0]} & t) / 10)
    return {**percentiles(times), "recall_at_10": round(float(np.mean(recalls)), 4)}


def render_images(folder: Path, n: int, size: int, seed: int) -> None:
    """Miniworld-like pictures at `size` px: a few random coloured shapes on white, saved as PNG."""
    import random

    from PIL import Image, ImageDraw

    rnd = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = Image.new("RGB", (size, size), "white")
        draw = ImageDraw.Draw(image)
        for _ in range(rnd.randint(1, 4)):
            x, y, r = rnd.randint(0, size), rnd.randint(0, size), rnd.randint(size // 10, size // 3)
            colour = tuple(rnd.randint(0, 255) for _ in range(3))
            (draw.ellipse if rnd.random() < 0.5 else draw.rectangle)((x - r, y - r, x + r, y + r), fill=colour)
        image.save(folder / f"{i:06d}.png")
        (folder / f"{i:06d}.txt").write_text(f"picture {i}")


def bench_throughput(
    label: str, embedder, folder: Path, batch_size: int, workdir: Path, workers: list[int], rounds: int
) -> dict:
    import torch
    from PIL import Image

    from imagerag.tools.backends.indexer import index_sources
    from imagerag.tools.backends.store import ReferenceStore, chroma_client

    paths = sorted(folder.glob("*.png"))
    pixels = []
    for p in paths:
        with Image.open(p) as image:
            pixels.append(embedder.preprocess(image.convert("RGB")))
    batches = [torch.stack(pixels[s : s + batch_size]) for s in range(0, len(pixels), batch_size)]
    embedder.embed_images(batches[0])  # warm-up

    def raw_pass() -> float:
        with torch.inference_mode():
            started = time.perf_counter()
            for batch in batches:
                embedder.model.encode_image(batch)
            return time.perf_counter() - started

    def end_to_end(n_workers: int) -> float:
        db = Path(tempfile.mkdtemp(dir=workdir, prefix="throughput-"))
        store = ReferenceStore.open(chroma_client(db), "throughput", embedder, create=True)
        summary = index_sources(store, [folder], batch_size=batch_size, num_workers=n_workers)
        assert summary.added == len(paths), summary
        shutil.rmtree(db, ignore_errors=True)
        return summary.seconds

    # Alternate the passes and keep each one's best round: on a shared CPU the least-disturbed round is the
    # closest to the machine's own speed, and alternating exposes both to the same disturbances.
    raw: list[float] = []
    e2e: dict[int, list[float]] = {n: [] for n in workers}
    for _ in range(rounds):
        raw.append(raw_pass())
        for n_workers in workers:
            e2e[n_workers].append(end_to_end(n_workers))
    raw_rate = len(paths) / min(raw)
    with Image.open(paths[0]) as first:
        image_size = first.width
    result = {
        "model": label,
        "images": len(paths),
        "image_size": image_size,
        "batch_size": batch_size,
        "torch_threads": torch.get_num_threads(),
        "rounds": rounds,
        "raw_forward_images_per_s": round(raw_rate, 1),
        "raw_seconds": [round(x, 2) for x in raw],
    }
    for n_workers, seconds in e2e.items():
        rate = len(paths) / min(seconds)
        result[f"end_to_end_workers{n_workers}_images_per_s"] = round(rate, 1)
        result[f"ratio_workers{n_workers}"] = round(rate / raw_rate, 3)
        result[f"end_to_end_workers{n_workers}_seconds"] = [round(x, 2) for x in seconds]
    return result


def markdown(report: dict) -> str:
    lines = [
        "## Retrieval: chromadb HNSW vs exact search",
        "",
        (
            f"Synthetic clustered unit vectors, dim {report['search_setup']['dim']}, "
            f"{report['search_setup']['queries']} held-out queries per level; "
            f"hnsw {json.dumps(report['search_setup']['hnsw'])}. {report['machine']}."
        ),
        "",
        "| vectors | inserted | insert (vectors/s) | ef_search | chroma p50 / p99 (ms) | exact p50 / p99 (ms) | recall@10 (chroma vs exact) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level in sorted(report["search"].values(), key=lambda r: r["vectors"]):
        note = (
            " (partial: insert time limit; exact latency over all vectors, recall over those inserted)"
            if level["partial"]
            else ""
        )
        lines.append(
            f"| {level['vectors']:,} | {level['inserted']:,}{note} | {level['insert_per_s']:,.0f} | {level.get('ef_search', '')} | "
            f"{level['chroma']['p50_ms']:.2f} / {level['chroma']['p99_ms']:.2f} | "
            f"{level['exact']['p50_ms']:.2f} / {level['exact']['p99_ms']:.2f} | {level['recall_at_10']:.3f} |"
        )
    lines += ["", "ef_search sweep (same index; p50 / p99 ms, recall@10):", ""]
    for level in sorted(report["search"].values(), key=lambda r: r["vectors"]):
        cells = [
            f"ef {ef}: {v['p50_ms']:.2f} / {v['p99_ms']:.2f}, {v['recall_at_10']:.3f}"
            for ef, v in level.get("ef_search_sweep", {}).items()
        ]
        lines.append(f"- {level['inserted']:,} vectors: " + "; ".join(cells))
    if report.get("throughput"):
        lines += [
            "",
            "## Indexing throughput: end to end vs the raw open_clip forward",
            "",
            "| model | images | size (px) | batch | raw forward (img/s) | end to end, 0 workers (img/s) | ratio | end to end, 1 worker (img/s) | ratio |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for t in report["throughput"].values():
            lines.append(
                f"| {t['model']} | {t['images']} | {t['image_size']} | {t['batch_size']} | {t['raw_forward_images_per_s']} | "
                f"{t.get('end_to_end_workers0_images_per_s', '')} | {t.get('ratio_workers0', '')} | "
                f"{t.get('end_to_end_workers1_images_per_s', '')} | {t.get('ratio_workers1', '')} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument(
        "--insert-limit",
        type=float,
        default=1200.0,
        help="Seconds of inserting per level before measuring what got in.",
    )
    parser.add_argument("--ef-search", type=int, nargs="*", default=[128, 256, 512])
    parser.add_argument("--throughput", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--models", nargs="*", default=["ViT-B-32", "mini:clip"], help="'ViT-B-32' (random weights) and/or 'mini:clip'."
    )
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 1])
    parser.add_argument(
        "--rounds", type=int, default=3, help="Alternating raw / end-to-end rounds; the best of each is kept."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("evals/results"))
    parser.add_argument("--measure-queries", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_queries:
        print(json.dumps(measure_queries(args.measure_queries)))
        return

    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "retrieval.json"
    report = json.loads(json_path.read_text()) if json_path.exists() else {}
    report["machine"] = (
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch threads {torch.get_num_threads()}"
    )
    report["search_setup"] = {
        "dim": args.dim,
        "queries": args.queries,
        "hnsw": HNSW,
        "add_batch": ADD_BATCH,
        "data": "Gaussian clusters (n/1000 centres) + rank-32 offsets (0.45) + isotropic noise (0.15), normalised",
    }
    report.setdefault("search", {})
    workdir = Path(tempfile.mkdtemp(prefix="bench-retrieval-"))
    try:
        if args.throughput:
            from imagerag.tools.backends.clip import LOCAL_DIR, ClipEmbedder
            from imagerag.tools.miniworld import MODELS_DIR as MINI_MODELS

            folder = workdir / "images"
            render_images(folder, args.images, args.image_size, args.seed)
            report.setdefault("throughput", {})
            for model in args.models:
                if model.startswith("mini:"):
                    embedder = ClipEmbedder.from_pretrained(LOCAL_DIR + str(MINI_MODELS / model.removeprefix("mini:")))
                    label = f"{model} ({embedder.info.dim}-d, trained)"
                else:
                    embedder = ClipEmbedder.from_pretrained(model, None)
                    label = f"{model} (random weights, {embedder.info.dim}-d)"
                t = bench_throughput(label, embedder, folder, args.batch_size, workdir, args.workers, args.rounds)
                print(json.dumps(t), flush=True)
                report["throughput"][f"{model}@{args.image_size}px"] = t  # rows measured earlier are kept
        for n in args.sizes:
            level = bench_search(n, args.dim, args.queries, args.seed, args.insert_limit, workdir, args.ef_search)
            print(json.dumps(level), flush=True)
            report["search"][str(n)] = level
            json_path.write_text(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    json_path.write_text(json.dumps(report, indent=2))
    text = markdown(report)
    (args.out / "retrieval.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
