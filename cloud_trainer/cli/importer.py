"""``cloud-train import``: register an existing image classifier (an ONNX file, or a PyTorch module
exported here) with its labels and the preprocessing it was trained with; or, with ``--task tensor``,
any ONNX model, served by its own signature (named tensors in, every output out).

cloud-train import resnet18.onnx --labels labels.txt --model birds --preset imagenet
cloud-train import --module mypkg.nets:build --labels labels.txt --model birds --size 224 --resize 256 \\
    --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --scale 1/255
cloud-train import model.onnx --labels labels.txt --model parts --preset imagenet --calibration images/
cloud-train import --task tensor ranker.onnx --model ranker [--golden-inputs case1.npz ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # torchvision's ImageNet evaluation transforms: Resize(256), CenterCrop(224), ToTensor, Normalize
    "imagenet": {
        "size": (224, 224),
        "resize": 256,
        "scale": 1 / 255,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "channels": "RGB",
        "layout": "NCHW",
    },
    # pixels scaled to 0..1 and nothing else
    "unit": {"scale": 1 / 255, "mean": None, "std": None, "channels": "RGB", "layout": "NCHW"},
}


def _size(value: str) -> tuple[int, int]:
    """``224`` or ``HxW`` (``224x192``)."""
    parts = value.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() and 0 < int(p) <= 8192 for p in parts):
        raise argparse.ArgumentTypeError(f"size {value!r} is not N or HxW with sides 1..8192")
    height, width = int(parts[0]), int(parts[-1])
    return height, width


def _floats(value: str) -> list[float]:
    try:
        numbers = [float(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not comma-separated numbers (e.g. 0.485,0.456,0.406)") from None
    if not all(abs(n) < 1e6 for n in numbers):
        raise argparse.ArgumentTypeError(f"{value!r} holds a number that is not finite")
    return numbers


def _scale(value: str) -> float:
    """``0.00392`` or a fraction ``1/255``."""
    numerator, _, denominator = value.partition("/")
    try:
        scale = float(numerator) / float(denominator) if denominator else float(numerator)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"scale {value!r} is not a number or a fraction like 1/255") from None
    if not 0 < scale < 1e6:
        raise argparse.ArgumentTypeError(f"scale {value!r} must be positive")
    return scale


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive integer")
    return int(value)


def preprocessing_from_args(args: argparse.Namespace, onnx_file: Path | None) -> Any:
    """The :class:`ImagePreprocessing` the flags declare: a preset, overridden flag by flag; the size
    from the ONNX input's fixed dimensions when neither says it."""
    from pydantic import ValidationError

    from cloud_trainer.training.importer import ModelImportError
    from edge_agent.protocol import ImagePreprocessing

    settings: dict[str, Any] = {
        "resize": None,
        "scale": 1 / 255,
        "mean": None,
        "std": None,
        "channels": "RGB",
        "layout": "NCHW",
        "size": None,
    }
    settings.update(PRESETS.get(args.preset or "", {}))
    for name in ("size", "resize", "scale", "mean", "std", "channels", "layout"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if args.no_resize:
        settings["resize"] = None
    channels = 1 if settings["channels"] == "L" else 3
    if settings["size"] is None and onnx_file is not None:
        settings["size"] = _size_from_onnx(onnx_file, settings["layout"])
    if settings["size"] is None:
        raise ModelImportError("--size HxW is required (or --preset, or an ONNX file with a fixed input size)")
    height, width = settings["size"]
    try:
        return ImagePreprocessing(
            height=height,
            width=width,
            channels=channels,
            layout=settings["layout"],
            scale=settings["scale"],
            mean=settings["mean"] if settings["mean"] is not None else [0.0] * channels,
            std=settings["std"] if settings["std"] is not None else [1.0] * channels,
            resize=settings["resize"],
            resample=args.resample or "bilinear",
            channel_order="BGR" if settings["channels"] == "BGR" else "RGB",
        )
    except ValidationError as exc:
        error = exc.errors()[0]
        raise ModelImportError(f"the declared preprocessing is not valid: {error['msg']}") from None


def _size_from_onnx(path: Path, layout: str) -> tuple[int, int] | None:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - check_onnx reports an unreadable file properly later
        return None
    if len(model.graph.input) < 1:
        return None
    dims = [d.dim_value if d.HasField("dim_value") else None for d in model.graph.input[0].type.tensor_type.shape.dim]
    if len(dims) != 4:
        return None
    height, width = (dims[2], dims[3]) if layout == "NCHW" else (dims[1], dims[2])
    return (height, width) if height and width else None


IMAGE_ONLY = ("labels", "module", "preset", "size", "resize", "no_resize", "scale", "mean", "std", "channels",
              "layout", "resample", "calibration")  # fmt: skip
"""The flags that describe an image classifier; ``--task tensor`` refuses them by name."""


def _cmd_import(args: argparse.Namespace) -> int:
    from cloud_trainer.releases.registry import Registry, default_registry, parse_ref
    from cloud_trainer.training.importer import ImportRequest, ModelImportError, import_model, read_labels

    parse_ref(args.model)  # a name that fits topics and directories, or a one-line error
    if args.task == "tensor":
        return _import_tensor(args)
    if args.golden_inputs:
        raise ModelImportError("--golden-inputs: only for --task tensor (image models get synthetic PNGs)")
    if (args.onnx is None) == (args.module is None):
        raise ModelImportError("give either MODEL.onnx or --module package.module:factory (exactly one)")
    if args.labels is None:
        raise ModelImportError("--labels FILE is required for an image classifier (class names, one a line)")
    labels = read_labels(args.labels)
    request = ImportRequest(
        onnx_file=args.onnx,
        module=args.module,
        labels=labels,
        model=args.model,
        preprocessing=preprocessing_from_args(args, args.onnx),
        calibration=args.calibration,
        max_accuracy_drop=args.max_accuracy_drop,
        max_f1_drop=args.max_f1_drop,
    )
    entry = import_model(request, registry=Registry(args.registry or default_registry()), version=args.version)
    manifest = entry.manifest
    check = manifest.metrics["import"]
    print(
        f"registered {entry.ref}: {len(labels)} labels, input {check['input']['shape']}, "
        f"{manifest.quantization}, {manifest.total_bytes} bytes"
    )
    if "parity_max_abs_diff" in check:
        print(f"ONNX vs PyTorch: max |diff| {check['parity_max_abs_diff']:.2e}")
    gate = manifest.metrics.get("export", {}).get("gate")
    if gate is not None:
        print(f"quantization gate: {gate['reason']}")
    print(f"push it with: cloud-train push {entry.ref}")
    return 0


def _import_tensor(args: argparse.Namespace) -> int:
    from cloud_trainer.releases.registry import Registry, default_registry
    from cloud_trainer.training.importer import ModelImportError
    from cloud_trainer.training.tensor_import import TensorImportRequest, import_tensor_model

    foreign = [name for name in IMAGE_ONLY if getattr(args, name) not in (None, False)]
    if foreign:
        flags = ", ".join("--" + name.replace("_", "-") for name in foreign)
        raise ModelImportError(f"{flags}: not for --task tensor (a tensor model has no labels or preprocessing)")
    if args.onnx is None:
        raise ModelImportError("--task tensor takes an ONNX file: cloud-train import --task tensor MODEL.onnx")
    request = TensorImportRequest(onnx_file=args.onnx, model=args.model, golden_inputs=args.golden_inputs or [])
    entry = import_tensor_model(request, registry=Registry(args.registry or default_registry()), version=args.version)
    report = entry.manifest.metrics["import"]

    def signature(specs: list[dict[str, Any]]) -> str:
        return ", ".join(f"{s['name']} {s['datatype']} {s['shape']}" for s in specs)

    print(f"registered {entry.ref}: tensor model, {entry.manifest.total_bytes} bytes")
    print(f"inputs: {signature(report['inputs'])}")
    print(f"outputs: {signature(report['outputs'])}")
    print(f"golden vectors: {report['golden_cases']} case(s) from {report['golden_inputs']}")
    print(f"push it with: cloud-train push {entry.ref}")
    return 0


def add_import_command(sub: Any) -> None:
    p = sub.add_parser(
        "import",
        help="register an existing image classifier (ONNX file or PyTorch module) with labels and preprocessing, "
        "or any ONNX model as a tensor model (--task tensor)",
        description="Check an existing image classifier with onnx.checker and onnxruntime, record golden "
        "vectors and register it. Preprocessing: a --preset, overridden by the flags after it. With --task "
        "tensor, any ONNX model: served by its own inputs and outputs, no labels, no preprocessing.",
    )
    p.add_argument("onnx", nargs="?", type=Path, metavar="MODEL.onnx", help="the ONNX model (or use --module)")
    p.add_argument(
        "--task",
        choices=["image-classification", "tensor"],
        default="image-classification",
        help="image-classification (default: labels, preprocessing); tensor: named tensors in, every output out",
    )
    p.add_argument(
        "--golden-inputs",
        type=Path,
        action="append",
        metavar="FILE.npz",
        help="tensor: one golden case's inputs (numpy.savez, arrays named by input); repeat for more "
        "(default: two seeded random cases)",
    )
    p.add_argument(
        "--module",
        metavar="PKG.MOD:FACTORY",
        help="a callable returning a torch.nn.Module (importable from here); exported with torch.onnx",
    )
    p.add_argument("--labels", type=Path, metavar="FILE", help="class names, one a line, logit order (image models)")
    p.add_argument("--model", required=True, metavar="NAME", help="model name in the registry and the fleet")
    p.add_argument("--version", type=_positive, help="version to register (default: the next)")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="imagenet: resize 256, crop 224, scale 1/255, ImageNet mean/std, RGB, NCHW",
    )
    p.add_argument("--size", type=_size, metavar="HxW", help="the model's input (crop) size: 224 or 224x192")
    p.add_argument(
        "--resize",
        type=_positive,
        metavar="N",
        help="scale the shorter side to N, then center-crop --size (default: scale straight to --size)",
    )
    p.add_argument("--no-resize", action="store_true", help="scale straight to --size (undo a preset's --resize)")
    p.add_argument("--scale", type=_scale, metavar="S", help="multiplies 0..255 pixels first (default 1/255)")
    p.add_argument("--mean", type=_floats, metavar="M,M,M", help="per channel, subtracted after --scale (default 0)")
    p.add_argument("--std", type=_floats, metavar="S,S,S", help="per channel, divides after --mean (default 1)")
    p.add_argument("--channels", choices=["RGB", "BGR", "L"], help="channel order the model takes; L: grayscale")
    p.add_argument("--layout", choices=["NCHW", "NHWC"], help="default NCHW")
    p.add_argument(
        "--resample",
        choices=["bilinear", "bicubic", "nearest"],
        help="resize filter (default bilinear, as torchvision's Resize)",
    )
    p.add_argument(
        "--calibration",
        type=Path,
        metavar="DIR",
        help="labelled images (one sub-folder per label): quantize to static int8 through the gate",
    )
    p.add_argument("--max-accuracy-drop", type=float, default=1.0, help="quantization gate, points (default 1.0)")
    p.add_argument("--max-f1-drop", type=float, default=0.02, help="quantization gate, macro-F1 (default 0.02)")
    p.add_argument(
        "--registry",
        type=Path,
        metavar="DIR",
        help="registry directory (default: $EDGELOOP_REGISTRY or ~/.edgeloop/registry)",
    )
    p.set_defaults(func=_cmd_import)
