"""A model as a server holds it: verified load, optional int8, mixed-task batches.

`ServedModel` is the merged branched model: one batch may hold requests for different tasks, and the shared
trunk runs once for all of its rows (flexible-multitask-bert-serving, sec. 3.3): a row leaves the trunk as soon
as every branch it asked for has run, and each branch runs only on the rows that asked for it.
`ServedStudents` is an end-to-end student (small_transformer, bilstm, cmow): one multi-task model, whose encoder
runs once per row for all the row's tasks, or one fine-tuned copy per task. Both answer the same API
(`Served`); `load_served` picks the one an artifact or run folder holds.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdlib import storage
from kdlib.artifact import MANIFEST, WEIGHTS, ArtifactError, load_model, read_manifest
from kdlib.branched import BranchedModel
from kdlib.device import autocast, hold_linear_weights, model_device
from kdlib.encoder import load_tokenizer, resolve_encoder_path
from kdlib.serve.quantize import quantize_int8
from kdlib.students.artifact import FORMAT as STUDENT_FORMAT
from kdlib.students.artifact import load_student
from kdlib.students.inputs import make_student_inputs
from kdlib.tokenize import tokenize

QUANTIZE_MODES = ("none", "int8")


@dataclass(frozen=True)
class Job:
    """One request's work: N inputs, the tasks to run on every one of them."""

    texts: list[str]
    pairs: list[str | None]
    tasks: tuple[str, ...]


def resolve_model_location(path: str | Path) -> str:
    """Where a model lives: `path` itself (a model artifact, or a folder of end-to-end students: `multitask/`
    or one fine-tuned copy per task), or for a run folder the model its `results.json` names (jobs/distill.py
    writes it). Local paths come back absolute; storage URIs (`s3://bucket/runs/demo`) as they are, so
    replicas on any node can read them."""
    location = str(path)
    if storage.is_local(location):
        location = str(Path(location).expanduser().resolve())
    if storage.exists_at(storage.child(location, MANIFEST)):
        return location
    results = storage.child(location, "results.json")
    if storage.exists_at(results):
        return resolve_model_location(json.loads(storage.read_text_at(results))["model_dir"])
    if student_folders(location):
        return location
    raise ArtifactError(f"{path}: neither a model artifact ({MANIFEST}), a folder of students (multitask/ or "
                        "<task>/ artifacts) nor a run folder (results.json)")


def student_folders(location: str) -> list[str]:
    """The end-to-end student artifacts directly under `location` (names of sub-folders holding one)."""
    fs, path = storage.filesystem(location)
    if not storage.exists(fs, path):
        return []
    names = [n for n in storage.list_folders(fs, path) if storage.exists(fs, storage.join(path, n, MANIFEST))]
    return [n for n in names if storage.read_json(fs, storage.join(path, n, MANIFEST)).get("format") == STUDENT_FORMAT]


def resolve_model_dir(path: str | Path) -> Path:
    """The model artifact's folder on this node's disk (a mirror of it when it lives in remote storage)."""
    return storage.local_copy(resolve_model_location(path))


def tokenizer_source(manifest: dict, override: str | None = None) -> str:
    """Where the artifact's tokenizer lives: the override, the recorded encoder folder, or its name."""
    if override:
        return override
    encoder = manifest.get("encoder")
    if not encoder:
        raise ArtifactError("the manifest records no encoder; pass tokenizer_path")
    if Path(encoder["source"]).is_dir():
        return encoder["source"]
    # Built on another machine: the offline package or the hub name gives the same tokenizer.
    return resolve_encoder_path(encoder["name"])


