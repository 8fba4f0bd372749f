"""Model artifacts on disk: `weights.safetensors` + `manifest.json`, checksummed; no pickle anywhere.

The manifest holds everything needed to rebuild the model (encoder config, pooling, branch layout),
what the branches mean to a user (per task: kind, label names, primary metric), the versions that made
it, and the SHA-256 of every file. A trunk-less artifact (a teacher ensemble, which shares the
pretrained encoder's frozen trunk) records the encoder it needs instead of storing its weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

import kdlib
from kdlib.branched import BranchedModel, BranchSpec
from kdlib.families import config_from_dict

WEIGHTS, MANIFEST = "weights.safetensors", "manifest.json"


class ArtifactError(Exception):
    """An artifact that is missing, altered or does not fit what loads it."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_model(model: BranchedModel, folder: str | Path, *, tasks: dict | None = None,
               include_trunk: bool = True, extra: dict | None = None) -> Path:
    """Write a model artifact atomically (a temp folder renamed into place).

    Args:
        model: the model to save.
        folder: target folder; replaced if it exists.
        tasks: per task user-facing facts (kind, label_names, metric, ...) stored in the manifest.
        include_trunk: False stores only the branches (the trunk is the pretrained encoder's).
        extra: more manifest fields (e.g. the config that produced it, encoder identity).
    """
    # fp32 CPU copies: an artifact written on a GPU, in any precision, loads the same on a CPU.
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()
             if include_trunk or k.startswith("branches.")}
    return write_artifact(folder, state, {
        "format": "kdlib.branched/1",
        "encoder_config": model.config.to_dict(),
        "pooling": model.pooling,
        "branches": [s.to_dict() for s in model.specs.values()],
        "trunk_depth": model.trunk_depth,
        "include_trunk": include_trunk,
        "tasks": tasks or {},
        **(extra or {}),
    })


def write_artifact(folder: str | Path, state: dict[str, torch.Tensor], manifest: dict) -> Path:
    """Write `state` (safetensors) and `manifest` (+ versions and the weights' SHA-256) into `folder`,
    atomically: a temp folder renamed into place, replacing any earlier one."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    save_file(state, str(tmp / WEIGHTS))
    manifest = {**manifest,
                "versions": {"kdlib": kdlib.__version__, "torch": torch.__version__,
                             "transformers": transformers.__version__},
                "files": {WEIGHTS: sha256_file(tmp / WEIGHTS)}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False))
    if folder.exists():
        _remove_tree(folder)
    os.replace(tmp, folder)
    return folder


def read_manifest(folder: str | Path, verify: bool = True) -> dict:
    """The manifest, after checking every listed file's SHA-256 (ArtifactError on any mismatch)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        raise ArtifactError(f"{folder}: no {MANIFEST}; not a kdlib model artifact")
    manifest = json.loads(path.read_text())
    if verify:
        for name, digest in manifest["files"].items():
            f = folder / name
            if not f.exists():
                raise ArtifactError(f"{folder}: {name} listed in the manifest is missing")
            if sha256_file(f) != digest:
                raise ArtifactError(f"{folder}: {name} checksum mismatch (manifest {digest[:12]}..., "
                                    f"file {sha256_file(f)[:12]}...): the artifact was altered or is incomplete")
    return manifest


def load_model(folder: str | Path, encoder: PreTrainedModel | None = None) -> tuple[BranchedModel, dict]:
    """Rebuild a model from its artifact (checksums verified).

    Args:
        folder: the artifact folder.
        encoder: for a trunk-less artifact, the pretrained encoder whose embeddings and bottom layers
            become the (shared, not copied) trunk.
    Returns:
        (model in eval mode, manifest).
    """
    manifest = read_manifest(folder)
    if manifest.get("format") != "kdlib.branched/1":
        raise ArtifactError(f"{folder}: a {manifest.get('format')!r} artifact, not a branched model "
                            "(students other than the branched one load with kdlib.students.load_student)")
    config = config_from_dict(manifest["encoder_config"])
    specs = [BranchSpec(**b) for b in manifest["branches"]]
    model = BranchedModel(config, specs, manifest["pooling"])
    state = load_file(str(Path(folder) / WEIGHTS))
    if not manifest["include_trunk"]:
        if encoder is None:
            raise ArtifactError(f"{folder}: stores no trunk; pass the encoder it was cut from")
        model.embeddings = model.family.embeddings_of(encoder)
        if model.shared is not None:
            model.shared = model.family.shared_of(encoder)
        model.trunk = nn_list_prefix(model.family.layers_of(encoder), model.trunk_depth)
        missing = model.load_state_dict(state, strict=False).missing_keys
        missing = [k for k in missing if k.startswith("branches.")]
    else:
        missing = model.load_state_dict(state, strict=True).missing_keys
    if missing:
        raise ArtifactError(f"{folder}: weights missing for {missing[:5]}")
    return model.eval(), manifest


def nn_list_prefix(layers: torch.nn.ModuleList, depth: int) -> torch.nn.ModuleList:
    if len(layers) < depth:
        raise ArtifactError(f"the shared trunk has {len(layers)} layers; the artifact needs {depth}")
    return torch.nn.ModuleList(list(layers)[:depth])


def _remove_tree(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder)
