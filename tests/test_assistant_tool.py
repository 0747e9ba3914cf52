"""The loop as one LangChain tool, bound by a prebuilt ReAct agent that a scripted chat model drives: a draw, a bad
call the agent gets back as an error message, a refinement of the returned thread, and a final answer."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langgraph.checkpoint.memory import InMemorySaver
from scripted import TWO_OBJECT_CONCEPTS, ScriptedChatModel, call, tool_turn

from imagerag.agent.assistant import ImageRAGInput, ImageRAGTool

PROMPT = "a red heart on the left and a blue square on the right"


def create_agent(model, tools):
    with warnings.catch_warnings():  # create_react_agent moved to langchain.agents, which is not installed here
        warnings.simplefilter("ignore")
        from langgraph.prebuilt import create_react_agent

        return create_react_agent(model, tools, checkpointer=InMemorySaver())


def tool_messages(messages) -> list[ToolMessage]:
    return [m for m in messages if isinstance(m, ToolMessage)]


@pytest.fixture
def imagerag_tool(tiny_settings, tmp_path) -> ImageRAGTool:
    return ImageRAGTool.from_settings(tiny_settings, out=tmp_path / "runs")


def test_the_tool_schema_is_what_an_llm_binds():
    schema = ImageRAGInput.model_json_schema()
    assert schema["required"] == ["prompt"]
    assert schema["properties"]["max_rounds"]["minimum"] == 1 and schema["properties"]["prompt"]["maxLength"] == 4000
    tool = ImageRAGTool.model_fields["name"].default
    assert tool == "imagerag"


def test_a_react_agent_draws_recovers_from_bad_input_and_refines(imagerag_tool, tmp_path):
    def refine_the_first_thread(messages):
        first = tool_messages(messages)[0]
        return tool_turn(
            call("imagerag", "c3", prompt="make the square green", thread=first.artifact["thread"], max_rounds=1)
        )

    script = iter(
        [
            tool_turn(call("imagerag", "c1", prompt=PROMPT, max_rounds=2)),
            tool_turn(
                call("imagerag", "c2a", prompt="", max_rounds=0), call("imagerag", "c2b", prompt=PROMPT, thread="ghost")
            ),
            refine_the_first_thread,
            AIMessage("Here is your image, with the square now green."),
        ]
    )
    agent = create_agent(ScriptedChatModel(messages=script), [imagerag_tool])
    final = agent.invoke(
        {"messages": [HumanMessage(f"Draw {PROMPT}, then make the square green.")]},
        {"configurable": {"thread_id": "assistant"}},
    )

    drawn, empty, ghost, refined = tool_messages(final["messages"])
    assert drawn.status == "success" and drawn.name == "imagerag"
    first = drawn.artifact
    assert first["status"] in {"satisfied", "budget_exhausted"} and 1 <= first["rounds"] <= 2
    assert [c["text"] for c in first["concepts"]] == TWO_OBJECT_CONCEPTS
    assert Path(first["best_image"]).exists() and Path(first["report"]).exists()
    assert f"thread {first['thread']}" in drawn.content and "best image:" in drawn.content

    # Bad input reaches the agent as error messages naming what to fix; the agent kept going.
    assert empty.status == "error" and "prompt" in empty.content and "max_rounds" in empty.content
    assert "greater than or equal to 1" in empty.content
    assert ghost.status == "error" and "unknown thread 'ghost'" in ghost.content

    assert (
        refined.status == "success" and refined.artifact["turn"] == 2 and refined.artifact["thread"] == first["thread"]
    )
    assert refined.artifact["prompt"] == "a red heart on the left and a green square on the right"
    assert final["messages"][-1].content.startswith("Here is your image")


def test_bad_input_through_the_tool_alone_is_an_error_message_not_an_exception(imagerag_tool):
    def invoke(**args) -> ToolMessage:
        return imagerag_tool.invoke({"type": "tool_call", "id": "x", "name": "imagerag", "args": args})

    assert "the prompt is empty" in invoke(prompt="   ").content
    assert "at most 4000 characters" in invoke(prompt="a red heart " * 400).content
    assert "max_rounds" in invoke(prompt=PROMPT, max_rounds="many").content
    assert "prompt" in invoke(prompt=42).content
    assert "unknown thread 'ghost'" in invoke(prompt=PROMPT, thread="ghost").content
    assert all(m.status == "error" for m in [invoke(prompt=""), invoke(prompt=PROMPT, max_rounds=0)])
