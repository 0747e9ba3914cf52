"""`imagerag eval paper` end to end on tiny stand-ins: dataset folders in their usual layouts, the retrieval
collection from training images only, every metric model loaded from a saved folder, DSG over the real HTTP path
of a scripted OpenAI-compatible server, per-prompt results that a rerun resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from scripted import FakeOpenAIServer, function_call

from imagerag.evals.paper import (
    CONDITIONS,
    METRICS,
    RECORDS,
    STAND_IN_WARNING,
    DSGQuestion,
    MetricModels,
    PaperOptions,
    build_tiny_metric_models,
    dsg_score,
    evaluate_paper,
    read_dataset,
)
from imagerag.graphs.state import Budget
from imagerag.tools.backends.loading import load_embedder
from imagerag.tools.backends.store import ReferenceStore, chroma_client
from imagerag.tools.config import LLMSettings
from imagerag.tools.errors import ConfigError

COLOURS = ["red", "green", "blue"]


def _image(path: Path, colour: str, variant: int) -> Path:
    """A small patterned image: the class's colour with a stripe where the variant says."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (40, 32), colour)
    ImageDraw.Draw(image).rectangle((variant * 8, 0, variant * 8 + 5, 31), fill="white")
    image.save(path)
    return path


def fake_imagenet(root: Path) -> Path:
    """train/<wnid>/*.JPEG, val/<wnid>/*.JPEG and LOC_synset_mapping.txt, three classes."""
    wnids = [f"n0000000{i}" for i in range(1, 4)]
    for wnid, colour in zip(wnids, COLOURS, strict=True):
        for i in range(3):
            _image(root / "train" / wnid / f"{wnid}_{i}.JPEG", colour, i)
            _image(root / "val" / wnid / f"ILSVRC2012_val_{wnid}_{i}.JPEG", colour, i + 1)
    names = [f"{wnid} {colour} thing, other name" for wnid, colour in zip(wnids, COLOURS, strict=True)]
    (root / "LOC_synset_mapping.txt").write_text("\n".join(names) + "\n")
    return root


def fake_cub(root: Path) -> Path:
    """CUB_200_2011's files: images/<class>/, images.txt, classes.txt, image_class_labels.txt, train_test_split.txt;
    the train and test images of a class share its folder."""
    classes = ["001.Red_bird", "002.Green_bird", "003.Blue_bird"]
    images, labels, split = [], [], []
    for class_id, (folder, colour) in enumerate(zip(classes, COLOURS, strict=True), 1):
        for i in range(5):
            image_id = len(images) + 1
            relative = f"{folder}/{folder.split('.')[1]}_{i}.jpg"
            _image(root / "images" / relative, colour, i)
            images.append(f"{image_id} {relative}")
            labels.append(f"{image_id} {class_id}")
            split.append(f"{image_id} {1 if i < 3 else 0}")
    for name, lines in (
        ("classes.txt", [f"{i} {c}" for i, c in enumerate(classes, 1)]),
        ("images.txt", images),
        ("image_class_labels.txt", labels),
        ("train_test_split.txt", split),
    ):
        (root / name).write_text("\n".join(lines) + "\n")
    return root


def test_the_readers_take_each_layout_and_keep_test_images_out_of_training(tmp_path):
    imagenet = read_dataset("imagenet", fake_imagenet(tmp_path / "imagenet"), classes=2, test_per_class=2)
    assert [(c.key, c.name) for c in imagenet] == [("n00000001", "red thing"), ("n00000002", "green thing")]
    assert [len(c.train) for c in imagenet] == [3, 3] and [len(c.test) for c in imagenet] == [2, 2]

    cub = read_dataset("cub", fake_cub(tmp_path / "cub"), train_per_class=2)
    assert [c.name for c in cub] == ["Red bird", "Green bird", "Blue bird"]
    assert [len(c.train) for c in cub] == [2, 2, 2] and [len(c.test) for c in cub] == [2, 2, 2]
    assert not {p for c in cub for p in c.train} & {p for c in cub for p in c.test}

    inat = tmp_path / "inat"
    for split in ("train", "val"):
        _image(inat / split / "00001_Animalia_Chordata_Aves_Passeriformes_Corvidae_Pica_pica" / "a.jpg", "black", 0)
        _image(
            inat / split / "00000_Plantae_Tracheophyta_Magnoliopsida_Rosales_Rosaceae_Rosa_canina" / "b.jpg", "red", 1
        )
    assert [c.name for c in read_dataset("inaturalist", inat)] == ["Rosa canina", "Pica pica"]

    (tmp_path / "cub" / "train_test_split.txt").unlink()
    with pytest.raises(ConfigError, match="train_test_split.txt"):
        read_dataset("cub", tmp_path / "cub")


