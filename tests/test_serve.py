"""The Ray Serve endpoint (kdlib/serve, jobs/serve.py) on tiny merged artifacts, over real HTTP.

Serve starts once for the module, through jobs/serve.py's `deploy`, on a free port of 127.0.0.1 in the
session's Ray, and shuts down at the end of the module.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import typing
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import yaml

from kdlib.artifact import ArtifactError, load_model, read_manifest, save_model
from kdlib.device import cpu_bf16_support
from kdlib.branched import BranchedModel, BranchSpec
from kdlib.encoder import encoder_fingerprint, load_encoder, load_tokenizer, resolve_encoder_path
from kdlib.predict import predict
from kdlib.serve.api import ClientError, Limits, ServeArgs, parse_predict, read_token
from kdlib.serve.loadtest import run_load_test
from kdlib.predict import predict_student
from kdlib.serve.model import Job, ModelSlot, ServedModel, ServedStudents, load_served, resolve_model_dir
from kdlib.students.artifact import load_student, save_student
from kdlib.students.heads import TaskHead
from kdlib.students.inputs import make_student_inputs
from kdlib.students.registry import build_student_model
from kdlib.serve.quantize import compare_float_int8

ROOT = Path(__file__).resolve().parent.parent
ENCODER = "sentence-transformers/all-MiniLM-L6-v2"  # its real WordPiece tokenizer; random tiny weights
TINY = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 64}
MAX_LENGTH = 32
# b takes a sentence pair (text, text_pair), the others a single text
TASKS = {"a": {"kind": "classification", "label_names": ["neg", "pos"], "metric": "accuracy", "pair": False},
         "b": {"kind": "regression", "label_names": [], "metric": "pearson", "pair": True},
         "c": {"kind": "classification", "label_names": ["x", "y", "z"], "metric": "accuracy", "pair": False},
         "d": {"kind": "classification", "label_names": ["no", "yes"], "metric": "f1", "pair": False}}
SPECS = {"a": BranchSpec("a", "classification", 2, 2, 1), "b": BranchSpec("b", "regression", 1, 1, 2),
         "c": BranchSpec("c", "classification", 3, 3, 1), "d": BranchSpec("d", "classification", 2, 2, 1)}
TEXTS = ["a fine film", "not good at all, and far too long for what it has to say", "ok"]
PAIRS = ["it was fine", "bad", "sure thing"]


def _perturb(branch: torch.nn.Module, seed: int) -> None:
    """Make a branch differ from the encoder (as training would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in branch.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _save_merged(folder: Path, encoder, branches: dict[str, torch.nn.Module | int]) -> Path:
    """A merged artifact as jobs/distill.py's merge stage writes it. `branches`: {task: module to copy, or
    a seed for fresh weights}. The trunk is the encoder's, as in every merged model."""
    source = resolve_encoder_path(ENCODER)
    model = BranchedModel.from_encoder(encoder, [SPECS[t] for t in branches], "mean")
    for task, src in branches.items():
        if isinstance(src, int):
            _perturb(model.branches[task], src)
        else:
            model.branches[task].load_state_dict(src.state_dict())
    enc = {"name": ENCODER, "source": source, "fingerprint": encoder_fingerprint(source, True, TINY, 0)}
    save_model(model.eval(), folder / "model", tasks={t: TASKS[t] for t in branches},
               extra={"role": "merged", "encoder": enc, "max_length": MAX_LENGTH})
    (folder / "results.json").write_text(json.dumps({"model_dir": str(folder / "model")}))
    return folder


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """v1: a, b, c. v2: c replaced, d added. v3: b removed. Each a run folder with results.json. legacy: v1 with a
    manifest from before it recorded which tasks take a sentence pair."""
    root = tmp_path_factory.mktemp("serve_models")
    encoder = load_encoder(resolve_encoder_path(ENCODER), True, TINY, seed=0)
    v1 = _save_merged(root / "v1", encoder, {"a": 1, "b": 2, "c": 3})
    m1, _ = load_model(v1 / "model")
    v2 = _save_merged(root / "v2", encoder, {"a": m1.branches["a"], "b": m1.branches["b"], "c": 13, "d": 4})
    m2, _ = load_model(v2 / "model")
    v3 = _save_merged(root / "v3", encoder, {"a": m1.branches["a"], "c": m2.branches["c"], "d": m2.branches["d"]})
    tampered = root / "tampered"
    shutil.copytree(v1, tampered)
    (tampered / "results.json").write_text(json.dumps({"model_dir": str(tampered / "model")}))
    with open(tampered / "model" / "weights.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    legacy = root / "legacy"
    shutil.copytree(v1, legacy)
    (legacy / "results.json").write_text(json.dumps({"model_dir": str(legacy / "model")}))
    manifest = json.loads((legacy / "model" / "manifest.json").read_text())
    for facts in manifest["tasks"].values():
        del facts["pair"]
    (legacy / "model" / "manifest.json").write_text(json.dumps(manifest))
    return {"v1": v1, "v2": v2, "v3": v3, "tampered": tampered, "legacy": legacy,
            "tokenizer": load_tokenizer(resolve_encoder_path(ENCODER))}


def _save_students(folder: Path, kind: str, per_task: bool, seed: int, **hparams) -> Path:
    """End-to-end students as jobs/distill.py's distill stage writes them: `multitask/` (tasks a, b, c), or one
    copy per task (`a/`, `b/`, `c/`: per-task fine-tuning), and a results.json naming the folder."""
    tokenizer = load_tokenizer(resolve_encoder_path(ENCODER))
    heads = {t: TaskHead(TASKS[t]["kind"], 1 if TASKS[t]["kind"] == "regression" else len(TASKS[t]["label_names"]),
                         pair=TASKS[t]["pair"]) for t in ("a", "b", "c")}
    source = resolve_encoder_path(ENCODER)
    extra = {"role": "student", "max_length": MAX_LENGTH,
             "encoder": {"name": ENCODER, "source": source, "fingerprint": encoder_fingerprint(source, True, TINY, 0)}}
    groups = {t: {t: heads[t]} for t in heads} if per_task else {"multitask": heads}
    for i, (name, group) in enumerate(groups.items()):
        torch.manual_seed(seed + i)
        model = build_student_model(kind, tasks=group, vocab_size=len(tokenizer), **hparams).eval()
        save_student(model, folder / "students" / name, name=kind, hparams=hparams,
                     tasks={t: TASKS[t] for t in group}, extra=extra)
    (folder / "results.json").write_text(json.dumps({"model_dir": str(folder / "students")}))
    return folder


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    """cmow: one multi-task CMOW student; bilstm: per-task fine-tuned BiLSTM copies."""
    root = tmp_path_factory.mktemp("serve_students")
    return {"cmow": _save_students(root / "cmow", "cmow", False, 5, matrix_dim=4, cbow_dim=8, head_hidden=16),
            "bilstm": _save_students(root / "bilstm", "bilstm", True, 7, embedding_dim=8, hidden=8, ffn_dim=8,
                                     head_hidden=16)}


def _student_expected(run: Path, task: str, pairs) -> np.ndarray:
    """predict_student on the artifact that serves `task` (its own copy, else multitask): probabilities/scores."""
    folder = run / "students" / (task if (run / "students" / task).exists() else "multitask")
    model, _ = load_student(folder)
    out = predict_student(model, load_tokenizer(resolve_encoder_path(ENCODER)), TEXTS, pairs, [task],
                          max_length=MAX_LENGTH)[task]
    return out if TASKS[task]["kind"] == "regression" else _softmax(out)


@pytest.mark.parametrize("kind", ["cmow", "bilstm"])
def test_served_students_equal_predict_student_on_mixed_task_batches(students, kind):
    """Two requests in one batch: one asks a, b and c of paired inputs (a, c read the text alone), the other c."""
    served = load_served(students[kind])
    assert isinstance(served, ServedStudents) and served.kind == kind
    assert served.describe()["models"] == (["a", "b", "c"] if kind == "bilstm" else ["multitask"])
    assert {t: info["pair"] for t, info in served.tasks.items()} == {"a": False, "b": True, "c": False}
    both, single = served.infer([Job(TEXTS, PAIRS, ("a", "b", "c")), Job(TEXTS, [None] * 3, ("c",))])
    for task in ("a", "b", "c"):
        expected = _student_expected(students[kind], task, PAIRS if task == "b" else None)
        np.testing.assert_allclose(_as_array(both, task), expected, atol=1e-5)
    np.testing.assert_allclose(_as_array(single, "c"), _student_expected(students[kind], "c", None), atol=1e-5)
    assert [r["c"]["label"] for r in single] == [["x", "y", "z"][i] for i in
                                                 _student_expected(students[kind], "c", None).argmax(1)]


def test_a_students_folder_of_mixed_kinds_is_refused(students, tmp_path):
    shutil.copytree(students["bilstm"] / "students", tmp_path / "students")
    shutil.rmtree(tmp_path / "students" / "c")
    shutil.copytree(students["cmow"] / "students" / "multitask", tmp_path / "students" / "multitask")
    with pytest.raises(ArtifactError, match=r"students of different kinds \['bilstm', 'cmow'\]"):
        load_served(tmp_path / "students")


def _reference(artifacts, version: str, task: str, pairs) -> np.ndarray:
    """kdlib.predict.predict on the artifact: (N, C) outputs for TEXTS."""
    model, _ = load_model(artifacts[version] / "model")
    return predict(model, artifacts["tokenizer"], TEXTS, pairs, [task], max_length=MAX_LENGTH)[task]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _as_array(answers: list[dict], task: str) -> np.ndarray:
    """HTTP answers for one task -> (N, C) probabilities, or (N, 1) scores."""
    if "score" in answers[0][task]:
        return np.array([[a[task]["score"]] for a in answers])
    return np.array([list(a[task]["probabilities"].values()) for a in answers])


def _expected(artifacts, version, task, pairs) -> np.ndarray:
    ref = _reference(artifacts, version, task, pairs)
    return ref if TASKS[task]["kind"] == "regression" else _softmax(ref)


def _version(artifacts, v: str) -> str:
    return "sha256:" + read_manifest(artifacts[v] / "model")["files"]["weights.safetensors"][:12]


def _wait_for(fn, timeout_s: float = 180.0):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = fn()
            if value:
                return value
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{fn} not true after {timeout_s}s")
        time.sleep(0.5)


# --- the model, without Serve ------------------------------------------------------------------------------


def test_mixed_task_batch_equals_predict(artifacts):
    """One run over rows asking for different tasks (at depths 1, 2, 3) equals predict task by task; in a job
    naming a sentence-pair task (b) and a single-sentence one (c), each reads what it takes."""
    served = ServedModel.load(artifacts["v1"])  # a run folder: its results.json names the model
    assert served.model_dir == str((artifacts["v1"] / "model").resolve())
    jobs = [Job(TEXTS, [None] * 3, ("a",)), Job(TEXTS, PAIRS, ("b", "c")), Job(TEXTS, [None] * 3, ("c", "a"))]
    answers = served.infer(jobs)
    np.testing.assert_allclose(_as_array(answers[0], "a"), _expected(artifacts, "v1", "a", None), atol=1e-5)
    np.testing.assert_allclose(_as_array(answers[1], "b"), _expected(artifacts, "v1", "b", PAIRS), atol=1e-5)
    np.testing.assert_allclose(_as_array(answers[1], "c"), _expected(artifacts, "v1", "c", None), atol=1e-5)
    assert [list(a) for a in answers[1]] == [["b", "c"]] * 3 and [list(a) for a in answers[2]] == [["c", "a"]] * 3
    np.testing.assert_allclose(_as_array(answers[2], "c"), _expected(artifacts, "v1", "c", None), atol=1e-5)
    assert answers[0][0]["a"]["label"] in ("neg", "pos")
    # A row mixing in a text pair does not change the rows without one.
    mixed = served.run(TEXTS, [None, "x y", None], [("a",)] * 3)
    ref = _reference(artifacts, "v1", "a", None)
    np.testing.assert_allclose(np.stack([mixed[0]["a"], mixed[2]["a"]]), ref[[0, 2]], atol=1e-5)
    # ... nor is a single sentence padded to a pair's length: the two kinds of rows run as two trunk passes.
    seen = []
    hook = served.model.trunk[0].register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[:2])))
    try:
        served.run(["a b", "a b"], [None, " ".join(TEXTS * 4)], [("a",), ("b",)])
    finally:
        hook.remove()
    lengths = [len(served.tokenizer("a b", *pair, truncation=True, max_length=served.max_length)["input_ids"])
               for pair in ((), (" ".join(TEXTS * 4),))]
    assert seen == [(1, lengths[0]), (1, lengths[1])] and lengths[0] < lengths[1]


