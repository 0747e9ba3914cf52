"""The application's settings: IMAGERAG_* variables, a TOML file and CLI flags, over the run context.

Precedence, highest first: CLI flags (init arguments), environment (IMAGERAG_*, nested with '__'), the TOML file
(./imagerag.toml, or the path in IMAGERAG_CONFIG), defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from imagerag.graphs.context import RunContext
from imagerag.graphs.state import Budget
from imagerag.tools.errors import ConfigError


class RunRecipe(BaseModel):
    """settings.json of a run folder (format 2): the settings that decide how the run draws. A run folder is trusted
    for that and for results, never for where data lives or what to connect to (data_dir, chroma_url,
    checkpoint_url, the LLM endpoint, device): those always come from the caller."""

    format: Literal[2] = 2
    profile: str
    policy: Literal["imagerag", "agent"]
    collection: str | None
    retrieve_k: int
    max_tool_errors: int
    seed: int
    samples: int = 1
    edits: bool = True


class Settings(RunContext):
    model_config = SettingsConfigDict(env_prefix="IMAGERAG_", env_nested_delimiter="__", extra="forbid")

    policy: Literal["imagerag", "agent"] = "imagerag"
    seed: int = Field(default=0, ge=0, lt=2**63)
    checkpoint_url: str | None = Field(
        default=None, description="postgresql://... for threads; default: SQLite in data_dir."
    )
    review: bool = Field(default=False, description="Pause before each regeneration for a person to review references.")
    budget: Budget = Field(default_factory=Budget)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = Path(os.environ.get("IMAGERAG_CONFIG", "imagerag.toml"))
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=toml_file))

    def check(self, has_llm: bool | None = None) -> Settings:
        """Fail now, with the fix, on settings that cannot run (before any model loads or folder is made).
        `has_llm`: whether backends handed over by the caller hold an LLM (default: whether one is configured)."""
        self.resolved_profile()
        if self.policy == "agent" and not (self.llm.model if has_llm is None else has_llm):
            raise ConfigError(
                "the agent policy needs an LLM: set IMAGERAG_LLM__MODEL (and IMAGERAG_LLM__BASE_URL for vLLM or "
                "Ollama), or use --policy imagerag"
            )
        return self

    def context(self) -> RunContext:
        """The graph's run context (LangGraph context_schema): the settings every node may read."""
        return RunContext.model_construct(**{name: getattr(self, name) for name in RunContext.model_fields})

    def recipe(self) -> RunRecipe:
        return RunRecipe.model_validate(self.model_dump(include=set(RunRecipe.model_fields)))

    def with_recipe(self, recipe: RunRecipe) -> Settings:
        return self.model_copy(update=recipe.model_dump(exclude={"format"}))
