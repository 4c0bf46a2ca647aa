"""Model source: resolve `cfg.model` to a local Hugging Face checkpoint directory and its identity.

Three sources, one loading path (`from_pretrained` on a directory):
- `hub_id` + pinned `revision`: downloaded through huggingface_hub (or found in its cache when offline);
- `path`: a local checkpoint directory;
- `generate: tiny`: a tiny Qwen2-architecture checkpoint generated here, deterministically from `seed`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweep.config.errors import ConfigError

log = logging.getLogger(__name__)

# Shapes of the tiny model: big enough to exercise GQA, rope and a multi-layer KV cache, small enough for CI.
# Head size 64 (hidden_size / num_attention_heads) is one every engine's attention kernel supports (TensorRT-LLM's
# MMHA and vLLM's CPU attention reject 16). It is derived, never written as head_dim: vLLM ignores an explicit
# head_dim on Qwen2 and would silently compute a different one.
TINY_SHAPE = dict(
    vocab_size=320,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
TINY_FORMAT_VERSION = 2  # bump when the generator changes, so old tiny checkpoints are not reused


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
    generated model's seed.
    """
    if model_cfg.path:
        path = Path(model_cfg.path).expanduser().resolve()
        return path.name, f"path:{path}"
    if model_cfg.hub_id:
        return model_cfg.name, f"hub:{model_cfg.hub_id}@{model_cfg.revision}"
    return model_cfg.name, f"generated:{model_cfg.generate}:seed={model_cfg.seed}"


def resolve_model(model_cfg: Any, cache_dir: Path) -> ModelSource:
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
        path = generate_tiny_checkpoint(cache_dir / "checkpoints", model_cfg.seed)
        identity = {"generated": "tiny", "weights_sha256": weights_digest(path)}
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


def generate_tiny_checkpoint(root: Path, seed: int) -> Path:
    """Write (once) a tiny random Qwen2 checkpoint with a byte-level tokenizer; return its directory."""
    shape_tag = hashlib.sha256(json.dumps([TINY_SHAPE, TINY_FORMAT_VERSION], sort_keys=True).encode()).hexdigest()[:8]
    target = root / f"tiny-qwen2-seed{seed}-{shape_tag}"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-tiny-"))
    try:
        tokenizer = build_byte_tokenizer()
        config = Qwen2Config(
            **TINY_SHAPE,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            torch_dtype="float32",
        )
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first; its checkpoint is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("generated tiny checkpoint at %s", target)
    return target


def build_byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: one token per byte, plus three special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for token in specials:
        vocab[token] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def model_sizes(model: ModelSource, dtype: str) -> dict[str, int]:
    """Parameter count and bytes in `dtype` (from the safetensors headers, no weights read), KV bytes per token, and
    the bytes of the input embedding table that a decode step does not read whole."""
    from safetensors import safe_open

    numel = 0
    for file in model.path.glob("*.safetensors"):
        try:
            with safe_open(file, framework="np") as f:
                for name in f.keys():
                    n = 1
                    for dim in f.get_slice(name).get_shape():
                        n *= dim
                    numel += n
        except Exception as exc:  # safetensors raises its own error types for a damaged header or a short file
            raise ConfigError(f"{file} is not a readable safetensors file ({exc}); the checkpoint is damaged") from None
    itemsize = 4 if dtype == "float32" else 2
    s = model.shape
    return {
        "model_params": numel,
        "model_bytes": numel * itemsize,
        "kv_bytes_per_token": 2 * s.num_layers * s.num_kv_heads * s.head_dim * itemsize,
        # A decode step reads one row of the input embedding table per sequence, not the table; a tied table is
        # also the LM head, which reads all of it, so then nothing is left out of the decode floor.
        "input_embedding_bytes": 0 if s.tie_word_embeddings else s.vocab_size * s.hidden_size * itemsize,
    }
