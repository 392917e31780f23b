"""int8 against fp32 in onnxruntime on this CPU: images/s of timm models exported as mlkd exports
them (torch.onnx, dynamic batch) and quantized as `mlkd export --int8` does (static, QDQ,
per-channel int8 weights, uint8 activations; calibrated here on random images: speed does not
depend on what the calibration saw), the two timed side by side in one run, in turns.

    python benchmarks/int8_speed.py [--models resnet50:224,test_convnext:32] [--batch 32]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import timm
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from mlkd_cli.export.onnx_graph import export_onnx
from mlkd_cli.export.session import open_session

ROUNDS = 3


def quantized(fp32: Path, out: Path, size: int) -> None:
    """`mlkd export --int8`'s quantization of `fp32` into `out`, on random calibration images."""
    rng = np.random.default_rng(0)
    batches = iter([{"images": rng.standard_normal((8, 3, size, size), np.float32)}] * 4)

    class Reader(CalibrationDataReader):
        def get_next(self):  # noqa: ANN201
            return next(batches, None)

    prepared = out.with_suffix(".prepared.onnx")
    quant_pre_process(str(fp32), str(prepared))
    quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, weight_type=QuantType.QInt8,
                    activation_type=QuantType.QUInt8)  # fmt: skip


def rate(session: onnxruntime.InferenceSession, images: np.ndarray, seconds: float) -> float:
    """Images/s over `seconds` of back-to-back runs."""
    session.run(None, {"images": images})
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(None, {"images": images})
        count += images.shape[0]
    return count / (time.perf_counter() - start)


def main() -> None:
    """One row per model and batch: fp32 and int8 images/s and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50:224,resnet18:224,test_convnext:32")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    print("| model | px | batch | fp32 img/s | int8 img/s | int8 / fp32 |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for entry in args.models.split(","):
            name, size = entry.split(":")[0], int(entry.split(":")[1])
            model = timm.create_model(name, num_classes=100).eval()
            fp32, int8 = Path(scratch) / f"{name}.onnx", Path(scratch) / f"{name}.int8.onnx"
            export_onnx(model, torch.randn(2, 3, size, size), fp32, ["logits"])
            quantized(fp32, int8, size)
            sessions = [open_session(p) for p in (fp32, int8)]
            for batch in (int(b) for b in args.batches.split(",")):
                images = np.random.default_rng(1).standard_normal(
                    (batch, 3, size, size), np.float32
                )
                rates = [[], []]
                for _ in range(ROUNDS):  # in turns, so the machine's drift falls on both
                    for i, session in enumerate(sessions):
                        rates[i].append(rate(session, images, args.seconds / ROUNDS))
                a, b = max(rates[0]), max(rates[1])
                print(f"| {name} | {size} | {batch} | {a:.1f} | {b:.1f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
