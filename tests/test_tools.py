"""The four tools as plain calls and as LangChain tools, decomposition, and the judges."""

import numpy as np
import pytest
from PIL import Image
from scripted import ScriptedChatModel

from imagerag.graphs.agent_tools import TOOLS
from imagerag.tools.backends.judges import ClipJudge, VLMJudge, VLMJudgement
from imagerag.tools.backends.llm import LLMOutputError
from imagerag.tools.backends.loading import load_embedder
from imagerag.tools.backends.planner import ConceptList, LLMDecomposer, RuleDecomposer
from imagerag.tools.backends.store import ReferenceStore, StoreError, chroma_client
from imagerag.tools.types import Concept

CONCEPTS = [Concept(id="c1", text="a red heart"), Concept(id="c2", text="a blue square")]


def test_tools_are_langchain_tools_whose_schemas_hide_the_injected_runtime():
    tools = {t.name: t for t in TOOLS}
    assert set(tools) == {"generate", "critique", "retrieve", "regenerate", "edit"}
    for tool in tools.values():
        schema = tool.tool_call_schema.model_json_schema()
        assert "runtime" not in schema["properties"] and "state" not in schema["properties"] and tool.description
    assert tools["regenerate"].tool_call_schema.model_json_schema()["required"] == ["prompt", "reference_ids"]


def test_plain_calls_generate_critique_retrieve_and_regenerate(toolkit):
    [candidate] = toolkit.generate("a red heart", seed=3)
    assert toolkit.images.path(candidate.image_id).exists() and candidate.seed == 3
    critique = toolkit.critique(candidate.image_id, CONCEPTS, "a red heart and a blue square")
    assert [v.concept_id for v in critique.verdicts] == ["c1", "c2"]
    hits = toolkit.retrieve("a red square", k=2)
    assert len(hits) == 2 and hits[0].similarity >= hits[1].similarity
    [again] = toolkit.regenerate("a red heart", hits, seed=1, round=2)
    assert len(again.references) == 1  # the IP-Adapter generator takes one reference
    assert "like the reference image" in again.prompt and again.round == 2


def test_images_are_content_addressed_and_unknown_ids_are_a_clear_error(toolkit):
    image = Image.new("RGB", (4, 4), "red")
    assert toolkit.images.put(image) == toolkit.images.put(image.copy())
    with pytest.raises(KeyError, match="use an image id returned by generate"):
        toolkit.images.get("0000")
    with pytest.raises(KeyError, match="is not an image id"):
        toolkit.images.get("../../etc/passwd")


def test_retrieval_drops_everything_below_the_threshold(tiny_store):
    assert tiny_store.search("a red square", k=5, min_similarity=1.01) == []
    assert len(tiny_store.search("a red square", k=5, min_similarity=-1.0)) == 5


def test_retrieval_never_returns_one_image_for_two_captions(tiny_store):
    hits = tiny_store.search_many(["a red square", "a red square", "a red square"], k=1)
    assert len({h.id for h in hits}) == 3


def test_a_missing_collection_is_a_clear_error(tiny_settings):
    with pytest.raises(StoreError, match="imagerag index IMAGE_FOLDER --collection nowhere"):
        ReferenceStore.open(chroma_client(tiny_settings.data_dir), "nowhere", load_embedder(tiny_settings))


def test_the_rule_decomposer_splits_clauses_into_objects_attributes_and_relations():
    concepts, tokens = RuleDecomposer().decompose(
        "A photo of a large red heart on the left and a blue square, in watercolour style"
    )
    assert [(c.id, c.text, c.kind, c.depends_on) for c in concepts] == [
        ("c1", "a heart", "object", []),
        ("c2", "a large heart", "attribute", ["c1"]),
        ("c3", "a red heart", "attribute", ["c1"]),
        ("c4", "a heart on the left", "relation", ["c1"]),
        ("c5", "a square", "object", []),
        ("c6", "a blue square", "attribute", ["c5"]),
        ("c7", "in watercolour style", "style", []),
    ]
    assert tokens == 0
    # 'and' between adjectives does not split the clause; counts keep their number.
    assert [c.text for c in RuleDecomposer().decompose("a black and white photo")[0]] == [
        "a photo",
        "a black and white photo",
    ]
    assert [(c.text, c.kind) for c in RuleDecomposer().decompose("three apples")[0]] == [("three apples", "count")]


