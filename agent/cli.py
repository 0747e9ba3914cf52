"""The `imagerag` command line."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from agent.config import ConfigError, Settings
from agent.state import Budget

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Make text-to-image models draw what the prompt asks.")
err = Console(stderr=True)
USER_ERRORS = (ConfigError, ValidationError, FileNotFoundError)


def fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def make_settings(budget: dict | None = None, **overrides) -> Settings:
    """Settings from env/TOML with the CLI's explicit flags on top (None means: not given)."""
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
        given = {k: v for k, v in (budget or {}).items() if v is not None}
        if given:
            settings = settings.model_copy(update={"budget": Budget.model_validate(settings.budget.model_dump() | given)})
        settings.resolved_profile()
        return settings
    except ValidationError as error:
        fail("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()))
    except ConfigError as error:
        fail(str(error))


Profile = Annotated[Optional[str], typer.Option(help="Backend profile: sdxl, omnigen, sd15, tiny, mini.")]
Collection = Annotated[Optional[str], typer.Option(help="Reference collection (default: the profile's).")]
DataDir = Annotated[Optional[Path], typer.Option(help="Data folder for chromadb and built models.")]


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    profile: Profile = None,
    policy: Annotated[Optional[str], typer.Option(help="imagerag (deterministic) or agent (LLM).")] = None,
    max_rounds: Annotated[Optional[int], typer.Option(help="Policy turns, the first generation included.")] = None,
    max_generations: Annotated[Optional[int], typer.Option(help="Images generated in all.")] = None,
    max_seconds: Annotated[Optional[float], typer.Option(help="Wall-clock budget.")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="LLM token budget.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.")] = None,
    collection: Collection = None,
    data_dir: DataDir = None,
    out: Annotated[Path, typer.Option(help="Folder that receives the run folder.")] = Path("runs"),
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Generate an image, critique it per concept, retrieve references and regenerate until satisfied."""
    from agent.run import RunError, run
    from tools.backends.store import StoreError

    settings = make_settings(
        budget=dict(max_rounds=max_rounds, max_generations=max_generations, max_seconds=max_seconds, max_tokens=max_tokens),
        profile=profile, policy=policy, seed=seed, collection=collection, data_dir=data_dir,
    )
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=True) as progress:
        task = progress.add_task("loading models", total=None)

        def on_event(kind: str, payload: dict) -> None:
            if kind == "diffusion_step":
                progress.update(task, completed=payload["step"], total=payload["total"])
            elif kind == "retrieved":
                progress.update(task, description=f"retrieved {len(payload['hits'])} reference(s)")
            else:
                for step in payload.get("steps", []):
                    err.print(f"[dim]round {step.round}[/] [bold]{step.node}[/] {step.summary}")
                progress.update(task, description=f"after {kind}", completed=0, total=None)

        try:
            result = run(prompt, settings, out, on_event=on_event)
        except (RunError, StoreError, *USER_ERRORS) as error:
            progress.stop()
            fail(str(error))
    if json_output:
        typer.echo(result.model_dump_json(indent=2))
    else:
        show_result(result)
    if result.status == "failed":
        raise typer.Exit(1)


def show_result(result) -> None:
    table = Table(title=f"{result.status} ({result.stop_reason}) · {result.rounds} round(s), {result.generations} image(s), {result.elapsed:.1f} s")
    for column in ("concept", "verdict", "score"):
        table.add_column(column)
    for c in result.concepts:
        table.add_row(c.text, c.verdict, f"{c.score:.2f}" if c.score is not None else "")
    err.print(table)
    if result.error:
        err.print(f"[red]{result.error}[/]")
    err.print(f"best image: {Path(result.run_dir) / result.best_image if result.best_image else 'none'}")
    err.print(f"report:     {Path(result.run_dir) / 'report.html'}")


@app.command()
def index(
    sources: Annotated[list[Path], typer.Argument(help="Image folders (recursive; captions from sidecar .txt/.json).")],
    collection: Collection = None,
    profile: Profile = None,
    data_dir: DataDir = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
) -> None:
    """Embed images with the profile's CLIP and add them to a reference collection (incremental, resumable)."""
    from tools.backends.indexer import index_folders
    from tools.backends.loading import load_embedder
    from tools.backends.store import ReferenceStore, StoreError, chroma_client

    settings = make_settings(profile=profile, collection=collection, data_dir=data_dir)
    for source in sources:
        if not source.is_dir():
            fail(f"no image folder at {source}: pass existing folders of images")
    try:
        store = ReferenceStore.open(chroma_client(settings.data_dir), settings.collection_name, load_embedder(settings), create=True)
    except StoreError as error:
        fail(str(error))
    with Progress(TextColumn("indexing"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"), console=err) as progress:
        task = progress.add_task("index", total=None, rate="")
        summary = index_folders(store, sources, batch_size, on_batch=lambda n: progress.advance(task, n))
    err.print(f"added {summary.added}, skipped {summary.skipped}, failed {summary.failed} in {summary.seconds:.1f} s; collection {settings.collection_name!r} holds {store.count()}")


@app.command()
def search(
    caption: Annotated[str, typer.Argument(help="What to look for.")],
    k: Annotated[int, typer.Option("-k", min=1)] = 5,
    min_similarity: Annotated[Optional[float], typer.Option(help="Drop hits below this cosine similarity.")] = None,
    collection: Collection = None,
    profile: Profile = None,
    data_dir: DataDir = None,
) -> None:
    """Search a reference collection by caption."""
    from tools.backends.loading import calibrated, load_embedder
    from tools.backends.store import ReferenceStore, StoreError, chroma_client

    settings = make_settings(profile=profile, collection=collection, data_dir=data_dir)
    try:
        store = ReferenceStore.open(chroma_client(settings.data_dir), settings.collection_name, load_embedder(settings))
    except StoreError as error:
        fail(str(error))
    threshold = calibrated(settings).retrieval_min_similarity if min_similarity is None else min_similarity
    hits = store.search(caption, k, threshold)
    table = Table(title=f"{len(hits)} hit(s) for {caption!r}")
    for column in ("similarity", "caption", "source"):
        table.add_column(column)
    for hit in hits:
        table.add_row(f"{hit.similarity:.3f}", hit.caption, hit.source)
    Console().print(table)


eval_app = typer.Typer(no_args_is_help=True, help="Benchmarks.")
app.add_typer(eval_app, name="eval")


@eval_app.command("miniworld")
def eval_miniworld(
    data_dir: Annotated[Path, typer.Option(help="Data folder for the world's corpus and collections.")] = Path(".imagerag"),
    out: Annotated[Path, typer.Option(help="Where miniworld.json and miniworld.md are written.")] = Path("evals/results"),
    prompts: Annotated[Optional[int], typer.Option(min=3, help="Use only this many held-out prompts (default: all).")] = None,
    rounds: Annotated[int, typer.Option(min=2, help="Round budget of the loop condition.")] = 4,
) -> None:
    """Text alone vs the paper's one pass vs the loop on the miniature world, judged by its oracle."""
    from evals.miniworld.benchmark import evaluate, markdown

    report = evaluate(data_dir, out, prompts, rounds)
    Console().print(markdown(report))
    err.print(f"written to {out / 'miniworld.json'} and {out / 'miniworld.md'} in {report['seconds_total']} s")


def main() -> None:
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    logging.basicConfig(level=logging.WARNING)
    # Library chatter (load bars, deprecation notes) would bury our own progress; errors still show.
    warnings.filterwarnings("ignore", category=FutureWarning)
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    app()
