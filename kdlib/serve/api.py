"""The HTTP contract of the model server: settings, request schema, checks and their status codes.

Every client mistake maps to a 4xx naming what is wrong, never a 500:
400 an empty body, malformed JSON or a body that is not UTF-8; 401 missing or wrong bearer token;
404 unknown task (the known ones listed) or route; 405 a method the route does not take; 413 body,
input count or text over the limit; 415 a Content-Type other than JSON or a Content-Encoding;
422 a missing, empty, wrongly typed or not allowed field (named), including `text_pair` where the
requested tasks require or refuse one (see `check_pairs`).
"""

from __future__ import annotations

import hmac
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, field_validator, model_validator


class ServeArgs(BaseModel):
    """Application arguments (`build_app(args)`, the `args:` of a Serve config, the flags of jobs/serve.py).

    The single source of defaults; each description is also the help of the field's jobs/serve.py flag."""

    model_config = ConfigDict(extra="forbid")

    model_dir: str | None = Field(None, description="artifact or run folder; absent: the deployment's user_config "
                                                    "must give it")
    quantize: Literal["none", "int8"] = Field("none", description="int8: dynamic int8 linear layers")
    tokenizer_path: str | None = Field(None, description="tokenizer folder; default: the encoder recorded in the "
                                                         "model's manifest")
    max_batch_size: int = Field(64, ge=1, description="inputs (not requests) per batch across concurrent requests")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="seconds a batch waits to fill")
    max_inputs_per_request: int = Field(64, ge=1, description="more inputs in one request: 413")
    max_text_chars: int = Field(2000, ge=1, description="a longer text or text_pair: 413")
    max_body_bytes: int = Field(1_000_000, ge=1, description="a larger request body: 413")
    max_ongoing_requests: int = Field(64, ge=1, description="requests a replica accepts at once")
    num_replicas: int = Field(1, ge=1, description="replicas, each holding a copy of the model")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (0.5: two replicas share one); the model "
                                                   "runs on the GPU Ray assigns")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: autocast on the replica's device, linear "
                                                                   "weights held in bf16 (GPUs: about 2x the inputs/s "
                                                                   "of fp32; CPUs with AMX: 1.4x at 1 input, 2.8x at "
                                                                   "32, jobs/benchmark.py precision)")
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads per replica; default: Ray's "
                                                              "(the replica's CPUs)")
    token_env: str = Field("KDLIB_SERVE_TOKEN", description="the environment variable holding the bearer token "
                                                            "(its name, not the token)")
    token_file: str | None = Field(None, description="file holding the bearer token (e.g. a mounted Kubernetes "
                                                     "Secret); wins over token_env")
    require_token: bool = Field(False, description="refuse to start without a token instead of serving "
                                                   "unauthenticated")

    @model_validator(mode="after")
    def _int8_runs_on_cpus(self):
        if self.quantize == "int8" and self.num_gpus > 0:
            raise ValueError("quantize int8 (dynamic int8 linear layers) runs on CPUs; on a GPU use precision bf16 "
                             "and quantize none")
        return self

    @model_validator(mode="after")
    def _request_fits_a_batch(self):
        if self.max_inputs_per_request > self.max_batch_size:
            raise ValueError(f"max_inputs_per_request ({self.max_inputs_per_request}) must not exceed "
                             f"max_batch_size ({self.max_batch_size}): a request is never split across batches")
        return self


class UserConfig(BaseModel):
    """What a live update may change (the deployment's `user_config`)."""

    model_config = ConfigDict(extra="forbid")

    model_dir: str
    quantize: Literal["none", "int8"] = "none"


class InputItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: StrictStr
    text_pair: StrictStr | None = None

    @field_validator("text", "text_pair")
    @classmethod
    def _non_empty_unicode(cls, v):
        if v is not None and not v.strip():
            raise ValueError("must be a non-empty string")
        at = lone_surrogate_at(v) if v is not None else None
        if at is not None:
            raise ValueError(surrogate_message(v, at))
        return v


class PredictRequest(BaseModel):
    """`{"task": "sst2" | "tasks": ["sst2", "stsb"], "inputs": [{"text": ..., "text_pair": ...}, ...]}`"""

    model_config = ConfigDict(extra="forbid")

    task: StrictStr | None = None
    tasks: list[StrictStr] | None = Field(None, min_length=1)
    inputs: list[InputItem] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_of_task_or_tasks(self):
        if (self.task is None) == (self.tasks is None):
            raise ValueError("give exactly one of 'task' (a name) or 'tasks' (a list of names)")
        return self

    def task_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([self.task] if self.task is not None else self.tasks))


