"""The LLM policy: tool calls run through a ToolNode, the graph owns the stop rule and the budget."""

from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langgraph.graph.message import add_messages
from scripted import ScriptedChatModel, ScriptedCritic, call, fake_backends, last_tool_answer, tool_turn

from imagerag.agent.checkpoints import open_checkpointer
from imagerag.agent.events import Finished, ReviewRequested
from imagerag.agent.run import resume, run, stream
from imagerag.graphs.agent import conversation_of, moved_conversation
from imagerag.graphs.nodes import ReviewDecision
from imagerag.graphs.state import REPLY_NAME, AgentState, Budget
from imagerag.tools.types import Box

PROMPT = "a heart and a square"  # concepts c1 (a heart), c2 (a square)


def go(tiny_settings, tiny_store, tmp_path, llm, critic, budget=None):
    settings = tiny_settings.model_copy(
        update={"policy": "agent", "budget": budget or Budget(max_rounds=8, max_generations=8)}
    )
    return run(PROMPT, settings, tmp_path / "runs", backends=fake_backends(tiny_store, critic, llm=llm))


def test_the_agent_generates_retrieves_and_regenerates_until_satisfied(tiny_settings, tiny_store, tmp_path):
    def regenerate_with_the_retrieved_reference(messages):
        hit_id = last_tool_answer(messages).split("references for 'a red square': ")[1].split(":")[0]
        return tool_turn(call("regenerate", "x1", prompt=PROMPT, reference_ids=[hit_id]))

    llm = ScriptedChatModel(
        messages=iter(
            [
                tool_turn(call("generate", "g1", prompt=PROMPT)),
                tool_turn(call("retrieve", "r1", caption="a red square")),
                regenerate_with_the_retrieved_reference,
                AIMessage("never reached: the graph stops once every concept is satisfied"),
            ]
        )
    )
    critic = ScriptedCritic([{"c2"}, {"c1", "c2"}])
    result = go(tiny_settings, tiny_store, tmp_path, llm, critic)
    assert result.status == "satisfied"
    assert result.generations == 2 and result.rounds == 3 and result.usage.critic_calls == 2
    assert result.best.references[0].query == "a red square" and result.best.round == 3
    assert result.usage.llm_tokens == 150
    # The automatic critique was shown to the LLM in the generate call's answer.
    second_turn = llm.seen[1]
    assert any("MISSING" in str(m.content) for m in second_turn if isinstance(m, ToolMessage))


def test_the_budget_holds_against_an_llm_that_never_stops(tiny_settings, tiny_store, tmp_path):
    endless = (tool_turn(call("generate", f"g{i}", prompt=PROMPT, seed=i)) for i in range(1000))
    result = go(
        tiny_settings,
        tiny_store,
        tmp_path,
        ScriptedChatModel(messages=endless),
        ScriptedCritic([set()]),
        Budget(max_rounds=100, max_generations=3),
    )
    assert result.status == "budget_exhausted" and result.stop_reason == "budget_exhausted:generations"
    assert result.generations == 3 and result.rounds == 3

    retrieving_forever = (tool_turn(call("retrieve", f"r{i}", caption="a heart")) for i in range(1000))
    result = go(
        tiny_settings,
        tiny_store,
        tmp_path,
        ScriptedChatModel(messages=retrieving_forever),
        ScriptedCritic([set()]),
        Budget(max_rounds=4),
    )
    assert result.stop_reason == "budget_exhausted:rounds" and result.rounds == 4 and result.generations == 0


def test_the_generation_budget_caps_a_multi_image_request(tiny_settings, tiny_store, tmp_path):
    llm = ScriptedChatModel(messages=iter([tool_turn(call("generate", "g1", prompt=PROMPT, n=4))]))
    result = go(tiny_settings, tiny_store, tmp_path, llm, ScriptedCritic([set()]), Budget(max_generations=2))
    assert result.generations == 2 and len(result.candidates) == 2 and result.usage.critic_calls == 2


def test_the_llm_may_end_early_with_a_final_answer(tiny_settings, tiny_store, tmp_path):
    llm = ScriptedChatModel(
        messages=iter([tool_turn(call("generate", "g1", prompt=PROMPT)), AIMessage("This is as good as it gets.")])
    )
    result = go(tiny_settings, tiny_store, tmp_path, llm, ScriptedCritic([{"c1"}]))
    assert result.status == "stopped" and result.stop_reason == "stopped_by_policy"
    assert result.best is not None and result.generations == 1


