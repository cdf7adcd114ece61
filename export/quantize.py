"""Graph optimization and quantization with onnxruntime, chosen for the target device.

- none: fp32, fused with onnxruntime's transformer optimizer (reference; any execution provider)
- weight-int8 (the default for text on a CPU): int8 weights with a scale per block of 64
  (``MatMulNBits``, 8 bits) and int8 embeddings. Each row of activations is quantized to int8 per
  block of 64 as it is multiplied (accuracy level 4), so a text's answer does not depend on the
  other texts in its batch. On drug reviews it changed 1 label of 379 against fp32, where dynamic
  int8 changed 11, at 1.04-1.11x dynamic int8's time on x86 (docs/benchmarks.md)
- dynamic-int8: int8 weights, each batch's activations quantized at run time with one scale, with
  optimum's preset for the CPU (``avx2``, ``avx512_vnni``, ``arm64``)
- static-int8: int8 weights and activations, ranges calibrated on training data (QDQ format)
- fp16: the fused graph in half precision, fp32 inputs and outputs (GPUs: Jetson's CUDA / TensorRT EP)
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from export.errors import ExportError

log = logging.getLogger(__name__)

QUANTIZATIONS = ("dynamic-int8", "static-int8", "weight-int8", "fp16", "none")
WEIGHT_BLOCK = 64  # weights per scale in weight-int8: 32 ran 1.23x dynamic int8's time here, 64 1.04-1.11x
DEFAULT_TEXT_QUANTIZATION = "weight-int8"
"""What a text classifier ships for a CPU unless told otherwise (``cloud-train export``)."""
TARGETS = ("avx2", "avx512_vnni", "arm64")
DEFAULT_TARGET = "avx2"
"""The preset a dynamic int8 export uses unless told otherwise: the ``avx2`` preset's unsigned 8-bit
weights (optimum's preset: uint8, symmetric around 128, full range, per-channel scales; onnxruntime
runs them with its u8 x u8 kernels), the one preset whose bundles every CPU kernel onnxruntime has
computes correctly. The ``arm64`` preset's signed 8-bit weights (int8, u8 x s8 kernels) ran in 12
ms per drug review against 20 on x86 with VNNI and changed as many predictions (8-10 of 379 against
9), but an emulated arm64 device whose CPU has SVE (qemu's ``max``, onnxruntime 1.27) computed them
wrongly: golden probabilities off by 0.41, 1 of 8 top classes right, so the device refused the
update; signed 7-bit weights (onnxruntime's ``reduce_range``) were off by 0.39 there too. With SVE
off (Cortex-A72, Neoverse-N1, A64FX) it matched within 0.0014. Until that is
measured on real SVE hardware (Graviton3, Grace), ``--target arm64`` (or ``avx512_vnni``) is for
fleets known to run it right: the device's health check refuses a bundle it computes wrongly
(docs/benchmarks.md)."""


def optimize_transformer(fp32: Path, out: Path) -> Path:
    """Fuse attention, layer norms and GELU with onnxruntime's transformer optimizer (BERT family)."""
    from onnxruntime.transformers.optimizer import optimize_model

    model = optimize_model(str(fp32), model_type="bert", num_heads=0, hidden_size=0, opt_level=1, use_gpu=False)
    model.save_model_to_file(str(out))
    return out


def quantize_dynamic_preset(fp32: Path, out: Path, *, target: str) -> Path:
    """Dynamic int8 with optimum's preset for ``target`` (avx2, avx512_vnni, arm64)."""
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    if target not in TARGETS:
        raise ExportError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    # per-channel weights: per-tensor scales flipped 6 of 70 predictions of a mean-pooling MiniLM, per-channel none
    config = getattr(AutoQuantizationConfig, target)(is_static=False, per_channel=True)
    save_dir = out.parent / f".{out.stem}-optimum"
    quantizer = ORTQuantizer.from_pretrained(str(fp32.parent), file_name=fp32.name)
    quantizer.quantize(save_dir=str(save_dir), quantization_config=config)
    produced = next(save_dir.glob("*quantized*.onnx"), None)
    if produced is None:
        raise ExportError(f"optimum wrote no quantized model in {save_dir}")
    shutil.move(produced, out)
    shutil.rmtree(save_dir, ignore_errors=True)
    return out


class _Calibration:
    """An onnxruntime CalibrationDataReader over pre-computed feeds."""

    def __init__(self, feeds: Iterable[dict[str, Any]]) -> None:
        self._iter: Iterator[dict[str, Any]] = iter(feeds)

    def get_next(self) -> dict[str, Any] | None:
        return next(self._iter, None)


def quantize_static_int8(fp32: Path, out: Path, *, calibration: Iterable[dict[str, Any]]) -> Path:
    """Static int8 (QDQ): activation ranges calibrated on ``calibration`` feeds (the device's pre-processing)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out.parent / f".{out.stem}-prepared.onnx"
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    quantize_static(
        str(prepared),
        str(out),
        _Calibration(calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8,
        calibrate_method=CalibrationMethod.MinMax,
        op_types_to_quantize=["MatMul", "Gemm", "Conv"],
    )
    prepared.unlink(missing_ok=True)
    return out


class _DropPreprocessingAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "consider to run pre-processing" not in record.getMessage()


@contextmanager
def _without_preprocessing_advice() -> Iterator[None]:
    """onnxruntime's quantizer logs "Please consider to run pre-processing" on the root logger."""
    advice = _DropPreprocessingAdvice()
    logging.getLogger().addFilter(advice)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(advice)


def quantize_weights_int8(fp32: Path, out: Path, *, block_size: int = WEIGHT_BLOCK) -> Path:
    """int8 weights: every constant MatMul weight in blocks of ``block_size`` rows with a symmetric
    scale each (onnxruntime's ``MatMulNBits``, 8 bits; at accuracy level 4 it quantizes each row of
    activations per block as it multiplies, independently of the batch), then the embedding tables
    (``Gather``) in int8, dequantized on lookup. About a quarter of the fp32 size, like dynamic int8."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    matmuls = out.parent / f".{out.stem}-matmul.onnx"
    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(fp32)),
        bits=8,
        block_size=block_size,
        is_symmetric=True,
        op_types_to_quantize=("MatMul",),
        accuracy_level=4,  # int8 products, per-block activation scales: 1.6x faster than fp32 products (level 0) here
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(matmuls), use_external_data_format=False)
    with _without_preprocessing_advice():  # it is for activation ranges; this call quantizes embedding tables
        quantize_dynamic(str(matmuls), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["Gather"])
    matmuls.unlink(missing_ok=True)
    if not any(node.op_type == "MatMulNBits" for node in onnx.load(str(out)).graph.node):
        raise ExportError(f"weight-int8 found no MatMul weight to quantize in {fp32.name}")
    return out


def convert_fp16(fp32: Path, out: Path) -> Path:
    """Half precision for GPU targets; inputs and outputs stay as they were."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True), str(out))
    return out
