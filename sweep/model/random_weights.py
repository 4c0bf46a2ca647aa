"""The one writer of random-weight checkpoints: config.json of a named shape (sweep/model/shapes.py), its weights
as safetensors drawn from `seed`, and a byte-level tokenizer, written once under the cache and reused.

Speed does not depend on the weights' values when EOS is ignored, so random weights of a real architecture measure
that model's speed without a download.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from sweep.model.shapes import SHAPES

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # bump when the writer changes, so that checkpoints written before are not reused


def random_checkpoint_dir(root: Path, shape: str, dtype: str, seed: int, device: str) -> Path:
    """Where the checkpoint of these inputs lives. The device is part of the name: torch's CPU and CUDA generators
    draw different weights from one seed."""
    spec = SHAPES[shape]
    digest = json.dumps([spec.model_type, dict(spec.config), FORMAT_VERSION], sort_keys=True).encode()
    return root / f"random-{shape}-{dtype}-seed{seed}-{device}-{hashlib.sha256(digest).hexdigest()[:8]}"


def write_random_checkpoint(root: Path, shape: str, dtype: str, seed: int, device: str) -> Path:
    """The checkpoint directory of random weights of `shape` in `dtype`, written once.

    The model is built on `device` in `dtype` (a 16-bit 8B model is initialised in a second on a GPU instead of
    minutes on a CPU), saved into a temporary directory beside the target, and renamed into place: a checkpoint
    cut short is never found, and two processes writing one at once both end with a whole one.
    """
    target = random_checkpoint_dir(root, shape, dtype, seed, device)
    if (target / "config.json").is_file():
        return target
    import torch
    import transformers

    spec = SHAPES[shape]
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{shape}-"))
    log.info("writing a %s checkpoint with random %s weights (seed %d, built on %s)", shape, dtype, seed, device)
    start = time.perf_counter()
    try:
        tokenizer = build_byte_tokenizer()
        config = transformers.AutoConfig.for_model(
            spec.model_type,
            **spec.config,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            dtype=dtype,
        )
        torch.manual_seed(seed)
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()  # the engine that loads next gets this memory back, and its peak is its own
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first; its checkpoint was drawn from the same inputs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s in %.1f s", target, time.perf_counter() - start)
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
