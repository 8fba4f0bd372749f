"""Student artifacts: `weights.safetensors` + `manifest.json` (format kdlib.student/1), checksummed.

The manifest names the architecture and its arguments, so `load_student` rebuilds the same module
without the pretrained encoder (the small transformer's config is stored; its weights are in the file).
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from kdlib.artifact import WEIGHTS, ArtifactError, read_manifest, write_artifact
from kdlib.families import config_from_dict
from kdlib.students.base import MultiTaskStudent
from kdlib.students.heads import TaskHead
from kdlib.students.registry import build_student_model

FORMAT = "kdlib.student/1"


def save_student(model: MultiTaskStudent, folder: str | Path, *, name: str, hparams: dict,
                 tasks: dict | None = None, extra: dict | None = None) -> Path:
    """Write a student artifact atomically.

    Args:
        name: the registry name (small_transformer, bilstm, cmow).
        hparams: the architecture arguments it was built with (JSON-able; no tensors).
        tasks: per task user-facing facts (kind, label_names, metric) stored in the manifest.
    """
    config = getattr(model.encoder, "config", None)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    return write_artifact(folder, state, {
        "format": FORMAT, "student": name, "hparams": hparams, "vocab_size": model.vocab_size,
        "heads": {t: {"kind": h.kind, "num_outputs": h.num_outputs, "pair": h.pair, "bins": h.bins}
                  for t, h in model.tasks.items()},
        "encoder_config": config.to_dict() if config is not None else None,
        "tasks": tasks or {}, **(extra or {})})


def load_student(folder: str | Path) -> tuple[MultiTaskStudent, dict]:
    """Rebuild a student from its artifact (checksums verified); returns (model in eval mode, manifest)."""
    manifest = read_manifest(folder)
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{folder}: a {manifest.get('format')!r} artifact, not a {FORMAT} student")
    heads = {t: TaskHead(**h) for t, h in manifest["heads"].items()}
    hparams = dict(manifest["hparams"])
    if manifest["student"] == "small_transformer":
        hparams["config"] = config_from_dict(manifest["encoder_config"])
    hparams.pop("cbow_init", None)  # how training started the CBOW vectors; the saved weights replace them
    model = build_student_model(manifest["student"], tasks=heads, vocab_size=manifest["vocab_size"], **hparams)
    result = model.load_state_dict(load_file(str(Path(folder) / WEIGHTS)), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ArtifactError(f"{folder}: weights do not fit the {manifest['student']} student "
                            f"(missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})")
    return model.eval(), manifest
