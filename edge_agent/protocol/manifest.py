"""The model bundle: a directory of plain files described by ``manifest.json``.

The manifest names every file with its size, sha256 and the content-addressed chunks it travels
in, the model's input/output signature, preprocessing, labels, golden vectors, metrics and
lineage. A release points at one manifest by its sha256, so the signature on the release covers
every byte of the bundle.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from edge_agent.protocol.errors import IntegrityError, MalformedPayload, UnsafePath

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA = "edgeloop.manifest/1"
CHUNK_SIZE = 96 * 1024
"""Every chunk of a file but its last carries this many bytes (96 KiB: under a 128 KiB MQTT message limit)."""
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="lowercase hex sha256")]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, *, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def safe_relative_path(name: str) -> PurePosixPath:
    """Return ``name`` as a relative path that stays inside a bundle directory, or raise ``UnsafePath``."""
    if not name or "\\" in name or "\x00" in name:
        raise UnsafePath(f"bundle file name {name!r} is empty or contains a backslash or NUL")
    path = PurePosixPath(name)
    if path.is_absolute() or any(part in ("..", ".", "") for part in path.parts) or name != str(path):
        raise UnsafePath(f"bundle file name {name!r} escapes the bundle directory or is not normalised")
    return path


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FileEntry(_Frozen):
    """One file of the bundle."""

    path: str = Field(description="relative POSIX path inside the bundle")
    size: int = Field(ge=0, description="bytes")
    sha256: Sha256
    chunks: list[Sha256] = Field(description="sha256 of each chunk, in order; their bytes concatenated are the file")

    @field_validator("path")
    @classmethod
    def _path_is_safe(cls, value: str) -> str:
        try:
            safe_relative_path(value)
        except UnsafePath as exc:
            raise ValueError(str(exc)) from None  # pydantic reports ValueError as a validation error
        return value


class TensorSpec(_Frozen):
    name: str
    dtype: str = Field(description="numpy dtype name, e.g. int64, float32, string")
    shape: list[int | str] = Field(description="dimensions; a string names a dynamic axis")


class TextPreprocessing(_Frozen):
    kind: Literal["text"] = "text"
    tokenizer: str = Field(description="bundle path of a Hugging Face tokenizers JSON file")
    max_length: int = Field(gt=0, le=8192)
    pad_token: str = "[PAD]"
    lowercase: bool = Field(default=False, description="lowercase before tokenizing (if the tokenizer does not)")
    truncation: Literal["head", "head+tail"] = Field(
        default="head",
        description="which tokens a text longer than max_length keeps: the first ones (head), or the first "
        "head_tokens plus the last ones (head+tail, better for long reviews and tickets)",
    )
    head_tokens: int = Field(
        default=0, ge=0, le=8192, description="head+tail only: tokens kept from the start; the rest from the end"
    )

    @model_validator(mode="after")
    def _head_fits(self) -> TextPreprocessing:
        if self.truncation == "head+tail" and self.head_tokens >= self.max_length:
            raise ValueError("head_tokens must be below max_length")
        return self


class ImagePreprocessing(_Frozen):
    """Image input: an encoded image (JPEG, PNG) is decoded, converted to ``channels`` (1: grayscale,
    3: RGB), scaled so its shorter side is ``resize`` and center-cropped to ``height x width`` (or,
    without ``resize``, scaled straight to ``height x width``); raw pixel arrays come at that size
    already. Then ``(pixels * scale - mean) / std`` per channel, in ``channel_order``, laid out as the
    model wants. Sizes and crop offsets are torchvision's (``Resize(resize)``, ``CenterCrop``)."""

    kind: Literal["image"] = "image"
    height: int = Field(gt=0, le=8192)
    width: int = Field(gt=0, le=8192)
    channels: int = Field(gt=0, le=4)
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    scale: float = Field(default=1.0, description="multiplies raw pixel values first (e.g. 1/255)")
    mean: list[float] = Field(description="one per channel, subtracted after scaling")
    std: list[float] = Field(description="one per channel, divides after the mean")
    resize: int | None = Field(
        default=None,
        gt=0,
        le=16384,
        description="encoded images: the shorter side is scaled to this before the center crop to height x width; "
        "null: scaled straight to height x width",
    )
    resample: Literal["bilinear", "bicubic", "nearest"] = Field(
        default="bilinear", description="encoded images: the resampling filter (Pillow's, with antialiasing)"
    )
    channel_order: Literal["RGB", "BGR"] = Field(
        default="RGB", description="3 channels: the order the model takes them in (inputs are RGB)"
    )

    @model_validator(mode="after")
    def _per_channel(self) -> ImagePreprocessing:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")
        if any(s == 0 for s in self.std):
            raise ValueError("std must not be zero")
        if self.resize is not None and self.resize < max(self.height, self.width):
            raise ValueError(f"resize {self.resize} is smaller than the {self.height}x{self.width} crop")
        if self.channel_order == "BGR" and self.channels != 3:
            raise ValueError("channel_order BGR needs 3 channels")
        return self

    @model_serializer(mode="wrap")
    def _omit_new_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Fields added for encoded images are left out at their defaults, so a bundle that does not
        use them (digits) stays readable by agents from before they existed."""
        data: dict[str, Any] = handler(self)
        for name, default in _IMAGE_DEFAULTS.items():
            if data.get(name, default) == default:
                data.pop(name, None)
        return data


_IMAGE_DEFAULTS: dict[str, Any] = {"resize": None, "resample": "bilinear", "channel_order": "RGB"}


class NoPreprocessing(_Frozen):
    """The ``tensor`` task's: the model's named input tensors come in as they are, and leave as they are."""

    kind: Literal["none"] = "none"


Preprocessing = Annotated[TextPreprocessing | ImagePreprocessing | NoPreprocessing, Field(discriminator="kind")]

TASK_PREPROCESSING = {"text-classification": "text", "image-classification": "image", "tensor": "none"}
"""The preprocessing ``kind`` each manifest ``task`` takes."""
TENSOR_DTYPES = ("float32", "float16", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "bool")
"""The dtypes a ``tensor`` model's inputs and outputs may have (numpy names; no strings)."""


