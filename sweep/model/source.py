"""Model source: resolve `cfg.model` to a local Hugging Face checkpoint directory and its identity.

Three sources, one loading path (`from_pretrained` on a directory):
- `hub_id` + pinned `revision`: downloaded through huggingface_hub (or found in its cache when offline);
- `path`: a local checkpoint directory;
- `generate: random`: random weights of a named shape (`model.shape`, sweep/model/shapes.py), written once under the
  cache in the run's dtype (sweep/model/random_weights.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweep.config.errors import ConfigError
from sweep.model.random_weights import write_random_checkpoint
from sweep.model.shapes import random_model_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelShape:
    """What the engines and the figures need from config.json, read once per run."""

    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int | None
    tie_word_embeddings: bool
    sliding_window: bool  # some layer attends to a window only

    @classmethod
    def read(cls, path: Path) -> ModelShape:
        where = path / "config.json"
        try:
            cfg = json.loads(where.read_text())
            heads = cfg["num_attention_heads"]
            return cls(
                architecture=(cfg.get("architectures") or ["unknown"])[0],
                num_layers=cfg["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=cfg.get("num_key_value_heads") or heads,
                head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                hidden_size=cfg["hidden_size"],
                vocab_size=cfg["vocab_size"],
                max_position_embeddings=cfg.get("max_position_embeddings"),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                sliding_window=bool(cfg.get("use_sliding_window"))
                or any(t != "full_attention" for t in cfg.get("layer_types") or []),
            )
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            reason = f"missing key {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
            raise ConfigError(f"{where} is not a usable Hugging Face model config ({reason})") from None


@dataclass(frozen=True)
class ModelSource:
    name: str
    path: Path  # a local directory with config.json, weights and tokenizer files
    identity: dict[str, Any]  # what identifies these weights in the engine cache key
    shape: ModelShape


def model_identity(model_cfg: Any) -> tuple[str, str]:
    """(name, full identity) of a model config, read from the config alone: nothing is fetched or hashed.

    The name is what records call the model: a local checkpoint is named after its directory (not the preset whose
    model.name it overrides), a hub model after its preset. The identity: a path, a hub id at its revision, or a
    generated model's shape and seed.
    """
    if model_cfg.path:
        path = Path(model_cfg.path).expanduser().resolve()
        return path.name, f"path:{path}"
    if model_cfg.hub_id:
        return model_cfg.name, f"hub:{model_cfg.hub_id}@{model_cfg.revision}"
    shape = model_cfg.shape
    return random_model_name(shape), f"generated:{model_cfg.generate}:{shape}:seed={model_cfg.seed}"


def resolve_model(model_cfg: Any, cache_dir: Path, dtype: str, device: str) -> ModelSource:
    """The checkpoint the config names; the first source set wins: path, hub_id, generate. `dtype` and `device`
    (the run's, resolved) are what a generated checkpoint is written in and built on."""
    name = model_identity(model_cfg)[0]
    if model_cfg.path:
        path = Path(model_cfg.path).expanduser().resolve()
        if not (path / "config.json").is_file():
            reason = (
                "no config.json in it" if path.is_dir() else ("it is a file" if path.exists() else "it does not exist")
            )
            raise ConfigError(f"model.path={model_cfg.path!r} is not a Hugging Face checkpoint directory ({reason})")
        identity = {"path": str(path), "weights_sha256": weights_digest(path)}
    elif model_cfg.hub_id:
        path = download_from_hub(model_cfg.hub_id, model_cfg.revision)
        identity = {"hub_id": model_cfg.hub_id, "revision": model_cfg.revision}
    else:
        shape, seed = model_cfg.shape, model_cfg.seed
        path = write_random_checkpoint(cache_dir / "checkpoints", shape, dtype, seed, device)
        identity = {"generated": "random", "shape": shape, "seed": seed, "weights_sha256": weights_digest(path)}
    return ModelSource(name, path, identity, ModelShape.read(path))


def download_from_hub(hub_id: str, revision: str | None) -> Path:
    import huggingface_hub
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    log.info("resolving %s@%s through huggingface_hub", hub_id, revision)
    # Without a reachable hub, huggingface_hub retries five times over ~24 s and logs every attempt twice;
    # a 3-second connect decides instead, and the local cache alone is searched.
    unreachable = (
        None if huggingface_hub.constants.HF_HUB_OFFLINE else hub_unreachable(huggingface_hub.constants.ENDPOINT)
    )
    if unreachable:
        log.info("the hub cannot be reached (%s): looking in the local Hugging Face cache only", unreachable)
    try:
        path = huggingface_hub.snapshot_download(
            hub_id,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt"],
            local_files_only=bool(unreachable),
        )
    except RepositoryNotFoundError as exc:
        raise ConfigError(f"model.hub_id={hub_id!r}: no such model on the hub (or it is gated): {exc}") from None
    except RevisionNotFoundError:
        raise ConfigError(f"model.revision={revision!r}: no such revision of {hub_id!r}") from None
    except LocalEntryNotFoundError:
        raise ConfigError(
            f"model.hub_id={hub_id!r}: the hub cannot be reached and {hub_id}@{revision} is not in the local "
            "Hugging Face cache; download it on a connected machine, or point model.path at a local checkpoint"
        ) from None
    return Path(path)


def hub_unreachable(endpoint: str, timeout_s: float = 3.0) -> str | None:
    """Why the hub's host cannot be connected to (name lookup, refused, timeout), or None when it can."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
    except OSError as exc:
        return f"{url.hostname}:{port}: {exc.strerror or exc}"
    return None


def weights_files(path: Path) -> tuple[tuple[str, int, int], ...]:
    """config.json and every weight file, as (name, size, mtime_ns), in name order."""
    return tuple(
        (f.name, f.stat().st_size, f.stat().st_mtime_ns)
        for f in sorted(path.iterdir())
        if f.name == "config.json" or f.suffix in (".safetensors", ".bin")
    )


def weights_digest(path: Path) -> str:
    """sha256 over config.json and every weight file. A sweep resolves the same checkpoint for every trial:
    the digest is computed once per process for files unchanged since (same sizes and modification times)."""
    return _digest(path, weights_files(path))


@functools.lru_cache(maxsize=8)
def _digest(path: Path, files: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, _, _ in files:
        digest.update(name.encode())
        with open(path / name, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


def is_decoder_linear_weight(name: str, ndim: int) -> bool:
    """A linear layer's weight inside the decoder layers: what engine.quantization quantizes. The embedding table,
    the LM head and the norms stay in the run's dtype (as vLLM's online quantization leaves them)."""
    return ndim == 2 and name.endswith(".weight") and ".layers." in f".{name}"


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


INT4_GROUP_SIZE = 128  # int4_weight_only: one scale and zero point per 128 input features (gpt-fast's and torchao's)


def linear_weight_bytes(quantization: str, out_features: int, in_features: int, itemsize: int) -> int:
    """Bytes one linear weight occupies as a quantized engine holds it, scales included, in torchao 0.18's layouts
    (sweep/backends/quantization.py); a weight the scheme leaves alone keeps the run's dtype."""
    n, k = out_features, in_features
    if quantization == "int8_weight_only":  # Int8Tensor per row: int8 values, a float32 scale, an int8 zero point
        return n * k + 5 * n
    if quantization == "int4_weight_only" and k % INT4_GROUP_SIZE == 0:
        # Int4TilePackedTo4dTensor (tinygemm): rows padded to a multiple of 8, columns to 1024, two values a byte,
        # and a bfloat16 scale and zero point per group of each padded row
        n, k = round_up(n, 8), round_up(k, 1024)
        return n * k // 2 + (k // INT4_GROUP_SIZE) * n * 2 * 2
    if quantization == "fp8" and n % 16 == 0 and k % 16 == 0:  # Float8Tensor per row: fp8 values, a float32 scale
        return n * k + 4 * n
    return n * k * itemsize


