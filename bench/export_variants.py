"""Export variants side by side: PyTorch fp32 vs ONNX fp32 vs each int8 (and fp16) variant.

Fine-tunes MiniLM on the project's voice-command data set, exports every variant through the
real pipeline (the same gates as `cloud-train export`, reported rather than enforced), and prints
accuracy, macro-F1, size on disk and single-request latency (p50/p99) for each, with the ratio of
each p50 to PyTorch fp32's. One run, one machine, the same validation texts for all.

    .venv/bin/python bench/export_variants.py [--epochs 8] [--threads 1] [--requests 300] [--workdir runs/bench]
        [--data TRAIN.csv --test TEST.csv]    # another data set, scored on its own test file

``flips`` counts the texts whose label differs from the ONNX fp32 model's: what quantization alone changed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

VARIANTS: list[tuple[str, dict[str, str]]] = [
    ("onnx fp32 (fused)", {"quantization": "none"}),
    ("int8 dynamic avx2", {"quantization": "dynamic-int8", "target": "avx2"}),
    ("int8 dynamic avx512_vnni", {"quantization": "dynamic-int8", "target": "avx512_vnni"}),
    ("int8 dynamic arm64", {"quantization": "dynamic-int8", "target": "arm64"}),
    ("int8 static (calibrated)", {"quantization": "static-int8"}),
    ("int8 weights (MatMulNBits)", {"quantization": "weight-int8"}),
    ("fp16 (GPU target)", {"quantization": "fp16"}),
]


def latencies(predict: Callable[[str], Any], texts: list[str], requests: int) -> list[float]:
    for text in texts[:10]:
        predict(text)  # warm-up
    samples = []
    for i in range(requests):
        start = time.perf_counter()
        predict(texts[i % len(texts)])
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=8.0)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for onnxruntime and torch")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-export"))
    parser.add_argument("--data", type=Path, help="training CSV (text, label); default: the packaged voice commands")
    parser.add_argument("--test", type=Path, help="score on this labelled file instead of the validation split")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from cloud_trainer.training.data import PACKAGED_DATASET, load_labelled
    from cloud_trainer.training.metrics import classification_metrics
    from cloud_trainer.training.runs import export_run, train_run
    from cloud_trainer.training.train import TrainConfig
    from edge_agent.runtime import TextClassifier
    from export.errors import AccuracyGateFailed

    torch.set_num_threads(args.threads)
    run = args.workdir / "run"
    data = args.data or PACKAGED_DATASET
    result = train_run(data, run, config=TrainConfig(epochs=args.epochs, progress=False))
    val = load_labelled(args.test) if args.test else load_labelled(run / "val.csv")
    labels = result.labels
    rows: list[dict[str, Any]] = []

    tokenizer = AutoTokenizer.from_pretrained(str(result.checkpoint))  # type: ignore[no-untyped-call]
    model = AutoModelForSequenceClassification.from_pretrained(str(result.checkpoint)).eval()

    def torch_predict(text: str) -> int:
        with torch.inference_mode():
            return int(model(**tokenizer([text], return_tensors="pt")).logits.argmax(-1))

    predicted = [labels[torch_predict(t)] for t in val.texts]
    m = classification_metrics(predicted, val.labels, labels=labels)
    size = sum(f.stat().st_size for f in result.checkpoint.glob("*.safetensors"))
    lat = latencies(torch_predict, val.texts, args.requests)
    rows.append({"variant": "pytorch fp32", "accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "mb": size / 1e6,
                 "p50": statistics.median(lat), "p99": percentile(lat, 0.99), "gate": "-", "flips": None})  # fmt: skip
    reference: list[str] | None = None  # the ONNX fp32 labels

    for name, options in VARIANTS:
        out = args.workdir / name.split(" (")[0].replace(" ", "-")
        try:
            exported = export_run(run, out, model="intents", version=1, max_accuracy_drop=1.0, **options)
            gate = "pass"
        except AccuracyGateFailed as exc:
            gate = f"FAIL ({exc})"
            exported = export_run(
                run, out, model="intents", version=1, max_accuracy_drop=100.0, max_f1_drop=1.0, **options
            )
        classifier = TextClassifier(bundle_dir=out, manifest=exported.manifest, providers=["CPUExecutionProvider"],
                                    intra_op_threads=args.threads)  # fmt: skip
        predicted = [p.label for i in range(0, len(val), 32) for p in classifier.predict(val.texts[i : i + 32])]
        m = classification_metrics(predicted, val.labels, labels=labels)
        reference = reference or predicted
        flips = sum(a != b for a, b in zip(predicted, reference, strict=True))
        lat = latencies(lambda t, c=classifier: c.predict([t]), val.texts, args.requests)
        rows.append({"variant": name, "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                     "mb": (out / "model.onnx").stat().st_size / 1e6, "p50": statistics.median(lat),
                     "p99": percentile(lat, 0.99), "gate": gate, "flips": flips})  # fmt: skip

    base = rows[0]["p50"]
    scored = f"{len(val)} test texts" if args.test else f"{len(val)} validation texts"
    print(f"\nexport variants: MiniLM-L6 fine-tuned on {data.name}, {scored}, "
          f"{args.requests} single-text requests each, {args.threads} thread(s), {platform.machine()}, "
          f"torch {torch.__version__}")  # fmt: skip
    print(f"{'variant':<28} {'accuracy':>8} {'macro-F1':>8} {'flips':>5} {'size MB':>8} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'p50 vs torch':>12}  gate (max drop 1.0 pt)")  # fmt: skip
    for r in rows:
        flips = "-" if r["flips"] is None else str(r["flips"])
        print(f"{r['variant']:<28} {r['accuracy']:>8.3f} {r['macro_f1']:>8.3f} {flips:>5} {r['mb']:>8.1f} "
              f"{r['p50']:>7.2f} {r['p99']:>7.2f} {base / r['p50']:>11.2f}x  {r['gate']}")  # fmt: skip
    (args.workdir / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
