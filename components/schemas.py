"""Row-level schemas of the manifests every stage hands to the next, and their only reader/writer.

A manifest is a parquet table with one row per (image, text) pair; `IngestedManifest` is what
the ingest stage writes, `BootstrappedManifest` adds the bootstrap stage's scores and provenance,
and `Rejects` lists the rows ingest refused, with a reason from `REJECT_REASONS`. `validate` runs
the pandera model lazily and turns every failure into one `CapfiltError` whose message lists the
failing rows (index, column, check, value). `write_manifest` validates and then writes
atomically; `read_manifest` validates before returning, so no stage ever reads an unchecked
manifest. Dataset-level expectations (null fractions, source mix, ...) live in
`components/expectations.py`.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pandera.pandas as pa
import pyarrow as pyarrow_lib
from pandera.errors import SchemaErrors
from pandera.typing.pandas import Series

from components.errors import CapfiltError
from components.reasons import REJECT_REASONS  # the closed vocabulary, defined next to ingest

log = logging.getLogger(__name__)

ManifestKind = Literal["ingested", "bootstrapped", "rejects"]

MAX_CAPTION_CHARS = 1000  # hard cap of the schema; ingest may truncate shorter
SOURCES = ("human", "web", "synthetic")
INGESTED_SOURCES = ("human", "web")  # `synthetic` rows only come out of the bootstrap stage
SPLITS = ("train", "val", "test")
MAX_REPORTED_LINES = 20  # failing rows shown in an error message; the rest are counted

_INT_COLUMNS = ("width", "height")
_FLOAT_COLUMNS = ("itm_score",)
_NOT_EMPTY = {"str_length": {"min_value": 1}}
# the cells worth showing when a dataframe-level (row) check fails; other checks show every cell
_ROW_CHECK_COLUMNS = {
    "provenance_null_iff_human": ("source", "itm_score", "captioner", "filter"),
    "decoding_iff_synthetic": ("source", "decoding"),
}


class IngestedManifest(pa.DataFrameModel):
    """The manifest written by ingest: one row per (image, text) pair (see DESIGN contracts)."""

    sample_id: Series[str] = pa.Field(unique=True, **_NOT_EMPTY)
    image_key: Series[str] = pa.Field(**_NOT_EMPTY)
    caption: Series[str] = pa.Field(str_length={"min_value": 1, "max_value": MAX_CAPTION_CHARS})
    source: Series[str] = pa.Field(isin=list(INGESTED_SOURCES))
    split: Series[str] = pa.Field(isin=list(SPLITS))
    width: Series[int] = pa.Field(gt=0)
    height: Series[int] = pa.Field(gt=0)
    sha256: Series[str] = pa.Field(str_length={"min_value": 64, "max_value": 64})
    shard: Series[str] = pa.Field(**_NOT_EMPTY)
    member: Series[str] = pa.Field(**_NOT_EMPTY)
    ref: Series[str] = pa.Field(**_NOT_EMPTY)

    @pa.check("caption", name="caption_not_blank")
    def _caption_not_blank(cls, s: Series[str]) -> Series[bool]:
        return s.str.strip().str.len() > 0

    @pa.check("sha256", name="lowercase_hex")
    def _sha256_is_hex(cls, s: Series[str]) -> Series[bool]:
        # stripping the hex digits is several times faster than a regex on millions of rows
        return s.str.strip("0123456789abcdef").str.len() == 0

    @pa.check("shard", name="relative_posix_path")
    def _shard_is_relative(cls, s: Series[str]) -> Series[bool]:
        # relative to the manifest's folder, so a manifest and its shards move together
        escapes = s.str.contains("..", regex=False)  # cheap pre-filter, then the exact rule
        escapes[escapes] = s[escapes].str.contains(r"(?:^|/)\.\.(?:/|$)", regex=True)
        return ~(s.str.startswith("/") | s.str.contains("\\", regex=False) | escapes)

    class Config:
        strict = True  # an extra column is an error: a typo must not ride along unnoticed
        coerce = False  # safe widening happens in `_safe_coerce`; "12" never becomes 12


class BootstrappedManifest(IngestedManifest):
    """The bootstrap stage's manifest: human rows kept, web rows filtered, synthetic rows added."""

    source: Series[str] = pa.Field(isin=list(SOURCES))
    itm_score: Series[float] = pa.Field(nullable=True, in_range={"min_value": 0.0, "max_value": 1.0})
    captioner: Series[str] = pa.Field(nullable=True, **_NOT_EMPTY)  # checkpoint hash
    filter: Series[str] = pa.Field(nullable=True, **_NOT_EMPTY)  # checkpoint hash
    decoding: Series[str] = pa.Field(nullable=True, **_NOT_EMPTY)  # e.g. "nucleus(p=0.9)"

    @pa.dataframe_check(name="provenance_null_iff_human")
    def _provenance(cls, df: pd.DataFrame) -> Series[bool]:
        # human rows carry no score or checkpoints; web and synthetic rows carry all of them
        human = df["source"] == "human"
        cols = ["itm_score", "captioner", "filter"]
        present = df[cols].notna()
        return (human & ~present.any(axis=1)) | (~human & present.all(axis=1))

    @pa.dataframe_check(name="decoding_iff_synthetic")
    def _decoding(cls, df: pd.DataFrame) -> Series[bool]:
        return df["decoding"].notna() == (df["source"] == "synthetic")


