"""Registries of what a profile names: profiles (tools.config.PROFILES), generator families, critics and decomposers
(tools.backends.registries).

Each registry is an entry-point group, so a package adds to it without touching this project, the way simonw/llm's
plugins and open_clip's model configs do: declare, in its own pyproject.toml,

    [project.entry-points."imagerag.generators"]
    myfamily = "mypackage.generator:MyGenerator"

The built-ins are registered the same way, in this project's pyproject.toml. What each group holds:

- `imagerag.profiles`: a `Profile` (tools.config) whose name is the entry's name;
- `imagerag.generators`: a generator family, a class with `from_pretrained(spec, model_path, ip_adapter_path,
  device, offload, compile)` returning a Generator (tools.backends.diffusion);
- `imagerag.critics`: a function `(parts: BackendParts) -> Critic` (tools.backends.judges);
- `imagerag.decomposers`: a function `(parts: BackendParts) -> Decomposer` (tools.backends.planner).

tools.backends.registries defines the backend groups; tests/contracts.py holds the contract every registered
generator and critic passes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Generic, TypeVar

from imagerag.tools.errors import ConfigError

T = TypeVar("T")


class UnknownName(ConfigError):
    """A profile names a backend that no installed package registers."""


class Registry(Mapping[str, T], Generic[T]):
    """Named entries of one entry-point group, loaded on first use. `add` registers one in this process only."""

    def __init__(self, group: str, what: str, hint: str):
        self.group, self.what, self.hint = group, what, hint
        self._added: dict[str, T] = {}
        self._loaded: dict[str, T] = {}
        self._entries: dict[str, EntryPoint] | None = None

    def entries(self) -> dict[str, EntryPoint]:
        if self._entries is None:  # read once per process: scanning the installed packages is not free
            self._entries = {e.name: e for e in entry_points(group=self.group)}
        return self._entries

    def add(self, name: str, value: T) -> None:
        self._added[name] = value

    def __getitem__(self, name: str) -> T:
        if name in self._added:
            return self._added[name]
        if name not in self._loaded:
            entry = self.entries().get(name)
            if entry is None:
                raise UnknownName(
                    f"unknown {self.what} {name!r}: choose one of {', '.join(self)} ({self.hint}); a package adds one "
                    f"through the entry-point group {self.group!r}"
                )
            self._loaded[name] = entry.load()
        return self._loaded[name]

    def __contains__(self, name: object) -> bool:
        return name in self._added or name in self.entries()

    def __iter__(self) -> Iterator[str]:
        return iter({**dict.fromkeys(self.entries()), **dict.fromkeys(self._added)})

    def __len__(self) -> int:
        return len(set(self.entries()) | set(self._added))
