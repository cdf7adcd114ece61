"""Vision serving latency side by side, in one run: ResNet-50 on one 224x224 JPEG, batch 1, sequential,
with the same number of intra-op threads (2 by default) for every engine:

1. decode and preprocess only: Pillow decode, Resize(256), CenterCrop(224), numpy normalisation
   (torchvision's classic rules, written out with Pillow and numpy): what every row below pays;
2. the classic path: 1, then PyTorch eager fp32 (``ResNetForImageClassification``);
3. the same with 1 intra-op thread, for reference: on a shared machine two OpenMP threads can wait
   at every operator's barrier for a core another process holds; one thread waits for no other;
4. 1, then raw onnxruntime fp32 (``InferenceSession.run``, the ``torch.onnx`` export);
5. 1, then raw onnxruntime static int8 (QDQ, calibrated and gated by ``cloud-train import --calibration``);
6. a real ``edge-agent`` process serving the int8 bundle over HTTP (``POST /v1/predict`` with the JPEG
   base64 in JSON, keep-alive): decoding, preprocessing, batching, sampling and the reply included;
7. a second agent serving the fp32 bundle, the same way.

1-7 run in alternating rounds, so load drifting on a shared machine weighs on every row alike.

The network is transformers' ``ResNetForImageClassification(ResNetConfig(num_labels=4))``: ResNet-50's
sizes (bottleneck blocks 3-4-6-3, widths 256-2048) with random weights, since nothing is downloaded.
So that int8's accuracy can be measured on labelled images, the network is adapted without a
gradient step through its convolutions: its BatchNorm statistics are re-estimated on the training
images (at initialisation they are 0 and 1, the statistics of no data; ``--init-batchnorm`` keeps
them), and its classification head alone is fitted (logistic regression on the pooled features) to
rendered shapes (circle, square, triangle, cross; a light shape of random size, place and rotation
on a noisy grey ground, saved as JPEG). The held-out shapes score PyTorch, onnxruntime fp32 and
int8, and int8's top-1 agreement with fp32. Random convolutions are weak features, so the accuracy
is low and int8 changes more predictions than it would in a pretrained network: the numbers
describe this network, not ResNet-50 as people use it. Both bundles go through ``cloud-train import``
(``cloud_trainer.training.importer``): onnx.checker, onnxruntime, the declared preprocessing (ImageNet mean and
std, Resize 256, crop 224) and golden PNGs, which each agent reproduces before it serves.

    .venv/bin/python bench/vision.py [--threads 2] [--requests 100] [--rounds 4] [--workdir runs/bench-vision]
    .venv/bin/python bench/vision.py --quick      # about two minutes: fewer images and requests
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import math
import shutil
import statistics
import sys
import textwrap
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from agent_harness import free_port, process_stats, start_agent, stop_agent

SHAPES = ["circle", "square", "triangle", "cross"]
SIZE, RESIZE = 224, 256
MEAN = np.asarray([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.asarray([0.229, 0.224, 0.225], dtype=np.float32)
MODEL = "vision"
TORCH_ROW = "PyTorch eager fp32 (classic path)"
TORCH_ONE_ROW = "PyTorch eager fp32, 1 intra-op thread (reference)"
ORT_FP32_ROW = "onnxruntime fp32, raw"
ORT_INT8_ROW = "onnxruntime int8 (static QDQ), raw"
AGENT_INT8_ROW = "agent HTTP, int8 bundle"
AGENT_FP32_ROW = "agent HTTP, fp32 bundle"


# -- images -----------------------------------------------------------------------------------------
def render_shape(shape: str, rng: np.random.Generator, size: int = SIZE) -> bytes:
    """One JPEG (quality 90) of ``size`` x ``size``: a light ``shape`` on a noisy grey ground."""
    from PIL import Image, ImageDraw

    ground = np.full((size, size, 3), 90, dtype=np.int16) + rng.integers(-20, 20, size=(size, size, 3))
    image = Image.fromarray(np.clip(ground, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    fill = (235, 235, 235)
    radius = float(rng.uniform(0.2, 0.34)) * size
    cx, cy = (float(v) for v in rng.uniform(radius + 4, size - radius - 4, size=2))
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    elif shape in ("square", "triangle"):
        corners = 4 if shape == "square" else 3
        turn = float(rng.uniform(0, 2 * math.pi))
        points = [(cx + radius * math.cos(turn + k * 2 * math.pi / corners),
                   cy + radius * math.sin(turn + k * 2 * math.pi / corners)) for k in range(corners)]  # fmt: skip
        draw.polygon(points, fill=fill)
    else:
        arm = radius / 3
        draw.rectangle([cx - radius, cy - arm, cx + radius, cy + arm], fill=fill)
        draw.rectangle([cx - arm, cy - radius, cx + arm, cy + radius], fill=fill)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def shapes(count: int, seed: int) -> tuple[list[bytes], list[str]]:
    """``count`` JPEGs, the classes in turn."""
    rng = np.random.default_rng(seed)
    labels = [SHAPES[i % len(SHAPES)] for i in range(count)]
    return [render_shape(label, rng) for label in labels], labels


def write_folder(folder: Path, images: list[bytes], labels: list[str]) -> Path:
    """One sub-folder per label, as ``cloud-train import --calibration`` takes them."""
    for index, (data, label) in enumerate(zip(images, labels, strict=True)):
        (folder / label).mkdir(parents=True, exist_ok=True)
        (folder / label / f"{index:04d}.jpg").write_bytes(data)
    return folder


def classic_preprocess(jpeg: bytes) -> npt.NDArray[np.float32]:
    """Pillow and numpy, as hand-written code does it: decode, RGB, shorter side to 256 (bilinear),
    center crop 224, scale to 0..1, ImageNet mean and std, CHW; shape [1, 3, 224, 224]."""
    from PIL import Image

    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    width, height = image.size
    short = min(width, height)
    size = (RESIZE, int(RESIZE * height / short)) if width <= height else (int(RESIZE * width / short), RESIZE)
    image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = round((size[0] - SIZE) / 2.0), round((size[1] - SIZE) / 2.0)
    pixels = np.asarray(image.crop((left, top, left + SIZE, top + SIZE)), dtype=np.float32) / 255.0
    chw = ((pixels - MEAN) / STD).transpose(2, 0, 1)
    return np.ascontiguousarray(chw[np.newaxis], dtype=np.float32)


# -- the network ------------------------------------------------------------------------------------
def build_resnet50(threads: int) -> Any:
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = ResNetConfig(num_labels=len(SHAPES))  # the defaults are ResNet-50's sizes
    assert (config.depths, config.hidden_sizes, config.layer_type) == ([3, 4, 6, 3], [256, 512, 1024, 2048],
                                                                      "bottleneck")  # fmt: skip
    return ResNetForImageClassification(config).eval()


def pooled_features(network: Any, images: list[bytes]) -> npt.NDArray[np.float32]:
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, len(images), 16):
            batch = torch.from_numpy(np.concatenate([classic_preprocess(i) for i in images[start : start + 16]]))
            out.append(network.resnet(batch).pooler_output.flatten(1).numpy())
    return np.concatenate(out)


def estimate_batchnorm(network: Any, images: list[bytes]) -> None:
    """Re-estimate every BatchNorm layer's running mean and variance on ``images`` (forward passes in
    training mode, a cumulative average; no gradient, no weight changes). At random initialisation
    they are 0 and 1, the statistics of no data: every image's pooled features then point almost the
    same way (cosine 0.997 between shapes), and int8's rounding leaves nothing to tell them apart."""
    import torch

    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    network.train()
    with torch.no_grad():
        for start in range(0, len(images), 16):
            batch = np.concatenate([classic_preprocess(i) for i in images[start : start + 16]])
            network.resnet(torch.from_numpy(batch))
    network.eval()


