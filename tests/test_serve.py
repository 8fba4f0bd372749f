"""The Ray Serve endpoint (kdlib/serve, jobs/serve.py) on tiny merged artifacts, over real HTTP.

Serve starts once for the module, through jobs/serve.py's `deploy`, on a free port of 127.0.0.1 in the
session's Ray, and shuts down at the end of the module.
"""

from __future__ import annotations

import json
import runpy
import secrets
import shutil
import socket
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
from kdlib.branched import BranchedModel, BranchSpec
from kdlib.encoder import encoder_fingerprint, load_encoder, load_tokenizer, resolve_encoder_path
from kdlib.predict import predict
from kdlib.serve.api import ServeArgs, read_token
from kdlib.serve.loadtest import run_load_test
from kdlib.serve.model import Job, ModelSlot, ServedModel, resolve_model_dir
from kdlib.serve.quantize import compare_float_int8

ROOT = Path(__file__).resolve().parent.parent
ENCODER = "sentence-transformers/all-MiniLM-L6-v2"  # its real WordPiece tokenizer; random tiny weights
TINY = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 64}
MAX_LENGTH = 32
TASKS = {"a": {"kind": "classification", "label_names": ["neg", "pos"], "metric": "accuracy"},
         "b": {"kind": "regression", "label_names": [], "metric": "pearson"},
         "c": {"kind": "classification", "label_names": ["x", "y", "z"], "metric": "accuracy"},
         "d": {"kind": "classification", "label_names": ["no", "yes"], "metric": "f1"}}
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
    """v1: a, b, c. v2: c replaced, d added. v3: b removed. Each a run folder with results.json."""
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
    return {"v1": v1, "v2": v2, "v3": v3, "tampered": tampered, "tokenizer": load_tokenizer(resolve_encoder_path(ENCODER))}


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
    """One run over rows asking for different tasks (at depths 1, 2, 3) equals predict task by task."""
    served = ServedModel.load(artifacts["v1"])  # a run folder: its results.json names the model
    assert served.model_dir == str((artifacts["v1"] / "model").resolve())
    jobs = [Job(TEXTS, [None] * 3, ("a",)), Job(TEXTS, PAIRS, ("b", "c")), Job(TEXTS, [None] * 3, ("c", "a"))]
    answers = served.infer(jobs)
    np.testing.assert_allclose(_as_array(answers[0], "a"), _expected(artifacts, "v1", "a", None), atol=1e-5)
    np.testing.assert_allclose(_as_array(answers[1], "b"), _expected(artifacts, "v1", "b", PAIRS), atol=1e-5)
    np.testing.assert_allclose(_as_array(answers[1], "c"), _expected(artifacts, "v1", "c", PAIRS), atol=1e-5)
    np.testing.assert_allclose(_as_array(answers[2], "c"), _expected(artifacts, "v1", "c", None), atol=1e-5)
    assert answers[0][0]["a"]["label"] in ("neg", "pos")
    # A row mixing in a text pair does not change the rows without one.
    mixed = served.run(TEXTS, [None, "x y", None], [("a",)] * 3)
    ref = _reference(artifacts, "v1", "a", None)
    np.testing.assert_allclose(np.stack([mixed[0]["a"], mixed[2]["a"]]), ref[[0, 2]], atol=1e-5)


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
        if name != "model_dir":
            word, expected[name] = _other_value(field.annotation, field.default)
            argv += ["--" + name.replace("_", "-")] + ([] if field.annotation is bool else [word])
    args = job["serve_args"](*job["parse_args"](argv))
    assert isinstance(args, ServeArgs) and args.model_dir == str(artifacts["v1"] / "model")
    assert args.model_dump(exclude={"model_dir"}) == expected
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
                                  "depth": 2, "layers": 1}
    assert info["tasks"]["b"]["kind"] == "regression" and info["tasks"]["b"]["label_names"] is None
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
def test_multi_task_request_equals_single_task_requests(server):
    multi = server.predict({"tasks": ["c", "a", "b"], "inputs": _items(PAIRS)})
    assert multi["tasks"] == ["c", "a", "b"] and len(multi["results"]) == 3
    for task in ("a", "b", "c"):
        single = server.predict({"task": task, "inputs": _items(PAIRS)})
        np.testing.assert_allclose(_as_array(multi["results"], task), _as_array(single["results"], task), atol=1e-5)


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
    check(400, data=b"\xff\xfe not json", contains="malformed JSON")
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
