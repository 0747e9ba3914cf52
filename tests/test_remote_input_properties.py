"""Property tests of what a remote client sends the LangGraph Server, run directly on the models and on the checks of
agent/server_app.py (no server): RunInput, ClientContext, the review decision. The safety property behind issue 23:
whatever the server's check lets through, the graph can read back from its state, so no input breaks a thread."""

from __future__ import annotations

import base64
import io
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import ValidationError

from imagerag.agent.server_app import (
    InputRefused,
    RemoteReviewDecision,
    check_review_answer,
    check_run_input,
    check_state_update,
)
from imagerag.graphs.context import SERVER_ONLY, ClientContext
from imagerag.graphs.nodes import ReviewDecision, review_uploads
from imagerag.graphs.state import (
    INVISIBLE,
    MAX_GENERATIONS,
    MAX_PROMPT_CHARS,
    MAX_RETRIEVE_K,
    MAX_REVIEW_KEEP,
    MAX_REVIEW_UPLOADS,
    MAX_ROUNDS,
    MAX_SEED,
    THREAD_PATTERN,
    Budget,
    RunInput,
    RunState,
)
from imagerag.tools.backends.sources import MAX_CAPTION_CHARS
from imagerag.tools.config import check_collection_name
from imagerag.tools.errors import ImageRAGError

CHECKS = settings(deadline=None, max_examples=150)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
# Text that is mostly nothing to see: white space, zero-width and other invisible characters, now and then a letter.
faint_text = st.text(alphabet=st.sampled_from([*INVISIBLE, " ", "\t", "\n", "\u3000", "a", "é", "字"]), max_size=40)


def visible(text: str) -> bool:
    return any(c.isprintable() and not c.isspace() and c not in INVISIBLE for c in text)


def accepts(build) -> bool:
    try:
        build()
    except (ValidationError, ImageRAGError):
        return False
    return True


@CHECKS
@given(faint_text | st.text(max_size=60))
def test_a_message_is_taken_iff_it_shows_something(message):
    assert accepts(lambda: RunInput(message=message)) == visible(message)
    if visible(message):
        kept = RunInput(message=message).message
        assert kept and kept[0] not in INVISIBLE and not kept[0].isspace()
        assert kept[-1] not in INVISIBLE and not kept[-1].isspace()


def test_a_message_of_only_zero_width_characters_is_empty():
    with pytest.raises(ValidationError, match="the prompt is empty"):
        RunInput(message="\u200b\u200c\u200d\u2060\ufeff")


@CHECKS
@given(st.integers(min_value=0, max_value=200), st.sampled_from(["a", " ", "\u200b"]))
def test_a_message_is_at_most_max_prompt_chars(extra, filler):
    message = "x" * (MAX_PROMPT_CHARS - 100) + "y" * extra + filler
    assert accepts(lambda: RunInput(message=message)) == (len(message.strip().strip(INVISIBLE)) <= MAX_PROMPT_CHARS)


@CHECKS
@given(st.integers(min_value=-(2**70), max_value=2**70))
def test_a_seed_is_a_signed_64_bit_integer_from_zero(seed):
    assert accepts(lambda: RunInput(message="a red square", seed=seed)) == (0 <= seed < MAX_SEED)


@CHECKS
@given(st.integers(min_value=-5, max_value=2 * MAX_GENERATIONS), st.integers(min_value=-5, max_value=2 * MAX_ROUNDS))
def test_a_budget_is_bounded(generations, rounds):
    ok = 1 <= generations <= MAX_GENERATIONS and 1 <= rounds <= MAX_ROUNDS
    assert accepts(lambda: Budget(max_generations=generations, max_rounds=rounds)) == ok


@CHECKS
@given(st.floats(min_value=0.01, max_value=50).filter(lambda x: not x.is_integer()))
def test_a_fractional_round_count_is_refused(rounds):
    assert not accepts(lambda: RunInput(message="a", budget={"max_rounds": rounds}))


