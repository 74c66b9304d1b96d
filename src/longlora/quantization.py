"""QLoRA's 4-bit base through bitsandbytes: the requirement check, the storage recipe, and the CPU repacking that
must stay off while a model trains.

bitsandbytes is imported lazily (the `qlora` extra): releases from 0.49 on have CPU kernels besides the CUDA ones,
so QLoRA trains, resumes and merges wherever `check_bitsandbytes` passes.
"""

from __future__ import annotations

import torch


def check_bitsandbytes(device: str | torch.device = "cpu") -> None:
    """QLoRA's requirement, checked before anything heavy: bitsandbytes imports and quantizes / dequantizes an NF4
    tensor on `device` (bitsandbytes >= 0.49 has CPU kernels besides CUDA ones; older releases only CUDA). One-line
    ValueError saying what to install otherwise."""
    try:
        import bitsandbytes
        from bitsandbytes.functional import dequantize_4bit, quantize_4bit
    except Exception as error:  # ImportError, or a broken install failing while loading its native library
        raise ValueError(
            f"quantization 4bit (QLoRA) needs bitsandbytes >= 0.49, which does not import here ({first_line(error)}):"
            " pip install 'longlora[qlora]'"
        ) from error
    try:
        weights, state = quantize_4bit(torch.ones(64, 64, device=device), quant_type="nf4", compress_statistics=True)
        dequantize_4bit(weights, state)
    except Exception as error:  # no kernel registered for the device (NotImplementedError, RuntimeError, ...)
        raise ValueError(
            f"quantization 4bit (QLoRA): bitsandbytes {getattr(bitsandbytes, '__version__', '?')} has no 4-bit "
            f"backend for {torch.device(device).type} ({first_line(error)}); bitsandbytes >= 0.49 runs on CPU and "
            "CUDA: pip install -U 'longlora[qlora]'"
        ) from error


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def qlora_quantization_config(compute_dtype: torch.dtype):
    """QLoRA's 4-bit storage (the paper's: NF4 with double-quantized scales), computing in `compute_dtype`."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=True,
    )


def keep_4bit_layers_unpacked(model) -> int:
    """Stop bitsandbytes' CPU inference repacking on every 4-bit layer of `model`; returns how many there are.

    On a CPU with AVX512-BF16, bitsandbytes (0.49+) rewrites a Linear4bit's weight, in place, into a CPU layout the
    first time the layer runs in eval mode without grad: scales rounded to bfloat16, products computed in bfloat16
    whatever the compute dtype, and a backward that no longer reaches the layer's input once it is trained again.
    The weights a model is trained against (and that `load_base_model` dequantizes for a QLoRA adapter) must stay the
    ones it was loaded with, so the flag that allows it is cleared on each layer instance.
    """
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu") and type(module).__name__ == "Linear4bit":
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count
