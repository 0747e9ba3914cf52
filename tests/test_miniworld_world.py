"""The miniature world, its prompt grammar, the judge and the benchmark's splits and statistics (no models)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from imagerag.evals.miniworld.benchmark import (
    K_BUCKETS,
    PROMPTS_DIR,
    RARE_MIX,
    SPLITS,
    Outcome,
    diversity,
    free_values,
    load_prompts,
    make_split,
    paired_bootstrap,
    parse_caption,
    strictly_right,
)
from imagerag.evals.miniworld.grammar import (
    Detected,
    Group,
    PromptSpec,
    RelationSpec,
    concept_text,
    judge,
    reading_of,
    sample_layout,
    sample_prompt,
)
from imagerag.evals.miniworld.train_t2i import WordTokens, parse_targets, training_caption, unknown_words
from imagerag.tools.backends.planner import RuleDecomposer
from imagerag.tools.backends.tiny import clip_bpe_tokenizer
from imagerag.tools.miniworld.world import (
    CELLS,
    COLOUR_NAMES,
    RELATIONS,
    SHAPES,
    SIZE_NAMES,
    ObjectSpec,
    Scene,
    caption,
    corpus_scenes,
    holds,
    render,
    write_corpus,
)


def test_world_is_deterministic_and_its_corpus_never_holds_an_evaluation_scene(tmp_path):
    a, b = corpus_scenes(300, seed=3), corpus_scenes(300, seed=3)
    assert a == b and all(sc.half == "corpus" for sc in a)
    assert np.array_equal(np.asarray(render(a[0])), np.asarray(render(b[0])))
    assert render(a[0]).size == (48, 48)
    # No two corpus scenes render alike (near-equal jitters would otherwise give ~30 repeats in 3,000): every
    # image the collection indexes is its own.
    many = corpus_scenes(3000, seed=1)
    assert len({render(sc).tobytes() for sc in many}) == len(many) == 3000
    write_corpus(tmp_path / "c", n=30, seed=1, exclude_shapes=["heart"])
    caps = [p.read_text() for p in sorted((tmp_path / "c").glob("*.txt"))]
    assert len(caps) == 30 and not any("heart" in c for c in caps)
    scene = Scene((ObjectSpec("square", "blue", "small", "right"), ObjectSpec("heart", "red", "large", "top left")))
    assert caption(scene) == "a large red heart in the top left and a small blue square on the right"
    assert [o[:2] for o in parse_caption(caption(scene))] == [("heart", "red"), ("square", "blue")]


def test_scenes_reject_what_the_world_cannot_draw():
    with pytest.raises(ValueError, match="unknown colour 'pink'"):
        ObjectSpec("star", "pink", "small", "centre")
    with pytest.raises(ValueError, match="share a cell"):
        Scene((ObjectSpec("star", "red", "small", "top"), ObjectSpec("ring", "red", "small", "top")))
    with pytest.raises(ValueError, match="1 to 4 objects"):
        Scene(tuple(ObjectSpec("ring", "red", "small", c) for c in ("top", "left", "right", "bottom", "centre")))


def test_relations_are_judged_on_grid_columns_and_rows():
    assert holds("left of", "top left", "bottom right") and holds("above", "top right", "centre")
    assert not holds("left of", "top", "bottom") and not holds("below", "left", "right")


@pytest.mark.parametrize("k", range(1, 17))
def test_sampled_prompts_carry_exactly_k_concepts_and_their_own_scene_satisfies_them(k):
    rng = random.Random(k)
    for rare in (False, True):
        for _ in range(20):
            spec = sample_prompt(rng, k, rare, half="eval")
            assert spec.k == k and spec.has_rare == rare
            assert spec.scene_objects is not None and spec.scene_objects.half == "eval"
            assert judge(spec, reading_of(spec.scene_objects)).all_right


def test_the_judge_fails_exactly_the_concept_that_is_wrong():
    spec = PromptSpec(
        id="x",
        prompt="a red star to the left of a blue ring and two green squares",
        groups=[
            Group(shape="star", colour="red"),
            Group(shape="ring", colour="blue"),
            Group(shape="square", count=2, colour="green"),
        ],
        relations=[RelationSpec(subject=0, relation="left of", object=1)],
    )
    good = [
        Detected("star", "red", "small", "left"),
        Detected("ring", "blue", "large", "centre"),
        Detected("square", "green", "small", "top"),
        Detected("square", "green", "small", "bottom"),
    ]
    assert judge(spec, good).all_right and spec.k == 8

    def failed(reading):
        return sorted((c.kind, c.value) for c, ok in judge(spec, reading).concepts if not ok)

    assert failed([good[0].__class__("star", "cyan", "small", "left"), *good[1:]]) == [("colour", "red")]
    assert failed([good[0].__class__("star", "red", "small", "right"), *good[1:]]) == [("relation", "left of")]
    assert failed([*good, Detected("square", "green", "small", "bottom right")]) == [("count", "2")]
    assert failed(good[1:]) == [("colour", "red"), ("relation", "left of"), ("shape", "star")]


def test_prompt_specs_refuse_contradictions():
    with pytest.raises(ValueError, match="single objects without a cell"):
        PromptSpec(
            id="x",
            prompt="...",
            groups=[Group(shape="star", cell="left"), Group(shape="ring")],
            relations=[RelationSpec(subject=0, relation="right of", object=1)],
        )
    with pytest.raises(ValueError, match="share a shape"):
        PromptSpec(id="x", prompt="...", groups=[Group(shape="star"), Group(shape="star", colour="red")])


def test_the_shipped_splits_are_what_the_code_draws_and_share_no_scene():
    dev, test = load_prompts(PROMPTS_DIR / "dev.jsonl"), load_prompts(PROMPTS_DIR / "test.jsonl")
    assert dev == make_split("dev") and test == make_split("test")
    assert not {p.scene_key for p in dev} & {p.scene_key for p in test}
    for split, name in ((dev, "dev"), (test, "test")):
        assert len({p.scene_key for p in split}) == len(split)
        assert all(p.scene_objects is not None and p.scene_objects.half == "eval" for p in split)
        for lo, hi in K_BUCKETS.values():
            for rare in RARE_MIX:
                assert sum(lo <= p.k <= hi and p.rare_objects == rare for p in split) == SPLITS[name][0]


def test_the_offline_planner_words_every_concept_as_the_judge_does():
    planner = RuleDecomposer()
    for spec in make_split("dev"):
        words = {c.text for c in planner.decompose(spec.prompt)[0]}
        assert {concept_text(spec, c) for c in spec.concepts} <= words, spec.prompt


def test_prompt_files_name_the_bad_line(tmp_path):
    spec = make_split("dev")[0]
    bad = spec.model_copy(update={"id": "other"}).model_dump_json().replace(f'"{spec.groups[0].shape}"', '"dragon"')
    path = tmp_path / "p.jsonl"
    path.write_text(spec.model_dump_json() + "\n" + bad + "\n")
    with pytest.raises(ValueError, match=r"(?s)p.jsonl:2: .*unknown shape 'dragon'"):
        load_prompts(path)
    path.write_text(spec.model_dump_json() + "\n" + spec.model_dump_json() + "\n")
    with pytest.raises(ValueError, match="ids must be unique"):
        load_prompts(path)


def test_the_paired_bootstrap_finds_a_real_difference_and_none_where_there_is_none():
    seeds = (0, 1, 2)
    always = {f"p{i}": dict.fromkeys(seeds, True) for i in range(30)}
    never = {f"p{i}": dict.fromkeys(seeds, False) for i in range(30)}
    assert paired_bootstrap(always, never) == {"prompts": 30, "difference_points": 100.0, "ci95": [100.0, 100.0]}
    rng = random.Random(0)
    a = {f"p{i}": {s: rng.random() < 0.5 for s in seeds} for i in range(60)}
    b = {f"p{i}": {s: rng.random() < 0.5 for s in seeds} for i in range(60)}
    lo, hi = paired_bootstrap(a, b)["ci95"]
    assert lo < 0 < hi


def test_text_encoder_targets_sit_at_each_objects_phrase_end_and_tokens_match_the_tokenizer():
    tokenizer = clip_bpe_tokenizer()
    words, rng, unknown = WordTokens(tokenizer), random.Random(7), unknown_words(tokenizer)
    for _ in range(2000):
        layout = sample_layout(rng, rng.randint(1, 4), rare=rng.random() < 0.5)
        names = {0: rng.choice(unknown)} if rng.random() < 0.5 else {}
        text, spec = training_caption(layout, rng, names)
        ids, ends = words(text)
        assert ids == tokenizer(text).input_ids
        phrase, cells = parse_targets(text, spec, names, ends)
        by_shape = {target["shape"]: position for position, target in phrase.items()}
        assert len(by_shape) == len(spec.groups)
        for i, group in enumerate(spec.groups):
            shape = len(SHAPES) if i in names else SHAPES.index(group.shape)
            last_word = group.phrase(names.get(i)).split()[-1]
            assert tokenizer.decode(ids[by_shape[shape]]).strip() == tokenizer.decode(words.word(last_word)[-1]).strip()
            assert phrase[by_shape[shape]]["cell"] == (CELLS.index(group.cell) if group.cell else len(CELLS))
            if group.cell:
                assert cells["shape"][CELLS.index(group.cell)] == shape
    # A hidden object's stand-in word that starts with another object's shape word: "a crossing" is not "a cross".
    spec = PromptSpec(id="x", prompt="", groups=[Group(shape="star"), Group(shape="cross")])
    text = "a crossing and a cross"
    phrase, _ = parse_targets(text, spec, {0: "crossing"}, words(text)[1])
    assert sorted(phrase) == [2, 5] and phrase[2]["shape"] == len(SHAPES)
    spec = PromptSpec(id="x", prompt="", groups=[Group(shape="ring", colour="red", size="large", cell="top left")])
    text = spec.groups[0].phrase()  # "a large red ring in the top left": its last token says every attribute
    ids, ends = words(text)
    phrase, _ = parse_targets(text, spec, {}, ends)
    expected = {"shape": SHAPES.index("ring"), "colour": COLOUR_NAMES.index("red"), "size": SIZE_NAMES.index("large"),
                "cell": CELLS.index("top left"), "count": 0, "relation": len(RELATIONS)}  # fmt: skip
    assert phrase == {len(ids) - 2: expected}


def test_the_grounding_loss_is_zero_when_each_token_attends_inside_its_cells_and_high_when_spread():
    import torch
    from diffusers import UNet2DConditionModel

    from imagerag.evals.miniworld.train_t2i import UNET_CFG, CrossAttentionMaps, grounding_loss

    cells = torch.zeros(1, 4, 3, 3)
    cells[0, 0, 0, 0] = 1.0  # group 0 (token 5) in the top left; groups 1-3 absent
    tokens = torch.tensor([[5, -1, -1, -1]])
    inside = torch.zeros(1, 144, 77)
    inside[0, [r * 12 + c for r in range(4) for c in range(4)], 5] = 1.0  # the top left 4x4 of a 12x12 map
    spread = torch.full((1, 144, 77), 1 / 77)
    assert grounding_loss([inside], tokens, cells).item() == 0.0
    assert grounding_loss([spread], tokens, cells).item() == pytest.approx((1 - 1 / 9) ** 2)

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CFG)
    attention = CrossAttentionMaps(unet)
    unet(torch.randn(2, 4, 12, 12), torch.tensor([10, 500]), encoder_hidden_states=torch.randn(2, 77, 64))
    maps = attention.maps()
    assert sorted({m.shape[1] for m in maps}) == [9, 36, 144] and len(maps) == 10
    assert all(m.shape[::2] == (2, 77) and torch.allclose(m.sum(-1), torch.ones(())) for m in maps)


def test_two_rare_objects_are_two_distinct_rare_shapes_and_one_rare_draws_as_before():
    for seed in range(50):
        layout = sample_layout(random.Random(seed), 3, 2, p_count=0.0)
        rare = [o.shape for o in layout.objects if o.is_rare]
        assert len(rare) == 2 and len(set(rare)) == 2
    # one rare object: the same layout as a boolean asked for (earlier splits and training data do not move)
    assert sample_layout(random.Random(7), 3, 1) == sample_layout(random.Random(7), 3, True)


def test_the_strict_judge_and_free_attributes_read_what_the_prompt_did_not_ask():
    spec = PromptSpec(
        id="x",
        prompt="a red star in the top left and a ring",
        groups=[Group(shape="star", colour="red", cell="top left"), Group(shape="ring")],
    )
    asked = [Detected("star", "red", "small", "top left"), Detected("ring", "blue", "large", "centre")]
    extra = [*asked, Detected("cross", "green", "small", "bottom")]
    assert strictly_right(spec, True, asked) and not strictly_right(spec, True, extra)
    assert not strictly_right(spec, False, asked)
    # the star's size and the ring's colour, size and cell were left free
    assert free_values(spec, asked) == [
        (0, "size", "small"),
        (1, "colour", "blue"),
        (1, "size", "large"),
        (1, "cell", "centre"),
    ]
    # across seeds: the ring blue twice and green once -> 2 distinct colours
    base = {"condition": "c", "prompt_id": "x", "k": 4, "rare": False, "objects": 2, "all_right": True}
    outcomes = [
        Outcome(
            **base,
            seed=s,
            concepts=[],
            any_image_all_right=True,
            critic=[],
            generations=1,
            seconds=1.0,
            free=[(1, "colour", colour)],
        )
        for s, colour in enumerate(("blue", "blue", "green"))
    ]
    assert diversity(outcomes)["colour"] == {"distinct_values": 2, "objects": 1}
    assert diversity(outcomes)["size"] == {"distinct_values": None, "objects": 0}