def test_the_manifest_says_which_tasks_take_a_pair_and_an_older_artifact_takes_either(artifacts):
    served, legacy = ServedModel.load(artifacts["v1"]), ServedModel.load(artifacts["legacy"])
    assert {t: x["pair"] for t, x in served.tasks.items()} == {"a": False, "b": True, "c": False}
    assert {t: x["pair"] for t, x in legacy.tasks.items()} == {"a": None, "b": None, "c": None}

    def limits(model: ServedModel) -> Limits:
        return Limits(10_000, 8, 100, {t: x["pair"] for t, x in model.tasks.items()})

    for body in ({"task": "a", "inputs": _items(PAIRS)}, {"task": "b", "inputs": _items()}):
        with pytest.raises(ClientError) as e:
            parse_predict(json.dumps(body).encode(), limits(served))
        assert e.value.status == 422
        assert [x["field"] for x in e.value.body()["errors"]] == [f"inputs[{i}].text_pair" for i in range(3)]
        assert parse_predict(json.dumps(body).encode(), limits(legacy)).inputs  # unknown kind: either is taken
    (answers,) = legacy.infer([Job(TEXTS, PAIRS, ("a",))])  # and read as given: the pair
    np.testing.assert_allclose(_as_array(answers, "a"), _expected(artifacts, "v1", "a", PAIRS), atol=1e-5)


def test_tampered_weights_are_refused_and_the_old_model_keeps_serving(artifacts):
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        ServedModel.load(artifacts["tampered"])
    slot = ModelSlot()
    with pytest.raises(ArtifactError):
        slot.update(str(artifacts["tampered"]), "none")  # nothing to fall back on: the replica fails
    assert slot.update(str(artifacts["v1"]), "none") == "loaded"
    v1 = slot.current
    assert slot.update(str(artifacts["v1"]), "none") == "unchanged" and slot.current is v1
    assert slot.update(str(artifacts["tampered"]), "none") == "refused"
    assert slot.current is v1 and "checksum mismatch" in slot.last_error
    assert slot.update(str(artifacts["v2"]), "none") == "loaded" and slot.current.version != v1.version
    assert slot.last_error is None


def test_int8_is_close_to_float_and_the_comparison_reports_both(artifacts):
    fp, q = ServedModel.load(artifacts["v1"]), ServedModel.load(artifacts["v1"], "int8")
    assert q.version == fp.version + "+int8"
    assert type(q.model.branches["a"].head.dense).__module__.startswith("torch.ao.nn.quantized.dynamic")
    assert type(fp.model.branches["a"].head.dense) is torch.nn.Linear  # the float model is untouched
    rows = [("a", "b", "c")] * 3
    for f, i in zip(fp.run(TEXTS, PAIRS, rows), q.run(TEXTS, PAIRS, rows)):
        for t in ("a", "b", "c"):
            np.testing.assert_allclose(i[t], f[t], atol=0.05)
    labels = {"a": np.array([0, 1, 0]), "b": np.array([0.1, 0.9, 0.5]), "c": np.array([0, 1, 2])}
    report = compare_float_int8(str(artifacts["v1"]), {t: (TEXTS, PAIRS if t == "b" else None, labels[t])
                                                        for t in ("a", "b", "c")})
    assert set(report["tasks"]) == {"a", "b", "c"} and report["rows"] == 9
    assert report["tasks"]["a"]["metric"] == "accuracy" and report["float_s"] > 0 and report["int8_s"] > 0
    assert all(r["max_abs_diff"] < 0.05 for r in report["tasks"].values())


def test_bf16_serving_is_close_to_fp32(artifacts):
    """A replica's bf16 autocast (here on the CPU) answers within 0.05 of fp32 (bf16 rounds each matmul to
    ~0.4%; these small random models' outputs are ~1 in size), and says which precision it runs."""
    fp, bf = ServedModel.load(artifacts["v1"]), ServedModel.load(artifacts["v1"], precision="bf16")
    assert bf.describe()["precision"] == "bf16" and bf.describe()["device"] == "cpu"
    rows = [("a", "b", "c")] * 3
    diffs = [np.abs(x[t] - y[t]).max() for x, y in zip(fp.run(TEXTS, PAIRS, rows), bf.run(TEXTS, PAIRS, rows))
             for t in ("a", "b", "c")]
    assert 0 < max(diffs) < 0.05, diffs