class Rejects(pa.DataFrameModel):
    """Rows that ingest refused: where they came from, why (fixed vocabulary), and details."""

    ref: Series[str] = pa.Field(**_NOT_EMPTY)
    reason: Series[str] = pa.Field(isin=list(REJECT_REASONS))
    detail: Series[str] = pa.Field()

    class Config:
        strict = True
        coerce = False


SCHEMAS: dict[str, type[pa.DataFrameModel]] = {
    "ingested": IngestedManifest,
    "bootstrapped": BootstrappedManifest,
    "rejects": Rejects,
}


def _model(kind: str) -> type[pa.DataFrameModel]:
    try:
        return SCHEMAS[kind]
    except KeyError:
        known = ", ".join(SCHEMAS)
        raise CapfiltError(f"unknown manifest kind {kind!r}; expected one of: {known}") from None


def columns(kind: ManifestKind) -> list[str]:
    """The columns of a `kind` table, in the order they are written."""
    return list(_model(kind).to_schema().columns)


def _safe_coerce(df: pd.DataFrame) -> pd.DataFrame:
    """Widen dtypes where no value can change: any ints (or an object column of ints) -> int64
    for sizes, ints/floats -> float64 for scores, object columns of str/None -> str."""
    out = df.copy()
    for name in out.columns:
        col = out[name]
        try:
            if name in _INT_COLUMNS and col.dtype != "int64":
                ints = pd.api.types.is_integer_dtype(col)
                if ints or (col.dtype == object and col.map(_is_int).all()):
                    out[name] = col.astype("int64")
            elif name in _FLOAT_COLUMNS and col.dtype != "float64":
                if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
                    out[name] = col.astype("float64")
                elif col.isna().all():  # an all-null column read back from parquet as object
                    out[name] = col.astype("float64")
            elif name not in _INT_COLUMNS + _FLOAT_COLUMNS and col.dtype == object:
                if col.map(lambda v: isinstance(v, str) or v is None).all():
                    out[name] = col.astype("str")
        except (TypeError, ValueError):  # e.g. a nullable Int64 holding NA: pandera names it
            pass
    return out


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def validate(df: pd.DataFrame, kind: ManifestKind, where: str) -> pd.DataFrame:
    """Validate `df` as a `kind` table; return it (safely widened) or raise one CapfiltError
    whose message starts with `"<where>: N rows fail the <kind> schema:"` and lists them all."""
    model = _model(kind)
    prepared = _safe_coerce(df)
    try:
        return pd.DataFrame(model.validate(prepared, lazy=True))
    except SchemaErrors as exc:
        raise CapfiltError(_describe_failures(exc.failure_cases, kind, where)) from None