class ClientError(Exception):
    """A request the client got wrong: the status code and a body naming what is wrong."""

    def __init__(self, status: int, message: str, **details):
        super().__init__(message)
        self.status, self.message, self.details = status, message, details

    def body(self) -> dict:
        return printable({"error": self.message, **self.details})


def printable(value):
    """`value` with any lone surrogate in its strings written as its escape (`\\ud800`): a field name
    or message echoing a client's bad text must still encode as the UTF-8 of a JSON response."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {printable(k): printable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [printable(v) for v in value]
    return value


def invalid(errors: list[dict]) -> ClientError:
    """422 for a list of {"field", "message"}: the first few summed up in the message, all of them listed."""
    summary = "; ".join(f"{x['field']}: {x['message']}" for x in errors[:5])
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return ClientError(422, f"invalid request: {summary}{more}", errors=errors)


@dataclass
class Limits:
    max_body_bytes: int
    max_inputs: int
    max_text_chars: int
    # known task -> whether it takes a sentence pair (None: the artifact does not say)
    tasks: dict[str, bool | None] = field(default_factory=dict)


def field_name(loc: tuple) -> str:
    """pydantic location ("body"-less) -> `inputs[0].text`."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(body)"


JSON_TYPES = ("application/json",)


def check_media_type(content_type: str | None, content_encoding: str | None) -> None:
    """415 unless the body is plain JSON in UTF-8. A missing Content-Type reads as JSON; `curl -d` without
    `-H 'Content-Type: application/json'` sends application/x-www-form-urlencoded, refused with the fix."""
    if content_encoding and content_encoding.strip().lower() not in ("", "identity"):
        raise ClientError(415, f"Content-Encoding {content_encoding!r} is not supported: send the JSON body "
                               "uncompressed", field="Content-Encoding")
    if not content_type:
        return
    media, _, params = content_type.partition(";")
    media = media.strip().lower()
    if media not in JSON_TYPES and not (media.startswith("application/") and media.endswith("+json")):
        raise ClientError(415, f"Content-Type {content_type!r} is not JSON: send 'Content-Type: application/json' "
                               "(curl: -H 'Content-Type: application/json')", field="Content-Type")
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise ClientError(415, f"Content-Type charset {value.strip()!r} is not supported: JSON bodies are "
                                   "UTF-8", field="Content-Type")


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r} in one JSON object")
        seen.add(key)
    return dict(pairs)


def _parse_int(digits: str) -> int:
    if len(digits) > 100:  # no field takes a number; Python's own refusal (past 4300 digits) reads as advice to us
        raise ValueError(f"a number of {len(digits)} digits is too long")
    return int(digits)


def decode_json(body: bytes):
    """The body's JSON value; 400 naming the problem (and where) for an empty, non-UTF-8 or malformed body."""
    if not body.strip():
        raise ClientError(400, "empty request body: send a JSON object such as "
                               '{"task": "<task>", "inputs": [{"text": "..."}]}')
    try:
        text = body.decode("utf-8-sig")  # RFC 8259: JSON travels as UTF-8 (a leading BOM is tolerated)
    except UnicodeDecodeError as e:
        raise ClientError(400, f"malformed JSON: the body is not valid UTF-8 (byte 0x{body[e.start]:02x} at "
                               f"position {e.start}: {e.reason})") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_int=_parse_int)
    except RecursionError:
        raise ClientError(400, "malformed JSON: nested too deeply") from None
    except ValueError as e:
        raise ClientError(400, f"malformed JSON: {e}") from None


def lone_surrogate_at(text: str) -> int | None:
    """Where `text` holds a lone UTF-16 surrogate, if it does. JSON can escape half of a surrogate pair (a
    lone \\ud800), which Python decodes into a str that neither UTF-8 nor a tokenizer can take."""
    if text.isascii():
        return None
    return next((i for i, ch in enumerate(text) if "\ud800" <= ch <= "\udfff"), None)


def surrogate_message(text: str, at: int) -> str:
    return f"holds a lone UTF-16 surrogate ({ascii(text[at])[1:-1]} at character {at}): not valid Unicode"


def lone_surrogate(data) -> dict | None:
    """The first string (value or key) of a decoded JSON value that holds a lone surrogate, as an error
    {"field", "message"}; None if none does."""
    stack = [((), data)]
    while stack:  # iterative: a body may nest as deep as the JSON decoder allows
        loc, value = stack.pop()
        if isinstance(value, str):
            at = lone_surrogate_at(value)
            if at is not None:
                return {"field": field_name(loc), "message": surrogate_message(value, at)}
        elif isinstance(value, dict):
            for key in value:
                at = lone_surrogate_at(key)
                if at is not None:
                    return {"field": field_name(loc + (key,)), "message": "this key " + surrogate_message(key, at)}
            stack += reversed([(loc + (key,), item) for key, item in value.items()])
        elif isinstance(value, list):
            stack += reversed([(loc + (i,), item) for i, item in enumerate(value)])
    return None


