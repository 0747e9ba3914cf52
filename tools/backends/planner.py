"""Concept decomposition: structured LLM output when an LLM is configured, an offline parser otherwise."""

from __future__ import annotations

import re
from typing import Protocol

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import HumanMessage
from pydantic import BaseModel, Field

from agent.state import Concept, ConceptKind
from prompts import render
from tools.backends.llm import structured_call


class ConceptSpec(BaseModel):
    text: str = Field(description="The concept, stand-alone, in a few words.")
    kind: ConceptKind = "object"


class ConceptList(BaseModel):
    concepts: list[ConceptSpec] = Field(min_length=1)


class Decomposer(Protocol):
    def decompose(self, prompt: str) -> tuple[list[Concept], int]: ...


def number(specs: list[ConceptSpec]) -> list[Concept]:
    unique = list(dict.fromkeys((s.text.strip(), s.kind) for s in specs if s.text.strip()))
    return [Concept(id=f"c{i}", text=text, kind=kind) for i, (text, kind) in enumerate(unique, 1)]


class LLMDecomposer:
    def __init__(self, llm: BaseChatModel, retries: int = 3):
        self.llm, self.retries = llm, retries

    def decompose(self, prompt: str) -> tuple[list[Concept], int]:
        answer, tokens = structured_call(self.llm, ConceptList, [HumanMessage(render("decompose", prompt=prompt))], self.retries)
        return number(answer.concepts), tokens


class RuleDecomposer:
    """Splits a prompt into noun-phrase clauses: at commas, semicolons, and 'and'/'with' before a determiner.

    'a red heart on the left and a blue square' -> ['a red heart on the left', 'a blue square']; 'black and
    white photo' stays whole because no determiner follows 'and'. Style phrases become style concepts.
    """

    _FRAME = re.compile(r"^(a |an )?(photo|picture|image|painting|drawing|render(ing)?) of ", re.I)
    _SPLIT = re.compile(r"\s*[,;]\s*(?:and\s+)?|\s+(?:and|with|next to|beside)\s+(?=(?:a|an|the|one|two|three|four|five|some|\d+)\b)", re.I)
    _STYLE = re.compile(r"\b(style|watercolou?r|oil painting|sketch|pixel art|cartoon|anime|photorealistic|3d render|low poly)\b", re.I)

    def decompose(self, prompt: str) -> tuple[list[Concept], int]:
        body = self._FRAME.sub("", prompt.strip().rstrip("."))
        clauses = [c.strip() for c in self._SPLIT.split(body) if c and c.strip()]
        specs = [ConceptSpec(text=c, kind="style" if self._STYLE.search(c) else "object") for c in clauses]
        return number(specs or [ConceptSpec(text=prompt.strip())]), 0
