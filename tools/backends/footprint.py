"""How big a profile is: parameters per component, read from the safetensors headers of its local or cached
weights (nothing is loaded), and the memory those weights take in the profile's dtype."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from pydantic import BaseModel

from imagerag.tools.config import Profile

BYTES_PER_PARAMETER = {"float32": 4, "float16": 2, "bfloat16": 2}


class ComponentSize(BaseModel):
    name: str
    parameters: int


class Footprint(BaseModel):
    profile: str
    dtype: str
    weights: str | None  # where the weights were found; None: neither local nor in the Hub cache
    components: list[ComponentSize]

    @property
    def parameters(self) -> int:
        return sum(c.parameters for c in self.components)

    @property
    def weight_bytes(self) -> int:
        """Memory of the weights in the profile's dtype on a GPU (a CPU runs float32). Peak memory adds the
        activations, which grow with image size and batch: measure them on your device."""
        return self.parameters * BYTES_PER_PARAMETER[self.dtype]


def safetensors_parameters(path: Path) -> int:
    """Parameters in a .safetensors file, from its header alone (8-byte length, then JSON of shapes)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    total = 0
    for name, entry in header.items():
        if name != "__metadata__":
            count = 1
            for dim in entry["shape"]:
                count *= dim
            total += count
    return total


def folder_parameters(folder: Path) -> int:
    """A component folder's parameters: its full-precision weights when a variant (fp16) sits beside them."""
    files = sorted(folder.glob("*.safetensors"))
    full = [f for f in files if ".fp16." not in f.name] or files
    return sum(safetensors_parameters(f) for f in full)


def local_snapshot(ref: str) -> Path | None:
    """A local folder, or the cached Hub snapshot of `ref`; None when neither exists (nothing is downloaded)."""
    if Path(ref).is_dir():
        return Path(ref)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(ref, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def footprint(profile: Profile, model: str, adapter: str | None) -> Footprint:
    """The generator's footprint; `model` and `adapter` are Hub ids or folders (local schemes already resolved)."""
    spec = profile.generator
    root = local_snapshot(model)
    components: list[ComponentSize] = []
    if root is not None:
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            if count := folder_parameters(folder):
                components.append(ComponentSize(name=folder.name, parameters=count))
        adapter_root = local_snapshot(adapter) if adapter and spec.ip_adapter else None
        if adapter_root is not None and spec.ip_adapter is not None:
            weights = adapter_root / spec.ip_adapter.subfolder / spec.ip_adapter.weight_name
            if weights.suffix == ".safetensors" and weights.is_file():
                components.append(ComponentSize(name="ip_adapter", parameters=safetensors_parameters(weights)))
            # As load_ip_adapter resolves it: a bare folder name sits in the adapter's subfolder, a path in the repo.
            named = spec.ip_adapter.image_encoder_folder
            encoder = adapter_root / (named if "/" in named else Path(spec.ip_adapter.subfolder) / named)
            if encoder.is_dir():
                components.append(ComponentSize(name="image_encoder", parameters=folder_parameters(encoder)))
    return Footprint(profile=profile.name, dtype=spec.dtype, weights=str(root) if root else None, components=components)
