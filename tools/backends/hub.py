"""Weights from the Hugging Face Hub: find out in seconds whether a profile's models can be had at all, so a
machine with neither a local copy nor a way to the Hub gets a clear answer instead of minutes of retries."""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlparse

from imagerag.tools.config import Profile
from imagerag.tools.errors import ConfigError

HUB_TIMEOUT = 3.0  # seconds to wait for the Hub before calling it unreachable


def generator_repos(profile: Profile) -> list[str]:
    """The Hub repositories of a profile's generator and adapter (local folders and built-in schemes excluded)."""
    generator = profile.generator
    repos = [generator.model_id] + ([generator.ip_adapter.repo] if generator.ip_adapter else [])
    return [r for r in repos if ":" not in r and not Path(r).exists()]


def clip_repos(profile: Profile) -> list[str]:
    """The Hub repository of the profile's open_clip weights, when its pretrained tag names one."""
    import open_clip

    if not profile.clip.pretrained:
        return []
    hf_hub = open_clip.get_pretrained_cfg(profile.clip.model, profile.clip.pretrained).get("hf_hub")
    return [hf_hub.strip("/")] if hf_hub else []


def is_cached(repo: str) -> bool:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot_download(repo, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        return False
    return True


def hub_reachable(timeout: float = HUB_TIMEOUT) -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def require_weights(profile: Profile) -> None:
    """Raise ConfigError, naming the fix, when some of the profile's weights are neither cached nor downloadable."""
    # The generator first: a machine without it fails before open_clip is even imported.
    missing = [repo for repo in generator_repos(profile) if not is_cached(repo)]
    missing = missing or [repo for repo in clip_repos(profile) if not is_cached(repo)]
    if missing and not hub_reachable():
        raise ConfigError(
            f"the {profile.name} profile needs {', '.join(missing)} from the Hugging Face Hub: not in the local cache, "
            "and the Hub cannot be reached from here (or HF_HUB_OFFLINE=1). Download them on a machine that reaches "
            f"the Hub (`hf download {missing[0]}`, then copy ~/.cache/huggingface here or set HF_HOME), or try the "
            "offline demo now: --profile mini"
        )