def test_bf16_serving_holds_linear_weights_in_bf16_and_answers_exactly_as_autocast_over_fp32(artifacts, students):
    """kdlib.device.hold_linear_weights: a bf16 replica's linear layers keep bf16 weights (autocast no longer
    casts them per request) and its answers are the ones autocast gives over the artifact's fp32 weights, to
    the bit; the fp32 model is untouched. The merged model and an end-to-end student alike."""
    from kdlib.device import autocast

    bf = ServedModel.load(artifacts["v1"], precision="bf16")
    linear = [m for m in bf.model.modules() if type(m) is torch.nn.Linear]
    assert linear and all(m.weight.dtype == torch.bfloat16 for m in linear)
    assert all(p.dtype == torch.float32 for p in ServedModel.load(artifacts["v1"]).model.parameters())
    reference = ServedModel.load(artifacts["v1"])
    reference.precision = "bf16"  # autocast over fp32 weights: what bf16 serving did before
    rows = [("a", "b", "c")] * 3
    for x, y in zip(reference.run(TEXTS, PAIRS, rows), bf.run(TEXTS, PAIRS, rows)):
        for t in ("a", "b", "c"):
            np.testing.assert_array_equal(x[t], y[t])

    student = load_served(students["cmow"], precision="bf16")
    fp32, _ = load_student(students["cmow"] / "students" / "multitask")
    assert any(type(m) is torch.nn.Linear and m.weight.dtype == torch.bfloat16
               for m in student.models["multitask"].modules())
    inputs = make_student_inputs(student.tokenizer, TEXTS, None, max_length=student.max_length)
    with torch.inference_mode(), autocast(torch.device("cpu"), "bf16"):
        want = fp32.forward_tasks(inputs, ["a"])["a"].float().numpy()
    got = student.run(TEXTS, [None] * 3, [("a",)] * 3)
    np.testing.assert_array_equal(np.stack([g["a"] for g in got]), want)


def test_an_artifact_saved_from_bf16_weights_loads_and_serves_as_fp32(artifacts, tmp_path):
    """Device-neutral artifacts: weights held in bf16 (as a GPU run might) are written as fp32 CPU tensors; the
    artifact loads in fp32 on the CPU and answers as the bf16 model did, within bf16's rounding."""
    model, manifest = load_model(artifacts["v1"] / "model")
    half = model.to(torch.bfloat16)
    folder = save_model(half, tmp_path / "from-bf16", tasks=manifest["tasks"],
                        extra={k: manifest[k] for k in ("encoder", "max_length") if k in manifest})
    reloaded, _ = load_model(folder)
    assert all(p.dtype == torch.float32 for p in reloaded.parameters())
    for (name, a), b in zip(half.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a.float(), b), name  # bf16 values are exact in fp32
    served = ServedModel.load(folder)
    assert served.run(TEXTS, PAIRS, [("a",)] * 3)[0]["a"].dtype == np.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_model_served_on_the_gpu_in_bf16_agrees_with_the_cpu(artifacts):
    cpu, gpu = ServedModel.load(artifacts["v1"]), ServedModel.load(artifacts["v1"], device="cuda", precision="bf16")
    rows = [("a", "b", "c")] * 3
    for x, y in zip(cpu.run(TEXTS, PAIRS, rows), gpu.run(TEXTS, PAIRS, rows)):
        for t in ("a", "b", "c"):
            np.testing.assert_allclose(y[t], x[t], atol=0.05)


def test_token_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("KDLIB_TEST_TOKEN", raising=False)
    assert read_token("KDLIB_TEST_TOKEN", None) is None
    monkeypatch.setenv("KDLIB_TEST_TOKEN", "from-env")
    assert read_token("KDLIB_TEST_TOKEN", None) == "from-env"
    (tmp_path / "t").write_text("from-file\n")
    assert read_token("KDLIB_TEST_TOKEN", str(tmp_path / "t")) == "from-file"
    (tmp_path / "empty").write_text("")
    with pytest.raises(ValueError, match="empty"):
        read_token("KDLIB_TEST_TOKEN", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="does not exist"):
        read_token("KDLIB_TEST_TOKEN", str(tmp_path / "missing"))


def test_serve_config_file_is_a_valid_serve_deploy_config():
    from ray.serve.schema import ServeDeploySchema

    from kdlib.serve.app import DEPLOYMENT, build_app

    path = ROOT / "configs" / "serve" / "serve_config.yaml"
    assert path.read_text().startswith("# serve deploy configs/serve/serve_config.yaml")
    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    assert config.http_options.host == "127.0.0.1"
    (app,) = config.applications
    assert app.import_path == "kdlib.serve.app:build_app"
    args = ServeArgs.model_validate(app.args)  # every arg is a known setting
    assert args.token_file is None and "token" not in {k for k in app.args if k not in ("token_env", "token_file",
                                                                                        "require_token")}
    (deployment,) = app.deployments
    assert deployment.name == DEPLOYMENT and set(deployment.user_config) == {"model_dir", "quantize"}
    build_app(app.args)  # builds without a model_dir (the user_config gives it)
    with pytest.raises(ValueError, match="max_inputs_per_request"):
        ServeArgs(max_batch_size=4, max_inputs_per_request=8)


def test_job_refuses_bad_settings_before_starting_anything(artifacts, tmp_path, capsys):
    job = runpy.run_path(str(ROOT / "jobs" / "serve.py"), run_name="serve_job")
    assert job["main"](["--model", str(tmp_path)]) == 2
    assert "neither a model artifact" in capsys.readouterr().err
    assert job["main"](["--model", str(artifacts["v1"]), "--max-inputs-per-request", "65"]) == 2
    assert "must not exceed max_batch_size" in capsys.readouterr().err
    assert job["main"](["--model", str(artifacts["v1"]), "--quantize", "int8", "--num-gpus", "1"]) == 2
    assert "quantize int8 (dynamic int8 linear layers) runs on CPUs" in capsys.readouterr().err


def _other_value(annotation, default):
    """A valid value of a ServeArgs field that differs from its default, as a command-line word and as typed."""
    options = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    kind = options[0]
    if typing.get_origin(annotation) is typing.Literal:
        value = next(a for a in typing.get_args(annotation) if a != default)
    elif kind is bool:
        value = not default
    elif kind is int:
        value = (default or 0) + 1
    elif kind is float:
        value = default + 0.5
    else:
        value = f"/other/{default}"
    return str(value), value


def test_every_serve_setting_is_a_flag_of_the_job_with_its_default(artifacts, tmp_path, monkeypatch):
    job = runpy.run_path(str(ROOT / "jobs" / "serve.py"), run_name="serve_job")
    launch, flags = job["parse_args"](["--model", "m"])
    assert (launch.model, launch.host, launch.port, launch.detach) == ("m", "127.0.0.1", 8000, False)
    assert flags == ServeArgs().model_dump(exclude={"model_dir"})  # --model gives model_dir
    # Every field given a non-default value on the command line reaches the replicas' ServeArgs, typed.
    monkeypatch.chdir(tmp_path)
    argv, expected = ["--model", str(artifacts["v1"])], {}
    for name, field in ServeArgs.model_fields.items():
        if name not in ("model_dir", "num_gpus"):  # int8 (quantize's other value) runs on CPUs: GPUs below
            word, expected[name] = _other_value(field.annotation, field.default)
            argv += ["--" + name.replace("_", "-")] + ([] if field.annotation is bool else [word])
    args = job["serve_args"](*job["parse_args"](argv))
    assert isinstance(args, ServeArgs) and args.model_dir == str(artifacts["v1"] / "model")
    assert args.model_dump(exclude={"model_dir", "num_gpus"}) == expected
    gpu = job["serve_args"](*job["parse_args"](["--model", str(artifacts["v1"]), "--num-gpus", "0.5"]))
    from kdlib.serve.app import build_app

    assert gpu.num_gpus == 0.5 and build_app(gpu)._bound_deployment.ray_actor_options["num_gpus"] == 0.5
    # A token configured for this launch is required of every replica, even without --require-token.
    (tmp_path / "token").write_text("secret")
    args = job["serve_args"](*job["parse_args"](["--model", str(artifacts["v1"]), "--token-file", "token"]))
    assert args.require_token and args.token_file == str(tmp_path / "token")


