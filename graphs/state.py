"""The run's state: what a caller sets (RunInput), what it gets back (RunOutput), and what the loop keeps between
nodes (RunState; AgentState adds the LLM's conversation). A thread is one state that later messages continue.

`messages` is the chat of a LangGraph Server client (its convention): the person's messages and the replies the
served graphs append (agent/langgraph_app.py). It is not the agent policy's tool-call conversation, which is
AgentState.conversation: a reply never reaches the policy's LLM."""

from __future__ import annotations

import operator
import re
import time
from typing import Annotated, Literal

from langchain_core.messages import AnyMessage, HumanMessage
from langgraph.graph.message import add_messages
from pydantic import BaseModel, Field, field_validator, model_validator

from imagerag.tools.types import Box, Candidate, Concept, EditRegion, RetrievalHit, ScenePlan

# stopped: the agent policy ended with a final answer while concepts were missing and budget was left.
# paused: waiting for a person's review of the references (resume with a decision).
# needs_clarification: a thread's message that could not be mapped to changes; the thread is left as it was.
RunStatus = Literal["running", "paused", "satisfied", "budget_exhausted", "stopped", "failed", "needs_clarification"]
THREAD_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"  # a thread names its run folder

# Bounds on what any caller sends (command line, MCP, LangChain, LangGraph Server), kept here once for every front
# end. A remote client gets these too (agent/server_app.py checks them before anything is stored).
MAX_PROMPT_CHARS = 4000  # long, dense prompts (DPG-Bench style) fit; a pasted document does not
MAX_SEED = 2**63  # exclusive: a seed is a signed 64-bit integer (torch.Generator.manual_seed)
MAX_ROUNDS = 100  # the agent policy spends a round per LLM call: 100 is far past any useful run
MAX_GENERATIONS = 1000  # images of one run, all rounds and samples together
MAX_SECONDS = 86_400.0  # a day; None (no time limit) stays allowed: rounds and generations still bound a run
MAX_TOKENS = 10_000_000
MAX_RETRIEVE_K = 20  # references per missing concept (and hits of a search): more only re-ranks more of the collection
MAX_TOOL_ERRORS = 20  # consecutive failed tool turns before an agent run fails
MAX_REVIEW_UPLOADS = 4  # replacement references in one review answer (OmniGen, the widest generator, takes 3)
MAX_UPLOAD_BYTES = 4 * 1024 * 1024  # one replacement reference image, decoded
MAX_REVIEW_KEEP = 256  # hit ids a review answer keeps
MAX_ID_CHARS = 64  # an image or hit id (content ids have 32)
MAX_TURNS = 10_000  # turns of one thread a message may branch from
REPLY_NAME = "imagerag"  # the name of the AI messages a served graph appends to the chat (agent/langgraph_app.py)
# Characters that print as nothing: a prompt of only these (and white space) is empty.
INVISIBLE = "\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e\u200b\u200c\u200d\u200e\u200f\u2060\u2061\u2062\u2063\u2064\u3164\ufeff\uffa0"


class Budget(BaseModel):
    """Limits of one run. A round is one policy turn: one pass of the imagerag policy, one LLM call of the agent."""

    max_rounds: int = Field(
        default=4, ge=1, le=MAX_ROUNDS, description="Policy turns, the initial generation included."
    )
    max_generations: int = Field(
        default=6, ge=1, le=MAX_GENERATIONS, description="Images generated, all rounds together."
    )
    max_seconds: float | None = Field(
        default=900.0, gt=0, le=MAX_SECONDS, description="Wall-clock seconds for the run (None: no time limit)."
    )
    max_tokens: int | None = Field(
        default=60_000, gt=0, le=MAX_TOKENS, description="LLM tokens (planner, judge, agent; None: no limit)."
    )


class Usage(BaseModel):
    rounds: int = 0
    generations: int = 0
    critic_calls: int = 0
    llm_tokens: int = 0
    seconds: float = 0.0

    def add(self, **deltas: int) -> Usage:
        return self.model_copy(update={k: getattr(self, k) + v for k, v in deltas.items()})

    def spent(self, budget: Budget) -> str | None:
        """Name of the first budget this usage has reached, or None while all have room."""
        if self.rounds >= budget.max_rounds:
            return "rounds"
        if self.generations >= budget.max_generations:
            return "generations"
        if budget.max_seconds is not None and self.seconds >= budget.max_seconds:
            return "seconds"
        if budget.max_tokens is not None and self.llm_tokens >= budget.max_tokens:
            return "tokens"
        return None


class Step(BaseModel):
    """One entry of the run's step record."""

    node: str
    round: int
    summary: str
    at: float = Field(default_factory=time.time)