def fit_head(network: Any, images: list[bytes], labels: list[str]) -> float:
    """Fit only the classification head: logistic regression on standardised pooled features, folded
    into the head's weights (logits = W (f - mu) / sd + b). Returns the training accuracy."""
    import torch
    from sklearn.linear_model import LogisticRegression

    features = pooled_features(network, images).astype(np.float64)
    mu, sd = features.mean(axis=0), features.std(axis=0) + 1e-6
    truth = np.asarray([SHAPES.index(label) for label in labels])
    fitted = LogisticRegression(C=0.1, max_iter=5000).fit((features - mu) / sd, truth)
    weight = fitted.coef_ / sd
    bias = fitted.intercept_ - weight @ mu
    head = network.classifier[1]
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight.astype(np.float32)))
        head.bias.copy_(torch.from_numpy(bias.astype(np.float32)))
    return float(fitted.score((features - mu) / sd, truth))


def export_onnx(network: Any, path: Path) -> Path:
    """torch.onnx (TorchScript exporter, opset 17), dynamic batch axis, logits out: what
    ``cloud-train import --module`` does, and what a user exporting their own model does."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = network

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.inner(pixels).logits  # type: ignore[no-any-return]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Logits().eval(), (torch.zeros(1, 3, SIZE, SIZE),), str(path), input_names=["pixel_values"],
                          output_names=["logits"], dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)  # fmt: skip
    return path


def import_bundles(work: Path, onnx_file: Path, calibration: Path) -> tuple[Any, Any]:
    """``cloud-train import`` twice: fp32, then static int8 calibrated on ``calibration``. The int8
    gate's allowances are wide: the bench measures the drop (printed below), it does not judge it."""
    from cloud_trainer.releases.registry import Registry
    from cloud_trainer.training.importer import ImportRequest, import_model
    from edge_agent.protocol import ImagePreprocessing

    pre = ImagePreprocessing(height=SIZE, width=SIZE, channels=3, resize=RESIZE, scale=1 / 255,
                             mean=MEAN.tolist(), std=STD.tolist())  # fmt: skip
    registry = Registry(work / "registry")
    fp32 = import_model(ImportRequest(onnx_file=onnx_file, labels=SHAPES, preprocessing=pre, model=MODEL),
                        registry=registry)  # fmt: skip
    int8 = import_model(ImportRequest(onnx_file=onnx_file, labels=SHAPES, preprocessing=pre, model=MODEL,
                                      calibration=calibration, max_accuracy_drop=100.0, max_f1_drop=1.0),
                        registry=registry)  # fmt: skip
    return fp32, int8


