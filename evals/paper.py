"""`imagerag eval paper`: the ImageRAG paper's evaluation protocol, for users with the weights and the datasets.

Class prompts ("A photo of a <class>") from ImageNet, CUB-200-2011 and iNaturalist 2021, each drawn
  (a) from text alone    one image from the prompt, the run's seed, no reference;
  (b) by the loop        imagerag.agent.run.run with the caller's settings, retrieving from a collection of the
                         dataset's training images, indexed by the project's own indexer (what `imagerag index` runs).
Each image is compared with its class: CLIP and SigLIP text-image similarity to the prompt and DINO similarity to
the class's real test images (the paper's three columns), and, beside them, CLIP and SigLIP image-image similarity
to those real images. Long prompts (a JSONL file) get a DSG score: yes/no questions with dependencies, written by
an LLM unless the file gives them, answered per image by a VLM through the configured endpoint.

Every metric model comes from a Hub id, a local folder in its library's layout, or `tiny:NAME` (random stand-ins
built offline), so the whole protocol runs on a CPU with stand-ins; its numbers then mean nothing, and the report
says so. Results are appended to OUT/paper-prompts.jsonl as each prompt finishes and OUT/paper.json and
OUT/paper.md are rewritten; a rerun with the same options skips finished prompts.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import statistics
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import HumanMessage
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from imagerag.agent.config import RunRecipe, Settings
from imagerag.agent.result import RunResult
from imagerag.agent.run import run
from imagerag.graphs.state import Budget
from imagerag.prompts import render
from imagerag.tools.backends.clip import LOCAL_DIR
from imagerag.tools.backends.diffusion import pick_device
from imagerag.tools.backends.indexer import index_sources
from imagerag.tools.backends.llm import image_data_url, make_chat_model, structured_call
from imagerag.tools.backends.loading import load_embedder
from imagerag.tools.backends.sources import IMAGE_SUFFIXES, FolderSource
from imagerag.tools.backends.store import ReferenceStore, StoreError, chroma_client
from imagerag.tools.config import LLMSettings
from imagerag.tools.errors import ConfigError
from imagerag.tools.files import atomic_write

log = logging.getLogger(__name__)

DatasetKind = Literal["imagenet", "cub", "inaturalist"]
Condition = Literal["text_alone", "imagerag"]
CONDITIONS: dict[Condition, str] = {"text_alone": "text alone", "imagerag": "imagerag loop"}
PAPER_TEMPLATE = "A photo of a {name}"
# The paper's classes: all of ImageNet and CUB, the first 1000 of iNaturalist (None: all).
PAPER_CLASSES: dict[DatasetKind, int | None] = {"imagenet": None, "cub": None, "inaturalist": 1000}
# The scores, in the report's column order: the paper's three first.
METRICS = {
    "clip_text": "CLIP",
    "siglip_text": "SigLIP",
    "dino": "DINO",
    "clip_image": "CLIP image-image",
    "siglip_image": "SigLIP image-image",
}
STAND_IN_WARNING = "numbers from tiny random stand-in models: they mean nothing"
# Real checkpoints of these metrics have tens of millions of parameters or more (DINOv2-S 22M, CLIP ViT-B-32 151M);
# a random stand-in built for tests has a few hundred thousand to 2M, most of them CLIP's token embeddings.
STAND_IN_PARAMETERS = 5_000_000
TINY_METRICS_DIR = "tiny-metric-models"  # under the data folder, for `tiny:` metric models
RECORDS, PROTOCOL, REPORT_JSON, REPORT_MD = "paper-prompts.jsonl", "paper-protocol.json", "paper.json", "paper.md"
BATCH = 32  # real images embedded per forward pass

# ImageRAG (ICLR 2026), CLIP / SigLIP text-image similarity and DINO similarity to real images (../shared/docs/method.md).
PAPER_FIGURES: dict[str, dict[str, tuple[float, float, float]]] = {
    "OmniGen": {"imagenet": (0.247, 0.122, 0.692), "inaturalist": (0.155, 0.014, 0.595), "cub": (0.231, 0.109, 0.747)},
    "ImageRAG on OmniGen": {
        "imagenet": (0.264, 0.134, 0.708),
        "inaturalist": (0.197, 0.095, 0.701),
        "cub": (0.253, 0.125, 0.760),
    },
    "FLUX": {"imagenet": (0.271, 0.137, 0.698), "inaturalist": (0.222, 0.065, 0.654), "cub": (0.267, 0.135, 0.746)},
    "ImageRAG on FLUX": {
        "imagenet": (0.277, 0.140, 0.705),
        "inaturalist": (0.238, 0.083, 0.691),
        "cub": (0.277, 0.144, 0.767),
    },
    "SDXL": {"imagenet": (0.267, 0.136, 0.700), "inaturalist": (0.259, 0.096, 0.698), "cub": (0.315, 0.172, 0.782)},
    "ImageRAG on SDXL": {
        "imagenet": (0.274, 0.141, 0.709),
        "inaturalist": (0.243, 0.118, 0.724),
        "cub": (0.314, 0.174, 0.784),
    },
}
PAPER_GPTSCORE = (
    "GPTScore, ImageNet / iNaturalist / CUB: OmniGen .75/.07/.57 -> ImageRAG .88/.56/.73; "
    "SDXL .86/.51/.94 -> .92/.70/.97; FLUX .84/.07/.79 -> .90/.31/.85."
)
DATASET_TITLES: dict[str, str] = {"imagenet": "ImageNet", "inaturalist": "iNaturalist", "cub": "CUB"}


# --- datasets ---------------------------------------------------------------------------------------------------


class ClassImages(BaseModel):
    """One class: its name as the prompt says it, its training images (the retrieval collection) and its test
    images (the real images a generated one is compared with)."""

    key: str
    name: str
    train: list[Path]
    test: list[Path]


def read_dataset(
    kind: DatasetKind,
    root: Path,
    classes: int | None = None,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
) -> list[ClassImages]:
    """The first `classes` classes of a dataset folder (default: the paper's), in the dataset's order, each with up
    to `train_per_class` training and `test_per_class` test images (default: all), in file order.

    Layouts:
    - imagenet: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (the ILSVRC folders, validation sorted into class
      folders), class names from LOC_synset_mapping.txt ("n01440764 tench, Tinca tinca": the first name), or a JSON
      map imagenet_class_index.json / class_names.json ({"0": ["n01440764", "tench"]} or {"n01440764": "tench"});
    - cub: CUB_200_2011 as distributed: images/, images.txt, classes.txt, image_class_labels.txt,
      train_test_split.txt (1: training, 0: test);
    - inaturalist: iNaturalist 2021 as distributed: train/ (or train_mini/) and val/, one folder per class named
      NNNNN_Kingdom_Phylum_Class_Order_Family_Genus_species; the class name is "Genus species".
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"no {kind} folder at {root}: pass the dataset's root folder")
    readers: dict[DatasetKind, Callable[[Path], list[ClassImages]]] = {
        "imagenet": _imagenet,
        "cub": _cub,
        "inaturalist": _inaturalist,
    }
    chosen = readers[kind](root)[: classes if classes is not None else PAPER_CLASSES[kind]]
    if not chosen:
        raise ConfigError(f"no classes found in {root}: check its {kind} layout")
    for item in chosen:
        for split, images in (("training", item.train), ("test", item.test)):
            if not images:
                raise ConfigError(f"{kind} class {item.key} ({item.name}) has no {split} images under {root}")
    return [
        item.model_copy(update={"train": item.train[:train_per_class], "test": item.test[:test_per_class]})
        for item in chosen
    ]


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir())