class Served:
    """What the server needs of a loaded model: `tasks` (name -> kind, label_names, metric, pair), `version`,
    `model_dir`, `describe()` and `run()`; answering requests (`infer`) is the same for every kind.
    Immutable once built; a new version is a new object."""

    kind: str
    tasks: dict[str, dict]
    version: str
    model_dir: str

    def describe(self) -> dict:
        raise NotImplementedError

    def run(self, texts: list[str], pairs: list[str | None], row_tasks: list[tuple[str, ...]]
            ) -> list[dict[str, np.ndarray]]:
        """Per row {task: (C,) float32 logits, or (1,) regression prediction} for the row's tasks."""
        raise NotImplementedError

    def answer(self, task: str, y: np.ndarray) -> dict:
        """One task's output as the API gives it: label and class probabilities, or a score."""
        info = self.tasks[task]
        if info["kind"] == "regression":
            return {"score": float(y[0])}
        p = np.exp(y - y.max())
        p = p / p.sum()
        return {"label": info["label_names"][int(np.argmax(y))],
                "probabilities": {name: float(v) for name, v in zip(info["label_names"], p)}}

    def rows(self, job: Job) -> list[tuple[int, str, str | None, tuple[str, ...]]]:
        """A job's trunk rows: (input index, text, text pair or None, tasks), each task reading what it takes.

        An input with a text pair asked for single-sentence tasks and for sentence-pair tasks at once becomes
        two rows: the text alone for the former, the pair for the latter. Tasks of unknown kind (pair None)
        read the input as given."""
        singles = tuple(t for t in job.tasks if self.tasks[t]["pair"] is False)
        others = tuple(t for t in job.tasks if self.tasks[t]["pair"] is not False)
        out = []
        for i, (text, pair) in enumerate(zip(job.texts, job.pairs)):
            if pair is not None and singles and others:
                out += [(i, text, None, singles), (i, text, pair, others)]
            else:
                out.append((i, text, None if not others else pair, job.tasks))
        return out

    def infer(self, jobs: list[Job]) -> list[list[dict] | list[str]]:
        """Answer a batch of jobs in one trunk pass.

        Returns:
            per job: a list (one per input) of {task: answer, in the job's task order}, or, for a job naming
            tasks this version does not have (a live update removed them after the request was checked), the
            missing names.
        """
        results: list = [None] * len(jobs)
        texts, pairs, row_tasks, owner = [], [], [], []
        for j, job in enumerate(jobs):
            missing = [t for t in job.tasks if t not in self.tasks]
            if missing:
                results[j] = missing
                continue
            results[j] = [{} for _ in job.texts]
            for i, text, pair, tasks in self.rows(job):
                texts.append(text)
                pairs.append(pair)
                row_tasks.append(tasks)
                owner.append((j, i))
        if texts:
            outputs = self.run(texts, pairs, row_tasks)
            for (j, i), tasks, row_out in zip(owner, row_tasks, outputs):
                results[j][i].update({t: self.answer(t, row_out[t]) for t in tasks})
        for j, job in enumerate(jobs):
            if results[j] and isinstance(results[j][0], dict):  # answers in the order the tasks were asked
                results[j] = [{t: answers[t] for t in job.tasks} for answers in results[j]]
        return results