def test_a_malformed_tool_call_is_retried(tiny_settings, tiny_store, tmp_path):
    broken = AIMessage(
        "",
        invalid_tool_calls=[
            {"name": "generate", "args": "{prompt: oops", "id": "b1", "error": "bad JSON", "type": "invalid_tool_call"}
        ],
    )
    llm = ScriptedChatModel(messages=iter([broken, tool_turn(call("generate", "g1", prompt=PROMPT))]))
    result = go(tiny_settings, tiny_store, tmp_path, llm, ScriptedCritic([{"c1", "c2"}]))
    assert result.status == "satisfied"
    # The retry told the model what went wrong.
    assert "could not be parsed (bad JSON)" in str(llm.seen[1][-1].content)


def test_persistent_malformed_calls_fail_the_run_cleanly(tiny_settings, tiny_store, tmp_path):
    broken = AIMessage(
        "",
        invalid_tool_calls=[
            {"name": "generate", "args": "{", "id": "b", "error": "bad JSON", "type": "invalid_tool_call"}
        ],
    )
    llm = ScriptedChatModel(messages=iter([tool_turn(call("generate", "g1", prompt=PROMPT)), broken, broken, broken]))
    result = go(tiny_settings, tiny_store, tmp_path, llm, ScriptedCritic([{"c1"}]))
    assert result.status == "failed" and "malformed tool calls 3 times" in result.error
    assert result.best is not None and len(result.candidates) == 1  # the partial result is kept


def test_failing_tool_calls_go_back_to_the_llm_then_fail_the_run(tiny_settings, tiny_store, tmp_path):
    bad = (tool_turn(call("regenerate", f"x{i}", prompt=PROMPT, reference_ids=["nope"])) for i in range(10))
    llm = ScriptedChatModel(messages=bad)
    result = go(tiny_settings, tiny_store, tmp_path, llm, ScriptedCritic([set()]))
    assert result.status == "failed" and "3 tool turns in a row failed" in result.error
    assert "unknown reference ids ['nope']" in result.error


def test_a_failing_critic_fails_the_agent_run_cleanly(tiny_settings, tiny_store, tmp_path):
    llm = ScriptedChatModel(messages=iter([tool_turn(call("generate", "g1", prompt=PROMPT))] * 3))
    result = go(tiny_settings, tiny_store, tmp_path, llm, ScriptedCritic([RuntimeError("judge down")]))
    assert result.status == "failed" and "judge down" in result.error
    assert len(result.candidates) == 0 or not result.candidates[0].judged


def test_the_agent_edits_one_region_and_keeps_the_verdicts_outside_it(tiny_settings, tiny_store, tmp_path):
    def edit_the_first_image(messages):
        image_id = last_tool_answer(messages).split("generated image(s) ")[1].split()[0]
        region = {"box": {"x0": 0.0, "y0": 0.0, "x1": 0.5, "y1": 0.5}, "text": "a heart in the top left"}
        return tool_turn(call("edit", "e1", image_id=image_id, regions=[region]))

    llm = ScriptedChatModel(messages=iter([tool_turn(call("generate", "g1", prompt=PROMPT)), edit_the_first_image]))
    critic = ScriptedCritic([{"c2"}, {"c1"}], boxes={"c2": Box(x0=0.5, y0=0.5, x1=1.0, y1=1.0)})
    result = go(tiny_settings, tiny_store, tmp_path, llm, critic)
    assert result.status == "satisfied" and result.generations == 2, result.error
    first, edited = result.candidates
    assert edited.edit is not None and edited.edit.source == first.image_id and edited.edit.exact_outside
    # The square's verdict stands (its pixels were kept); only the heart was judged on the edited image.
    assert {v.concept_id: v.satisfied for v in edited.verdicts} == {"c1": True, "c2": True}
    assert critic.calls == 2


def test_a_region_naming_an_unknown_reference_goes_back_to_the_llm(tiny_settings, tiny_store, tmp_path):
    def edit_with_a_made_up_reference(messages):
        answers = [m.content for m in messages if isinstance(m, ToolMessage) and "generated image(s) " in m.content]
        image_id = answers[0].split("generated image(s) ")[1].split()[0]
        region = {"box": {"x0": 0.0, "y0": 0.0, "x1": 0.5, "y1": 0.5}, "text": "a heart", "reference_ids": ["nope"]}
        return tool_turn(call("edit", "e1", image_id=image_id, regions=[region]))

    turns = iter([tool_turn(call("generate", "g1", prompt=PROMPT)), *[edit_with_a_made_up_reference] * 3])
    result = go(tiny_settings, tiny_store, tmp_path, ScriptedChatModel(messages=turns), ScriptedCritic([{"c2"}]))
    assert result.status == "failed" and "unknown reference ids ['nope']" in result.error
    assert len(result.candidates) == 1  # nothing was edited