def _imagenet_names(root: Path) -> dict[str, str]:
    mapping = root / "LOC_synset_mapping.txt"
    if mapping.is_file():
        rows = (line.partition(" ") for line in mapping.read_text().splitlines() if line.strip())
        return {wnid: synonyms.split(",")[0].strip() for wnid, _, synonyms in rows}
    for name in ("imagenet_class_index.json", "class_names.json"):
        path = root / name
        if path.is_file():
            data: dict[str, str | list[str]] = json.loads(path.read_text())
            # Keras' and torchvision's index {"0": ["n01440764", "tench"]}, or a plain {"n01440764": "tench"}
            pairs = (value if isinstance(value, list) else [key, value] for key, value in data.items())
            return {wnid: name for wnid, name in pairs}
    raise ConfigError(
        f"no ImageNet class names in {root}: add LOC_synset_mapping.txt, imagenet_class_index.json or "
        "class_names.json ({wnid: name})"
    )


def _imagenet(root: Path) -> list[ClassImages]:
    if not (root / "train").is_dir():
        raise ConfigError(f"no train/ folder in {root}: ImageNet is read as train/<wnid>/*.JPEG and val/<wnid>/*.JPEG")
    names = _imagenet_names(root)
    classes = []
    for folder in _class_folders(root / "train"):
        if folder.name not in names:
            raise ConfigError(f"ImageNet class {folder.name} has no name in {root}'s class-name file")
        test = _image_files(root / "val" / folder.name)
        classes.append(ClassImages(key=folder.name, name=names[folder.name], train=_image_files(folder), test=test))
    return classes


