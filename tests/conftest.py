"""Offline by construction: no Hub, no telemetry, no socket except loopback."""

from __future__ import annotations

import os
import tempfile

os.environ.update(
    HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", ANONYMIZED_TELEMETRY="False", OPENAI_API_KEY="sk-test-not-real"
)
for leaked in [k for k in os.environ if k.startswith("IMAGERAG_")]:
    del os.environ[leaked]  # a developer's own configuration must not steer the tests
# The default data folder (~/.imagerag) belongs to the person running the tests, not to them.
os.environ["IMAGERAG_DATA_DIR"] = tempfile.mkdtemp(prefix="imagerag-tests-")

import socket
from pathlib import Path

import pytest
import torch
from PIL import Image
from scripted import ScriptedCritic, fake_backends

from imagerag.agent.config import Settings
from imagerag.tools.backends.indexer import index_folders
from imagerag.tools.backends.loading import load_embedder
from imagerag.tools.backends.store import ReferenceStore, chroma_client
from imagerag.tools.toolkit import Toolkit

# The tiny models are faster on one thread than on two shared ones, and the suite steadier (2-core machines).
torch.set_num_threads(1)

_real_connect = socket.socket.connect


def _loopback_only(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and (
        host.startswith("127.") or host in {"localhost", "::1"} or self.family == socket.AF_UNIX
    ):
        return _real_connect(self, address)
    raise ConnectionRefusedError(f"tests may not open a socket to {address!r}: only loopback is allowed")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    monkeypatch.setattr(socket.socket, "connect", _loopback_only)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A data folder with the tiny models built and a small reference collection 'tiny' indexed."""
    root = tmp_path_factory.mktemp("data")
    refs = root / "refs"
    refs.mkdir()
    for colour in ("red", "blue", "green", "yellow", "purple"):
        Image.new("RGB", (32, 32), colour).save(refs / f"{colour}.png")
        (refs / f"{colour}.txt").write_text(f"a {colour} square")
    settings = Settings(profile="tiny", data_dir=root)
    store = ReferenceStore.open(chroma_client(root), "tiny", load_embedder(settings), create=True)
    index_folders(store, [refs])
    return root


@pytest.fixture
def tiny_settings(data_dir) -> Settings:
    return Settings(profile="tiny", data_dir=data_dir)


@pytest.fixture
def tiny_store(tiny_settings) -> ReferenceStore:
    return ReferenceStore.open(chroma_client(tiny_settings.data_dir), "tiny", load_embedder(tiny_settings))


@pytest.fixture
def toolkit(tiny_store, tmp_path) -> Toolkit:
    return Toolkit(fake_backends(tiny_store, ScriptedCritic([set()])), tmp_path / "images")
