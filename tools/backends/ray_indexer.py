"""Index image collections on a Ray cluster into a Chroma server (`imagerag index SOURCES --ray [ADDRESS]`).

Ray Data runs the single-process indexer's own steps (indexer.py) over the project's own readers (sources.py), so
the collection equals the one `imagerag index` builds in one process: the same content-hash ids, sidecar captions,
link rules, size and caption bounds, decoding, reference-cache copies and row layout. Ray's read_images would decode
first and pair no captions, so the sources themselves are the items:

1. items: one row per .tar shard, .parquet file or folder (`from_items`, a block each, so shards read in parallel);
2. read (`flat_map`, CPU tasks): the source's reader yields its records as rows, captions bounded as in one process
   (indexer.bound_record), a refused file as a failed row; then an end row saying how many rows the source gave;
3. decode + preprocess (`map_batches`, CPU tasks): rows the collection already holds are skipped before decoding (one
   lookup per batch), indexer.DecodeAndPreprocess decodes the rest, shard and parquet members are copied into the
   reference cache (before their row is written, as in one process);
4. embed (`map_batches` in an ActorPoolStrategy pool): one model load per actor, a GPU per actor when the cluster
   has GPUs, else a fraction of a CPU so reads and decodes are not starved on a small machine; each actor checks that
   its model is the one the collection records;
5. write (`map_batches`, CPU tasks): one upsert per batch to the Chroma server (store.upsert_rows). Upserts by
   content id are idempotent, so a task Ray retries after a lost worker writes the same rows again.

The driver alone writes metadata: the collection's model and folders (before any row) and the ledger, a sibling
collection with one record per source (chromadb replaces a collection's metadata whole, so concurrent writers would
lose updates). A source is marked done once the driver has seen every one of its rows come out of the writers; a
rerun skips shards and parquet files marked done (keyed by path, size and modification time, so a changed file is
read again) and re-reads folders (they grow in place), skipping their indexed images by id before decoding.

Every node, and every machine that searches the collection, must see the sources and the reference cache at the
same paths (a shared filesystem): the collection records those folders and the agent opens references only there.
An image present twice (in two shards) is embedded twice and written under its one id; the later write's caption
stands.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, Field, model_validator

from imagerag.tools.backends.clip import EmbeddingModelInfo
from imagerag.tools.backends.indexer import (
    DecodeAndPreprocess,
    IndexSummary,
    _Fresh,
    bound_record,
    input_size,
    stored_source,
)
from imagerag.tools.backends.loading import load_embedder
from imagerag.tools.backends.sources import FolderSource, Source, SourceError, SourceRecord, open_source
from imagerag.tools.backends.store import WHITE, ReferenceStore, StoreError, server_client, upsert_rows
from imagerag.tools.config import BackendConfig
from imagerag.tools.files import content_id

if TYPE_CHECKING:
    import chromadb
    import pyarrow as pa

log = logging.getLogger(__name__)

LEDGER_OF_KEY = "imagerag_ledger_of"  # metadata of a ledger collection: the collection whose sources it records
MAX_NAMED_FAILURES = 100  # failed files named in the summary (every one is logged)
OBJECT_STORE_BYTES = 256 << 20  # a local runtime's object store: batches stream through it, nothing is held

Reader = Callable[[str], Iterable[SourceRecord]]
"""Opens one source (a path as the driver saw it) on a worker and yields its records."""


class RayIndexOptions(BaseModel):
    """How `index_on_ray` runs; every field has a default that suits one machine."""

    address: str | None = Field(
        default=None, description="A Ray cluster ('auto', 'host:6379', 'ray://host:10001'); None: a local runtime."
    )
    batch_size: int = Field(default=64, ge=1, description="Images per decode task batch, embedding forward and write.")
    embed_actors: int | None = Field(
        default=None, ge=1, description="Embedding actors; default: one per GPU of the cluster, else 1."
    )
    # Fractions, so that a node's CPUs hold an embedding actor and read, decode and write tasks beside it: on a
    # one-CPU node, a whole-CPU task would never be scheduled next to the actor. They differ on purpose: Ray Data
    # fuses a task step into the next actor step when their resources are equal, which would decode in the actors.
    actor_cpus: float = Field(default=0.5, gt=0, description="CPUs per embedding actor when the cluster has no GPU.")
    task_cpus: float = Field(default=0.25, gt=0, description="CPUs per read, decode and write task.")

    @model_validator(mode="after")
    def _not_fused(self) -> RayIndexOptions:
        if self.actor_cpus == self.task_cpus:
            raise ValueError("actor_cpus and task_cpus must differ, or Ray Data decodes inside the embedding actors")
        return self

    image_column: str | None = None
    caption_column: str | None = None
    background: tuple[int, int, int] = WHITE


class ShardReport(BaseModel):
    """One source's counts, as the ledger records them once all its rows are written."""

    uri: str
    added: int = 0
    skipped: int = 0
    failed: int = 0


