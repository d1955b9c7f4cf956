"""Text classification data for the main job: the VADER sentiment lexicon, or the user's CSV / JSONL file.

A `TextDataset` is a pair of aligned columns (texts, integer labels) plus the label names. Files are
checked completely when read, so a bad file fails before any model is loaded or trained.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """A data file cannot be used: missing, unreadable, missing columns, empty texts or labels, one class."""


@dataclasses.dataclass(frozen=True)
class TextDataset:
    """Aligned texts and labels.

    Attributes:
      texts: the inputs, one string each.
      labels: int32 array of shape ``(len(texts),)``, values in ``range(len(label_names))``.
      label_names: the label of each class id, as written in the source.
    """

    texts: tuple[str, ...]
    labels: np.ndarray
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, mask: np.ndarray) -> TextDataset:
        """The rows where the boolean `mask` (shape ``(len(self),)``) is True."""
        texts = tuple(t for t, keep in zip(self.texts, mask) if keep)
        return TextDataset(texts, self.labels[mask], self.label_names)


def vader_lexicon(min_abs_rating: float = 0.5) -> TextDataset:
    """Polarity of the ~7,500 words and emoticons that human raters scored for VADER.

    Each line of ``vader_lexicon.txt`` (shipped by the `vaderSentiment` package) holds a token and the
    mean of ten ratings in [-4, 4]. The label is ``mean > 0``; tokens with ``|mean| < min_abs_rating``
    (no clear polarity) are dropped. With the default, 6,817 tokens remain: 3,817 negative, 3,000 positive.

    Example:
      >>> data = vader_lexicon()
      >>> data.label_names
      ('negative', 'positive')
    """
    try:
        import vaderSentiment
    except ImportError:
        raise DataError(
            "The default data set is the lexicon shipped by `vaderSentiment`: pip install vaderSentiment "
            "(or ia3_jax[demo]), or pass --data your_file.csv."
        ) from None
    path = Path(vaderSentiment.__file__).parent / "vader_lexicon.txt"
    texts, labels = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        token, mean, *_ = line.split("\t")
        if abs(float(mean)) >= min_abs_rating:
            texts.append(token)
            labels.append(int(float(mean) > 0))
    return TextDataset(tuple(texts), np.asarray(labels, np.int32), ("negative", "positive"))


def _rows(path: Path) -> Iterable[tuple[int, dict]]:
    """``(line number, row)`` for every record of a CSV (header line) or JSONL file."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for row in reader:
                yield reader.line_num, row
        return
    if suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{number}: not a JSON object per line ({err}).") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}.")
                yield number, row
        return
    raise DataError(f"{path}: unknown file type {suffix!r}; use .csv (with a header line) or .jsonl.")


def _label_names(raw: Sequence[str]) -> tuple[str, ...]:
    names = set(raw)
    try:  # integer labels keep their numeric order: "2" after "10" would surprise
        return tuple(sorted(names, key=int))
    except ValueError:
        return tuple(sorted(names))


def read_table(path: str | Path, text_column: str = "text", label_column: str = "label") -> TextDataset:
    """Reads a CSV (with a header line) or JSONL file of ``text``, ``label`` records.

    Labels may be integers or strings; class ids follow their sorted order. Every row is checked:
    a missing column, an empty text or an empty label raises `DataError` with the line number, as
    does a file with fewer than two classes.

    Example:
      >>> data = read_table("reviews.csv", text_column="review", label_column="stars")
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"data file {str(path)!r} is a directory: pass one .csv or .jsonl file.")
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist.")
    texts, raw = [], []
    try:
        rows = list(_rows(path))
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}): save it as UTF-8.") from None
    for number, row in rows:
        where = f"{path}:{number}"
        missing = [c for c in (text_column, label_column) if c not in row]
        if missing:
            raise DataError(
                f"{where}: no column {missing} (the record has {sorted(row)}). Name the columns with "
                "--text-column / --label-column."
            )
        text, label = row[text_column], row[label_column]
        if label is None or str(label).strip() == "":
            raise DataError(f"{where}: empty label in column {label_column!r}; every row needs one.")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: empty or non-text value in column {text_column!r}.")
        texts.append(text)
        raw.append(str(label).strip())
    if not texts:
        raise DataError(f"{path}: no records.")
    names = _label_names(raw)
    if len(names) < 2:
        raise DataError(f"{path}: every row has the label {names[0]!r}; classification needs at least two classes.")
    ids = {name: i for i, name in enumerate(names)}
    return TextDataset(tuple(texts), np.asarray([ids[r] for r in raw], np.int32), names)


def heldout_split(data: TextDataset, fraction: float = 0.2) -> tuple[TextDataset, TextDataset]:
    """``(train, heldout)``, fixed by a hash of each text: the same text always lands on the same side.

    Raises `DataError` if either side would be empty.
    """
    buckets = np.asarray([zlib.crc32(t.encode("utf-8")) % 1000 for t in data.texts])
    heldout = buckets < round(fraction * 1000)
    if heldout.all() or not heldout.any():
        raise DataError(
            f"{len(data)} records are too few for a held-out split of {fraction:.0%}: every one fell on the same side. "
            "Add records."
        )
    return data.select(~heldout), data.select(heldout)