def model_sizes(
    model: ModelSource, dtype: str, quantization: str = "none", kv_cache_dtype: str = "auto"
) -> dict[str, int]:
    """Parameter count and the bytes the engine holds them in (from the safetensors headers, no weights read): the
    decoder's linear weights as `quantization` packs them, the rest in `dtype`; KV bytes per token (one byte an
    element for an fp8 KV cache), and the bytes of the input embedding table that a decode step does not read whole."""
    from safetensors import safe_open

    itemsize = 4 if dtype == "float32" else 2
    numel = weight_bytes = 0
    for file in model.path.glob("*.safetensors"):
        try:
            with safe_open(file, framework="np") as f:
                for name in f.keys():
                    shape = f.get_slice(name).get_shape()
                    n = 1
                    for dim in shape:
                        n *= dim
                    numel += n
                    if quantization != "none" and is_decoder_linear_weight(name, len(shape)):
                        weight_bytes += linear_weight_bytes(quantization, shape[0], shape[1], itemsize)
                    else:
                        weight_bytes += n * itemsize
        except Exception as exc:  # safetensors raises its own error types for a damaged header or a short file
            raise ConfigError(f"{file} is not a readable safetensors file ({exc}); the checkpoint is damaged") from None
    s = model.shape
    kv_itemsize = 1 if kv_cache_dtype == "fp8" else itemsize
    return {
        "model_params": numel,
        "model_bytes": weight_bytes,
        "kv_bytes_per_token": 2 * s.num_layers * s.num_kv_heads * s.head_dim * kv_itemsize,
        # A decode step reads one row of the input embedding table per sequence, not the table; a tied table is
        # also the LM head, which reads all of it, so then nothing is left out of the decode floor.
        "input_embedding_bytes": 0 if s.tie_word_embeddings else s.vocab_size * s.hidden_size * itemsize,
    }
