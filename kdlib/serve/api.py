"""The HTTP contract of the model server: settings, request schema, checks and their status codes.

Every client mistake maps to a 4xx naming what is wrong, never a 500:
400 malformed JSON; 401 missing or wrong bearer token; 404 unknown task (the known ones listed);
413 body, input count or text over the limit; 422 a missing, empty or wrongly typed field (named).
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
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads per replica; default: Ray's "
                                                              "(the replica's CPUs)")
    token_env: str = Field("KDLIB_SERVE_TOKEN", description="the environment variable holding the bearer token "
                                                            "(its name, not the token)")
    token_file: str | None = Field(None, description="file holding the bearer token (e.g. a mounted Kubernetes "
                                                     "Secret); wins over token_env")
    require_token: bool = Field(False, description="refuse to start without a token instead of serving "
                                                   "unauthenticated")

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
    def _not_blank(cls, v):
        if v is not None and not v.strip():
            raise ValueError("must be a non-empty string")
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
        return {"error": self.message, **self.details}


@dataclass
class Limits:
    max_body_bytes: int
    max_inputs: int
    max_text_chars: int
    known_tasks: list[str] = field(default_factory=list)


def field_name(loc: tuple) -> str:
    """pydantic location ("body"-less) -> `inputs[0].text`."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(body)"


def parse_predict(body: bytes, limits: Limits) -> PredictRequest:
    """Check a /v1/predict body; ClientError with the status code for the first problem found."""
    if len(body) > limits.max_body_bytes:
        raise ClientError(413, f"request body of {len(body)} bytes exceeds the limit of {limits.max_body_bytes}")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ClientError(400, f"malformed JSON: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("inputs"), list) and len(data["inputs"]) > limits.max_inputs:
        raise ClientError(413, f"{len(data['inputs'])} inputs exceed the limit of {limits.max_inputs} per request",
                          field="inputs", limit=limits.max_inputs)
    try:
        req = PredictRequest.model_validate(data)
    except ValidationError as e:
        errors = [{"field": field_name(err["loc"]), "message": err["msg"]} for err in e.errors()]
        summary = "; ".join(f"{x['field']}: {x['message']}" for x in errors[:5])
        raise ClientError(422, f"invalid request: {summary}", errors=errors) from None
    for i, item in enumerate(req.inputs):
        for name in ("text", "text_pair"):
            value = getattr(item, name)
            if value is not None and len(value) > limits.max_text_chars:
                raise ClientError(413, f"inputs[{i}].{name} has {len(value)} characters; the limit is "
                                       f"{limits.max_text_chars}", field=f"inputs[{i}].{name}",
                                  limit=limits.max_text_chars)
    unknown = [t for t in req.task_names() if t not in limits.known_tasks]
    if unknown:
        raise unknown_tasks(unknown, limits.known_tasks)
    return req


def unknown_tasks(unknown: list[str], known: list[str]) -> ClientError:
    return ClientError(404, f"unknown task(s) {unknown}; known tasks: {sorted(known)}", known_tasks=sorted(known))


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
        raise ClientError(401, "missing or wrong bearer token (send 'Authorization: Bearer <token>')")
