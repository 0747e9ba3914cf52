"""The LLM policy: a chat model with the tools of graphs.agent_tools bound, run by a ToolNode.

The LLM chooses the calls; the graph keeps the books and owns the stop rule. After every tool turn the `observe`
node records images and references, has the critic judge each new image (so every image is judged, whatever the
LLM does), and ends the run once every concept is satisfied or a budget is spent, even if the LLM would keep
calling tools. The LLM may also end early by answering without a tool call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, RemoveMessage, SystemMessage, ToolMessage
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import REMOVE_ALL_MESSAGES
from langgraph.prebuilt import ToolNode
from langgraph.runtime import Runtime

from imagerag.graphs.agent_tools import DRAWS_WITH_REFERENCES, TOOLS, ToolOutcome, describe_verdicts
from imagerag.graphs.context import RunContext, context_of, toolkit
from imagerag.graphs.nodes import NODE_RETRY, ask_review, finish, judge_new, plan
from imagerag.graphs.rules import clock, concepts_from_best, stop_reason
from imagerag.graphs.state import REPLY_NAME, AgentState, RunInput, RunOutput, Step
from imagerag.prompts import render


def agent(state: AgentState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    """One LLM turn: the system prompt (prompt, concepts, budget) and the conversation so far, the tools bound.

    A reply with malformed tool calls is not kept (it would have no tool answers); the LLM is asked again, up to
    max_tool_errors times, then the run fails. A reply with no tool call is the LLM's final answer."""
    context, tools = context_of(runtime), toolkit(state, runtime)
    budget = state.budget
    system = SystemMessage(
        render(
            "agent_system",
            prompt=state.prompt,
            concepts=state.concepts,
            max_references=tools.max_references,
            budget=f"{budget.max_rounds} rounds, {budget.max_generations} images",
        )
    )
    # The turn's first call opens with the user's message: the prompt, or a thread's refinement.
    opening = [] if state.usage.rounds else [HumanMessage(state.instruction or f"Draw: {state.prompt}")]
    usage, error = state.usage.add(rounds=1), ""
    nudge: list[HumanMessage] = []
    earlier = conversation_of(state)
    for _ in range(context.max_tool_errors):
        reply, tokens = tools.converse([system, *earlier, *opening, *nudge], TOOLS)
        usage = usage.add(llm_tokens=tokens)
        if not isinstance(reply, AIMessage) or not reply.invalid_tool_calls:
            calls = ", ".join(c["name"] for c in getattr(reply, "tool_calls", [])) or "final answer"
            moved = moved_conversation(state)
            return {
                **moved,
                "conversation": [*moved.get("conversation", []), *opening, reply],
                "usage": clock(state, usage),
                "steps": [Step(node="agent", round=usage.rounds, summary=calls)],
            }
        # A malformed call is not kept in the conversation (it has no tool answer); ask again instead.
        error = "; ".join(str(c.get("error") or c.get("args")) for c in reply.invalid_tool_calls)
        nudge = [HumanMessage(render("tool_call_error", error=error, tools=[t.name for t in TOOLS]))]
    return {
        "status": "failed",
        "error": f"the LLM made malformed tool calls {context.max_tool_errors} times in a row ({error})",
        "usage": clock(state, usage),
        "steps": [Step(node="agent", round=usage.rounds, summary="malformed tool calls; giving up")],
    }


def after_plan(state: AgentState) -> Literal["agent", "finish", "__end__"]:
    if state.status == "needs_clarification":  # the turn did not start: nothing to draw, no turn to record
        return "__end__"
    return "finish" if state.current() and stop_reason(state) else "agent"


def after_agent(state: AgentState) -> Literal["review", "tools", "finish"]:
    conversation = conversation_of(state)
    last = conversation[-1] if conversation else None
    if not (isinstance(last, AIMessage) and last.tool_calls) or stop_reason(state):
        return "finish"
    drawing = any(c["name"] in DRAWS_WITH_REFERENCES for c in last.tool_calls)
    return "review" if state.review and drawing else "tools"


def review(state: AgentState) -> dict[str, Any]:
    """Show a person the references of each regenerate or edit call; rewrite the call with their decision."""
    last = conversation_of(state)[-1]
    assert isinstance(last, AIMessage)  # after_agent routes here only after an AI message with tool calls
    known = {h.id: h for h in state.hits}
    calls, added = [], []
    for tool_call in last.tool_calls:
        if tool_call["name"] in DRAWS_WITH_REFERENCES:
            hits = [known[i] for i in tool_call["args"].get("reference_ids", []) if i in known]
            chosen = ask_review(hits, [c.text for c in state.missing()], state.usage.rounds)
            added += [h for h in chosen if h.id not in known]
            tool_call = {**tool_call, "args": {**tool_call["args"], "reference_ids": [h.id for h in chosen]}}
        calls.append(tool_call)
    summary = "; ".join(
        ", ".join(c["args"].get("reference_ids", [])) or "no reference"
        for c in calls
        if c["name"] in DRAWS_WITH_REFERENCES
    )
    return {
        "conversation": [last.model_copy(update={"tool_calls": calls})],
        "hits": [*state.hits, *added],
        "steps": [Step(node="review", round=state.usage.rounds, summary=f"reviewed: {summary}")],
    }