class ServedModel(Served):
    """The merged branched model (kdlib.branched) ready to answer requests."""

    kind = "branched"

    def __init__(self, model: BranchedModel, manifest: dict, tokenizer, *, model_dir: str, quantize: str,
                 precision: str = "fp32"):
        if "max_length" not in manifest:
            raise ArtifactError(f"{model_dir}: the manifest has no max_length (not a merged model artifact)")
        self.model, self.manifest, self.tokenizer = model, manifest, tokenizer
        self.model_dir, self.quantize, self.precision = model_dir, quantize, precision
        self.device = model_device(model)
        self.max_length = int(manifest["max_length"])
        # The weights' checksum names the version: any branch added, replaced or removed changes it.
        self.version = f"sha256:{manifest['files'][WEIGHTS][:12]}" + ("+int8" if quantize == "int8" else "")
        self.tasks: dict[str, dict] = {}
        for name, spec in model.specs.items():
            facts = manifest["tasks"].get(name, {})
            labels = facts.get("label_names") or [str(i) for i in range(spec.num_outputs)]
            # pair: whether the task takes a sentence pair; None when the artifact predates the manifest saying so
            self.tasks[name] = {"kind": spec.kind, "label_names": [str(x) for x in labels] if spec.kind ==
                                "classification" else None, "metric": facts.get("metric"),
                                "pair": facts.get("pair"), "depth": spec.depth, "layers": spec.layers}

    @classmethod
    def load(cls, model_dir: str | Path, quantize: str = "none", tokenizer_path: str | None = None,
             device: torch.device | str = "cpu", precision: str = "fp32") -> "ServedModel":
        """Load and verify (SHA-256 of the safetensors weights against the manifest; ArtifactError if altered),
        onto `device`; `precision` bf16 runs it under autocast there, its linear layers' weights held in bf16
        (kdlib.device.hold_linear_weights: the same outputs, without casting them on every request)."""
        if quantize not in QUANTIZE_MODES:
            raise ValueError(f"quantize={quantize!r}: must be one of {QUANTIZE_MODES}")
        location = resolve_model_location(model_dir)
        model, manifest = load_model(storage.local_copy(location))
        if quantize == "int8":
            model = quantize_int8(model)
        return cls(hold_linear_weights(model.to(device), precision), manifest,
                   load_tokenizer(tokenizer_source(manifest, tokenizer_path)),
                   model_dir=location, quantize=quantize, precision=precision)

    def describe(self) -> dict:
        return {"kind": self.kind, "model_version": self.version, "model_dir": self.model_dir,
                "quantize": self.quantize, "device": str(self.device), "precision": self.precision,
                "max_length": self.max_length, "trunk_depth": self.model.trunk_depth, "tasks": self.tasks}

    def encode(self, texts: list[str], pairs: list[str] | None) -> dict[str, torch.Tensor]:
        """Tokenize rows (all with a text pair, or none: `pairs` None) into one right-padded batch on the device."""
        enc = tokenize(self.tokenizer, texts, pairs, max_length=self.max_length)
        return {k: torch.from_numpy(v).to(self.device, non_blocking=True) for k, v in enc.items()}

    def run(self, texts: list[str], pairs: list[str | None], row_tasks: list[tuple[str, ...]]
            ) -> list[dict[str, np.ndarray]]:
        """Outputs of each row's tasks; the trunk runs once for all rows of a kind, only as deep as each row needs.

        Rows with and without a text pair run as two trunk passes: a single sentence is not padded to a pair's
        length (an all-task request on sentence pairs asks for both kinds of rows: kdlib.serve.model.Served.rows).

        Args:
            texts, pairs: N inputs (a None pair: a single text).
            row_tasks: for each row, the branches to run on it.
        Returns:
            per row {task: (C,) float32 logits, or (1,) regression prediction}.
        """
        out: list[dict[str, np.ndarray]] = [{} for _ in texts]
        for with_pair in (False, True):
            rows = [i for i, p in enumerate(pairs) if (p is not None) == with_pair]
            if rows:
                enc = self.encode([texts[i] for i in rows], [pairs[i] for i in rows] if with_pair else None)
                for i, row_out in zip(rows, self._run_trunk(enc, [row_tasks[i] for i in rows])):
                    out[i] = row_out
        return out

    @torch.inference_mode()
    def _run_trunk(self, enc: dict[str, torch.Tensor], row_tasks: list[tuple[str, ...]]
                   ) -> list[dict[str, np.ndarray]]:
        """One trunk pass over a tokenized batch: each branch runs on its rows at its depth; rows leave the
        trunk once their deepest branch has run."""
        model = self.model
        mask = enc["attention_mask"]  # (N, T)
        need = torch.tensor([max(model.specs[t].depth for t in ts) for ts in row_tasks])  # (N,)
        rows = torch.arange(len(row_tasks))  # original index of each row still in the trunk
        with autocast(self.device, self.precision):
            h = model.embed(enc["input_ids"], enc["token_type_ids"], mask)  # (N, T, H)
        out: list[dict[str, np.ndarray]] = [{} for _ in row_tasks]
        top = int(need.max())
        for depth in range(top + 1):
            for task in sorted({t for r in rows.tolist() for t in row_tasks[r] if model.specs[t].depth == depth}):
                sel = [i for i, r in enumerate(rows.tolist()) if task in row_tasks[r]]
                with autocast(self.device, self.precision):
                    y = model.branch_forward(task, h[sel], mask[sel])  # (b, C)
                for i, row in zip(sel, y.float().cpu().numpy()):
                    out[int(rows[i])][task] = row
            if depth < top:
                keep = need[rows] > depth  # rows and need stay on the CPU; h and mask on the device
                if not bool(keep.all()):
                    on_device = keep.to(self.device)
                    h, mask, rows = h[on_device], mask[on_device], rows[keep]
                    t = int(mask.sum(1).max())  # right padding: drop columns no remaining row uses
                    h, mask = h[:, :t], mask[:, :t]
                with autocast(self.device, self.precision):
                    h = model.run_layer(model.trunk[depth], h, model.context(h, mask))
        return out