def test_the_llm_decomposer_uses_structured_output():
    llm = ScriptedChatModel(
        messages=iter(()),
        structured=iter(
            [
                ConceptList(
                    concepts=[{"text": "a boston bull", "kind": "object"}, {"text": "a boston bull", "kind": "object"}]
                )
            ]
        ),
    )
    concepts, tokens = LLMDecomposer(llm).decompose("a boston bull")
    assert [(c.id, c.text) for c in concepts] == [("c1", "a boston bull")] and tokens == 100


def test_the_vlm_judge_sends_the_image_and_retries_hotter_until_every_concept_is_answered():
    partial = VLMJudgement(verdicts=[{"concept_id": "c1", "satisfied": True, "score": 0.9}])
    full = VLMJudgement(
        verdicts=[
            {"concept_id": "c1", "satisfied": True, "score": 0.9},
            {"concept_id": "c2", "satisfied": False, "score": 0.1},
        ]
    )
    llm = ScriptedChatModel(messages=iter(()), structured=iter([None, partial, full]))
    critique = VLMJudge(llm, retries=3).critique(Image.new("RGB", (8, 8)), CONCEPTS, "a red heart and a blue square")
    assert llm.temperatures == pytest.approx([0.0, 0.3, 0.6])
    [message] = llm.seen[0]
    assert message.content[1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert "c2 (object): a blue square" in message.content[0]["text"]
    assert [v.satisfied for v in critique.verdicts] == [True, False]
    # A missing concept always carries a retrieval caption (the concept itself when the VLM gave none).
    assert critique.verdicts[1].caption == "a blue square" and critique.tokens == 300


def test_the_vlm_judge_gives_up_after_its_retries():
    llm = ScriptedChatModel(messages=iter(()), structured=iter([None] * 3))
    with pytest.raises(LLMOutputError, match="no valid answer after 3 attempts"):
        VLMJudge(llm, retries=2).critique(Image.new("RGB", (8, 8)), CONCEPTS, "p")


def test_the_clip_judge_scores_half_at_its_threshold(tiny_settings):
    embedder = load_embedder(tiny_settings)
    image = Image.new("RGB", (32, 32), "red")
    similarity = float(embedder.embed_texts(["a red heart"])[0] @ embedder.embed_images([image])[0])
    critique = ClipJudge(embedder, threshold=similarity).critique(image, CONCEPTS[:1])
    assert critique.verdicts[0].satisfied and critique.verdicts[0].score == pytest.approx(0.5, abs=1e-3)
    critique = ClipJudge(embedder, threshold=similarity + 0.1).critique(image, CONCEPTS[:1])
    assert not critique.verdicts[0].satisfied and critique.verdicts[0].caption == "a red heart"


class _BlankLovingEmbedder:
    """Every text embeds as [1, 0]; a crop with anything drawn on it as [0.8, 0.6], a blank one as [1, 0]: blank
    cells score above any threshold, as a small CLIP's can."""

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return np.tile([1.0, 0.0], (len(texts), 1))

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        drawn = [len(set(im.convert("RGB").getdata())) > 1 for im in images]
        return np.array([[0.8, 0.6] if d else [1.0, 0.0] for d in drawn])


def test_the_clip_judge_counts_only_cells_with_something_drawn():
    image = Image.new("RGB", (48, 48), "white")
    for left in (2, 34):  # two red squares: the top left and top right cells
        image.paste((220, 40, 40), (left, 2, left + 12, 14))
    judge = ClipJudge(_BlankLovingEmbedder(), threshold=0.5)  # type: ignore[arg-type]
    two, three = (Concept(id=f"c{n}", kind="count", text=f"{n} red squares") for n in ("two", "three"))
    verdicts = judge.critique(image, [two, three]).verdicts
    assert [v.satisfied for v in verdicts] == [True, False]
    assert "found in 2 cell(s): top left, top right" in verdicts[0].evidence


def test_the_agent_is_told_where_an_image_holds_an_object_nobody_asked_for():
    from imagerag.graphs.agent_tools import describe_verdicts
    from imagerag.tools.grid import CELL_BOXES
    from imagerag.tools.types import Concept, ConceptVerdict

    concepts = [Concept(id="c1", text="a star", kind="object")]
    verdicts = [ConceptVerdict(concept_id="c1", satisfied=True, score=0.9)]
    assert "asked for by no concept" not in describe_verdicts("img", verdicts, concepts)
    told = describe_verdicts("img", verdicts, concepts, [CELL_BOXES["top left"], CELL_BOXES["bottom"]])
    assert told.endswith("asked for by no concept, in: top left, bottom (the run does not end on this image)")