@pytest.mark.parametrize("argv, message", [
    (["--max-batch-size", "0"], "argument --max-batch-size: invalid value '0': Input should be greater than or equal"),
    (["--num-cpus", "many"], "argument --num-cpus: invalid value 'many': Input should be a valid number"),
    (["--quantize", "int4"], "argument --quantize: invalid value 'int4': Input should be 'none' or 'int8'"),
    (["--torch-threads", "0"], "argument --torch-threads: invalid value '0': Input should be greater than or equal"),
    (["--port", "http"], "argument --port: invalid value 'http': Input should be a valid integer"),
    (["--max-batch-sise", "8"], "unrecognized arguments: --max-batch-sise 8"),
])
def test_a_bad_flag_value_is_an_error_naming_the_flag(argv, message, capsys):
    job = runpy.run_path(str(ROOT / "jobs" / "serve.py"), run_name="serve_job")
    with pytest.raises(SystemExit) as e:
        job["parse_args"](["--model", "m", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_serve_run_string_args_reach_the_replicas_typed():
    from kdlib.serve.app import build_app

    # `serve run kdlib.serve.app:build_app key=value ...` passes every value as a string.
    app = build_app({"model_dir": "/abs/model", "max_batch_size": "128", "num_cpus": "0.5", "require_token": "true",
                     "torch_threads": "2"})
    (args,) = app._bound_deployment.init_args
    assert isinstance(args, ServeArgs)
    assert (args.max_batch_size, args.num_cpus, args.require_token, args.torch_threads) == (128, 0.5, True, 2)
    with pytest.raises(ValueError, match="max_batch_size\n  Input should be a valid integer"):
        build_app({"max_batch_size": "many"})


# --- over HTTP ------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, token: str, token_file: str, deploy, argv: list[str]):
        self.url, self.token, self.token_file, self.deploy, self.argv = url, token, token_file, deploy, argv

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, headers=kw.pop("headers", self.headers()), timeout=60, **kw)

    def post(self, path: str, body=None, data=None, headers=None) -> requests.Response:
        h = {**self.headers(), **(headers or {})}
        if body is not None:
            data = json.dumps(body)
        return requests.post(self.url + path, data=data, headers={"Content-Type": "application/json", **h},
                             timeout=60)

    def predict(self, body: dict) -> dict:
        r = self.post("/v1/predict", body)
        assert r.status_code == 200, r.text
        return r.json()

    def predict_at(self, path: str, body: dict) -> list[dict]:
        r = self.post(path, body)
        assert r.status_code == 200, r.text
        return r.json()["results"]

    def redeploy(self, model: Path, *extra: str) -> None:
        self.deploy([*self.argv, "--model", str(model), *extra])


@pytest.fixture(scope="module")
def server(ray_session, artifacts, tmp_path_factory):
    from ray import serve

    token = secrets.token_hex(16)
    token_file = tmp_path_factory.mktemp("secret") / "token"
    token_file.write_text(token)
    job = runpy.run_path(str(ROOT / "jobs" / "serve.py"), run_name="serve_job")
    argv = ["--port", str(_free_port()), "--num-cpus", "0.5", "--token-file", str(token_file),
            "--max-inputs-per-request", "8", "--batch-wait-timeout-s", "0.05", "--detach"]
    url = job["deploy"]([*argv, "--model", str(artifacts["v1"])])
    assert url.startswith("http://127.0.0.1:")
    yield Server(url, token, str(token_file), job["deploy"], argv)
    serve.shutdown()


def _items(pairs=None) -> list[dict]:
    return [{"text": t, **({"text_pair": p} if p else {})} for t, p in zip(TEXTS, pairs or [None] * len(TEXTS))]


@pytest.mark.slow
def test_tasks_and_health(server, artifacts):
    version = _version(artifacts, "v1")
    info = server.get("/v1/tasks").json()
    assert info["model_version"] == version and info["quantize"] == "none"
    assert info["tasks"]["a"] == {"kind": "classification", "label_names": ["neg", "pos"], "metric": "accuracy",
                                  "pair": False, "depth": 2, "layers": 1}
    assert info["tasks"]["b"]["kind"] == "regression" and info["tasks"]["b"]["label_names"] is None
    assert {t: x["pair"] for t, x in info["tasks"].items()} == {"a": False, "b": True, "c": False}
    assert set(info["tasks"]) == {"a", "b", "c"}
    health = requests.get(server.url + "/healthz", timeout=30)  # open: probes carry no token
    assert health.status_code == 200 and health.json()["model_version"] == version


@pytest.mark.slow
def test_http_outputs_equal_predict(server, artifacts):
    for task, pairs in (("a", None), ("b", PAIRS), ("c", None)):
        out = server.predict({"task": task, "inputs": _items(pairs)})
        assert out["tasks"] == [task] and out["model_version"].startswith("sha256:")
        np.testing.assert_allclose(_as_array(out["results"], task), _expected(artifacts, "v1", task, pairs),
                                   atol=1e-5)
    out = server.predict({"task": "c", "inputs": _items()})
    ref = _reference(artifacts, "v1", "c", None)
    assert [r["c"]["label"] for r in out["results"]] == [["x", "y", "z"][i] for i in ref.argmax(1)]


@pytest.mark.slow
def test_multi_task_request_equals_single_task_requests(server, artifacts):
    """Single-sentence tasks (a, c) and a sentence-pair task (b) on the same inputs: each reads what it takes,
    as in its own request (text alone for a and c, the pair for b)."""
    multi = server.predict({"tasks": ["c", "a", "b"], "inputs": _items(PAIRS)})
    assert multi["tasks"] == ["c", "a", "b"] and len(multi["results"]) == 3
    for task in ("a", "b", "c"):
        pairs = PAIRS if task == "b" else None
        single = server.predict({"task": task, "inputs": _items(pairs)})
        np.testing.assert_allclose(_as_array(multi["results"], task), _as_array(single["results"], task), atol=1e-5)
        np.testing.assert_allclose(_as_array(multi["results"], task), _expected(artifacts, "v1", task, pairs),
                                   atol=1e-5)


@pytest.mark.slow
def test_bad_requests_get_the_right_status_naming_the_problem(server):
    ok = {"task": "a", "inputs": [{"text": "fine"}]}

    def check(status, body=None, data=None, field=None, contains=None):
        r = server.post("/v1/predict", body, data=data)
        assert r.status_code == status, (body or data, r.status_code, r.text)
        payload = r.json()
        if field is not None:
            assert field in [e["field"] for e in payload["errors"]] and field in payload["error"], payload
        if contains is not None:
            assert contains in payload["error"], payload
        return payload

    assert server.post("/v1/predict", ok).status_code == 200
    check(400, data="{\"task\": \"a\", \"inputs\": [", contains="malformed JSON")
    check(400, data=b"\xff\xfe not json", contains="malformed JSON: the body is not valid UTF-8")
    check(422, {"task": "a", "inputs": [{}]}, field="inputs[0].text")
    check(422, {"task": "a", "inputs": [{"text": ""}]}, field="inputs[0].text")
    check(422, {"task": "a", "inputs": [{"text": "   "}]}, field="inputs[0].text")
    check(422, {"task": "a", "inputs": [{"text": 5}]}, field="inputs[0].text")
    check(422, {"task": "a", "inputs": [{"text": "ok", "text_pair": ["x"]}]}, field="inputs[0].text_pair")
    check(422, {"task": "a", "inputs": [{"txt": "typo"}]}, field="inputs[0].txt")
    check(422, {"task": "a", "inputs": "fine"}, field="inputs")
    check(422, {"task": "a", "inputs": []}, field="inputs")
    check(422, {"task": "a"}, field="inputs")
    check(422, {"tasks": "a", "inputs": [{"text": "x"}]}, field="tasks")
    check(422, {"tasks": [], "inputs": [{"text": "x"}]}, field="tasks")
    check(422, {"inputs": [{"text": "x"}]}, contains="exactly one of 'task'")
    check(422, ["not", "an", "object"])
    unknown = check(404, {"tasks": ["a", "sentiment"], "inputs": [{"text": "x"}]}, contains="'sentiment'")
    assert unknown["known_tasks"] == ["a", "b", "c"]
    check(413, {"task": "a", "inputs": [{"text": "x"}] * 9}, contains="limit of 8")
    check(413, {"task": "a", "inputs": [{"text": "x" * 2001}]}, contains="inputs[0].text")
    check(413, data=json.dumps({"task": "a", "inputs": [{"text": "x" * 1_000_001}]}), contains="bytes")
    # The token guards every route but /healthz.
    for path in ("/v1/tasks", "/v1/stats"):
        assert server.get(path, headers={}).status_code == 401
    r = requests.post(server.url + "/v1/predict", json=ok, timeout=30)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert server.post("/v1/predict", ok, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert server.post("/v1/predict", ok, headers={"Authorization": server.token}).status_code == 401  # no scheme


@pytest.mark.slow
def test_a_pair_task_requires_text_pair_and_a_single_text_task_refuses_it(server):
    """The manifest records which tasks take a sentence pair (b) and which a single text (a, c); a request
    that does not fit gets a 422 naming each offending inputs[i].text_pair."""
    cases = [({"task": "b", "inputs": _items()}, [0, 1, 2], "required: task(s) ['b'] take a sentence pair"),
             ({"task": "a", "inputs": _items(PAIRS)}, [0, 1, 2], "not allowed: task(s) ['a'] take a single text"),
             ({"task": "b", "inputs": [{"text": "x", "text_pair": "y"}, {"text": "x", "text_pair": None}]}, [1],
              "required"),
             ({"tasks": ["c", "b"], "inputs": [{"text": "x", "text_pair": "y"}, {"text": "x"}]}, [1], "required")]
    for body, rows, message in cases:
        r = server.post("/v1/predict", body)
        assert r.status_code == 422, (body, r.status_code, r.text)
        errors = r.json()["errors"]
        assert [e["field"] for e in errors] == [f"inputs[{i}].text_pair" for i in rows], r.json()
        assert message in errors[0]["message"] and f"inputs[{rows[0]}].text_pair" in r.json()["error"]


@pytest.fixture(scope="module")
def replica_before_bad_requests(server) -> str:
    return server.get("/v1/stats").json()["replica"]


OK_INPUT = {"text": "fine"}
# (id, method, path, headers (None: drop the header), body (bytes: sent as they are; else JSON-encoded),
#  the status, the text the error must hold: the offending field, header, method or path)
BAD_REQUESTS = [
    ("empty-body", "POST", "/v1/predict", {}, b"", 400, "empty request body"),
    ("blank-body", "POST", "/v1/predict", {}, b" \n\t ", 400, "empty request body"),
    ("not-json", "POST", "/v1/predict", {}, b"task=a&text=fine", 400, "line 1 column 1"),
    ("truncated-json", "POST", "/v1/predict", {}, b'{"task": "a", "inputs": [', 400, "line 1 column 26"),
    ("trailing-garbage", "POST", "/v1/predict", {}, b'{"task": "a", "inputs": [{"text": "x"}]} x', 400,
     "Extra data: line 1"),
    ("json-array", "POST", "/v1/predict", {}, ["a", {"text": "x"}], 422, "(body)"),
    ("json-string", "POST", "/v1/predict", {}, "fine", 422, "(body)"),
    ("json-null", "POST", "/v1/predict", {}, None, 422, "(body)"),
    ("text-plain", "POST", "/v1/predict", {"Content-Type": "text/plain"}, {"task": "a", "inputs": [OK_INPUT]}, 415,
     "Content-Type"),
    ("curl-form-default", "POST", "/v1/predict", {"Content-Type": "application/x-www-form-urlencoded"},
     {"task": "a", "inputs": [OK_INPUT]}, 415, "Content-Type"),
    ("charset-latin1", "POST", "/v1/predict", {"Content-Type": "application/json; charset=latin-1"},
     {"task": "a", "inputs": [OK_INPUT]}, 415, "charset"),
    ("gzip-encoding", "POST", "/v1/predict", {"Content-Encoding": "gzip"}, {"task": "a", "inputs": [OK_INPUT]}, 415,
     "Content-Encoding"),
    ("missing-inputs", "POST", "/v1/predict", {}, {"task": "a"}, 422, "inputs: Field required"),
    ("inputs-not-a-list", "POST", "/v1/predict", {}, {"task": "a", "inputs": "fine"}, 422, "inputs:"),
    ("inputs-an-object", "POST", "/v1/predict", {}, {"task": "a", "inputs": OK_INPUT}, 422, "inputs:"),
    ("inputs-empty", "POST", "/v1/predict", {}, {"task": "a", "inputs": []}, 422, "inputs:"),
    ("input-a-string", "POST", "/v1/predict", {}, {"task": "a", "inputs": ["fine"]}, 422, "inputs[0]:"),
    ("input-a-list", "POST", "/v1/predict", {}, {"task": "a", "inputs": [["fine"]]}, 422, "inputs[0]:"),
    ("text-missing", "POST", "/v1/predict", {}, {"task": "a", "inputs": [OK_INPUT, {}]}, 422, "inputs[1].text"),
    ("text-null", "POST", "/v1/predict", {}, {"task": "a", "inputs": [{"text": None}]}, 422, "inputs[0].text"),
    ("text-a-number", "POST", "/v1/predict", {}, {"task": "a", "inputs": [{"text": 42}]}, 422, "inputs[0].text"),
    ("text-a-float", "POST", "/v1/predict", {}, {"task": "a", "inputs": [{"text": 1.5}]}, 422, "inputs[0].text"),
    ("text-nan", "POST", "/v1/predict", {}, b'{"task": "a", "inputs": [{"text": NaN}]}', 422, "inputs[0].text"),
    ("text-a-bool", "POST", "/v1/predict", {}, {"task": "a", "inputs": [{"text": True}]}, 422, "inputs[0].text"),
    ("text-a-list", "POST", "/v1/predict", {}, {"task": "a", "inputs": [{"text": ["x"]}]}, 422, "inputs[0].text"),
    ("text-nested-object", "POST", "/v1/predict", {}, {"task": "a", "inputs": [{"text": {"text": "x"}}]}, 422,
     "inputs[0].text"),
    ("text-empty", "POST", "/v1/predict", {}, {"task": "a", "inputs": [{"text": ""}]}, 422, "inputs[0].text"),
    ("text-blank", "POST", "/v1/predict", {}, {"task": "a", "inputs": [{"text": " \n "}]}, 422, "inputs[0].text"),
    ("text-too-long", "POST", "/v1/predict", {}, {"task": "a", "inputs": [{"text": "x" * 2001}]}, 413,
     "inputs[0].text"),
    ("text-pair-too-long", "POST", "/v1/predict", {}, {"task": "b", "inputs": [{"text": "x", "text_pair": "y" * 2001}]},
     413, "inputs[0].text_pair"),
    ("too-many-inputs", "POST", "/v1/predict", {}, {"task": "a", "inputs": [OK_INPUT] * 9}, 413, "inputs exceed"),
    ("body-too-large", "POST", "/v1/predict", {}, {"task": "a", "inputs": [{"text": "x" * 1_000_001}]}, 413,
     "bytes"),
    ("unknown-task", "POST", "/v1/predict", {}, {"task": "sentiment", "inputs": [OK_INPUT]}, 404, "(task)"),
    ("unknown-task-in-tasks", "POST", "/v1/predict", {}, {"tasks": ["a", "sentiment"], "inputs": [OK_INPUT]}, 404,
     "(tasks[1])"),
    ("task-empty-name", "POST", "/v1/predict", {}, {"task": "", "inputs": [OK_INPUT]}, 404, "(task)"),
    ("task-a-number", "POST", "/v1/predict", {}, {"task": 1, "inputs": [OK_INPUT]}, 422, "task:"),
    ("task-a-list", "POST", "/v1/predict", {}, {"task": ["a"], "inputs": [OK_INPUT]}, 422, "task:"),
    ("tasks-not-a-list", "POST", "/v1/predict", {}, {"tasks": "a", "inputs": [OK_INPUT]}, 422, "tasks:"),
    ("tasks-empty", "POST", "/v1/predict", {}, {"tasks": [], "inputs": [OK_INPUT]}, 422, "tasks:"),
    ("tasks-holding-a-number", "POST", "/v1/predict", {}, {"tasks": ["a", 2], "inputs": [OK_INPUT]}, 422,
     "tasks[1]"),
    ("tasks-duplicated", "POST", "/v1/predict", {}, {"tasks": ["a", "c", "a"], "inputs": [OK_INPUT]}, 422,
     "tasks[2]"),
    ("task-and-tasks", "POST", "/v1/predict", {}, {"task": "a", "tasks": ["a"], "inputs": [OK_INPUT]}, 422,
     "exactly one of 'task'"),
    ("no-task", "POST", "/v1/predict", {}, {"inputs": [OK_INPUT]}, 422, "exactly one of 'task'"),
    ("pair-missing", "POST", "/v1/predict", {}, {"task": "b", "inputs": [OK_INPUT]}, 422, "inputs[0].text_pair"),
    ("pair-null-where-required", "POST", "/v1/predict", {}, {"task": "b", "inputs": [{"text": "x", "text_pair": None}]},
     422, "inputs[0].text_pair"),
    ("pair-on-a-single-text-task", "POST", "/v1/predict", {}, {"task": "a", "inputs": [{"text": "x", "text_pair": "y"}]},
     422, "inputs[0].text_pair"),
    ("pair-missing-in-a-mixed-request", "POST", "/v1/predict", {},
     {"tasks": ["a", "b"], "inputs": [{"text": "x", "text_pair": "y"}, OK_INPUT]}, 422, "inputs[1].text_pair"),
    ("pair-empty", "POST", "/v1/predict", {}, {"task": "b", "inputs": [{"text": "x", "text_pair": ""}]}, 422,
     "inputs[0].text_pair"),
    ("pair-a-number", "POST", "/v1/predict", {}, {"task": "b", "inputs": [{"text": "x", "text_pair": 3}]}, 422,
     "inputs[0].text_pair"),
    ("extra-top-level-field", "POST", "/v1/predict", {}, {"task": "a", "inputs": [OK_INPUT], "model": "x"}, 422,
     "model: Extra inputs"),
    ("extra-input-field", "POST", "/v1/predict", {}, {"task": "a", "inputs": [{"text": "x", "label": 1}]}, 422,
     "inputs[0].label"),
    ("misspelt-field", "POST", "/v1/predict", {}, {"task": "a", "inputs": [{"txt": "x"}]}, 422, "inputs[0].txt"),
    ("duplicate-json-key", "POST", "/v1/predict", {}, b'{"task": "a", "task": "b", "inputs": [{"text": "x"}]}', 400,
     "duplicate key 'task'"),
    ("invalid-utf8", "POST", "/v1/predict", {}, b'{"task": "a", "inputs": [{"text": "caf\xe9"}]}', 400,
     "byte 0xe9 at position 38"),
    ("utf16-body", "POST", "/v1/predict", {}, '{"task": "a", "inputs": [{"text": "x"}]}'.encode("utf-16"), 400,
     "not valid UTF-8"),
    ("lone-surrogate-text", "POST", "/v1/predict", {}, b'{"task": "a", "inputs": [{"text": "ok \\ud800"}]}', 422,
     "inputs[0].text"),
    ("lone-surrogate-pair", "POST", "/v1/predict", {},
     b'{"task": "b", "inputs": [{"text": "ok", "text_pair": "\\udfff"}]}', 422, "inputs[0].text_pair"),
    ("lone-surrogate-key", "POST", "/v1/predict", {}, b'{"task": "a", "inputs": [{"text": "ok", "\\ud800": 1}]}',
     422, "inputs[0].\\ud800"),
    ("lone-surrogate-task", "POST", "/v1/predict", {}, b'{"task": "\\udc00", "inputs": [{"text": "ok"}]}', 422,
     "task:"),
    ("nested-too-deep", "POST", "/v1/predict", {}, b"[" * 100_000, 400, "nested too deeply"),
    ("huge-number", "POST", "/v1/predict", {}, b'{"task": "a", "inputs": [{"text": ' + b"9" * 5000 + b"}]}", 400,
     "5000 digits"),
    ("get-predict", "GET", "/v1/predict", {}, None, 405, "method GET"),
    ("put-predict", "PUT", "/v1/predict", {}, {"task": "a", "inputs": [OK_INPUT]}, 405, "method PUT"),
    ("delete-predict", "DELETE", "/v1/predict", {}, None, 405, "method DELETE"),
    ("patch-predict", "PATCH", "/v1/predict", {}, {"task": "a", "inputs": [OK_INPUT]}, 405, "method PATCH"),
    ("post-tasks", "POST", "/v1/tasks", {}, {"task": "a", "inputs": [OK_INPUT]}, 405, "method POST"),
    ("wrong-path", "POST", "/v1/predicts", {}, {"task": "a", "inputs": [OK_INPUT]}, 404, "/v1/predicts"),
    ("old-path", "POST", "/predict", {}, {"task": "a", "inputs": [OK_INPUT]}, 404, "/predict"),
    ("no-authorization", "POST", "/v1/predict", {"Authorization": None}, {"task": "a", "inputs": [OK_INPUT]}, 401,
     "Authorization"),
    ("bearer-without-token", "POST", "/v1/predict", {"Authorization": "Bearer"}, {"task": "a", "inputs": [OK_INPUT]},
     401, "Authorization"),
    ("bearer-wrong-token", "POST", "/v1/predict", {"Authorization": "Bearer wrong"},
     {"task": "a", "inputs": [OK_INPUT]}, 401, "Authorization"),
    ("basic-scheme", "POST", "/v1/predict", {"Authorization": "Basic dXNlcjpwYXNz"},
     {"task": "a", "inputs": [OK_INPUT]}, 401, "Authorization"),
    ("token-scheme", "POST", "/v1/predict", {"Authorization": "Token {token}"}, {"task": "a", "inputs": [OK_INPUT]},
     401, "Authorization"),
    ("token-without-scheme", "POST", "/v1/predict", {"Authorization": "{token}"}, {"task": "a", "inputs": [OK_INPUT]},
     401, "Authorization"),
    ("token-with-a-suffix", "POST", "/v1/predict", {"Authorization": "Bearer {token}x"},
     {"task": "a", "inputs": [OK_INPUT]}, 401, "Authorization"),
    ("token-twice", "POST", "/v1/predict", {"Authorization": "Bearer {token} {token}"},
     {"task": "a", "inputs": [OK_INPUT]}, 401, "Authorization"),
    ("non-ascii-authorization", "POST", "/v1/predict", {"Authorization": b"Bearer \xff\xfe"},
     {"task": "a", "inputs": [OK_INPUT]}, 401, "Authorization"),
    ("tasks-route-without-token", "GET", "/v1/tasks", {"Authorization": None}, None, 401, "Authorization"),
]


@pytest.mark.slow
@pytest.mark.parametrize("method, path, headers, body, status, named",
                         [pytest.param(*case[1:], id=case[0]) for case in BAD_REQUESTS])
def test_a_bad_request_is_a_4xx_naming_what_is_wrong(server, replica_before_bad_requests, method, path, headers,
                                                   body, status, named):
    sent = {"Content-Type": "application/json", **server.headers()}
    for key, value in headers.items():
        if value is None:
            sent.pop(key)
        else:
            sent[key] = value.format(token=server.token) if isinstance(value, str) else value
    data = body if isinstance(body, bytes) else (json.dumps(body) if body is not None or method == "POST" else None)
    r = requests.request(method, server.url + path, data=data, headers=sent, timeout=60)
    assert r.status_code == status, (r.status_code, r.text[:500])
    payload = r.json()
    assert set(payload) <= {"error", "errors", "field", "limit", "known_tasks"}, payload
    assert named in payload["error"], payload
    if "errors" in payload:  # each listed error names a field
        assert all(e["field"] and e["message"] for e in payload["errors"]), payload


@pytest.mark.slow
def test_the_replica_is_healthy_after_the_bad_requests(server, artifacts, replica_before_bad_requests):
    assert len(BAD_REQUESTS) >= 30
    health = requests.get(server.url + "/healthz", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert server.get("/v1/stats").json()["replica"] == replica_before_bad_requests  # the same replica: no restart
    out = server.predict({"tasks": ["a", "b"], "inputs": _items(PAIRS)})
    np.testing.assert_allclose(_as_array(out["results"], "b"), _expected(artifacts, "v1", "b", PAIRS), atol=1e-5)
    # Without a Content-Type (requests' data=, curl --data-binary with -H 'Content-Type:') the body reads as JSON.
    r = requests.post(server.url + "/v1/predict", data=json.dumps({"task": "a", "inputs": _items()}),
                      headers=server.headers(), timeout=60)
    assert r.status_code == 200 and "content-type" not in {k.lower() for k in r.request.headers}
    np.testing.assert_allclose(_as_array(r.json()["results"], "a"), _expected(artifacts, "v1", "a", None), atol=1e-5)


@pytest.mark.slow
def test_concurrent_requests_for_different_tasks_share_batches(server, artifacts):
    before = server.get("/v1/stats").json()
    bodies = [{"task": "a", "inputs": _items()}, {"task": "b", "inputs": _items(PAIRS)},
              {"tasks": ["c", "a"], "inputs": _items()}] * 4
    barrier, answers = threading.Barrier(len(bodies)), [None] * len(bodies)

    def send(i):
        barrier.wait()
        answers[i] = server.predict(bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = server.get("/v1/stats").json()
    assert stats["requests"] - before["requests"] == len(bodies)
    assert stats["batches"] - before["batches"] < len(bodies), stats  # some requests were answered together
    assert stats["max_batch_requests"] > 1 and stats["max_batch_tasks"] > 1, stats
    for body, out in zip(bodies, answers):  # batching changes no answer
        for task in out["tasks"]:
            pairs = PAIRS if "text_pair" in body["inputs"][0] else None
            np.testing.assert_allclose(_as_array(out["results"], task), _expected(artifacts, "v1", task, pairs),
                                       atol=1e-5)


def _scrape_metrics(ray) -> list[tuple[str, dict, float]]:
    """Every sample (name, labels, value) that the nodes' metrics agents export for Prometheus to scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = []
    for node in ray.nodes():
        if node["Alive"] and node.get("MetricsExportPort"):
            text = requests.get(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics",
                                timeout=30).text
            samples += [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text)
                        for s in fam.samples]
    return samples


def _metric(samples, name: str, **labels) -> float:
    """The sum over all series (replicas, workers) of `name` whose labels include `labels`."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


@pytest.mark.slow
def test_request_counts_and_latencies_are_exported_as_metrics(server, ray_session):
    """The app's ray.serve.metrics (requests by route and status code, latency histogram, inputs per task)
    reach the Prometheus endpoint of Ray's metrics agent, scraped over HTTP like Prometheus does."""
    app = {"application": "kdlib"}
    wanted = {  # (metric, labels) -> at least this increase
        ("ray_kdlib_serve_requests_total", (("route", "/v1/predict"), ("code", "200"))): 5,
        ("ray_kdlib_serve_requests_total", (("route", "/v1/predict"), ("code", "422"))): 2,
        ("ray_kdlib_serve_requests_total", (("route", "/v1/predict"), ("code", "401"))): 1,
        ("ray_kdlib_serve_latency_ms_count", (("route", "/v1/predict"),)): 8,
        ("ray_kdlib_serve_latency_ms_bucket", (("route", "/v1/predict"), ("le", "+Inf"))): 8,
        ("ray_kdlib_serve_task_inputs_total", (("task", "a"),)): 5 * len(TEXTS),
    }

    def values(samples) -> dict:
        return {key: _metric(samples, key[0], **app, **dict(key[1])) for key in wanted}

    before_samples = _scrape_metrics(ray_session)
    before = values(before_samples)
    latency_sum = _metric(before_samples, "ray_kdlib_serve_latency_ms_sum", route="/v1/predict", **app)
    for _ in range(5):
        server.predict({"task": "a", "inputs": _items()})
    for _ in range(2):
        assert server.post("/v1/predict", {"task": "a", "inputs": [{}]}).status_code == 422
    assert requests.post(server.url + "/v1/predict", json={"task": "a", "inputs": _items()},
                         timeout=30).status_code == 401

    # Replicas report their metrics every few seconds (RAY_metrics_report_interval_ms, 10 s by default).
    deltas = {}

    def exported():
        samples = _scrape_metrics(ray_session)
        deltas.update({k: v - before[k] for k, v in values(samples).items()})
        deltas["latency_sum"] = _metric(samples, "ray_kdlib_serve_latency_ms_sum", route="/v1/predict",
                                        **app) - latency_sum
        return all(deltas[k] >= n for k, n in wanted.items())

    try:
        _wait_for(exported, timeout_s=120)
    except TimeoutError:
        pytest.fail(f"metrics not exported: increases {deltas}, wanted at least {wanted}")
    assert deltas["latency_sum"] > 0, deltas


@pytest.mark.slow
def test_live_updates_under_load_fail_no_request(server, artifacts):
    """Replace c and add d (v2), then remove b (v3), while 4 threads keep asking for task a."""
    reference = _expected(artifacts, "v1", "a", None)
    seen, wrong, lock, stop = set(), [], threading.Lock(), threading.Event()

    def on_response(payload, status, body):
        if status == 200:
            with lock:
                seen.add(body["model_version"])
                if not np.allclose(_as_array(body["results"], "a"), reference, atol=1e-5):
                    wrong.append(body)

    load = {}
    thread = threading.Thread(target=lambda: load.update(run_load_test(
        server.url + "/v1/predict", [{"task": "a", "inputs": _items()}], concurrency=4, total=100_000,
        token=server.token, max_seconds=240, on_response=on_response, stop=stop)))
    thread.start()
    try:
        time.sleep(1.0)
        versions = []
        for v in ("v2", "v3"):
            server.redeploy(artifacts[v])
            versions.append(server.get("/v1/tasks").json()["model_version"])
            time.sleep(1.0)
    finally:
        stop.set()
        thread.join()
    assert load["errors"] == 0, load
    assert load["requests"] > 20 and not wrong, (load, wrong[:1])
    v2, v3 = _version(artifacts, "v2"), _version(artifacts, "v3")
    assert versions == [v2, v3] and {v2, v3} <= seen, (versions, seen)
    info = server.get("/v1/tasks").json()
    assert set(info["tasks"]) == {"a", "c", "d"} and info["model_version"] == v3
    out = server.predict({"tasks": ["c", "d"], "inputs": _items()})  # the replaced and the added branch
    np.testing.assert_allclose(_as_array(out["results"], "c"), _expected(artifacts, "v2", "c", None), atol=1e-5)
    np.testing.assert_allclose(_as_array(out["results"], "d"), _expected(artifacts, "v2", "d", None), atol=1e-5)
    assert server.post("/v1/predict", {"task": "b", "inputs": _items()}).status_code == 404  # removed
    print(f"\nlive updates under load: {load['requests']} requests, {load['errors']} errors, "
          f"{load['requests_per_s']:.1f} req/s, p50 {load['p50_ms']:.1f} ms, p99 {load['p99_ms']:.1f} ms")


@pytest.mark.slow
def test_serve_deploy_config_updates_the_model_in_place(server, artifacts):
    """The `serve deploy configs/serve/serve_config.yaml` path: a new user_config reaches the running replica
    through reconfigure (the same replica, no restart) while requests keep flowing; a tampered artifact is
    refused and the current version keeps serving."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((ROOT / "configs" / "serve" / "serve_config.yaml").read_text())
    (app,) = raw["applications"]
    app.update(name="kdlib-config", route_prefix="/config")
    app["args"].update(token_file=server.token_file, require_token=True, batch_wait_timeout_s=0.02)
    (deployment,) = app["deployments"]
    deployment["ray_actor_options"]["num_cpus"] = 0.5

    def apply(version: str) -> None:
        deployment["user_config"]["model_dir"] = str(artifacts[version])
        # What the dashboard's REST handler does with the file `serve deploy` sends it (the session's Ray
        # runs without a dashboard): the controller applies the config declaratively.
        _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": [app]}))

    def serving(version: str):
        return lambda: server.get("/config/v1/tasks").json().get("model_version") == _version(artifacts, version)

    try:
        apply("v1")
        _wait_for(serving("v1"))
        before = server.get("/config/v1/stats").json()
        stop, load = threading.Event(), {}
        thread = threading.Thread(target=lambda: load.update(run_load_test(
            server.url + "/config/v1/predict", [{"tasks": ["a", "c"], "inputs": _items()}], concurrency=4,
            total=100_000, token=server.token, max_seconds=180, stop=stop)))
        thread.start()
        try:
            time.sleep(1.0)
            apply("v2")
            _wait_for(serving("v2"))
            time.sleep(1.0)
        finally:
            stop.set()
            thread.join()
        assert load["errors"] == 0 and load["requests"] > 10, load
        after = server.get("/config/v1/stats").json()
        assert after["replica"] == before["replica"] and after["model_loads"] == before["model_loads"] + 1
        apply("tampered")
        health = _wait_for(lambda: requests.get(server.url + "/config/healthz", timeout=30).json()
                           .get("last_update_error"))
        assert "checksum mismatch" in health
        assert serving("v2")() and server.get("/config/v1/stats").json()["replica"] == before["replica"]
        out = server.predict_at("/config/v1/predict", {"task": "d", "inputs": _items()})
        np.testing.assert_allclose(_as_array(out, "d"), _expected(artifacts, "v2", "d", None), atol=1e-5)
    finally:
        serve.delete("kdlib-config")


@pytest.mark.slow
def test_int8_deployment_answers_close_to_float(server, artifacts):
    float_out = server.predict({"tasks": ["a", "c"], "inputs": _items()})
    server.redeploy(artifacts["v3"], "--quantize", "int8")
    info = server.get("/v1/tasks").json()
    assert info["quantize"] == "int8" and info["model_version"] == float_out["model_version"] + "+int8"
    q = server.predict({"tasks": ["a", "c"], "inputs": _items()})
    for task in ("a", "c"):
        np.testing.assert_allclose(_as_array(q["results"], task), _as_array(float_out["results"], task), atol=0.05)
    assert resolve_model_dir(artifacts["v3"]) == Path(info["model_dir"])


@pytest.mark.slow
def test_a_replica_without_the_gpu_it_asked_for_says_so_in_healthz(server, artifacts):
    """--num-gpus 0.5 on the session Ray's logical GPUs: Ray gives the replica its GPU share, the replica finds
    no CUDA, serves on the CPU, and /healthz answers 503 naming the problem (a load balancer's probe takes it
    out). --precision bf16 reaches the replica. Then back to a CPU replica."""
    server.redeploy(artifacts["v1"], "--num-gpus", "0.5", "--precision", "bf16")
    health = requests.get(server.url + "/healthz", timeout=30)
    assert health.status_code == 503, health.text
    body = health.json()
    assert body["status"] == "no gpu" and body["device"] == "cpu" and body["precision"] == "bf16"
    assert "asked Ray for 0.5 GPU (num_gpus) but sees no CUDA device" in body["gpu_error"]
    info = server.get("/v1/tasks").json()
    assert info["device"] == "cpu" and info["precision"] == "bf16"
    assert server.predict({"task": "a", "inputs": _items()})["results"]  # it still answers
    server.redeploy(artifacts["v1"])
    assert requests.get(server.url + "/healthz", timeout=30).status_code == 200


@pytest.mark.slow
def test_the_endpoint_serves_an_end_to_end_student_and_updates_live_between_kinds(server, artifacts, students):
    """A live update from the merged model to a CMOW run folder, then to per-task BiLSTM copies, and back: the
    same API, token, errors and batching; /v1/tasks says which kind is served."""
    for kind in ("cmow", "bilstm"):
        server.redeploy(students[kind])
        info = server.get("/v1/tasks").json()
        assert info["kind"] == kind and set(info["tasks"]) == {"a", "b", "c"}
        assert info["tasks"]["b"] == {"kind": "regression", "label_names": None, "metric": "pearson", "pair": True,
                                      "model": "b" if kind == "bilstm" else "multitask"}
        out = server.predict({"tasks": ["c", "a", "b"], "inputs": _items(PAIRS)})
        for task in ("a", "b", "c"):
            np.testing.assert_allclose(_as_array(out["results"], task),
                                       _student_expected(students[kind], task, PAIRS if task == "b" else None),
                                       atol=1e-5)
        r = server.post("/v1/predict", {"task": "b", "inputs": _items()})  # a pair task without text_pair
        assert r.status_code == 422 and "inputs[0].text_pair" in r.text, r.text
        assert server.post("/v1/predict", {"task": "zz", "inputs": _items()}).status_code == 404
        assert requests.post(server.url + "/v1/predict", json={"task": "a", "inputs": _items()},
                             timeout=30).status_code == 401  # no token
    server.redeploy(artifacts["v1"])
    assert server.get("/v1/tasks").json()["kind"] == "branched"


# --- jobs/serve.py as a process: its own embedded Ray ---------------------------------------------------------


def _job_env() -> dict:
    """The environment of a jobs/serve.py process: no cluster to join, no token, this checkout's kdlib."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "KDLIB_SERVE_TOKEN")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def _gone(pid: int) -> bool:
    """Whether process `pid` has exited (a zombie no one reaped yet counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.mark.slow
def test_detach_without_a_cluster_leaves_the_server_running_until_killed(artifacts, tmp_path):
    """`--detach` on the embedded Ray: the job returns once the server answers, and it keeps answering after
    the job has exited, until `kill <pid>` stops it gracefully. Served: an artifact that does not record which
    tasks take a pair, so either is taken (and read as given)."""
    port, log = _free_port(), tmp_path / "detached.log"
    argv = [sys.executable, str(ROOT / "jobs" / "serve.py"), "--model", str(artifacts["legacy"]), "--port", str(port),
            "--num-cpus", "0.5", "--detach", "--log-file", str(log)]
    done = subprocess.run(argv, env=_job_env(), capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, (done.stdout, done.stderr, log.read_text() if log.exists() else "")
    pid = int(re.search(r"\(pid (\d+)\)", done.stdout).group(1))
    url = f"http://127.0.0.1:{port}"
    try:
        assert f"at {url}/v1/predict" in done.stdout and f"kill {pid}" in done.stdout
        assert not _gone(pid)
        health = requests.get(url + "/healthz", timeout=30)
        assert health.status_code == 200 and health.json()["model_version"] == _version(artifacts, "v1")
        for task, pairs in (("a", PAIRS), ("a", None), ("b", None), ("b", PAIRS)):
            r = requests.post(url + "/v1/predict", json={"task": task, "inputs": _items(pairs)}, timeout=60)
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(_as_array(r.json()["results"], task), _expected(artifacts, "v1", task, pairs),
                                       atol=1e-5)
        # The port is taken: a second detached server is refused before anything starts.
        again = subprocess.run(argv[:-2], env=_job_env(), capture_output=True, text=True, timeout=300, check=False)
        assert again.returncode == 2 and f"port {port} on 127.0.0.1 is not free" in again.stderr, again.stderr
    finally:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 120
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.5)
    assert _gone(pid)
    output = log.read_text()
    assert "[serve] stopped" in output and "Traceback" not in output, output[-3000:]
    # fp32 replicas on a CPU with AMX: the server's log says that --precision bf16 is faster (kdlib.device)
    assert ("(AMX): --precision bf16 is faster here" in output) == (cpu_bf16_support() == "amx"), output[-3000:]
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/healthz", timeout=10)


@pytest.mark.slow
def test_sigterm_answers_the_requests_in_flight_and_exits_0(artifacts, tmp_path):
    """A service manager's stop: SIGTERM while requests wait in a batch (batch_wait_timeout_s 5 s); each is
    answered with 200 after the signal, the job exits 0 soon after, and its stderr holds no traceback."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    out, err = (tmp_path / "stdout").open("w+"), (tmp_path / "stderr").open("w+")
    job = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "serve.py"), "--model", str(artifacts["v1"]), "--port",
                            str(port), "--num-cpus", "0.5", "--batch-wait-timeout-s", "5"],
                           env=_job_env(), stdout=out, stderr=err)
    try:
        _wait_for(lambda: job.poll() is not None or requests.get(url + "/healthz", timeout=5).status_code == 200,
                  timeout_s=600)
        assert job.poll() is None, Path(err.name).read_text()[-3000:]
        answers = {}

        def send(i: int) -> None:
            r = requests.post(url + "/v1/predict", json={"task": "b", "inputs": _items(PAIRS)}, timeout=120)
            answers[i] = (r.status_code, r.json(), time.monotonic())

        threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(2.0)  # the requests wait in the replica's batch (5 s)
        assert not answers
        signalled = time.monotonic()
        job.send_signal(signal.SIGTERM)
        code = job.wait(timeout=90)
        stopped = time.monotonic()
        for t in threads:
            t.join(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    stderr = Path(err.name).read_text()
    assert code == 0, stderr[-3000:]
    assert stopped - signalled < 60
    assert len(answers) == 4 and all(status == 200 for status, _, _ in answers.values()), answers
    assert all(at > signalled for _, _, at in answers.values())  # in flight when the signal came
    for _, body, _ in answers.values():
        np.testing.assert_allclose(_as_array(body["results"], "b"), _expected(artifacts, "v1", "b", PAIRS), atol=1e-5)
    assert "Traceback" not in stderr and "SIGTERM received" not in stderr, stderr[-3000:]
    assert "[serve] SIGTERM: answering the requests in flight" in stderr and "[serve] stopped" in stderr
