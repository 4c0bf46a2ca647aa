"""engine.quantization through torchao (backends hf and compiled), and what each value needs of the device.

Read from torchao 0.18.0's source (torchao/quantization/quant_api.py and quantize_/workflows/):
- int8_weight_only: Int8WeightOnlyConfig, an Int8Tensor per row whose linear casts the int8 weights to the
  activations' dtype, runs torch.mm and scales each row: any device, any dtype;
- int4_weight_only: Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"), tinygemm's
  packing (aten._weight_int4pack_mm): CUDA of compute capability 8.0+, bfloat16 weights. Its default packing
  ("plain") needs the mslk kernels, and its other formats are XPU's and NPU's: none runs on the CPU;
- fp8: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), fp8 weights and fp8 activations quantized
  per token at run time: CUDA of compute capability 8.9+ (_check_hardware_support), bfloat16 weights (PerRow).
The decoder's linear layers are quantized (sweep.model.source.is_decoder_linear_weight); the embedding table and
the LM head stay in the run's dtype.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from sweep.model.source import INT4_GROUP_SIZE, is_decoder_linear_weight

FP8_MIN_CAPABILITY = (8, 9)  # Ada and Hopper: fp8 tensor cores
INT4_MIN_CAPABILITY = (8, 0)  # tinygemm's tensor-core int4 kernel
log = logging.getLogger(__name__)

TORCHAO_HINT = "pip install 'torchao>=0.18' (or pip install -e '.[quant]')"


def gpu_capability(device: str) -> tuple[int, int] | None:
    """The CUDA device's compute capability; None on the CPU."""
    if device != "cuda":
        return None
    import torch

    return torch.cuda.get_device_capability()


def fp8_refusal(device: str, capability: tuple[int, int] | None) -> str | None:
    """fp8 weights and activations run on fp8 tensor cores only, whichever backend drives them."""
    if device != "cuda":
        return "fp8 needs a CUDA GPU of compute capability 8.9+ (fp8 tensor cores), and this run is on the CPU"
    if capability < FP8_MIN_CAPABILITY:
        major, minor = capability
        return f"fp8 needs a GPU of compute capability 8.9+ (fp8 tensor cores); this one has {major}.{minor}"
    return None


def torchao_refusals(device: str, dtype: str) -> dict[str, str | None]:
    """Each engine.quantization value -> why torchao cannot run it here (None: it can)."""
    installed = importlib.util.find_spec("torchao") is not None
    capability = gpu_capability(device)
    missing = None if installed else f"it is quantized by torchao, which is not installed: {TORCHAO_HINT}"
    if device != "cuda":
        int4 = "torchao's Int4WeightOnlyConfig packs int4 for CUDA (tinygemm, mslk), XPU and NPU only, not the CPU"
    elif capability < INT4_MIN_CAPABILITY:
        int4 = f"torchao's int4 kernel (tinygemm) needs compute capability 8.0+; this GPU has {capability}"
    elif dtype != "bfloat16":
        int4 = f"torchao's int4 kernel (tinygemm) takes bfloat16 weights; set engine.dtype=bfloat16 (not {dtype})"
    else:
        int4 = None
    fp8 = fp8_refusal(device, capability)
    if fp8 is None and dtype != "bfloat16":
        fp8 = f"torchao's per-row fp8 takes bfloat16 weights; set engine.dtype=bfloat16 (not {dtype})"
    return {
        "none": None,
        "int8_weight_only": missing,
        "int4_weight_only": missing or int4,
        "fp8": missing or fp8,
    }


def torchao_config(quantization: str) -> Any:
    """The torchao config for an engine.quantization value other than none. set_inductor_config=False: torchao
    would otherwise change Inductor's global settings for every later engine of this process."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int4WeightOnlyConfig,
        Int8WeightOnlyConfig,
        PerRow,
    )

    if quantization == "int8_weight_only":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    if quantization == "int4_weight_only":
        return Int4WeightOnlyConfig(
            group_size=INT4_GROUP_SIZE, int4_packing_format="tile_packed_to_4d", set_inductor_config=False
        )
    if quantization == "fp8":
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    raise ValueError(f"no torchao config for engine.quantization={quantization!r}")


def quantize_model(model: Any, quantization: str, compiled: bool) -> dict[str, Any]:
    """Quantize the decoder's linear layers in place (on their device); what the manifest records of it. `compiled`:
    whether torch.compile will run the model (it fuses int8 weight-only dequantization into the matmul)."""
    if quantization == "none":
        return {"quantization": "none"}
    if quantization == "int8_weight_only" and not compiled:
        log.warning(
            "engine.quantization=int8_weight_only without torch.compile dequantizes every weight to the run's dtype "
            "before its matmul: decode is slower than unquantized, not faster (docs/quantization.md); on "
            "backend=compiled leave engine.compile_mode at a compiling mode to fuse it"
        )
    import torch
    import torchao
    from torchao.quantization import quantize_

    def decoder_linear(module: torch.nn.Module, fqn: str) -> bool:
        return isinstance(module, torch.nn.Linear) and is_decoder_linear_weight(f"{fqn}.weight", 2)

    config = torchao_config(quantization)
    quantize_(model, config, filter_fn=decoder_linear)
    quantized = sorted(
        {type(m.weight).__name__ for _, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        - {"Parameter", "Tensor"}
    )
    return {
        "quantization": quantization,
        "torchao": torchao.__version__,
        "torchao_config": repr(config),
        "weight_types": quantized,
    }