class ServedStudents(Served):
    """End-to-end students (kdlib.students: small_transformer, bilstm, cmow) ready to answer requests: one
    multi-task model, or one fine-tuned copy per task (distill.fine_tune_epochs). Rows asking several tasks of
    one model are encoded once for all of them."""

    def __init__(self, models: dict[str, tuple[torch.nn.Module, dict]], tokenizer, *, model_dir: str,
                 quantize: str, device: torch.device, precision: str):
        """models: artifact name (multitask, or a task) -> (student, manifest); each task is served by its own
        fine-tuned copy when there is one, else by the multi-task model."""
        self.models = {name: m for name, (m, _) in models.items()}
        self.tokenizer, self.model_dir, self.quantize = tokenizer, model_dir, quantize
        self.device, self.precision = torch.device(device), precision
        manifests = {name: mf for name, (_, mf) in models.items()}
        kinds = {mf["student"] for mf in manifests.values()}
        if len(kinds) != 1:
            raise ArtifactError(f"{model_dir}: students of different kinds {sorted(kinds)} in one folder")
        self.kind = kinds.pop()
        self.max_length = min(int(mf.get("max_length", 128)) for mf in manifests.values())
        self.by_task: dict[str, str] = {}
        self.tasks = {}
        for name in sorted(models, key=lambda n: n != "multitask"):  # per-task copies override the multi-task one
            manifest = manifests[name]
            for task, head in manifest["heads"].items():
                if name not in ("multitask", task):
                    continue
                facts = manifest["tasks"].get(task, {})
                kind = head["kind"]
                labels = facts.get("label_names") or [str(i) for i in range(head["num_outputs"])]
                self.by_task[task] = name
                self.tasks[task] = {"kind": kind, "label_names": [str(x) for x in labels]
                                    if kind == "classification" else None, "metric": facts.get("metric"),
                                    "pair": head["pair"], "model": name}
        digests = ",".join(f"{n}:{manifests[n]['files'][WEIGHTS]}" for n in sorted(manifests))
        self.version = "sha256:" + hashlib.sha256(digests.encode()).hexdigest()[:12] + (
            "+int8" if quantize == "int8" else "")

    @classmethod
    def load(cls, location: str, quantize: str = "none", tokenizer_path: str | None = None,
             device: torch.device | str = "cpu", precision: str = "fp32") -> "ServedStudents":
        """A student artifact, or a folder of them (`multitask/`, `<task>/`), verified, onto `device`."""
        folder = storage.local_copy(location)
        names = [None] if (folder / MANIFEST).exists() else student_folders(location)
        models = {}
        for name in names:
            model, manifest = load_student(folder if name is None else folder / name)
            if quantize == "int8":
                model = quantize_int8(model)
            models[name or ("multitask" if len(manifest["heads"]) > 1 else next(iter(manifest["heads"])))] = (
                hold_linear_weights(model.to(device), precision), manifest)
        manifest = next(iter(models.values()))[1]
        return cls(models, load_tokenizer(tokenizer_source(manifest, tokenizer_path)), model_dir=location,
                   quantize=quantize, device=torch.device(device), precision=precision)

    def describe(self) -> dict:
        return {"kind": self.kind, "model_version": self.version, "model_dir": self.model_dir,
                "quantize": self.quantize, "device": str(self.device), "precision": self.precision,
                "max_length": self.max_length, "models": sorted(self.models), "tasks": self.tasks}

    @torch.inference_mode()
    def run(self, texts: list[str], pairs: list[str | None], row_tasks: list[tuple[str, ...]]
            ) -> list[dict[str, np.ndarray]]:
        """Rows grouped by (model, with or without a pair): each group encoded once, every head it asked for
        run on it, each row keeping its own tasks' outputs."""
        groups: dict[tuple[str, bool], list[int]] = {}
        for i, tasks in enumerate(row_tasks):
            for name in sorted({self.by_task[t] for t in tasks}):
                groups.setdefault((name, pairs[i] is not None), []).append(i)
        out: list[dict[str, np.ndarray]] = [{} for _ in texts]
        for (name, with_pair), rows in groups.items():
            model = self.models[name]
            names = sorted({t for i in rows for t in row_tasks[i] if self.by_task[t] == name})
            inputs = make_student_inputs(self.tokenizer, [texts[i] for i in rows],
                                         [pairs[i] for i in rows] if with_pair else None,
                                         max_length=self.max_length).to(self.device)
            with autocast(self.device, self.precision):
                y = model.forward_tasks(inputs, names)
            scores = {t: model.tasks[t].scores(y[t]).float().cpu().numpy() for t in names}
            for j, i in enumerate(rows):
                out[i].update({t: scores[t][j] for t in row_tasks[i] if t in scores})
        return out