def _cub_table(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise ConfigError(
            f"no {path.name} in {path.parent}: CUB is read as CUB_200_2011 is distributed (images/, images.txt, "
            "classes.txt, image_class_labels.txt, train_test_split.txt)"
        )
    return dict(line.split(maxsplit=1) for line in path.read_text().splitlines() if line.strip())


def _cub(root: Path) -> list[ClassImages]:
    images, labels, split = (
        _cub_table(root / f) for f in ("images.txt", "image_class_labels.txt", "train_test_split.txt")
    )
    classes = {
        # "001.Black_footed_Albatross" -> "Black footed Albatross"
        key: ClassImages(key=key, name=folder.partition(".")[2].replace("_", " "), train=[], test=[])
        for key, folder in _cub_table(root / "classes.txt").items()
    }
    for image_id, relative in images.items():
        item = classes[labels[image_id]]
        (item.train if split[image_id] == "1" else item.test).append(root / "images" / relative)
    return sorted(classes.values(), key=lambda item: int(item.key))


def _inaturalist(root: Path) -> list[ClassImages]:
    train = next((root / name for name in ("train", "train_mini") if (root / name).is_dir()), None)
    if train is None:
        raise ConfigError(f"no train/ or train_mini/ folder in {root}: iNaturalist 2021 is read as distributed")
    classes = []
    for folder in _class_folders(train):
        parts = folder.name.split("_")
        if len(parts) < 3:
            raise ConfigError(f"{folder} is not an iNaturalist 2021 class folder (NNNNN_Kingdom_..._Genus_species)")
        name = " ".join(parts[-2:])
        classes.append(
            ClassImages(
                key=folder.name, name=name, train=_image_files(folder), test=_image_files(root / "val" / folder.name)
            )
        )
    return classes


# --- metric models ------------------------------------------------------------------------------------------------


class MetricModels(BaseModel):
    """The scoring models. Each is what its library loads (an open_clip architecture with a pretrained tag, or an
    `hf-hub:` id; a transformers Hub id for DINO), a local folder in that library's layout (open_clip:
    open_clip_config.json and weights, read as `local-dir:`, the pretrained tag then ignored; transformers:
    save_pretrained with its image processor), or `tiny:clip`, `tiny:siglip`, `tiny:dino`: random stand-ins built
    offline into the data folder."""

    model_config = ConfigDict(extra="forbid")

    clip: str = "ViT-B-32"
    clip_pretrained: str | None = "openai"
    siglip: str = "ViT-B-16-SigLIP"
    siglip_pretrained: str | None = "webli"
    dino: str = "facebook/dinov2-base"

    @classmethod
    def tiny(cls) -> MetricModels:
        return cls(
            clip="tiny:clip", clip_pretrained=None, siglip="tiny:siglip", siglip_pretrained=None, dino="tiny:dino"
        )


def build_tiny_metric_models(root: Path, seed: int = 0) -> Path:
    """Random stand-ins for the three metric models under `root` (built once, atomically), in the layouts the real
    loaders read: root/clip and root/siglip as open_clip folders (open_clip_config.json + safetensors), the second
    shaped like open_clip's SigLIP (a custom text tower without causal mask, a logit bias), and root/dino as a
    transformers Dinov2Model with its image processor. Returns root."""
    if (root / "done").exists():
        return root
    import open_clip
    from safetensors.torch import save_file
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".tiny-metrics-"))
    torch.manual_seed(seed)
    vision = {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8}
    text = {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    siglip_text = {**text, "no_causal_mask": True, "pool_type": "last", "proj_bias": True}
    configs: dict[str, dict[str, Any]] = {
        "clip": {"embed_dim": 16, "vision_cfg": vision, "text_cfg": text},
        "siglip": {
            "embed_dim": 16,
            "custom_text": True,
            "init_logit_bias": -10.0,
            "vision_cfg": vision,
            "text_cfg": siglip_text,
        },
    }
    preprocess = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic"}
    for name, model_cfg in configs.items():
        # open_clip's loader reads custom_text to pick the class; the classes themselves do not take it.
        kwargs = {k: v for k, v in model_cfg.items() if k != "custom_text"}
        model = open_clip.CustomTextCLIP(**kwargs) if model_cfg.get("custom_text") else open_clip.CLIP(**kwargs)
        folder = tmp / name
        folder.mkdir()
        (folder / "open_clip_config.json").write_text(
            json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess})
        )
        save_file(model.state_dict(), folder / "open_clip_model.safetensors")
    dino = Dinov2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=32, patch_size=8
    )
    Dinov2Model(dino).save_pretrained(tmp / "dino")
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp / "dino")
    (tmp / "done").write_text("ok")
    if root.exists():  # a crashed earlier build left a partial folder
        shutil.rmtree(root)
    tmp.rename(root)
    return root


def _resolve(ref: str, data_dir: Path) -> str:
    if ref.startswith("tiny:"):
        return str(build_tiny_metric_models(Path(data_dir) / TINY_METRICS_DIR) / ref.removeprefix("tiny:"))
    return ref


