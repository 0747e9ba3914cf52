"""The OWLv2 detector on a tiny OWLv2 built offline and loaded through from_pretrained, the real id's code path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import Owlv2ForObjectDetection, Owlv2Processor

from imagerag.tools.backends.detector import OwlDetector, padded_to_image
from imagerag.tools.backends.judges import CellCache
from imagerag.tools.backends.tiny import build_tiny_owlv2
from imagerag.tools.types import REFERENCE_ID, Box

TEXTS = ["a red square", "a blue circle", "a green star"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_owlv2(tmp_path_factory.mktemp("models") / "owlv2")


def _scene(size: tuple[int, int]) -> Image.Image:
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).rectangle((2, 2, size[0] // 2, size[1] // 2), fill="red")
    return image


def _vision_calls(detector: OwlDetector) -> list[int]:
    calls: list[int] = []
    detector.model.owlv2.vision_model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_the_tiny_model_saves_in_the_real_layout_and_loads_back(folder, tmp_path):
    detector = OwlDetector.from_pretrained(str(folder))
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= {
        p.name for p in folder.iterdir()
    }
    assert detector.model.config.model_type == "owlv2" and not detector.model.training
    assert detector.processor.tokenizer.model_max_length == 16 and detector.processor.tokenizer.pad_token == "!"
    assert build_tiny_owlv2(folder) == folder  # built once: a second call finds it


@pytest.mark.parametrize("size", [(48, 24), (24, 48), (32, 32)])
def test_locate_gives_one_box_or_none_per_text_inside_the_image(folder, size):
    boxes = OwlDetector.from_pretrained(str(folder), threshold=0.0).locate(_scene(size), TEXTS)
    assert len(boxes) == len(TEXTS) and all(isinstance(b, Box) for b in boxes)  # threshold 0: every text has one
    assert OwlDetector.from_pretrained(str(folder)).locate(_scene(size), []) == []


def test_a_caption_longer_than_owlv2_s_16_tokens_is_cut_not_fatal(folder):
    detector = OwlDetector.from_pretrained(str(folder), threshold=0.0)
    assert len(detector.locate(_scene((32, 32)), ["a red square beside a blue circle " * 10, "a star"])) == 2


@pytest.mark.parametrize("size", [(48, 24), (24, 48)])
def test_boxes_are_converted_from_the_padded_square_as_transformers_post_processing_does(folder, size):
    """Every patch's box (cached with the features) against transformers' own post-processing of a full forward
    pass, which scales OWLv2's boxes by the padded square's side."""
    detector = OwlDetector.from_pretrained(str(folder), threshold=0.0)
    image = _scene(size)
    detector.locate(image, TEXTS)
    corners = detector.cache.get(image, lambda: pytest.fail("the image side was not cached"))[:, -4:]
    processor: Owlv2Processor = detector.processor
    model: Owlv2ForObjectDetection = detector.model
    with torch.inference_mode():
        outputs = model(**processor(text=[TEXTS], images=image, return_tensors="pt"))
    width, height = size
    reference = processor.post_process_grounded_object_detection(
        outputs, threshold=0.0, target_sizes=[(height, width)]
    )[0]["boxes"].numpy() / np.array([width, height, width, height])
    assert len(reference) == len(corners)
    np.testing.assert_allclose(corners, np.clip(reference, 0.0, 1.0), atol=1e-5)
    # Some box reaches past the image into the padding: the conversion is exercised where it matters.
    assert (reference > 1.0 + 1e-3).any()


def test_a_box_of_the_padded_square_in_the_image_s_fractions():
    # A 40 x 20 image is padded to a 40 x 40 square at the bottom: y doubles, x stays.
    box = np.array([[0.5, 0.25, 0.5, 0.25], [0.5, 0.9, 0.2, 0.1]], np.float32)  # centre x, centre y, width, height
    np.testing.assert_allclose(padded_to_image(box, (40, 20)), [[0.25, 0.25, 0.75, 0.75], [0.4, 1.0, 0.6, 1.0]])
    # 20 x 40, padded on the right: x doubles.
    np.testing.assert_allclose(padded_to_image(box[:1], (20, 40)), [[0.5, 0.125, 1.0, 0.375]])


def test_the_best_box_of_each_text_is_chosen_and_a_weak_best_gives_none(folder, monkeypatch):
    detector = OwlDetector.from_pretrained(str(folder), threshold=0.1)
    image = _scene((48, 24))
    detector.locate(image, TEXTS[:1])
    corners = detector.cache.get(image, lambda: pytest.fail("not cached"))[:, -4:]
    patches = len(corners)
    inside = [i for i in range(patches) if corners[i, 0] < corners[i, 2] and corners[i, 1] < corners[i, 3]]
    first, second = inside[0], inside[-1]
    # Scores (sigmoid of the logits): text 0 peaks at 0.8 on one patch, text 1 at 0.6 on another, text 2 at 0.05.
    logits = torch.full((1, patches, 3), -6.0)
    logits[0, first, 0], logits[0, second, 1], logits[0, first, 2] = 1.386, 0.405, -2.944
    monkeypatch.setattr(detector.model, "class_predictor", lambda *_: (logits, None))
    boxes = detector.locate(image, TEXTS)
    assert boxes[0] == Box(**dict(zip(("x0", "y0", "x1", "y1"), corners[first].tolist(), strict=True)))
    assert boxes[1] == Box(**dict(zip(("x0", "y0", "x1", "y1"), corners[second].tolist(), strict=True)))
    assert boxes[2] is None


def test_a_box_wholly_in_the_padding_is_never_chosen(folder, monkeypatch):
    detector = OwlDetector.from_pretrained(str(folder), threshold=0.0)
    image = _scene((48, 24))
    detector.locate(image, TEXTS[:1])
    corners = detector.cache.get(image, lambda: pytest.fail("not cached"))[:, -4:]
    padding = [i for i in range(len(corners)) if not (corners[i, 0] < corners[i, 2] and corners[i, 1] < corners[i, 3])]
    assert padding  # the tiny model's bottom row of patches lies below a 2:1 image
    logits = torch.zeros((1, len(corners), 1))
    logits[0, padding[0], 0] = 5.0
    monkeypatch.setattr(detector.model, "class_predictor", lambda *_: (logits, None))
    box = detector.locate(image, TEXTS[:1])[0]
    assert box is not None and box.y1 <= 1.0 and box.y0 < box.y1


def test_the_image_side_is_computed_once_for_many_texts_and_calls(folder):
    detector = OwlDetector.from_pretrained(str(folder), threshold=0.0)
    calls = _vision_calls(detector)
    image = _scene((48, 24))
    first = detector.locate(image, TEXTS)
    again = detector.locate(image.copy(), TEXTS[::-1])  # the same pixels, another object
    assert len(calls) == 1
    assert again == first[::-1]
    detector.locate(_scene((24, 48)), TEXTS)
    assert len(calls) == 2


def test_a_collection_image_is_cached_on_disk_under_its_id(folder, tmp_path):
    image = _scene((48, 24))
    image.info[REFERENCE_ID] = "ref-1"
    first = OwlDetector.from_pretrained(str(folder), threshold=0.0, cache=CellCache(tmp_path / "owl"))
    boxes = first.locate(image, TEXTS)
    assert (tmp_path / "owl" / "ref-1.npy").exists()
    # Another process: a fresh detector and cache read the image side from disk, not from the vision tower.
    second = OwlDetector.from_pretrained(str(folder), threshold=0.0, cache=CellCache(tmp_path / "owl"))
    calls = _vision_calls(second)
    assert second.locate(image, TEXTS) == boxes and not calls


def test_a_profile_with_a_detector_hands_the_generator_the_located_object(tiny_store, tmp_path):
    """The real profiles name OWLv2; their miniatures load the tiny one through the same from_pretrained. Retrieval
    records each hit's box, hits whose object was found come first, and the generator gets the crop."""
    from scripted import FakeGenerator, ScriptedCritic, fake_backends

    from imagerag.tools.backends.loading import _detector
    from imagerag.tools.backends.store import ReferenceStore
    from imagerag.tools.config import PROFILES
    from imagerag.tools.toolkit import Toolkit

    assert PROFILES["sdxl"].detector == "google/owlv2-base-patch16-ensemble"
    assert isinstance(_detector(PROFILES["tiny-sdxl"], tmp_path, "cpu"), OwlDetector)
    assert _detector(PROFILES["mini"], tmp_path, "cpu") is None  # its critic's re-ranking locates

    box = Box(x0=0.0, y0=0.0, x1=0.5, y1=0.5)
    last = tiny_store.search("a square", k=5)[-1]  # CLIP's last
    found = ReferenceStore.load_image(last).getpixel((0, 0))

    class OnlyThere:  # a stand-in detector: the object is found in CLIP's last hit only
        def locate(self, image, texts):
            return [box if image.getpixel((0, 0)) == found else None for _ in texts]

    generator = FakeGenerator()
    sizes = []
    generate = generator.generate
    generator.generate = lambda prompt, seed, n=1, references=(), on_step=None: (
        sizes.extend(r.size for r in references) or generate(prompt, seed, n, references, on_step)
    )
    backends = fake_backends(tiny_store, ScriptedCritic([set()]), generator=generator)
    backends.locator = OnlyThere()
    tools = Toolkit(backends, tmp_path)
    hits = tools.retrieve("a square", k=5)
    assert hits[0].id == last.id and hits[0].box == box
    assert all(h.box is None for h in hits[1:])
    tools.regenerate("a square", hits[:1])
    assert sizes == [(18, 18)]  # 16 px of the 32 px image, 2 px of margin (15%) where the image goes on