def load_served(model_dir: str | Path, quantize: str = "none", tokenizer_path: str | None = None,
                device: torch.device | str = "cpu", precision: str = "fp32") -> Served:
    """The model at `model_dir` (an artifact, a folder of students, or a run folder), of whatever kind it is."""
    location = resolve_model_location(model_dir)
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize={quantize!r}: must be one of {QUANTIZE_MODES}")
    folder = storage.local_copy(location)
    if (folder / MANIFEST).exists() and read_manifest(folder, verify=False).get("format") != STUDENT_FORMAT:
        return ServedModel.load(location, quantize, tokenizer_path, device, precision)
    return ServedStudents.load(location, quantize, tokenizer_path, device, precision)


class ModelSlot:
    """The model version a replica serves. An update swaps in a new one only once it has loaded and
    verified; until then, and if it fails, requests keep getting the current one."""

    def __init__(self, tokenizer_path: str | None = None, *, device: torch.device | str = "cpu",
                 precision: str = "fp32"):
        self.tokenizer_path, self.device, self.precision = tokenizer_path, device, precision
        self.current: Served | None = None
        self.config: dict | None = None
        self.last_error: str | None = None
        self._lock = threading.Lock()  # one update at a time; readers never wait on it

    def update(self, model_dir: str, quantize: str) -> str:
        """Load `model_dir` and make it current.

        Returns:
            "loaded"; "unchanged" (already serving exactly this); or "refused" when the new artifact fails
            to load, the current model staying in service. Raises when there is no current model to keep.
        """
        config = {"model_dir": str(model_dir), "quantize": quantize}
        with self._lock:
            if config == self.config and self.current is not None:
                return "unchanged"
            try:
                new = load_served(model_dir, quantize, self.tokenizer_path, self.device, self.precision)
            except Exception as e:  # noqa: BLE001 - any failure keeps the old model serving
                self.last_error = f"{type(e).__name__}: {e}"
                if self.current is None:
                    raise
                return "refused"
            self.current, self.config, self.last_error = new, config, None  # one reference swap
            return "loaded"