def _normalised(x: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(x.float(), dim=-1).cpu().numpy()


def _batches(images: list[Image.Image]) -> Iterator[list[Image.Image]]:
    for start in range(0, len(images), BATCH):
        yield images[start : start + BATCH]


class OpenClipScorer:
    """An open_clip model's L2-normalised image and text embeddings (CLIP, or SigLIP's two towers).

    Not the project's ClipEmbedder: that one reads the embedding size from CLIP's text projection, which open_clip's
    SigLIP (a CustomTextCLIP) does not have."""

    def __init__(self, ref: str, pretrained: str | None, device: str):
        import open_clip

        local = Path(ref).is_dir()
        name = LOCAL_DIR + ref if local else ref
        model, _, self.preprocess = open_clip.create_model_and_transforms(
            name, pretrained=None if local else pretrained, device=device
        )
        self.model = model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        self.device = device
        self.parameters = sum(p.numel() for p in model.parameters())

    @torch.inference_mode()
    def images(self, images: list[Image.Image]) -> np.ndarray:
        return np.concatenate(
            [
                _normalised(self.model.encode_image(torch.stack([self.preprocess(i) for i in batch]).to(self.device)))
                for batch in _batches(images)
            ]
        )

    @torch.inference_mode()
    def text(self, text: str) -> np.ndarray:
        return _normalised(self.model.encode_text(self.tokenizer([text]).to(self.device)))[0]


class DinoScorer:
    """A transformers DINO (v2 by default) model's L2-normalised CLS embeddings."""

    def __init__(self, ref: str, device: str):
        from transformers import AutoImageProcessor, AutoModel

        self.processor = AutoImageProcessor.from_pretrained(ref)
        self.model = AutoModel.from_pretrained(ref).to(device).eval()
        self.device = device
        self.parameters = sum(p.numel() for p in self.model.parameters())

    @torch.inference_mode()
    def images(self, images: list[Image.Image]) -> np.ndarray:
        chunks = []
        for batch in _batches(images):
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            chunks.append(_normalised(self.model(pixel_values=pixels).last_hidden_state[:, 0]))
        return np.concatenate(chunks)


@dataclass(frozen=True)
class ClassTargets:
    """What a class's images are compared with: the prompt's text embeddings and the real images' embeddings."""

    text: dict[str, np.ndarray]  # clip, siglip
    real: dict[str, np.ndarray]  # clip, siglip, dino: one row per real image


@dataclass(frozen=True)
class Scorers:
    clip: OpenClipScorer
    siglip: OpenClipScorer
    dino: DinoScorer

    @classmethod
    def load(cls, models: MetricModels, data_dir: Path, device: str) -> Scorers:
        return cls(
            clip=OpenClipScorer(_resolve(models.clip, data_dir), models.clip_pretrained, device),
            siglip=OpenClipScorer(_resolve(models.siglip, data_dir), models.siglip_pretrained, device),
            dino=DinoScorer(_resolve(models.dino, data_dir), device),
        )

    def stand_ins(self) -> list[str]:
        sizes = {"CLIP": self.clip.parameters, "SigLIP": self.siglip.parameters, "DINO": self.dino.parameters}
        return [f"{name} ({n:,} parameters)" for name, n in sizes.items() if n < STAND_IN_PARAMETERS]

    def targets(self, prompt: str, real: list[Image.Image]) -> ClassTargets:
        return ClassTargets(
            text={"clip": self.clip.text(prompt), "siglip": self.siglip.text(prompt)},
            real={"clip": self.clip.images(real), "siglip": self.siglip.images(real), "dino": self.dino.images(real)},
        )

    def score(self, image: Image.Image, targets: ClassTargets) -> dict[str, float]:
        """Cosine similarities of `image` with the prompt (text) and, averaged, with the class's real images."""
        clip, siglip, dino = (model.images([image])[0] for model in (self.clip, self.siglip, self.dino))
        return {
            "clip_text": float(clip @ targets.text["clip"]),
            "siglip_text": float(siglip @ targets.text["siglip"]),
            "dino": float((targets.real["dino"] @ dino).mean()),
            "clip_image": float((targets.real["clip"] @ clip).mean()),
            "siglip_image": float((targets.real["siglip"] @ siglip).mean()),
        }


# --- DSG ----------------------------------------------------------------------------------------------------------


class DSGQuestion(BaseModel):
    id: int = Field(ge=1)
    question: str = Field(min_length=1, description="A yes/no question about the image.")
    parents: list[int] = Field(
        default_factory=list, description="Ids of the questions this one depends on; empty for none."
    )

    @field_validator("parents")
    @classmethod
    def _no_root(cls, parents: list[int]) -> list[int]:
        return [p for p in parents if p != 0]  # DSG's own files write 0 for "no parent"


class DSGQuestions(BaseModel):
    """A prompt's DSG questions; a parent comes before its children."""

    questions: list[DSGQuestion] = Field(min_length=1)

    @model_validator(mode="after")
    def _parents_first(self) -> DSGQuestions:
        seen: set[int] = set()
        for question in self.questions:
            if question.id in seen:
                raise ValueError(f"question id {question.id} is repeated")
            if later := [p for p in question.parents if p not in seen]:
                raise ValueError(f"question {question.id} depends on {later}, which do not come before it")
            seen.add(question.id)
        return self


class DSGAnswer(BaseModel):
    id: int
    answer: bool = Field(description="true for yes, false for no")


class DSGAnswers(BaseModel):
    answers: list[DSGAnswer]


class DSGPrompt(BaseModel):
    """A line of the long-prompt file: {"prompt": "...", "questions": [{"id", "question", "parents"}, ...]}; without
    questions, the LLM writes them. Other keys (an id, a category) are ignored."""

    prompt: str = Field(min_length=1)
    questions: list[DSGQuestion] | None = None

    @field_validator("questions")
    @classmethod
    def _checked(cls, questions: list[DSGQuestion] | None) -> list[DSGQuestion] | None:
        return None if questions is None else DSGQuestions(questions=questions).questions


def read_dsg_prompts(path: Path) -> list[DSGPrompt]:
    """The long prompts of a JSONL file, each once, in file order."""
    if not Path(path).is_file():
        raise ConfigError(f'no DSG prompt file at {path}: pass a JSONL file of {{"prompt": ...}} lines')
    prompts: dict[str, DSGPrompt] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = DSGPrompt.model_validate_json(line)
        except ValidationError as error:
            raise ConfigError(f"{path}:{number}: {error.errors()[0]['msg']}") from None
        prompts.setdefault(item.prompt, item)
    return list(prompts.values())


def dsg_questions(llm: BaseChatModel, prompt: str, retries: int) -> list[DSGQuestion]:
    answer, _ = structured_call(llm, DSGQuestions, [HumanMessage(render("dsg_questions", prompt=prompt))], retries)
    return answer.questions


def dsg_answers(llm: BaseChatModel, image: Image.Image, questions: list[DSGQuestion], retries: int) -> dict[int, bool]:
    """The VLM's yes/no per question, all questions in one call (as the project's critic judges every concept at
    once). It is not shown the prompt: the image alone must answer."""
    message = HumanMessage(
        content=[
            {"type": "text", "text": render("dsg_answer", questions=questions)},
            {"type": "image_url", "image_url": {"url": image_data_url(image)}},
        ]
    )
    wanted = sorted(q.id for q in questions)

    def answers_each_question_once(answer: DSGAnswers) -> str | None:
        got = sorted(a.id for a in answer.answers)
        return None if got == wanted else f"answers for {got}, expected one for each of {wanted}"

    answer, _ = structured_call(llm, DSGAnswers, [message], retries, check=answers_each_question_once)
    return {a.id: a.answer for a in answer.answers}


def dsg_score(questions: list[DSGQuestion], answers: dict[int, bool]) -> float:
    """DSG's score: the share of questions answered yes, a question counting as no whenever one of its parents does
    (the bird cannot be red in an image without the bird)."""
    holds: dict[int, bool] = {}
    for question in questions:  # parents come first
        holds[question.id] = answers[question.id] and all(holds[p] for p in question.parents)
    return sum(holds.values()) / len(questions)


# --- records ------------------------------------------------------------------------------------------------------


class Outcome(BaseModel):
    """One condition's answer to one prompt."""

    image: str | None = Field(description="The run's chosen image; None when it failed before drawing one.")
    run_dir: str
    status: str
    generations: int
    seconds: float


def _outcome(result: RunResult) -> dict[str, Any]:
    """The Outcome fields of a run's result."""
    return {
        "image": result.best_image,
        "run_dir": result.run_dir,
        "status": result.status,
        "generations": result.generations,
        "seconds": round(result.elapsed, 3),
    }


class ClassOutcome(Outcome):
    scores: dict[str, float] = Field(default_factory=dict)


class ClassRecord(BaseModel):
    kind: Literal["class"] = "class"
    dataset: DatasetKind
    key: str
    name: str
    prompt: str
    real_images: int
    conditions: dict[Condition, ClassOutcome]


class DSGOutcome(Outcome):
    answers: dict[int, bool] = Field(default_factory=dict)
    score: float | None = None
    score_without_dependencies: float | None = None


class DSGRecord(BaseModel):
    kind: Literal["dsg"] = "dsg"
    prompt: str
    questions: list[DSGQuestion]
    conditions: dict[Condition, DSGOutcome]


Record = Annotated[ClassRecord | DSGRecord, Field(discriminator="kind")]
_RECORD = TypeAdapter(Record)


def _key(record: ClassRecord | DSGRecord) -> tuple[str, ...]:
    if isinstance(record, ClassRecord):
        return ("class", record.dataset, record.key)
    return ("dsg", record.prompt)


class PaperOptions(BaseModel):
    """What to evaluate, beside the run settings (profile, policy, budget, seed, LLM)."""

    model_config = ConfigDict(extra="forbid")

    datasets: dict[DatasetKind, Path] = Field(default_factory=dict, description="Dataset root folders, by format.")
    classes: int | None = Field(
        default=None, ge=1, description="Classes per dataset; default: the paper's (all; iNaturalist's first 1000)."
    )
    images_per_class: int | None = Field(
        default=None, ge=1, description="Real test images per class the images are compared with; default: all."
    )
    train_images_per_class: int | None = Field(
        default=None, ge=1, description="Training images per class in the retrieval collection; default: all."
    )
    template: str = Field(default=PAPER_TEMPLATE, description="The class prompt; {name} is the class name.")
    metrics: MetricModels = Field(default_factory=MetricModels)
    dsg_prompts: Path | None = Field(default=None, description="JSONL file of long prompts for the DSG score.")
    dsg_llm: LLMSettings | None = Field(
        default=None, description="The VLM that writes and answers DSG questions; default: the settings' LLM."
    )
    index_workers: int = Field(default=1, ge=0, description="DataLoader workers decoding images while indexing.")

    @field_validator("template")
    @classmethod
    def _names_the_class(cls, template: str) -> str:
        if "{name}" not in template:
            raise ValueError("the template must hold {name}, where the class name goes")
        return template


class Protocol(BaseModel):
    """What decides the numbers. A rerun into the same folder must match it, so that it resumes one experiment
    rather than mixing two in one table; datasets may be added."""

    format: Literal[1] = 1
    recipe: RunRecipe
    budget: Budget
    loop_llm: str | None
    dsg_llm: str | None
    template: str
    classes: int | None
    images_per_class: int | None
    train_images_per_class: int | None
    metrics: MetricModels
    datasets: dict[str, str]

    @classmethod
    def of(cls, settings: Settings, options: PaperOptions) -> Protocol:
        return cls(
            recipe=settings.recipe(),
            budget=settings.budget,
            loop_llm=settings.llm.model,
            dsg_llm=(options.dsg_llm or settings.llm).model,
            template=options.template,
            classes=options.classes,
            images_per_class=options.images_per_class,
            train_images_per_class=options.train_images_per_class,
            metrics=options.metrics,
            datasets={kind: str(Path(root).resolve()) for kind, root in options.datasets.items()},
        )


def open_protocol(out: Path, protocol: Protocol) -> Protocol:
    """Record `protocol` in OUT, or check it against the one recorded there (datasets may be added); ConfigError
    naming what differs otherwise."""
    path = Path(out) / PROTOCOL
    if path.exists():
        recorded = Protocol.model_validate_json(path.read_text())
        changed = [f for f in Protocol.model_fields if f != "datasets" and getattr(recorded, f) != getattr(protocol, f)]
        changed += [
            f"datasets.{kind}"
            for kind in recorded.datasets.keys() & protocol.datasets.keys()
            if recorded.datasets[kind] != protocol.datasets[kind]
        ]
        if changed:
            raise ConfigError(
                f"{out} holds results of another protocol ({', '.join(sorted(changed))} differ): rerun with the same "
                "options to resume, or pass another --out"
            )
        protocol = protocol.model_copy(update={"datasets": {**recorded.datasets, **protocol.datasets}})
    atomic_write(path, protocol.model_dump_json(indent=2))
    return protocol


class Results:
    """OUT's records, appended one line per finished prompt; the report is rewritten after each."""

    def __init__(self, out: Path, protocol: Protocol, stand_ins: list[str]):
        self.out, self.protocol, self.stand_ins = Path(out), protocol, stand_ins
        self.records = self._read()
        self.done = {_key(r) for r in self.records}

    def _read(self) -> list[ClassRecord | DSGRecord]:
        path = self.out / RECORDS
        if not path.exists():
            return []
        text = path.read_text()
        torn = text.rpartition("\n")[2]
        if torn:  # a line cut short by a crash while it was written: that prompt runs again
            log.warning("dropping the unfinished last line of %s", path)
            text = text[: len(text) - len(torn)]
            with path.open("r+b") as handle:
                handle.truncate(len(text.encode()))
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            try:
                records.append(_RECORD.validate_json(line))
            except ValidationError:
                raise ConfigError(
                    f"{path}:{number} is not a result of this benchmark: move the file away to start over"
                ) from None
        return records

    def append(self, record: ClassRecord | DSGRecord) -> None:
        with (self.out / RECORDS).open("a") as handle:
            handle.write(record.model_dump_json() + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.records.append(record)
        self.done.add(_key(record))
        self.write_report()

    def report(self) -> dict[str, Any]:
        report: dict[str, Any] = {}
        if self.stand_ins:
            report["warning"] = STAND_IN_WARNING
            report["stand_ins"] = self.stand_ins
        classes = [r for r in self.records if isinstance(r, ClassRecord)]
        dsg = [r for r in self.records if isinstance(r, DSGRecord)]
        datasets = list(dict.fromkeys(r.dataset for r in classes))
        report["protocol"] = self.protocol.model_dump(mode="json")
        report["class_prompts"] = {
            kind: _summarise_classes([r for r in classes if r.dataset == kind]) for kind in datasets
        }
        report["dsg"] = _summarise_dsg(dsg) if dsg else None
        report["paper_figures"] = {
            "metrics": "CLIP / SigLIP text-image similarity, DINO similarity to real images of the class",
            "rows": {model: {kind: list(row) for kind, row in rows.items()} for model, rows in PAPER_FIGURES.items()},
            "gptscore": PAPER_GPTSCORE,
        }
        report["records"] = RECORDS
        return report

    def write_report(self) -> dict[str, Any]:
        report = self.report()
        atomic_write(self.out / REPORT_JSON, json.dumps(report, indent=2))
        atomic_write(self.out / REPORT_MD, markdown(report))
        return report


def _mean(values: list[float]) -> float | None:
    return round(statistics.mean(values), 4) if values else None


def _costs(outcomes: list[ClassOutcome] | list[DSGOutcome]) -> dict[str, float | None]:
    return {
        "generations_per_prompt": _mean([o.generations for o in outcomes]),
        "seconds_per_prompt": _mean([o.seconds for o in outcomes]),
    }


def _summarise_classes(records: list[ClassRecord]) -> dict[str, Any]:
    conditions = {}
    for condition in CONDITIONS:
        outcomes = [r.conditions[condition] for r in records]
        scored = [o for o in outcomes if o.scores]
        conditions[condition] = {
            "n": len(scored),
            "failed": len(outcomes) - len(scored),
            **{metric: _mean([o.scores[metric] for o in scored]) for metric in METRICS},
            **_costs(outcomes),
        }
    # Paired over the prompts both conditions scored: the loop's gain, prompt by prompt.
    pairs = [r for r in records if all(r.conditions[c].scores for c in CONDITIONS)]
    difference = {
        metric: _mean(
            [r.conditions["imagerag"].scores[metric] - r.conditions["text_alone"].scores[metric] for r in pairs]
        )
        for metric in METRICS
    }
    return {"prompts": len(records), "conditions": conditions, "difference": {"n": len(pairs), **difference}}


def _summarise_dsg(records: list[DSGRecord]) -> dict[str, Any]:
    conditions = {}
    for condition in CONDITIONS:
        outcomes = [r.conditions[condition] for r in records]
        scored = [o for o in outcomes if o.score is not None]
        conditions[condition] = {
            "n": len(scored),
            "failed": len(outcomes) - len(scored),
            "score": _mean([o.score for o in scored if o.score is not None]),
            "score_without_dependencies": _mean(
                [o.score_without_dependencies for o in scored if o.score_without_dependencies is not None]
            ),
            **_costs(outcomes),
        }
    return {"prompts": len(records), "conditions": conditions}


# --- the protocol -------------------------------------------------------------------------------------------------


def _stand_in_generator(settings: Settings) -> list[str]:
    profile = settings.resolved_profile()
    if not profile.local:
        return []
    return [f"the {profile.name!r} profile's generator and retrieval CLIP"]


def _conditions(settings: Settings) -> dict[Condition, Settings]:
    text_alone = settings.model_copy(
        update={
            # One image from the prompt alone with the run's seed: the base model as a user of text alone gets it.
            # No LLM: with one round nothing acts on the verdicts, so planning and judging by LLM would only cost.
            "policy": "imagerag",
            "samples": 1,
            "llm": LLMSettings(),
            "budget": Budget(max_rounds=1, max_generations=1, max_seconds=None, max_tokens=None),
        }
    )
    return {"text_alone": text_alone, "imagerag": settings}


def _load(path: str | Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def index_training_images(
    settings: Settings,
    kind: DatasetKind,
    classes: list[ClassImages],
    options: PaperOptions,
    say: Callable[[str], None],
) -> str:
    """Index the classes' training images into the dataset's retrieval collection with the profile's CLIP and the
    project's indexer (what `imagerag index FOLDER --follow-external-links` runs); return the collection's name.

    The indexer reads a folder of links to the chosen images, named after their class so that each reference's
    caption names it; a link resolves to the dataset's file, which is what the collection records as the source.
    The name holds everything that decides the collection's contents, so one data folder serves several protocols.
    """
    name = f"paper-{kind}-{len(classes)}c-{options.train_images_per_class or 'all'}t-{settings.profile}"
    folder = Path(settings.data_dir) / "paper-references" / name
    for item in classes:
        class_folder = folder / item.key
        class_folder.mkdir(parents=True, exist_ok=True)
        slug = re.sub(r"[^A-Za-z0-9]+", "_", item.name).strip("_")
        for path in item.train:
            link = class_folder / f"{slug}_{path.name}"
            if not link.is_symlink():
                link.symlink_to(path.resolve())
    store = ReferenceStore.open(
        chroma_client(settings.data_dir, settings.chroma_url), name, load_embedder(settings), create=True
    )
    say(f"{kind}: indexing {sum(len(c.train) for c in classes)} training images into {name!r}")
    summary = index_sources(
        store, [FolderSource(folder, follow_external_links=True)], num_workers=options.index_workers
    )
    say(f"{kind}: {summary.line()}; {name!r} holds {store.count()}")
    return name


def _class_prompt(
    kind: DatasetKind, item: ClassImages, template: str, settings: Settings, scorers: Scorers, runs: Path
) -> ClassRecord:
    prompt = template.replace("{name}", item.name)
    targets = scorers.targets(prompt, [_load(p) for p in item.test])
    conditions = {}
    for condition, condition_settings in _conditions(settings).items():
        result = run(prompt, condition_settings, runs / condition)
        scores = scorers.score(_load(result.best_image), targets) if result.best_image else {}
        conditions[condition] = ClassOutcome(**_outcome(result), scores=scores)
    return ClassRecord(
        dataset=kind, key=item.key, name=item.name, prompt=prompt, real_images=len(item.test), conditions=conditions
    )


def _dsg_prompt(item: DSGPrompt, settings: Settings, vlm: BaseChatModel, retries: int, runs: Path) -> DSGRecord:
    questions = item.questions or dsg_questions(vlm, item.prompt, retries)
    conditions = {}
    for condition, condition_settings in _conditions(settings).items():
        result = run(item.prompt, condition_settings, runs / condition)
        outcome = DSGOutcome(**_outcome(result))
        if result.best_image:
            answers = dsg_answers(vlm, _load(result.best_image), questions, retries)
            outcome = outcome.model_copy(
                update={
                    "answers": answers,
                    "score": dsg_score(questions, answers),
                    "score_without_dependencies": sum(answers.values()) / len(questions),
                }
            )
        conditions[condition] = outcome
    return DSGRecord(prompt=item.prompt, questions=questions, conditions=conditions)


def _line(label: str, conditions: dict[Condition, ClassOutcome] | dict[Condition, DSGOutcome]) -> str:
    parts = []
    for condition, outcome in conditions.items():
        if isinstance(outcome, ClassOutcome):
            scores = ", ".join(
                f"{METRICS[m]} {outcome.scores[m]:.3f}" for m in ("clip_text", "siglip_text", "dino") if outcome.scores
            )
        else:
            scores = f"DSG {outcome.score:.3f}" if outcome.score is not None else ""
        parts.append(f"{CONDITIONS[condition]}: {scores or outcome.status} ({outcome.generations} image(s))")
    return f"{label}: " + "; ".join(parts)


def evaluate_paper(
    settings: Settings, options: PaperOptions, out: Path, on_progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run the paper's protocol (see the module's docstring) into `out`; return the report (also OUT/paper.json).

    `settings` are the loop's (profile, policy, budget, seed, LLM, data folder); `on_progress` gets a line per
    finished prompt and per indexing step. Bad options fail with ConfigError before any model loads."""
    settings.check()
    say = on_progress or (lambda line: None)
    datasets = {
        kind: read_dataset(kind, root, options.classes, options.train_images_per_class, options.images_per_class)
        for kind, root in options.datasets.items()
    }
    dsg_prompts = read_dsg_prompts(options.dsg_prompts) if options.dsg_prompts else []
    if not datasets and not dsg_prompts:
        raise ConfigError("nothing to evaluate: pass a dataset folder (imagenet, cub, inaturalist) or DSG prompts")
    dsg_llm = options.dsg_llm or settings.llm
    vlm = make_chat_model(dsg_llm) if dsg_prompts else None
    if dsg_prompts and vlm is None:
        raise ConfigError("DSG scores need a VLM: configure the LLM (IMAGERAG_LLM__MODEL, IMAGERAG_LLM__BASE_URL)")
    if dsg_prompts and not settings.resolved_profile().local:
        # Long prompts retrieve from the settings' collection (a local profile builds its own on first use): a
        # missing one fails now, not after hours of class prompts.
        try:
            ReferenceStore.open(
                chroma_client(settings.data_dir, settings.chroma_url), settings.collection_name, load_embedder(settings)
            )
        except StoreError as error:
            raise ConfigError(f"DSG prompts: {error}") from None
    Path(out).mkdir(parents=True, exist_ok=True)
    protocol = open_protocol(out, Protocol.of(settings, options))  # before any model loads: a mismatch fails fast
    stand_ins = _stand_in_generator(settings)
    scorers = None
    if datasets:
        scorers = Scorers.load(options.metrics, Path(settings.data_dir), pick_device(settings.device))
        stand_ins += scorers.stand_ins()
    results = Results(out, protocol, stand_ins)
    results.write_report()
    for kind, classes in datasets.items():
        assert scorers is not None  # loaded above whenever there is a dataset
        todo = [item for item in classes if ("class", kind, item.key) not in results.done]
        if not todo:
            continue
        collection = index_training_images(settings, kind, classes, options, say)
        loop = settings.model_copy(update={"collection": collection})
        for number, item in enumerate(classes, 1):
            if ("class", kind, item.key) in results.done:
                continue
            record = _class_prompt(kind, item, options.template, loop, scorers, Path(out) / "runs" / kind)
            results.append(record)
            say(_line(f"{kind} {number}/{len(classes)} {item.name!r}", record.conditions))
    for number, long_prompt in enumerate(dsg_prompts, 1):
        if ("dsg", long_prompt.prompt) in results.done:
            continue
        assert vlm is not None  # made above whenever there are DSG prompts
        dsg_record = _dsg_prompt(long_prompt, settings, vlm, dsg_llm.max_retries, Path(out) / "runs" / "dsg")
        results.append(dsg_record)
        say(_line(f"DSG {number}/{len(dsg_prompts)}", dsg_record.conditions))
    return results.write_report()


# --- the report ---------------------------------------------------------------------------------------------------


def _number(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _costs_cells(stats: dict[str, Any]) -> list[str]:
    images, seconds = stats["generations_per_prompt"], stats["seconds_per_prompt"]
    return ["-" if images is None else f"{images:.2f}", "-" if seconds is None else f"{seconds:.2f}"]


def _model(ref: str, pretrained: str | None) -> str:
    return f"`{ref}` / `{pretrained}`" if pretrained else f"`{ref}`"


def markdown(report: dict[str, Any]) -> str:
    protocol = report["protocol"]
    recipe, budget, metrics = protocol["recipe"], protocol["budget"], protocol["metrics"]
    lines = ["# The ImageRAG paper's protocol", ""]
    if report.get("warning"):
        lines += [f"> **{report['warning']}** (stand-ins: {'; '.join(report['stand_ins'])})", ""]
    lines += [
        (
            f"Profile `{recipe['profile']}`, policy `{recipe['policy']}`, seed {recipe['seed']}; the loop's budget: "
            f'{budget["max_rounds"]} rounds, {budget["max_generations"]} images. Class prompt: "{protocol["template"]}". '
            f"Metric models: CLIP {_model(metrics['clip'], metrics['clip_pretrained'])}, SigLIP "
            f"{_model(metrics['siglip'], metrics['siglip_pretrained'])}, DINO {_model(metrics['dino'], None)}."
        ),
        "",
    ]
    if report["class_prompts"]:
        lines += [
            "## Class prompts",
            "",
            (
                "Each image against its class: CLIP and SigLIP text-image similarity to the prompt and DINO similarity "
                "to the class's real test images (the paper's three columns), then CLIP and SigLIP image-image "
                "similarity to those images. Means over n prompts; the last row of a dataset is the loop's gain, paired "
                "by prompt."
            ),
            "",
            "| dataset | condition | n | " + " | ".join(METRICS.values()) + " | images / prompt | seconds / prompt |",
            "|---|---|---:|" + "---:|" * (len(METRICS) + 2),
        ]
        for kind, summary in report["class_prompts"].items():
            title = DATASET_TITLES.get(kind, kind)
            for condition, label in CONDITIONS.items():
                s = summary["conditions"][condition]
                cells = [_number(s[m]) for m in METRICS] + _costs_cells(s)
                failed = f" ({s['failed']} failed)" if s["failed"] else ""
                lines.append(f"| {title} | {label} | {s['n']}{failed} | " + " | ".join(cells) + " |")
            d = summary["difference"]
            lines.append(
                f"| {title} | loop - text alone | {d['n']} | "
                + " | ".join(_number(d[m], True) for m in METRICS)
                + " | | |"
            )
        lines.append("")
    if report["dsg"]:
        lines += [
            "## Long prompts: DSG score",
            "",
            (
                "Share of a prompt's DSG questions the VLM answers yes for the image, a question counting as no when a "
                "question it depends on is no; beside it, the share without that rule."
            ),
            "",
            "| condition | n | DSG score | without the dependency rule | images / prompt | seconds / prompt |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for condition, label in CONDITIONS.items():
            s = report["dsg"]["conditions"][condition]
            lines.append(
                f"| {label} | {s['n']} | {_number(s['score'])} | {_number(s['score_without_dependencies'])} | "
                + " | ".join(_costs_cells(s))
                + " |"
            )
        lines.append("")
    lines += [
        "## The paper's figures, for reference (not measured here)",
        "",
        (
            "Reported by ImageRAG (Shalev-Arkushin et al., ICLR 2026), CLIP / SigLIP / DINO, with the paper's own "
            "evaluation models and a 350K-image LAION subset to retrieve from (here: the dataset's training images). "
            "Where the evaluation models differ, compare gains (loop - text alone), not absolute values:"
        ),
        "",
        "| model | ImageNet | iNaturalist | CUB |",
        "|---|---|---|---|",
    ]
    for model, row in PAPER_FIGURES.items():
        cells = [
            " / ".join(f"{v:.3f}".removeprefix("0") for v in row[kind]) for kind in ("imagenet", "inaturalist", "cub")
        ]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["", f"The paper's {PAPER_GPTSCORE}", ""]
    return "\n".join(lines)