def observe(state: AgentState, runtime: Runtime[RunContext]) -> dict[str, Any]:
    """Keep the books of one tool turn, whatever the LLM did: record the images, references and critiques the tool
    calls made (their ToolOutcome artifacts), have the critic judge every image not yet judged, append those
    verdicts to the answer of the call that made each image, and count tool turns that failed as a whole (a run
    fails after max_tool_errors in a row)."""
    recent = trailing_tool_messages(conversation_of(state))
    candidates, hits, usage = list(state.candidates), list(state.hits), state.usage
    for message in recent:
        if message.status == "error" or message.artifact is None:
            continue
        outcome = ToolOutcome.model_validate(message.artifact)
        candidates += outcome.candidates
        hits += outcome.hits
        usage = usage.add(generations=len(outcome.candidates))
        if outcome.critique is not None:
            usage = usage.add(critic_calls=1, llm_tokens=outcome.critique.tokens)
            verdicts = outcome.critique.verdicts
            candidates = [
                c.model_copy(update={"verdicts": verdicts}) if c.image_id == outcome.judged_image else c
                for c in candidates
            ]
    fresh = {c.image_id for c in candidates if not c.judged}
    candidates, usage, steps = judge_new(toolkit(state, runtime), state.model_copy(update={"usage": usage}), candidates)
    # Show the LLM the automatic verdicts in the answer of the call that made each image.
    by_id = {c.image_id: c for c in candidates}
    updated = []
    for message in recent:
        made = [i for i in fresh if i in str(message.content)]
        if made:
            notes = [describe_verdicts(i, by_id[i].verdicts, state.concepts, by_id[i].strays) for i in made]
            updated.append(message.model_copy(update={"content": f"{message.content}\n" + "\n".join(notes)}))
    errors = sum(m.status == "error" for m in recent)
    tool_errors = state.tool_errors + 1 if recent and errors == len(recent) else 0
    update: dict[str, Any] = {
        "candidates": candidates,
        "hits": hits,
        "concepts": concepts_from_best(state.concepts, candidates),
        "usage": usage,
        "tool_errors": tool_errors,
        "conversation": updated,
        "steps": steps
        or [Step(node="observe", round=usage.rounds, summary=f"{len(recent)} tool result(s), {errors} failed")],
    }
    if tool_errors >= context_of(runtime).max_tool_errors:
        update |= {"status": "failed", "error": f"{tool_errors} tool turns in a row failed: {recent[-1].content}"}
    return update


def after_observe(state: AgentState) -> Literal["agent", "finish"]:
    return "finish" if stop_reason(state) else "agent"


def earlier_layout(state: AgentState) -> list[AnyMessage]:
    """The conversation a checkpoint of an earlier version keeps in `messages`, now the chat: everything up to its
    last tool call, tool answer or unmarked AI message (the chat holds only people's messages and marked replies)."""
    ends = [i for i, m in enumerate(state.messages) if not isinstance(m, HumanMessage) and m.name != REPLY_NAME]
    return state.messages[: ends[-1] + 1] if ends else []


def conversation_of(state: AgentState) -> list[AnyMessage]:
    """The policy's conversation, an earlier version's included (a message the new field rewrote, by id, once)."""
    rewritten = {m.id for m in state.conversation}
    return [*(m for m in earlier_layout(state) if m.id not in rewritten), *state.conversation]


def moved_conversation(state: AgentState) -> dict[str, Any]:
    """The update that moves an earlier version's conversation out of the chat into `conversation`, in order."""
    earlier = earlier_layout(state)
    if not earlier:
        return {}
    return {
        "messages": [RemoveMessage(id=str(m.id)) for m in earlier],
        "conversation": [RemoveMessage(id=REMOVE_ALL_MESSAGES), *conversation_of(state)],
    }


def trailing_tool_messages(messages: list[AnyMessage]) -> list[ToolMessage]:
    """The tool answers after the last AI message: this turn's results."""
    recent = []
    for message in reversed(messages):
        if not isinstance(message, ToolMessage):
            break
        recent.append(message)
    return recent[::-1]


def build_agent_graph(
    context: type[RunContext] = RunContext, reply: Callable[..., dict[str, Any]] | None = None
) -> StateGraph[AgentState, RunContext, RunInput, RunOutput]:
    builder = StateGraph(AgentState, context_schema=context, input_schema=RunInput, output_schema=RunOutput)
    builder.add_node(plan, retry_policy=NODE_RETRY)
    builder.add_node(agent)
    builder.add_node(review)
    builder.add_node("tools", ToolNode(TOOLS, handle_tool_errors=True, messages_key="conversation"))
    builder.add_node(observe, retry_policy=NODE_RETRY)
    builder.add_node(finish)
    # A served graph ends every turn with its reply to the chat (agent/langgraph_app.py), a refused message too.
    end = END
    if reply is not None:
        builder.add_node("reply", reply)
        builder.add_edge("reply", END)
        end = "reply"
    builder.add_edge(START, "plan")
    builder.add_conditional_edges("plan", after_plan, {"agent": "agent", "finish": "finish", END: end})
    builder.add_conditional_edges("agent", after_agent)
    builder.add_edge("review", "tools")
    builder.add_edge("tools", "observe")
    builder.add_conditional_edges("observe", after_observe)
    builder.add_edge("finish", end)
    return builder