def test_the_dependency_rule_counts_a_child_of_a_no_as_no():
    questions = [
        DSGQuestion(id=1, question="Is there a bird?"),
        DSGQuestion(id=2, question="Is the bird red?", parents=[1]),
        DSGQuestion(id=3, question="Is the red bird's beak open?", parents=[2]),
        DSGQuestion(id=4, question="Is there a tree?", parents=[0]),  # DSG's files write 0 for no parent
    ]
    assert dsg_score(questions, {1: True, 2: True, 3: True, 4: False}) == 3 / 4
    # Without the bird, its colour and its beak count as no, whatever the VLM said about them.
    assert dsg_score(questions, {1: False, 2: True, 3: True, 4: True}) == 1 / 4


class Interrupted(Exception):
    pass


def test_the_paper_protocol_end_to_end_on_stand_ins_and_a_rerun_resumes(tiny_settings, tmp_path):
    metrics_dir = build_tiny_metric_models(tmp_path / "metric-models")
    metrics = MetricModels(clip=str(metrics_dir / "clip"), siglip=str(metrics_dir / "siglip"), dino="tiny:dino")
    options = PaperOptions(
        datasets={"imagenet": fake_imagenet(tmp_path / "imagenet"), "cub": fake_cub(tmp_path / "cub")},
        classes=2,
        images_per_class=2,
        metrics=metrics,
        index_workers=0,
    )
    settings = tiny_settings.model_copy(update={"budget": Budget(max_rounds=2)})
    out = tmp_path / "out"

    def stop_after_first_prompt(line: str) -> None:
        if line.startswith("imagenet 1/2"):
            raise Interrupted(line)

    with pytest.raises(Interrupted):  # as if killed once the first prompt was written
        evaluate_paper(settings, options, out, on_progress=stop_after_first_prompt)
    assert len((out / RECORDS).read_text().splitlines()) == 1
    with (out / RECORDS).open("a") as records:  # and a crash mid-write left half of the next line
        records.write('{"kind": "class", "dataset": "imag')

    lines: list[str] = []
    report = evaluate_paper(settings, options, out, on_progress=lines.append)
    assert not any(line.startswith("imagenet 1/2") for line in lines)  # the finished prompt is not redone
    assert any(line.startswith("imagenet 2/2") for line in lines) and any(line.startswith("cub 2/2") for line in lines)

    # The stand-in warning, in the JSON and at the top of the Markdown.
    saved = json.loads((out / "paper.json").read_text())
    assert saved == report and next(iter(saved)) == "warning" and saved["warning"] == STAND_IN_WARNING
    generator, *metric_models = saved["stand_ins"]
    assert "'tiny' profile" in generator and [m.split(" ")[0] for m in metric_models] == ["CLIP", "SigLIP", "DINO"]
    md = (out / "paper.md").read_text()
    assert md.splitlines()[2].startswith(f"> **{STAND_IN_WARNING}**")

    # Per dataset, both conditions over the 2 class prompts, every metric a cosine similarity.
    assert list(saved["class_prompts"]) == ["imagenet", "cub"]
    for summary in saved["class_prompts"].values():
        assert summary["prompts"] == 2 and summary["difference"]["n"] == 2
        for condition in CONDITIONS:
            stats = summary["conditions"][condition]
            assert stats["n"] == 2 and stats["failed"] == 0
            assert all(-1.0 <= stats[m] <= 1.0 for m in METRICS)
        assert summary["conditions"]["text_alone"]["generations_per_prompt"] == 1
    assert "| ImageNet | text alone | 2 |" in md and "| CUB | imagerag loop | 2 |" in md
    assert "The paper's figures" in md and "| ImageRAG on SDXL | .274 / .141 / .709 |" in md

    records = [json.loads(line) for line in (out / RECORDS).read_text().splitlines()]
    assert [(r["dataset"], r["prompt"]) for r in records] == [
        ("imagenet", "A photo of a red thing"),
        ("imagenet", "A photo of a green thing"),
        ("cub", "A photo of a Red bird"),
        ("cub", "A photo of a Green bird"),
    ]
    for record in records:
        assert record["real_images"] == 2
        for condition in CONDITIONS:
            assert Path(record["conditions"][condition]["image"]).is_file()
            assert set(record["conditions"][condition]["scores"]) == set(METRICS)
    # One run folder per prompt and condition: the interrupted run's finished prompt was not drawn again.
    for dataset in ("imagenet", "cub"):
        for condition in CONDITIONS:
            assert len(list((out / "runs" / dataset / condition).iterdir())) == 2

    # The retrieval collection: the two classes' training images and nothing of their test split.
    store = ReferenceStore.open(chroma_client(settings.data_dir), "paper-cub-2c-allt-tiny", load_embedder(settings))
    sources = {Path(m["source"]) for m in store.collection.get(include=["metadatas"])["metadatas"]}
    chosen = read_dataset("cub", tmp_path / "cub", classes=2)
    assert sources == {p.resolve() for c in chosen for p in c.train}

    # A third run has nothing left to do; another protocol into the same folder is refused before any work.
    assert evaluate_paper(settings, options, out, on_progress=lines.append) == report
    assert len((out / RECORDS).read_text().splitlines()) == 4
    with pytest.raises(ConfigError, match="images_per_class"):
        evaluate_paper(settings, options.model_copy(update={"images_per_class": 1}), out)