def _describe_failures(cases: pd.DataFrame, kind: str, where: str) -> str:
    """A compact, capped text table of pandera failure cases, one line per failing cell."""
    row_level = cases[cases["index"].notna()]
    frame_level = cases[cases["index"].isna()]
    n_rows = row_level["index"].nunique()
    header = f"{where}: {n_rows} rows fail the {kind} schema"
    if len(frame_level):
        header += f" (and {len(frame_level)} problems with its columns)"
    lines = [_frame_problem(r) for r in frame_level.itertuples(index=False)]
    lines += _row_lines(row_level)
    shown = lines[:MAX_REPORTED_LINES]
    if len(lines) > len(shown):
        shown.append(f"... and {len(lines) - len(shown)} more")
    return header + ":\n  " + "\n  ".join(shown)


def _frame_problem(case: object) -> str:
    check, column = str(case.check), str(case.column)  # type: ignore[attr-defined]
    value = case.failure_case  # type: ignore[attr-defined]
    if check == "column_in_schema":
        return f"unexpected column {value!r}"
    if check == "column_in_dataframe":
        return f"missing column {value!r}"
    if check.startswith("dtype("):
        return f"column {column!r} has dtype {value}, expected {check[6:-1].strip(chr(39))}"
    if case.schema_context == "DataFrameSchema":  # type: ignore[attr-defined]
        return f"row check {check} could not run: {value}"
    return f"column {column!r}: {check}: {_short(value)}"


def _row_lines(rows: pd.DataFrame) -> list[str]:
    """One line per (row, check), in row order; a dataframe-level check's per-column failure
    cases fold into one line, so a failing row is listed once per check, not once per column."""
    if rows.empty:
        return []
    entries: list[tuple[tuple[int, float | str], str, str]] = []
    frame_checks = rows["schema_context"] == "DataFrameSchema"
    for (label, check), group in rows[frame_checks].groupby(["index", "check"], sort=False):
        shown = _ROW_CHECK_COLUMNS.get(str(check))
        cells = ", ".join(f"{c}={_short(v, 24)}" for c, v in zip(group["column"], group["failure_case"])
                          if shown is None or c in shown)
        entries.append((_sort_key(label), str(check), _line(label, "(row)", check, _clip(cells, 100))))
    for r in rows[~frame_checks].itertuples(index=False):
        line = _line(r.index, r.column, r.check, _short(r.failure_case))
        entries.append((_sort_key(r.index), str(r.check), line))
    entries.sort(key=lambda e: (e[0], e[1]))
    return [_line("index", "column", "check", "value"), *(e[2] for e in entries)]


def _line(index: object, column: object, check: object, value: str) -> str:
    return f"{index!s:>8}  {column!s:<12} {check!s:<28} {value}"


def _sort_key(label: object) -> tuple[int, float | str]:
    try:
        return (0, float(label))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return (1, str(label))


def _short(value: object, width: int = 60) -> str:
    return _clip(repr(value), width)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def write_manifest(df: pd.DataFrame, path: Path, kind: ManifestKind) -> Path:
    """Validate `df`, then write it as parquet atomically (temporary name in the same folder,
    then `os.replace`): readers see the old manifest or the new one, never a partial file."""
    path = Path(path)
    valid = validate(df, kind, where=str(path))
    valid = valid[columns(kind)].reset_index(drop=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        valid.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except OSError as exc:
        raise CapfiltError(f"{path}: cannot write the {kind} manifest: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    log.info("wrote %s: %d rows (%s)", path, len(valid), kind)
    return path


def read_manifest(path: Path, kind: ManifestKind) -> pd.DataFrame:
    """Read a parquet manifest and validate it; a missing or unreadable file is a CapfiltError."""
    path = Path(path)
    if not path.is_file():
        raise CapfiltError(f"{path}: {kind} manifest not found")
    try:
        df = pd.read_parquet(path)
    except (OSError, ValueError, pyarrow_lib.ArrowException) as exc:
        raise CapfiltError(f"{path}: not a readable parquet file: {exc}") from None
    return validate(df, kind, where=str(path))