class RayIndexSummary(IndexSummary):
    shards_done: int = 0
    shards_skipped: int = 0  # marked done in the ledger by an earlier run
    failures: list[str] = Field(default_factory=list)  # the first MAX_NAMED_FAILURES failed files, with why
    stage_stats: str = ""  # Ray Data's per-operator times for this run

    def line(self) -> str:
        shards = f"{self.shards_done} source(s) done, {self.shards_skipped} already done before; "
        return shards + super().line()


# --------------------------------------------------------------------------------------------------- the ledger


def ledger_name(name: str) -> str:
    """The ledger collection of collection `name` (a valid name: at most 63 characters)."""
    return f"{name[:56]}-ledger"


def source_key(source: Source) -> str:
    """A source's ledger id: a folder by its path, a file by path, size and modification time."""
    if isinstance(source, FolderSource):
        return content_id(f"folder:{source.root}".encode())
    stat = Path(source.uri).stat()
    return content_id(f"file:{source.uri}:{stat.st_size}:{stat.st_mtime_ns}".encode())


class ShardLedger:
    """One record per source of a collection, in a sibling collection that only the driver writes."""

    def __init__(self, client: chromadb.ClientAPI, name: str):
        self.collection = client.get_or_create_collection(
            ledger_name(name), embedding_function=None, metadata={LEDGER_OF_KEY: name}
        )
        if (self.collection.metadata or {}).get(LEDGER_OF_KEY) != name:
            raise StoreError(
                f"collection {ledger_name(name)!r} exists and is not the ledger of {name!r}: rename or delete it"
            )

    def done(self, keys: Sequence[str]) -> set[str]:
        if not keys:
            return set()
        return set(self.collection.get(ids=list(dict.fromkeys(keys)), include=[])["ids"])

    def mark_done(self, key: str, report: ShardReport) -> None:
        # chromadb stores vectors only: a one-number placeholder keeps the record a row.
        self.collection.upsert(
            ids=[key],
            embeddings=np.ones((1, 1), np.float32),
            documents=[report.uri],
            metadatas=[{**report.model_dump(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}],
        )

    def reports(self) -> dict[str, ShardReport]:
        found = self.collection.get(include=["metadatas"])
        return {
            i: ShardReport.model_validate({k: m[k] for k in ShardReport.model_fields})
            for i, m in zip(found["ids"], found["metadatas"], strict=True)
        }


# ------------------------------------------------------------------------------------------ the pipeline's steps


def read_rows(item: dict[str, Any], reader: Reader) -> Iterator[dict[str, Any]]:
    """flat_map: one source's records as rows (captions bounded), then its end row with how many came before."""
    count = 0
    try:
        for count, record in enumerate(reader(item["path"]), 1):
            bounded, cut = bound_record(record)
            yield _row(item["key"], count - 1, "failed" if record.error else "read", bounded, cut)
    except (SourceError, OSError) as error:  # this node does not see the path as the driver did
        where = f"{item['path']} on {socket.gethostname()}"
        reason = f"cannot read {where} ({error}): every node must see the sources at the same path (shared storage)"
        yield _row(item["key"], count, "failed", SourceRecord(b"", "", item["path"], error=reason), False)
        count += 1
    yield {**_row(item["key"], -1, "end", SourceRecord(b"", "", item["path"]), False), "count": count}


def _row(key: str, row: int, status: str, record: SourceRecord, cut: bool) -> dict[str, Any]:
    return {
        "shard": key,
        "row": row,
        "status": status,
        "id": record.id if status == "read" else "",
        "data": record.data,
        "caption": record.caption,
        "uri": record.uri,
        "on_disk": record.on_disk,
        "reason": record.error or "",
        "caption_cut": cut,
        "caption_lost": record.caption_error or "",
        "count": 0,
    }


@cache
def _server_collection(url: str, name: str) -> chromadb.Collection:
    """The collection on the Chroma server, one client per worker process."""
    return server_client(url).get_collection(name, embedding_function=None)


def decode_rows(table: pa.Table, decode: DecodeAndPreprocess, url: str, name: str, cache_dir: str | None) -> pa.Table:
    """map_batches: skip rows the collection holds, decode and preprocess the rest, copy shard members to the cache."""
    rows = table.to_pylist()
    reads = [r for r in rows if r["status"] == "read"]
    ids = list(dict.fromkeys(r["id"] for r in reads))  # chromadb refuses repeated ids and an empty list
    present = set(_server_collection(url, name).get(ids=ids, include=[])["ids"]) if ids else set()
    fresh: list[_Fresh] = []
    for r in reads:
        if r["id"] in present:  # indexed, or a second copy in this batch: counted as in one process
            r.update(status="skipped", caption_cut=False, caption_lost="")
            continue
        present.add(r["id"])
        fresh.append(_Fresh(r["id"], SourceRecord(r["data"], r["caption"], r["uri"], on_disk=r["on_disk"])))
    batch = decode(fresh)
    by_id = {r["id"]: r for r in reads if r["status"] == "read"}  # the first copy of each id, not a skipped one
    for item, why in batch.failed:
        by_id[item.id].update(status="failed", reason=why)
    pixels = batch.pixels.numpy() if batch.pixels is not None else ()
    for item, fmt, tensor in zip(batch.fresh, batch.formats, pixels, strict=True):
        by_id[item.id].update(
            status="fresh",
            source=stored_source(item, fmt, Path(cache_dir) if cache_dir else None),
            pixels=np.ascontiguousarray(tensor, np.float32).tobytes(),
        )
    for r in rows:
        r.pop("data")
        r.setdefault("source", "")
        r.setdefault("pixels", b"")
    return _table(rows)


class EmbedActor:
    """map_batches in an actor pool: the profile's CLIP, loaded once per actor, embeds the fresh rows."""

    def __init__(self, config: BackendConfig, info: EmbeddingModelInfo):
        self.embedder = load_embedder(config)
        if self.embedder.info != info:
            raise StoreError(
                f"this worker's {config.profile} CLIP is {self.embedder.info} but the collection records {info}: "
                "install the same model on every node"
            )
        # The shape one image preprocesses to, from the preprocess itself (resize, crop).
        self.shape = tuple(self.embedder.preprocess(Image.new("RGB", (8, 8))).shape)

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = table.to_pylist()
        fresh = [r for r in rows if r["status"] == "fresh"]
        if fresh:
            pixels = np.stack([np.frombuffer(r["pixels"], np.float32) for r in fresh]).reshape(-1, *self.shape)
            for r, vector in zip(fresh, self.embedder.embed_images(torch.from_numpy(pixels)), strict=True):
                r["embedding"] = np.asarray(vector, np.float32).tobytes()
        for r in rows:
            r.pop("pixels")
            r.setdefault("embedding", b"")
        return _table(rows)


def write_rows(table: pa.Table, url: str, name: str) -> pa.Table:
    """map_batches: one upsert of the batch's embedded rows; what the driver needs of every row goes on."""
    rows = table.to_pylist()
    fresh = [r for r in rows if r["status"] == "fresh"]
    if fresh:
        upsert_rows(
            _server_collection(url, name),
            [r["id"] for r in fresh],
            np.stack([np.frombuffer(r["embedding"], np.float32) for r in fresh]),
            [r["caption"] for r in fresh],
            [r["source"] for r in fresh],
            [r["uri"] for r in fresh],
        )
        for r in fresh:
            r["status"] = "added"
    keep = ("shard", "row", "status", "uri", "reason", "caption_cut", "caption_lost", "count")
    return _table([{k: r[k] for k in keep} for r in rows])


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    import pyarrow as pa

    return pa.Table.from_pylist(rows)


# ------------------------------------------------------------------------------------------------- the driver


@contextmanager
def ray_runtime(address: str | None) -> Iterator[None]:
    """Connect to the Ray cluster at `address`, or start a local runtime (loopback, no dashboard, usage stats off,
    a small object store); shut down what this started. A runtime the caller already runs is used as it is."""
    import ray

    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(
            address="local",
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            object_store_memory=OBJECT_STORE_BYTES,
            logging_level=logging.WARNING,
        )
    try:
        yield
    finally:
        ray.shutdown()


@dataclass
class _Shard:
    key: str
    report: ShardReport
    rows: set[int] = field(default_factory=set)
    expected: int | None = None
    marked: bool = False

    @property
    def complete(self) -> bool:
        return self.expected is not None and len(self.rows) == self.expected


def index_on_ray(
    store: ReferenceStore,
    sources: Sequence[Source],
    config: BackendConfig,
    chroma_url: str,
    cache_dir: Path | None,
    options: RayIndexOptions | None = None,
    on_batch: Callable[[int], None] | None = None,
    on_shard: Callable[[ShardReport], None] | None = None,
    summary: RayIndexSummary | None = None,
    reader: Reader | None = None,
) -> RayIndexSummary:
    """Embed and add every image of `sources` that the collection lacks, on Ray, writing to the Chroma server at
    `chroma_url` (where `store`'s collection lives, created and model-checked by the caller).

    Sources marked done in the ledger are skipped; `on_batch(n)` hears of rows dealt with, `on_shard` of each source
    finished. `cache_dir` receives copies of shard and parquet images and must be a path every node and the searching
    machine see (required when there are such sources). `reader` opens a source on a worker (default: its reader in
    sources.py, with the options' parquet columns).
    """
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    options = options or RayIndexOptions()
    summary = summary if summary is not None else RayIndexSummary()
    started = time.time()
    folders = [s for s in sources if isinstance(s, FolderSource)]
    if any(s.follow_external_links for s in folders):
        raise SourceError("--follow-external-links is not supported with --ray: link the files into the folder")
    if cache_dir is None and len(folders) < len(sources):
        raise SourceError("indexing .tar shards or .parquet files needs a reference cache folder (--reference-cache)")
    ledger = ShardLedger(server_client(chroma_url), store.collection.name)
    keys = [source_key(s) for s in sources]
    finished = ledger.done([k for k, s in zip(keys, sources, strict=True) if not isinstance(s, FolderSource)])
    summary.shards_skipped += len(finished)
    todo = {k: _Shard(k, ShardReport(uri=s.uri)) for k, s in zip(keys, sources, strict=True) if k not in finished}
    # Recorded before any row: a row is never written without the folder that lets the agent open its image.
    store.record_roots([s.root for s in folders] + ([cache_dir] if cache_dir else []))
    if not todo:
        summary.seconds = time.time() - started
        return summary
    read = reader or partial(open_source, image_column=options.image_column, caption_column=options.caption_column)
    with ray_runtime(options.address):
        DataContext.get_current().enable_progress_bars = False  # the caller shows its own
        gpus = int(ray.cluster_resources().get("GPU", 0))
        actors = options.embed_actors or max(gpus, 1)
        items = [{"key": k, "path": s.uri} for k, s in zip(keys, sources, strict=True) if k in todo]
        decode = DecodeAndPreprocess(store.embedder.preprocess, input_size(store.embedder), options.background)
        name, cache = store.collection.name, str(cache_dir) if cache_dir else None
        dataset = (
            ray.data.from_items(items, override_num_blocks=len(items))
            .flat_map(partial(read_rows, reader=read), num_cpus=options.task_cpus)
            .map_batches(
                partial(decode_rows, decode=decode, url=chroma_url, name=name, cache_dir=cache),
                batch_size=options.batch_size,
                batch_format="pyarrow",
                num_cpus=options.task_cpus,
            )
            .map_batches(
                EmbedActor,
                batch_size=options.batch_size,
                batch_format="pyarrow",
                compute=ActorPoolStrategy(size=actors),
                fn_constructor_kwargs={
                    "config": BackendConfig(profile=config.profile, data_dir=config.data_dir, device=config.device),
                    "info": store.embedder.info,
                },
                **({"num_gpus": 1} if gpus else {"num_cpus": options.actor_cpus}),
            )
            .map_batches(
                partial(write_rows, url=chroma_url, name=name),
                batch_size=options.batch_size,
                batch_format="pyarrow",
                num_cpus=options.task_cpus,
            )
        )
        try:
            for row in dataset.iter_rows():
                _tally(row, todo, summary, ledger, on_batch, on_shard)
        finally:
            summary.seconds = time.time() - started
            summary.stage_stats = dataset.stats()
    return summary


def _tally(
    row: dict[str, Any],
    shards: dict[str, _Shard],
    summary: RayIndexSummary,
    ledger: ShardLedger,
    on_batch: Callable[[int], None] | None,
    on_shard: Callable[[ShardReport], None] | None,
) -> None:
    """Count one row the writers let through (once, though a retried task may send it again); mark its source done
    in the ledger once all of its rows are in."""
    shard = shards[row["shard"]]
    if row["status"] == "end":
        shard.expected = row["count"]
    elif row["row"] not in shard.rows:
        shard.rows.add(row["row"])
        status = row["status"]
        if status == "failed":
            summary.failed += 1
            shard.report.failed += 1
            log.warning("skipping %s: %s", row["uri"], row["reason"])
            if len(summary.failures) < MAX_NAMED_FAILURES:
                summary.failures.append(f"{row['uri']}: {row['reason']}")
        else:
            setattr(summary, status, getattr(summary, status) + 1)  # added or skipped
            setattr(shard.report, status, getattr(shard.report, status) + 1)
        if row["caption_cut"]:
            summary.captions_cut += 1
            log.warning("caption of %s was over the limit: cut at a word boundary", row["uri"])
        if row["caption_lost"]:
            summary.captions_lost += 1
            log.warning("%s", row["caption_lost"])
        if on_batch:
            on_batch(1)
    if shard.complete and not shard.marked:
        ledger.mark_done(shard.key, shard.report)
        summary.shards_done += 1
        shard.marked = True
        if on_shard:
            on_shard(shard.report)
