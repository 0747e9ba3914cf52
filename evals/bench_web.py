"""The chat page against the CLI, side by side in one process: time from send to the first round image, and to the
end of the run, on the mini profile.

The CLI side is what `imagerag generate` runs once its models are loaded (agent.run.run with an event callback: the
first image exists when its node reports). The page side is `imagerag serve web`'s app on loopback, driven in
Debian's Chromium by Playwright: from the click on Send to the first round image loaded in the page (decoded,
natural width > 0), and to the final status. Both use the same backends (loaded once, warmed by one untimed run
each), the same prompt and seed, a new thread per run, alternating which side goes first. The overhead is page minus
CLI, per pair. The machine's load average is recorded: on a shared machine it moves the figures.

    python -m imagerag.evals.bench_web --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

from imagerag.agent.config import Settings
from imagerag.agent.events import NodeFinished, RunEvent
from imagerag.agent.run import run
from imagerag.agent.serving import serving_in_thread
from imagerag.agent.web import ChatPage, build_app
from imagerag.graphs.state import Budget
from imagerag.tools.backends.indexer import index_folders
from imagerag.tools.backends.loading import load_backends, load_embedder
from imagerag.tools.backends.store import ReferenceStore, chroma_client
from imagerag.tools.miniworld.world import write_corpus
from imagerag.tools.profiles import MINI_COLLECTION

PROMPT = "a large red crescent in the top left, a blue ring at the bottom and a yellow square on the right"
DRAWN = {"generate", "regenerate", "edit"}
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-sync"]
FIRST_IMAGE = "() => { const i = document.querySelector('#conversation img.round'); return !!i && i.complete && i.naturalWidth > 0 }"


def small_mini_data(root: Path, corpus: int) -> Settings:
    """A data folder whose mini collection is indexed from `corpus` images (the profile's own 20,000 are not
    rendered; the first round draws from text alone, so the collection's size does not enter its time)."""
    write_corpus(root / "corpus", n=corpus, seed=1)
    settings = Settings(profile="mini", data_dir=root)
    store = ReferenceStore.open(chroma_client(root), MINI_COLLECTION, load_embedder(settings), create=True)
    index_folders(store, [root / "corpus"])
    return settings


def cli_run(settings: Settings, out: Path, thread: str, backends: object) -> dict[str, float]:
    started, first = time.perf_counter(), None

    def on_event(event: RunEvent) -> None:
        nonlocal first
        if first is None and isinstance(event, NodeFinished) and event.node in DRAWN:
            first = time.perf_counter() - started

    result = run(PROMPT, settings, out, thread, backends, on_event=on_event)  # type: ignore[arg-type]
    assert first is not None and result.status != "failed", result.error
    return {"first_image_s": first, "run_s": time.perf_counter() - started, "rounds": result.rounds}


def page_run(page: Page, url: str, rounds: int) -> dict[str, float]:
    page.goto(url, wait_until="load")
    page.wait_for_selector("#send")
    page.fill("#rounds input", str(rounds))
    page.fill("#images input", str(rounds))
    page.fill("#message textarea", PROMPT)
    started = time.perf_counter()
    page.click("#send")
    page.wait_for_function(FIRST_IMAGE, polling="raf", timeout=600_000)
    first = time.perf_counter() - started
    final = page.wait_for_selector("#status .final:not([data-status=running])", timeout=600_000)
    assert final is not None
    total = time.perf_counter() - started
    rounds_done = int(final.inner_text().split(" round(s)")[0].rsplit("· ", 1)[1])
    return {"first_image_s": first, "run_s": total, "rounds": rounds_done}


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each side")
    parser.add_argument("--rounds", type=int, default=4, help="round budget of each run")
    parser.add_argument("--corpus", type=int, default=500, help="images in the mini collection")
    parser.add_argument("--out", type=Path, default=Path("evals/results/web"))
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = small_mini_data(root / "data", args.corpus)
        settings = settings.model_copy(update={"budget": Budget(max_rounds=args.rounds, max_generations=args.rounds)})
        backends = load_backends(settings)
        chat = ChatPage(settings, root / "page-runs", backends)
        cli: list[dict[str, float]] = []
        web: list[dict[str, float]] = []
        with serving_in_thread(build_app(chat)) as url, sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            context = browser.new_context()
            context.route(
                "**/*",
                lambda r: r.continue_() if r.request.url.startswith(("http://127.0.0.1", "data:")) else r.abort(),
            )
            page = context.new_page()
            cli_run(settings, root / "cli-runs", "warm", backends)  # untimed: first calls of each side
            page_run(page, url, args.rounds)
            for i in range(args.runs):
                cli_first = i % 2 == 0
                if cli_first:
                    cli.append(cli_run(settings, root / "cli-runs", f"cli-{i}", backends))
                web.append(page_run(page, url, args.rounds))
                if not cli_first:
                    cli.append(cli_run(settings, root / "cli-runs", f"cli-{i}", backends))
            browser.close()
    overhead_first = [w["first_image_s"] - c["first_image_s"] for c, w in zip(cli, web, strict=True)]
    overhead_run = [w["run_s"] - c["run_s"] for c, w in zip(cli, web, strict=True)]
    results = {
        "prompt": PROMPT,
        "profile": "mini",
        "rounds_budget": args.rounds,
        "corpus": args.corpus,
        "runs": args.runs,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_before": load_before},
        "cli": {
            "first_image_s": summary([c["first_image_s"] for c in cli]),
            "run_s": summary([c["run_s"] for c in cli]),
        },
        "page": {
            "first_image_s": summary([w["first_image_s"] for w in web]),
            "run_s": summary([w["run_s"] for w in web]),
        },
        "page_overhead": {"first_image_s": summary(overhead_first), "run_s": summary(overhead_run)},
        "rounds": {"cli": [c["rounds"] for c in cli], "page": [w["rounds"] for w in web]},
        "samples": {"cli": cli, "page": web},
    }
    results["machine"]["load_after"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_web.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: results[k] for k in ("cli", "page", "page_overhead", "rounds", "machine")}, indent=2))


if __name__ == "__main__":
    main()