def test_the_chat_is_not_the_conversation_and_an_earlier_versions_conversation_moves_out_of_it():
    """Issue 25, item 7: the chat (`messages`) holds a person's messages and the served graph's replies, never fed
    to the policy's LLM. A checkpoint of an earlier version kept the policy's conversation in `messages`: it is read
    as the conversation, and the agent's next turn moves it there, leaving the chat to the person's new message."""
    earlier = [
        HumanMessage("Draw: a heart and a square", id="h1"),
        AIMessage("", tool_calls=[call("generate", "g1", prompt=PROMPT)], id="a1"),
        ToolMessage("generated image(s) x", tool_call_id="g1", id="t1"),
        AIMessage("Done.", id="a2"),
    ]
    state = AgentState(message=PROMPT, messages=[*earlier, HumanMessage("make the square green", id="h2")])
    assert state.message == "make the square green"  # the chat's last message, a person's, is the message
    assert conversation_of(state) == earlier
    moved = moved_conversation(state)
    assert add_messages(state.messages, moved["messages"]) == [state.messages[-1]]
    assert add_messages(state.conversation, moved["conversation"]) == earlier

    chat = [HumanMessage(PROMPT, id="h1"), AIMessage("Turn 1: satisfied", name=REPLY_NAME, id="r1")]
    state = AgentState(message=PROMPT, messages=chat, conversation=earlier[1:])
    assert state.message == PROMPT and conversation_of(state) == earlier[1:] and moved_conversation(state) == {}


def test_a_paused_thread_of_an_earlier_version_resumes_and_its_conversation_moves(tiny_settings, tiny_store, tmp_path):
    """A thread paused for review by an earlier version, whose checkpoint keeps the conversation in `messages`."""

    def regenerate_with_the_retrieved_reference(messages):
        hit_id = last_tool_answer(messages).split("references for 'a red square': ")[1].split(":")[0]
        return tool_turn(call("regenerate", "x1", prompt=PROMPT, reference_ids=[hit_id]))

    turns = [
        tool_turn(call("generate", "g1", prompt=PROMPT)),
        tool_turn(call("retrieve", "r1", caption="a red square")),
    ]
    llm = ScriptedChatModel(messages=iter([*turns, regenerate_with_the_retrieved_reference, AIMessage("Done.")]))
    settings = tiny_settings.model_copy(
        update={"policy": "agent", "review": True, "budget": Budget(max_rounds=8, max_generations=8)}
    )
    backends = fake_backends(tiny_store, ScriptedCritic([{"c2"}, {"c2"}]), llm=llm)
    events = stream(PROMPT, settings, tmp_path, thread="earlier", backends=backends)
    pause = next(e for e in events if isinstance(e, ReviewRequested))
    config = {"configurable": {"thread_id": "earlier", "checkpoint_ns": ""}}
    with open_checkpointer(settings) as saver:  # the checkpoint as an earlier version wrote it
        found = saver.get_tuple(config)
        checkpoint = found.checkpoint
        checkpoint["channel_values"]["messages"] = checkpoint["channel_values"].pop("conversation")
        checkpoint["channel_versions"]["messages"] = checkpoint["channel_versions"].pop("conversation")
        saver.put(found.parent_config or config, checkpoint, found.metadata, {})
        assert "conversation" not in saver.get_tuple(config).checkpoint["channel_values"]

    follow = list(resume(pause.run_dir, ReviewDecision(action="accept"), settings, backends=backends))
    assert isinstance(follow[-1], Finished) and follow[-1].result.status == "stopped", follow[-1]
    # The LLM's last turn saw the whole conversation, the earlier version's part included, and it moved.
    assert [m.tool_call_id for m in llm.seen[-1] if isinstance(m, ToolMessage)] == ["g1", "r1", "x1"]
    with open_checkpointer(settings) as saver:
        values = saver.get_tuple(config).checkpoint["channel_values"]
    assert values["messages"] == [] and [m.type for m in values["conversation"]][-2:] == ["tool", "ai"]