def scripted_dsg(request: dict) -> dict:
    """Plays the VLM: three questions (the second depends on the first), then per image: no bird, yet a red one."""
    forced = request["tool_choice"]["function"]["name"]
    if forced == "DSGQuestions":
        questions = [
            {"id": 1, "question": "Is there a bird?", "parents": []},
            {"id": 2, "question": "Is the bird red?", "parents": [1]},
            {"id": 3, "question": "Is there a tree?", "parents": []},
        ]
        return function_call("DSGQuestions", {"questions": questions})
    assert forced == "DSGAnswers", forced
    answers = [{"id": 1, "answer": False}, {"id": 2, "answer": True}, {"id": 3, "answer": True}]
    return function_call("DSGAnswers", {"answers": answers})


def test_dsg_scores_long_prompts_through_the_endpoint_with_the_dependency_rule(tiny_settings, tmp_path):
    prompts = tmp_path / "long.jsonl"
    prompts.write_text(json.dumps({"prompt": "a red bird on a branch of a tall tree", "id": "p1"}) + "\n")
    settings = tiny_settings.model_copy(update={"budget": Budget(max_rounds=2)})
    with pytest.raises(ConfigError, match="VLM"):  # no LLM configured: refused before anything runs
        evaluate_paper(settings, PaperOptions(dsg_prompts=prompts), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()

    with FakeOpenAIServer(scripted_dsg) as server:
        vlm = LLMSettings(model="gpt-4o-2024-08-06", base_url=server.base_url)
        report = evaluate_paper(settings, PaperOptions(dsg_prompts=prompts, dsg_llm=vlm), tmp_path / "out")

    asked = [r["tool_choice"]["function"]["name"] for r in server.requests]
    assert asked == ["DSGQuestions", "DSGAnswers", "DSGAnswers"]  # questions once, then one call per image
    answer_request = server.requests[1]["messages"][-1]["content"]
    assert "red bird on a branch" not in answer_request[0]["text"]  # the image alone answers
    assert answer_request[1]["image_url"]["url"].startswith("data:image/png;base64,")

    # The VLM said "red" for a bird it did not see: with DSG's rule that answer counts as no.
    assert "warning" in report and report["class_prompts"] == {}
    for condition in CONDITIONS:
        stats = report["dsg"]["conditions"][condition]
        assert stats["n"] == 1 and stats["score"] == pytest.approx(1 / 3, abs=1e-4)  # means are kept to 4 places
        assert stats["score_without_dependencies"] == pytest.approx(2 / 3, abs=1e-4)
    md = (tmp_path / "out" / "paper.md").read_text()
    assert "| text alone | 1 | 0.333 | 0.667 |" in md
    record = json.loads((tmp_path / "out" / RECORDS).read_text())
    assert [q["parents"] for q in record["questions"]] == [[], [1], []]  # kept, so a rerun asks no new questions
    assert record["conditions"]["imagerag"]["answers"] == {"1": False, "2": True, "3": True}
    assert record["conditions"]["imagerag"]["score"] == 1 / 3
