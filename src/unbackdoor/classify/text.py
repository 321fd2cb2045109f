"""Text classification data: the counterpart of ``ImageData`` for sequence classifiers.

Records come from JSON (a list of objects, or ``{"class_names": [...], "records": [...]}``), JSONL
or CSV, with a text column and a label column (``text`` / ``label`` by default; other names are
options). Labels are class indices or class names; names are mapped through the class names
given (the model's ``id2label``, an option, or the file's own list), else sorted, and they are
kept, so reports and ``predictions.json`` show them. A :class:`TextData` bound to a tokenizer
(:meth:`TextData.with_tokenizer`) exposes ``inputs``: the tokenised dict of tensors every
classifier defense and the evaluation accept in place of image tensors.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..core.config import option
from ..core.errors import DataError
from ..core.runs import atomic_write_text

TEXT_SUFFIXES = (".json", ".jsonl", ".csv")


@dataclass
class TextOptions:
    """How to read a text classification file (CLI flags, API keywords)."""

    text_field: str = option("text", "column / key holding the text")
    label_field: str = option("label", "column / key holding the label (a class index or a class name)")
    label_names: list[str] | None = option(None, "class names in index order (default: the model's, the file's, "
                                                 "else the sorted label names)")
    max_length: int = option(128, "tokens per text at most (longer texts are truncated)")


@dataclass
class TextData:
    """Labelled texts: ``texts`` (list of str), ``labels`` int64 ``[N]``, class names; ``inputs`` once tokenised."""

    texts: list[str]
    labels: torch.Tensor
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    name: str = "text"
    tokenizer: Any = field(default=None, repr=False, compare=False)
    max_length: int = 128
    _encoded: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        where = f"dataset '{self.name}'"
        if not isinstance(self.texts, list) or not all(isinstance(t, str) for t in self.texts):
            raise DataError("texts must be a list of strings", where=where, fix="give one string per record")
        self.labels = torch.as_tensor(self.labels, dtype=torch.int64).flatten()
        if not self.texts:
            raise DataError("the dataset is empty", where=where, fix="check the file and any subset/filter")
        if len(self.labels) != len(self.texts):
            raise DataError(f"{len(self.texts)} texts but {len(self.labels)} labels", where=where,
                            fix="give exactly one label per text")
        self.num_classes = int(self.num_classes)
        bad = ((self.labels < 0) | (self.labels >= self.num_classes)).nonzero().flatten()
        if len(bad):
            i = int(bad[0])
            raise DataError(f"label {int(self.labels[i])} at record {i} is outside [0, {self.num_classes})",
                            where=f"{where}, record {i}, field 'label'",
                            fix="labels must be class indices 0..num_classes-1 (or class names)")
        if not self.class_names:
            self.class_names = [str(i) for i in range(self.num_classes)]
        if len(self.class_names) != self.num_classes:
            raise DataError(f"{len(self.class_names)} class names for {self.num_classes} classes", where=where,
                            fix="give one name per class")

    def __len__(self) -> int:
        return len(self.texts)

    def class_counts(self) -> torch.Tensor:
        return torch.bincount(self.labels, minlength=self.num_classes)

    def replace(self, texts: list[str], labels: torch.Tensor, name: str) -> "TextData":
        """A new set with these texts and labels, the same classes and tokenizer."""
        return TextData(list(texts), labels.clone(), self.num_classes, list(self.class_names), name, self.tokenizer,
                        self.max_length)

    def subset(self, indices: Sequence[int] | torch.Tensor, name: str | None = None) -> "TextData":
        idx = torch.as_tensor(indices, dtype=torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise DataError(f"subset index out of range for a dataset of {len(self)} records",
                            where=f"dataset '{self.name}'", fix="use indices in [0, len(data))")
        return self.replace([self.texts[i] for i in idx.tolist()], self.labels[idx], name or self.name)

    def with_tokenizer(self, tokenizer: Any, max_length: int | None = None) -> "TextData":
        """The same records, tokenised by ``tokenizer`` when ``inputs`` is first read."""
        out = self.replace(self.texts, self.labels, self.name)
        out.tokenizer, out.max_length = tokenizer, int(max_length or self.max_length)
        return out

    @property
    def inputs(self) -> dict[str, torch.Tensor]:
        """The tokenised texts (padded to the longest, truncated at ``max_length``): the model's inputs."""
        if self._encoded is None:
            if self.tokenizer is None:
                raise DataError("text data has no tokenizer", where=f"dataset '{self.name}'",
                                fix="load the data with the model's tokenizer (the classify commands do it)")
            enc = self.tokenizer(self.texts, padding="longest", truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            self._encoded = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
        return self._encoded


def is_text_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in TEXT_SUFFIXES


def _records(path: Path) -> tuple[list[dict[str, Any]], list[str] | None]:
    """The file's records and the class names it lists itself (JSON object form), if any."""
    suffix = path.suffix.lower()
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path.name}: {e}", where=str(path), fix="pass a UTF-8 text file") from None
    if suffix == ".csv":
        return list(csv.DictReader(raw.splitlines())), None
    if suffix == ".jsonl":
        out = []
        for i, line in enumerate(raw.splitlines()):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError as e:
                    raise DataError(f"line {i + 1} is not JSON: {e}", where=f"{path}, line {i + 1}",
                                    fix="write one JSON object per line") from None
        return out, None
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise DataError(f"{path.name} is not JSON: {e}", where=str(path), fix="pass a JSON list of records") from None
    if isinstance(data, dict):
        records = data.get("records", data.get("data"))
        names = data.get("class_names")
        if not isinstance(records, list):
            raise DataError(f"{path.name} is a JSON object without a 'records' list", where=str(path),
                            fix='write [{"text": ..., "label": ...}, ...] or {"class_names": [...], "records": [...]}')
        return records, [str(n) for n in names] if isinstance(names, list) else None
    if not isinstance(data, list):
        raise DataError(f"{path.name} holds a JSON {type(data).__name__}, not a list of records", where=str(path),
                        fix='write [{"text": ..., "label": ...}, ...]')
    return data, None