def ort_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the agent runs it
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# -- the agent ----------------------------------------------------------------------------------------
@dataclass
class Agent:
    name: str
    process: Any
    port: int

    def stop(self) -> None:
        stop_agent(self.process)


def start_vision_agent(work: Path, name: str, bundle: Path, *, threads: int, public_key: Path) -> Agent:
    """An ``edge-agent run`` process with ``bundle`` installed as its active version (no broker: it
    serves what is installed and retries the connection in the background). Its keep-alive idle
    timeout is an hour: the client's connection waits while the other rows run."""
    from edge_agent.store import ModelStore

    state = work / f"agent-{name}"
    shutil.rmtree(state, ignore_errors=True)
    store = ModelStore(state_dir=state, model=MODEL)
    staging = store.fresh_staging(1)
    shutil.copytree(bundle, staging, dirs_exist_ok=True)
    store.install(staging, 1)
    store.activate(1)
    port = free_port()
    config = work / f"agent-{name}.toml"
    config.write_text(textwrap.dedent(f"""\
        device_id = "bench-{name}"
        fleet = "bench"
        model = "{MODEL}"
        state_dir = "{state}"
        [mqtt]
        port = {free_port()}
        [http]
        port = {port}
        max_body_bytes = 8388608
        idle_timeout_s = 3600
        [runtime]
        intra_op_threads = {threads}
        [serving]
        telemetry_interval_s = 0
        [update]
        trusted_keys = ["{public_key}"]
        """))  # fmt: skip
    agent = Agent(name, start_agent(config, log=work / f"agent-{name}.log"), port)
    deadline = time.monotonic() + 120
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/v2/health/ready")
            ready = conn.getresponse().status == 200
            conn.close()
            if ready:
                return agent
        except OSError:
            pass
        if agent.process.poll() is not None or time.monotonic() > deadline:
            agent.stop()
            raise SystemExit(f"agent {name} did not serve; see {work / f'agent-{name}.log'}")
        time.sleep(0.2)


