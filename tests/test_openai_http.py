"""ChatOpenAI's real HTTP path against a scripted OpenAI-compatible server on 127.0.0.1:
tool calls for the agent, structured output for the planner and the VLM judge, images as data URLs."""

import json
import re

import pytest
from scripted import FakeOpenAIServer, function_call

from imagerag.agent.run import run
from imagerag.graphs.state import Budget
from imagerag.tools.backends.loading import load_backends

PROMPT = "a red heart on the left and a blue square on the right"


def scripted_openai():
    """A responder that plays the planner, the VLM judge and the agent, by what each request asks for."""
    judgements = []

    def respond(request: dict) -> dict:
        return answer(request, judgements)

    return respond


def answer(request: dict, judgements: list) -> dict:
    forced = (
        (request.get("tool_choice") or {}).get("function", {}).get("name")
        if isinstance(request.get("tool_choice"), dict)
        else None
    )
    if forced == "ConceptList":
        return function_call(
            "ConceptList",
            {
                "concepts": [
                    {"text": "a red heart on the left", "kind": "object"},
                    {"text": "a blue square on the right", "kind": "object"},
                ]
            },
        )
    if forced == "VLMJudgement":
        judgements.append(request)
        ok = len(judgements) > 1  # the first image misses the heart, later ones have everything
        return function_call(
            "VLMJudgement",
            {
                "verdicts": [
                    {
                        "concept_id": "c1",
                        "satisfied": ok,
                        "score": 0.9 if ok else 0.2,
                        "evidence": "heart" if ok else "no heart",
                        "caption": None if ok else "a red heart",
                    },
                    {"concept_id": "c2", "satisfied": True, "score": 0.9, "evidence": "square"},
                ]
            },
        )
    tool_answers = [m for m in request["messages"] if m["role"] == "tool"]
    if not tool_answers:
        return function_call("generate", {"prompt": PROMPT, "seed": 0}, "call_g")
    last = tool_answers[-1]["content"]
    if last.startswith("generated"):
        return function_call("retrieve", {"caption": "a red heart"}, "call_r")
    if last.startswith("references"):
        hit_id = re.search(r": ([0-9a-f]{32}):", last).group(1)
        return function_call("regenerate", {"prompt": PROMPT, "reference_ids": [hit_id]}, "call_x")
    return {"content": "Done."}


@pytest.fixture
def openai_server():
    with FakeOpenAIServer(scripted_openai()) as server:
        yield server


def llm_settings(tiny_settings, server, **update):
    llm = tiny_settings.llm.model_copy(update={"model": "gpt-4o-2024-08-06", "base_url": server.base_url})
    return tiny_settings.model_copy(update={"llm": llm, **update})


def test_the_agent_policy_over_http(tiny_settings, openai_server, tmp_path):
    settings = llm_settings(tiny_settings, openai_server, policy="agent", budget=Budget(max_rounds=6))
    result = run(PROMPT, settings, tmp_path, backends=load_backends(settings))
    assert result.status == "satisfied", result.error
    assert [c.text for c in result.concepts] == ["a red heart on the left", "a blue square on the right"]
    assert result.generations == 2 and result.best.references

    requests = openai_server.requests
    agent_calls = [r for r in requests if not r.get("tool_choice")]
    assert {t["function"]["name"] for t in agent_calls[0]["tools"]} == {
        "generate",
        "critique",
        "retrieve",
        "regenerate",
        "edit",
    }
    assert "state" not in json.dumps(agent_calls[0]["tools"][0]["function"]["parameters"]["properties"])
    judge_calls = [
        r for r in requests if (r.get("tool_choice") or {}).get("function", {}).get("name") == "VLMJudgement"
    ]
    assert len(judge_calls) == 2
    image_part = judge_calls[0]["messages"][-1]["content"][1]
    assert image_part["type"] == "image_url" and image_part["image_url"]["url"].startswith("data:image/png;base64,")
    # Every call's usage was counted: 1 plan + 2 judgements + 3 agent turns, 50 tokens each.
    assert result.usage.llm_tokens == 50 * (1 + 2 + 3)


def test_the_imagerag_policy_with_an_llm_planner_and_vlm_judge(tiny_settings, openai_server, tmp_path):
    settings = llm_settings(tiny_settings, openai_server)
    result = run(PROMPT, settings, tmp_path, backends=load_backends(settings))
    assert result.status == "satisfied" and result.rounds == 2
    assert result.candidates[1].references[0].query == "a red heart"  # the VLM's caption drives retrieval