def parse_predict(body: bytes, limits: Limits) -> PredictRequest:
    """Check a /v1/predict body; ClientError with the status code for the first problem found."""
    if len(body) > limits.max_body_bytes:
        raise ClientError(413, f"request body of {len(body)} bytes exceeds the limit of {limits.max_body_bytes}")
    data = decode_json(body)
    bad = lone_surrogate(data)
    if bad:
        raise invalid([bad])
    if isinstance(data, dict) and isinstance(data.get("inputs"), list) and len(data["inputs"]) > limits.max_inputs:
        raise ClientError(413, f"{len(data['inputs'])} inputs exceed the limit of {limits.max_inputs} per request",
                          field="inputs", limit=limits.max_inputs)
    try:
        req = PredictRequest.model_validate(data)
    except ValidationError as e:
        raise invalid([{"field": field_name(err["loc"]), "message": err["msg"]} for err in e.errors()]) from None
    if req.tasks is not None:
        seen: set[str] = set()
        repeated = []
        for i, name in enumerate(req.tasks):
            if name in seen:
                repeated.append({"field": f"tasks[{i}]", "message": f"task {name!r} is listed more than once"})
            seen.add(name)
        if repeated:
            raise invalid(repeated)
    for i, item in enumerate(req.inputs):
        for name in ("text", "text_pair"):
            value = getattr(item, name)
            if value is not None and len(value) > limits.max_text_chars:
                raise ClientError(413, f"inputs[{i}].{name} has {len(value)} characters; the limit is "
                                       f"{limits.max_text_chars}", field=f"inputs[{i}].{name}",
                                  limit=limits.max_text_chars)
    names = req.task_names()
    unknown = [t for t in names if t not in limits.tasks]
    if unknown:
        fields = ["task"] if req.task is not None else [f"tasks[{req.tasks.index(t)}]" for t in unknown]
        raise unknown_tasks(unknown, list(limits.tasks), fields)
    check_pairs(req, limits.tasks)
    return req


def check_pairs(req: PredictRequest, pair_tasks: dict[str, bool | None]) -> None:
    """422 naming `inputs[i].text_pair` where the requested tasks need one and it is missing, or none of
    them takes one and it is given.

    Each task reads what it was trained on: a sentence-pair task `text` and `text_pair`, a single-sentence
    task `text` alone. So a request naming both kinds needs `text_pair` on every input, and its
    single-sentence tasks ignore it. A task whose artifact does not record its kind (an artifact from before
    the manifest did) is taken on either and reads the input as given.
    """
    kinds = {t: pair_tasks.get(t) for t in req.task_names()}
    pairs = [t for t, p in kinds.items() if p is True]
    singles = [t for t, p in kinds.items() if p is False]
    either = [t for t, p in kinds.items() if p is None]
    errors = []
    for i, item in enumerate(req.inputs):
        if pairs and item.text_pair is None:
            errors.append({"field": f"inputs[{i}].text_pair",
                           "message": f"required: task(s) {pairs} take a sentence pair (text, text_pair)"})
        elif item.text_pair is not None and not pairs and not either:
            errors.append({"field": f"inputs[{i}].text_pair",
                           "message": f"not allowed: task(s) {singles} take a single text; remove text_pair"})
    if errors:
        raise invalid(errors)


def unknown_tasks(unknown: list[str], known: list[str], fields: list[str] | None = None) -> ClientError:
    shown = unknown[:10] + (["..."] if len(unknown) > 10 else [])
    where = f" ({', '.join(fields[:10])})" if fields else ""
    details = {"field": fields[0]} if fields else {}
    return ClientError(404, f"unknown task(s) {shown}{where}; known tasks: {sorted(known)}", known_tasks=sorted(known),
                       **details)


def read_token(env_name: str, token_file: str | None) -> str | None:
    """The bearer token: from `token_file` when given (it must exist and hold one), else from the
    environment variable `env_name`; None when neither is set. Never from a config file in the repo."""
    if token_file:
        path = Path(token_file).expanduser()
        if not path.is_file():
            raise ValueError(f"token_file {token_file!r} does not exist")
        token = path.read_text().strip()
        if not token:
            raise ValueError(f"token_file {token_file!r} is empty")
        return token
    return os.environ.get(env_name, "").strip() or None


def check_bearer(authorization: str | None, token: str | None) -> None:
    """401 unless `Authorization: Bearer <token>` matches (compared in constant time); no-op without a token."""
    if token is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ClientError(401, "missing or wrong bearer token (send 'Authorization: Bearer <token>')",
                          field="Authorization")