class Lineage(_Frozen):
    base_model: str
    dataset_sha256: str | None = None
    parent_version: int | None = None
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    samples: dict[str, Any] | None = Field(
        default=None, description="labelled fleet samples merged into the training data: counts and sha256"
    )


class Manifest(_Frozen):
    """``manifest.json``: what a bundle is and how to run it."""

    schema_: Literal["edgeloop.manifest/1"] = Field(default=MANIFEST_SCHEMA, alias="schema")  # type: ignore[arg-type]
    model: str
    version: int = Field(ge=1)
    created_at: str
    task: Literal["text-classification", "image-classification", "tensor"] = Field(
        description="text-classification and image-classification: labels and scores; tensor: the model's own "
        "named tensors in and out (no preprocessing, no labels)"
    )
    model_file: str = Field(description="bundle path of the ONNX model to serve")
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opset: int
    min_onnxruntime: str
    execution_providers: list[str]
    quantization: str = Field(description="e.g. none, dynamic-int8")
    preprocessing: Preprocessing
    labels: list[str] = Field(description="label names in logit order: at least 2 for a classifier, none for tensor")
    golden_file: str = Field(description="bundle path of golden test vectors (JSON)")
    metrics: dict[str, Any] = Field(default_factory=dict)
    lineage: Lineage
    files: list[FileEntry] = Field(min_length=1)

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _referenced_files_exist(self) -> Manifest:
        names = [entry.path for entry in self.files]
        if len(set(names)) != len(names):
            raise ValueError("manifest lists a file twice")
        refs = [self.model_file, self.golden_file]
        if isinstance(self.preprocessing, TextPreprocessing):
            refs.append(self.preprocessing.tokenizer)
        expected_kind = TASK_PREPROCESSING[self.task]
        if self.preprocessing.kind != expected_kind:
            raise ValueError(f"task {self.task} needs {expected_kind} preprocessing, not {self.preprocessing.kind}")
        if self.task == "tensor":
            self._tensor_signature()
        elif len(self.labels) < 2:
            raise ValueError(f"task {self.task} needs at least 2 labels, not {len(self.labels)}")
        for ref in refs:
            if ref not in names:
                raise ValueError(f"manifest refers to {ref!r}, which is not in its file list")
        self.chunk_sizes()  # chunk counts and sizes agree with the declared file sizes
        return self

    def _tensor_signature(self) -> None:
        """A tensor model is served by its signature: no labels, unique names, dtypes a device can carry."""
        if self.labels:
            raise ValueError("task tensor has no labels")
        if not self.inputs or not self.outputs:
            raise ValueError("task tensor needs at least one input and one output")
        for kind, specs in (("input", self.inputs), ("output", self.outputs)):
            names = [spec.name for spec in specs]
            if len(set(names)) != len(names) or not all(names):
                raise ValueError(f"task tensor: {kind} names must be unique and not empty")
            for spec in specs:
                if spec.dtype not in TENSOR_DTYPES:
                    raise ValueError(
                        f"task tensor: {kind} {spec.name!r} has dtype {spec.dtype}; one of {', '.join(TENSOR_DTYPES)}"
                    )
                if kind == "input" and any(isinstance(d, int) and d < 1 for d in spec.shape):
                    raise ValueError(f"task tensor: input {spec.name!r} has shape {spec.shape}; fixed sizes are >= 1")

    def chunk_sizes(self) -> dict[str, int]:
        """The exact size of every chunk, from the file sizes; ``ValueError`` if the chunk lists disagree.

        A file of ``size`` bytes travels in ``ceil(size / CHUNK_SIZE)`` chunks, all full but the
        last. A manifest that lists more (an amplification attack: a device would fetch them all
        before assembly could notice) or fewer is refused before a single chunk is requested.
        """
        sizes: dict[str, int] = {}
        for entry in self.files:
            expected = -(-entry.size // CHUNK_SIZE)
            if len(entry.chunks) != expected:
                raise ValueError(
                    f"file {entry.path!r} of {entry.size} bytes travels in {expected} chunk(s) of at most "
                    f"{CHUNK_SIZE} bytes, but the manifest lists {len(entry.chunks)}"
                )
            for index, chunk in enumerate(entry.chunks):
                size = min(CHUNK_SIZE, entry.size - index * CHUNK_SIZE)
                if sizes.setdefault(chunk, size) != size:
                    raise ValueError(f"chunk {chunk[:12]}… is listed with two different sizes")
        return sizes

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files)

    def to_json(self) -> bytes:
        return json.dumps(self.model_dump(by_alias=True), indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def parse(cls, data: bytes, *, origin: str = "manifest") -> Manifest:
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise MalformedPayload(f"{origin} is not a valid {MANIFEST_SCHEMA}: {_first_error(exc)}") from None

    @classmethod
    def read(cls, bundle_dir: Path) -> Manifest:
        path = bundle_dir / MANIFEST_NAME
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise MalformedPayload(f"cannot read {path}: {exc.strerror}") from None
        return cls.parse(data, origin=str(path))


def verify_bundle_files(bundle_dir: Path, manifest: Manifest) -> None:
    """Check that every file in ``manifest`` is in ``bundle_dir`` with its declared size and sha256."""
    for entry in manifest.files:
        path = bundle_dir / safe_relative_path(entry.path)
        try:
            size = path.stat().st_size
        except OSError:
            raise IntegrityError(f"bundle file {entry.path!r} is missing") from None
        if size != entry.size:
            raise IntegrityError(f"bundle file {entry.path!r} has {size} bytes, the manifest says {entry.size}")
        actual = sha256_file(path)
        if actual != entry.sha256:
            raise IntegrityError(
                f"bundle file {entry.path!r} has sha256 {actual[:12]}…, the manifest says {entry.sha256[:12]}…"
            )


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(part) for part in err["loc"]) or "payload"
    return f"{where}: {err['msg']} ({exc.error_count()} problem(s))"