def read_text_data(path: str | Path, options: TextOptions | None = None, *, class_names: Sequence[str] | None = None,
                   name: str | None = None) -> TextData:
    """A :class:`TextData` from a JSON / JSONL / CSV file (see the module docstring for the label rules)."""
    path, opts = Path(path), options or TextOptions()
    if not path.is_file():
        raise DataError(f"text data not found: {path}", where=str(path), fix="check the path")
    records, file_names = _records(path)
    if not records:
        raise DataError(f"{path.name} holds no records", where=str(path), fix="add at least one record")
    texts, raw_labels = [], []
    for i, rec in enumerate(records):
        where = f"{path}, record {i}"
        if not isinstance(rec, dict):
            raise DataError(f"record {i} is a {type(rec).__name__}, not an object", where=where,
                            fix=f"write records as objects with '{opts.text_field}' and '{opts.label_field}'")
        for key in (opts.text_field, opts.label_field):
            if key not in rec:
                raise DataError(f"record {i} has no '{key}' (it has: {', '.join(map(str, rec)) or 'nothing'})",
                                where=f"{where}, field '{key}'",
                                fix="name the columns with --text-field / --label-field")
        text = rec[opts.text_field]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"record {i}: '{opts.text_field}' is empty or not a string", where=f"{where}, field "
                            f"'{opts.text_field}'", fix="drop the record or fill in its text")
        texts.append(text)
        raw_labels.append(rec[opts.label_field])
    names = list(opts.label_names or class_names or file_names or [])
    labels = _label_indices(raw_labels, names, path, opts.label_field)
    if not names:
        strings = sorted({str(v) for v in raw_labels if not _is_int(v)})
        names = strings if strings else [str(i) for i in range(int(labels.max()) + 1)]
    return TextData(texts, labels, len(names), names, name or path.stem, max_length=opts.max_length)


def _is_int(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    return isinstance(v, str) and v.strip().lstrip("-").isdigit()


def _label_indices(raw: list[Any], names: list[str], path: Path, field_name: str) -> torch.Tensor:
    if all(_is_int(v) for v in raw):
        return torch.tensor([int(v) for v in raw], dtype=torch.int64)
    if not names:
        names[:] = sorted({str(v) for v in raw})
    index = {n: i for i, n in enumerate(names)}
    out = []
    for i, v in enumerate(raw):
        if _is_int(v):
            out.append(int(v))
        elif str(v) in index:
            out.append(index[str(v)])
        else:
            raise DataError(f"record {i}: label {v!r} is not a class name ({', '.join(names)})",
                            where=f"{path}, record {i}, field '{field_name}'",
                            fix="use the model's class names, or give them with --label-names in index order")
    return torch.tensor(out, dtype=torch.int64)


def write_text_data(data: TextData, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``{"class_names", "records": [{"text", "label"}]}`` JSON (or JSONL records), atomically."""
    path = Path(path)
    records = [{"text": t, "label": data.class_names[int(y)]} for t, y in zip(data.texts, data.labels.tolist())]
    if path.suffix.lower() == ".jsonl":
        return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    body = {**(extra or {}), "class_names": list(data.class_names), "records": records}
    return atomic_write_text(path, json.dumps(body, ensure_ascii=False, indent=1) + "\n")


__all__ = ["TEXT_SUFFIXES", "TextData", "TextOptions", "is_text_file", "read_text_data", "write_text_data"]