class Turn(BaseModel):
    """One message of a thread and where it left the image."""

    index: int
    message: str
    prompt: str
    status: RunStatus
    stop_reason: str
    best_image: str | None
    satisfied: list[str] = Field(default_factory=list, description="Texts of the satisfied concepts.")
    missing: list[str] = Field(default_factory=list, description="Texts of the concepts still missing.")
    usage: Usage
    parent: int | None = Field(
        default=None, description="The turn this one continued from (the one before, unless it branched)."
    )
    scene: ScenePlan | None = Field(default=None, description="The objects after this turn.")
    concepts: list[Concept] = Field(default_factory=list, description="The concepts after this turn, with verdicts.")


class RunInput(BaseModel):
    """What a caller sets: the message (the prompt of a new thread, or how to change a thread's image), seed,
    budget and whether to pause for review. A chat client sends `messages` instead: its last message, a person's,
    is the message."""

    message: str = Field(
        default="",
        description="What to draw; on a thread that already has an image, how to change it. Required unless "
        "`messages` ends with a human message.",
    )
    messages: Annotated[list[AnyMessage], add_messages] = Field(
        default_factory=list,
        description="The chat convention: a human message last is the message (bounded like it); the reply to it is "
        "appended as an AI message.",
    )
    seed: int = Field(default=0, ge=0, lt=MAX_SEED, description="Base seed of the generations.")
    budget: Budget = Field(default_factory=Budget)
    review: bool = Field(default=False, description="Pause for a person before each regeneration.")
    from_turn: int | None = Field(
        default=None,
        ge=1,
        le=MAX_TURNS,
        description="On a thread: continue from this earlier turn's image and objects (a branch), not the last.",
    )

    @field_validator("message")
    @classmethod
    def _message_fits(cls, value: str) -> str:
        return fitted_message(value)

    @model_validator(mode="after")
    def _chat_message(self) -> RunInput:
        # A human message last in the chat has not been answered yet: it is this turn's message (a turn's reply,
        # appended when it ends, makes `message` the one to read again). A remote client that sends neither is
        # refused by agent/server_app.py.
        last = self.messages[-1] if self.messages else None
        if isinstance(last, HumanMessage):
            self.message = fitted_message(last.text)
        return self


def fitted_message(value: str) -> str:
    """A message stripped of surrounding blanks; ValueError for one that is empty or over MAX_PROMPT_CHARS."""
    value = re.sub(f"^[\\s{INVISIBLE}]+|[\\s{INVISIBLE}]+$", "", value)
    if not any(c.isprintable() and not c.isspace() and c not in INVISIBLE for c in value):
        raise ValueError("the prompt is empty: describe the image to draw, e.g. 'a red fox in the snow'")
    if len(value) > MAX_PROMPT_CHARS:
        raise ValueError(
            f"the prompt has {len(value)} characters, more than {MAX_PROMPT_CHARS}: shorten it, or split it over turns of a thread"
        )
    return value


class RunOutput(BaseModel):
    """What a caller gets back: the prompt as it now stands, the verdict per concept, every image, the record."""

    prompt: str = Field(default="", description="The full prompt (a thread's messages rewrite it).")
    run_dir: str = Field(default="", description="The run's folder (images, run.json, report.html).")
    turn: int = 1
    status: RunStatus = "running"
    stop_reason: str = ""
    error: str | None = None
    clarification: str | None = Field(
        default=None, description="With needs_clarification: which words were not understood, and why."
    )
    scene: ScenePlan | None = Field(default=None, description="The objects the image must show, with their ids.")
    concepts: list[Concept] = Field(default_factory=list)
    candidates: list[Candidate] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    turns: Annotated[list[Turn], operator.add] = Field(default_factory=list)
    steps: Annotated[list[Step], operator.add] = Field(default_factory=list)


class RunState(RunOutput, RunInput):
    """The graph state of both policies."""

    instruction: str | None = Field(default=None, description="The refining message of this turn, if any.")
    # Set by the first node that runs (not a default factory: a field no node writes would be "now" in every node).
    started_at: float | None = None
    hits: list[RetrievalHit] = Field(default_factory=list, description="References retrieved this round.")
    layout: dict[str, Box] = Field(default_factory=dict, description="Where each object concept should go.")
    regions: list[EditRegion] = Field(default_factory=list, description="What this round's edit redraws, if any.")
    turn_parent: int | None = Field(default=None, description="The turn this turn continued from.")

    def current(self) -> list[Candidate]:
        """This turn's candidates (earlier turns are history)."""
        return [c for c in self.candidates if c.turn == self.turn]

    def missing(self) -> list[Concept]:
        return [c for c in self.concepts if c.verdict != "satisfied"]

    def elapsed(self) -> float:
        return time.time() - self.started_at if self.started_at is not None else 0.0


class AgentState(RunState):
    """The LLM policy adds its conversation (tool calls and their answers), apart from the chat's `messages`."""

    conversation: Annotated[list[AnyMessage], add_messages] = Field(default_factory=list)
    tool_errors: int = Field(default=0, description="Consecutive tool turns in which every call failed.")