class AgentClient:
    """``POST /v1/predict`` on a keep-alive connection; the JSON body (one base64 JPEG) built once."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self._bodies: dict[bytes, bytes] = {}

    def predict(self, jpeg: bytes) -> dict[str, Any]:
        body = self._bodies.get(jpeg)
        if body is None:
            body = json.dumps({"images": [base64.b64encode(jpeg).decode()]}).encode()
            self._bodies[jpeg] = body
        self.conn.request("POST", "/v1/predict", body=body, headers={"Content-Type": "application/json"})
        response = self.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"agent answered {response.status}: {data[:200]!r}")
        reply: dict[str, Any] = json.loads(data)
        return reply

    def label(self, jpeg: bytes) -> str:
        return str(self.predict(jpeg)["predictions"][0]["label"])


# -- measuring ----------------------------------------------------------------------------------------
def interleaved(calls: dict[str, Callable[[], Any]], requests: int, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Each call ``requests`` times in ``rounds`` alternating slices (after ``warmup`` calls each); ms."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        for _ in range(warmup):
            call()
    for r in range(rounds):
        for name, call in calls.items():
            for _ in range(r * requests // rounds, (r + 1) * requests // rounds):
                start = time.perf_counter()
                call()
                samples[name].append((time.perf_counter() - start) * 1000)
    return samples


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def accuracy(predicted: list[str], truth: list[str]) -> float:
    return sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(truth)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for torch, onnxruntime and agents")
    parser.add_argument("--requests", type=int, default=100, help="timed requests per row")
    parser.add_argument("--rounds", type=int, default=4, help="alternating slices the requests are split into")
    parser.add_argument("--train", type=int, default=96, help="rendered images the head is fitted on")
    parser.add_argument("--test", type=int, default=96, help="held-out images that score fp32 and int8")
    parser.add_argument("--calibration", type=int, default=48, help="images for cloud-train import --calibration")
    parser.add_argument(
        "--init-batchnorm",
        action="store_true",
        help="keep BatchNorm's initial statistics (mean 0, variance 1) instead of re-estimating them",
    )
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-vision"))
    parser.add_argument("--json", type=Path, help="write the rows and accuracies as JSON here")
    parser.add_argument("--quick", action="store_true", help="about two minutes: fewer images and requests")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.rounds, args.train, args.test, args.calibration = 24, 3, 32, 32, 24
    began = time.perf_counter()
    work = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    import onnxruntime as ort
    import torch

    from cloud_trainer.releases.signing import generate_keypair

    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {args.threads} intra-op threads", flush=True)
    network = build_resnet50(args.threads)
    parameters = sum(p.numel() for p in network.parameters())
    train_images, train_labels = shapes(args.train, seed=1)
    test_images, test_labels = shapes(args.test, seed=2)
    calib_images, calib_labels = shapes(args.calibration, seed=3)
    step = time.perf_counter()
    if not args.init_batchnorm:
        estimate_batchnorm(network, train_images)
    train_accuracy = fit_head(network, train_images, train_labels)
    print(f"ResNet-50, {parameters / 1e6:.1f} M parameters; BatchNorm statistics "
          f"{'as initialised' if args.init_batchnorm else 're-estimated'}, head fitted on {args.train} shapes in "
          f"{time.perf_counter() - step:.0f} s (training accuracy {train_accuracy:.3f})", flush=True)  # fmt: skip

    step = time.perf_counter()
    onnx_file = export_onnx(network, work / "resnet50.onnx")
    fp32_entry, int8_entry = import_bundles(work, onnx_file, write_folder(work / "calibration", calib_images,
                                                                           calib_labels))  # fmt: skip
    fp32_file = fp32_entry.bundle_dir / fp32_entry.manifest.model_file
    int8_file = int8_entry.bundle_dir / int8_entry.manifest.model_file
    print(f"exported and imported fp32 ({fp32_entry.ref}) and static int8 ({int8_entry.ref}) in "
          f"{time.perf_counter() - step:.0f} s", flush=True)  # fmt: skip
    fp32_session, int8_session = ort_session(fp32_file, args.threads), ort_session(int8_file, args.threads)

    def torch_logits(jpeg: bytes) -> npt.NDArray[np.float32]:
        with torch.inference_mode():
            logits: npt.NDArray[np.float32] = network(torch.from_numpy(classic_preprocess(jpeg))).logits.numpy()
        return logits

    def torch_one_thread(jpeg: bytes) -> npt.NDArray[np.float32]:
        torch.set_num_threads(1)
        try:
            return torch_logits(jpeg)
        finally:
            torch.set_num_threads(args.threads)

    def ort_logits(session: Any) -> Callable[[bytes], npt.NDArray[np.float32]]:
        def run(jpeg: bytes) -> npt.NDArray[np.float32]:
            logits: npt.NDArray[np.float32] = session.run(None, {"pixel_values": classic_preprocess(jpeg)})[0]
            return logits

        return run

    def batched(run: Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]) -> npt.NDArray[np.float32]:
        """Logits of every held-out image, 16 at a time (accuracy, not latency: batches are faster)."""
        out = []
        for start in range(0, len(test_images), 16):
            out.append(run(np.concatenate([classic_preprocess(i) for i in test_images[start : start + 16]])))
        return np.concatenate(out)

    def torch_batch(pixels: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        with torch.inference_mode():
            logits: npt.NDArray[np.float32] = network(torch.from_numpy(pixels)).logits.numpy()
        return logits

    def ort_batch(session: Any) -> Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]:
        return lambda pixels: session.run(None, {"pixel_values": pixels})[0]  # type: ignore[no-any-return]

    logits = {"pytorch": batched(torch_batch), "ort-fp32": batched(ort_batch(fp32_session)),
              "ort-int8": batched(ort_batch(int8_session))}  # fmt: skip
    predicted = {name: [SHAPES[i] for i in values.argmax(axis=1)] for name, values in logits.items()}
    parity = float(np.abs(logits["ort-fp32"] - logits["pytorch"]).max())
    engines = {"ort-fp32": ort_logits(fp32_session), "ort-int8": ort_logits(int8_session)}

    _, public_key = generate_keypair(work / "keys")
    agents: list[Agent] = []
    try:
        agents.append(start_vision_agent(work, "int8", int8_entry.bundle_dir, threads=args.threads,
                                         public_key=public_key))  # fmt: skip
        agents.append(start_vision_agent(work, "fp32", fp32_entry.bundle_dir, threads=args.threads,
                                         public_key=public_key))  # fmt: skip
        int8_client, fp32_client = AgentClient(agents[0].port), AgentClient(agents[1].port)
        predicted["agent-int8"] = [int8_client.label(i) for i in test_images]
        jpeg = test_images[0]
        calls: dict[str, Callable[[], Any]] = {
            "decode + preprocess only (Pillow, numpy)": lambda: classic_preprocess(jpeg),
            TORCH_ROW: lambda: torch_logits(jpeg),
            TORCH_ONE_ROW: lambda: torch_one_thread(jpeg),
            ORT_FP32_ROW: lambda: engines["ort-fp32"](jpeg),
            ORT_INT8_ROW: lambda: engines["ort-int8"](jpeg),
            AGENT_INT8_ROW: lambda: int8_client.predict(jpeg),
            AGENT_FP32_ROW: lambda: fp32_client.predict(jpeg),
        }
        step = time.perf_counter()
        samples = interleaved(calls, args.requests, args.rounds, warmup=3)
        measured_s = time.perf_counter() - step
        rss = {agent.name: process_stats(agent.process.pid).peak_rss_mb for agent in agents}
    finally:
        for agent in agents:
            agent.stop()

    rows = []
    for name, values in samples.items():
        ordered = sorted(values)
        rows.append({"row": name, "p50_ms": statistics.median(ordered), "p99_ms": percentile(ordered, 0.99),
                     "images_per_s": 1000 * len(values) / sum(values), "n": len(values)})  # fmt: skip
    p50 = {row["row"]: row["p50_ms"] for row in rows}
    torch_p50, ort_p50 = p50[TORCH_ROW], p50[ORT_FP32_ROW]
    print(f"\n{args.requests} requests per row in {args.rounds} alternating rounds ({measured_s:.0f} s); "
          f"one {SIZE}x{SIZE} JPEG of {len(jpeg)} bytes, batch 1\n")  # fmt: skip
    print(f"| {'':<46} | p50 ms | p99 ms | images/s | p50 / PyTorch | p50 / ORT fp32 |")
    print(f"|{'-' * 48}|--------|--------|----------|---------------|----------------|")
    for row in rows:
        print(f"| {row['row']:<46} | {row['p50_ms']:6.1f} | {row['p99_ms']:6.1f} | {row['images_per_s']:8.1f} "
              f"| {row['p50_ms'] / torch_p50:12.2f}x | {row['p50_ms'] / ort_p50:13.2f}x |")  # fmt: skip
    print()
    for name in (TORCH_ONE_ROW, ORT_FP32_ROW, ORT_INT8_ROW, AGENT_INT8_ROW, AGENT_FP32_ROW):
        print(f"{name}: {torch_p50 / p50[name]:.2f}x faster than PyTorch eager ({args.threads} threads), "
              f"{ort_p50 / p50[name]:.2f}x the speed of raw onnxruntime fp32")  # fmt: skip
    print(f"agent HTTP int8 p50 - raw onnxruntime int8 p50: {p50[AGENT_INT8_ROW] - p50[ORT_INT8_ROW]:+.1f} ms "
          f"(agent fp32 - raw fp32: {p50[AGENT_FP32_ROW] - ort_p50:+.1f} ms)")  # fmt: skip

    fp32_mb, int8_mb = fp32_file.stat().st_size / 1e6, int8_file.stat().st_size / 1e6
    print(f"\nmodel.onnx: fp32 {fp32_mb:.1f} MB, int8 {int8_mb:.1f} MB ({fp32_mb / int8_mb:.2f}x smaller); "
          f"agents' peak RSS: int8 {rss['int8']:.0f} MB, fp32 {rss['fp32']:.0f} MB")  # fmt: skip
    truth = test_labels
    scores = {name: accuracy(values, truth) for name, values in predicted.items()}
    agree = accuracy(predicted["ort-int8"], predicted["ort-fp32"])
    print(f"\nheld-out rendered shapes ({args.test}, {len(SHAPES)} classes, chance {1 / len(SHAPES):.2f}), "
          f"head fitted on {args.train}:")  # fmt: skip
    for name, value in scores.items():
        print(f"  {name:<11} accuracy {value:.3f}")
    print(f"  int8 drop against onnxruntime fp32: {100 * (scores['ort-fp32'] - scores['ort-int8']):+.1f} points; "
          f"int8 top-1 agrees with fp32 on {agree:.3f} ({round(agree * len(truth))} of {len(truth)})")  # fmt: skip
    print(f"  agent (int8, its own decoding) agrees with raw int8 on "
          f"{accuracy(predicted['agent-int8'], predicted['ort-int8']):.3f}; onnxruntime fp32 vs PyTorch: "
          f"max |logit difference| {parity:.2e}")  # fmt: skip
    gate = int8_entry.manifest.metrics["export"]["gate"]
    print(f"  cloud-train import's gate on its calibration hold-out ({gate['examples']} images): fp32 "
          f"{gate['accuracy_reference']:.3f}, int8 {gate['accuracy_candidate']:.3f}; {gate['reason']}")  # fmt: skip
    print(f"\ntotal {time.perf_counter() - began:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "accuracy": scores, "int8_agreement": agree,
                                         "fp32_mb": fp32_mb, "int8_mb": int8_mb, "peak_rss_mb": rss,
                                         "parity_max_abs_diff": parity, "gate": gate}, indent=1))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