run_inputs = st.fixed_dictionaries(
    {},
    optional={
        "message": json_values | faint_text | st.text(max_size=30),
        "seed": json_values | st.integers(min_value=-3, max_value=2**64),
        "budget": json_values
        | st.fixed_dictionaries(
            {},
            optional={
                "max_rounds": json_values | st.integers(min_value=-2, max_value=200) | st.floats(0, 5),
                "max_generations": json_values | st.integers(min_value=-2, max_value=2000),
                "max_seconds": json_values | st.floats(min_value=-1, max_value=1e6),
                "max_tokens": json_values,
            },
        ),
        "review": json_values,
    },
)


@CHECKS
@given(run_inputs)
def test_what_the_server_takes_as_input_a_node_can_read_back(value):
    """The server's check is stricter than RunInput (no `true` for a number, no unknown field); whatever it takes, the
    state a node reads validates, and whatever RunInput refuses, it refuses."""
    try:
        check_run_input(value)
    except InputRefused:
        passed = False
    else:
        passed = True
        RunState.model_validate(value)  # raises if the check let through something that would break the thread
    if not accepts(lambda: RunInput.model_validate(value)):
        assert not passed


@CHECKS
@given(st.sampled_from(sorted(set(RunState.model_fields) - {"messages"})), json_values)
def test_what_the_server_takes_as_a_state_update_a_node_can_read_back(field, value):
    try:
        check_state_update({field: value})
    except InputRefused:
        return
    RunState.model_validate({"message": "a red square", field: value})


@CHECKS
@given(st.integers(min_value=-3, max_value=10**12))
def test_a_client_retrieves_at_most_max_retrieve_k(k):
    assert accepts(lambda: ClientContext(retrieve_k=k)) == (1 <= k <= MAX_RETRIEVE_K)


@CHECKS
@given(st.sampled_from(sorted(SERVER_ONLY)), json_values)
def test_a_client_never_says_where_data_lives(field, value):
    with pytest.raises(ImageRAGError, match=f"a client cannot set {field}"):
        ClientContext(**{field: value})


@CHECKS
@given(st.text(max_size=120) | st.from_regex(THREAD_PATTERN, fullmatch=True))
def test_a_collection_is_a_name(name):
    """A name every front end takes alike: the collection-name rule of the CLI and the store (tools.config)."""
    assert accepts(lambda: ClientContext(collection=name)) == accepts(lambda: check_collection_name(name))
    if accepts(lambda: check_collection_name(name)):
        assert re.fullmatch(THREAD_PATTERN, name)  # never a path or pasted text


def png_base64() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


PNG = png_base64()


@CHECKS
@given(
    st.integers(min_value=0, max_value=8),
    st.integers(min_value=0, max_value=3 * MAX_CAPTION_CHARS),
    st.sampled_from(["accept", "drop", "replace"]),
)
def test_a_review_answer_is_bounded(uploads, caption_chars, action):
    answer = {"action": action, "uploads": [PNG] * uploads, "caption": "c" * caption_chars}
    ok = uploads <= MAX_REVIEW_UPLOADS and caption_chars <= MAX_CAPTION_CHARS and (action != "replace" or uploads > 0)
    assert accepts(lambda: RemoteReviewDecision.model_validate(answer)) == ok


@CHECKS
@given(st.lists(st.text(max_size=80), max_size=MAX_REVIEW_KEEP + 20))
def test_a_review_answer_keeps_a_bounded_list_of_ids(keep):
    ok = len(keep) <= MAX_REVIEW_KEEP and all(len(i) <= 64 for i in keep)
    assert accepts(lambda: RemoteReviewDecision(action="accept", keep=keep)) == ok


@CHECKS
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "action": json_values | st.sampled_from(["accept", "drop", "replace"]),
            "keep": json_values,
            "images": json_values,
            "uploads": json_values
            | st.lists(st.sampled_from([PNG, "bm90IGFuIGltYWdl", "data:image/png;base64," + PNG])),
            "caption": json_values,
        },
    )
)
def test_what_the_server_takes_as_a_review_answer_the_graph_takes_at_once(answer):
    """ask_review asks again on an answer it refuses; an answer the server stored must never be one of those."""
    try:
        check_review_answer(answer)
    except InputRefused:
        return
    review_uploads(ReviewDecision.model_validate(answer))
