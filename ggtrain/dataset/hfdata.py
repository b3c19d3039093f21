"""Local Hugging Face datasets: a `save_to_disk` directory (Dataset or DatasetDict) or parquet files.

Read with the `datasets` package when it is installed; otherwise with `pyarrow` alone, which reads
the same files (save_to_disk writes Arrow IPC streams listed in state.json). Neither is a dependency
of ggtrain: without both, the user gets one message saying what to install.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ggtrain.errors import GGTrainError

INSTALL_HINT = "pip install datasets  (or just pyarrow)"


def _missing(path: Path) -> GGTrainError:
    return GGTrainError(f"{path}: reading a Hugging Face dataset directory or parquet file needs the "
                        f"'datasets' package, which is not installed: {INSTALL_HINT}")


def _split_dir(path: Path) -> Path:
    """A DatasetDict dir holds one dir per split: take 'train' (or the only/first split)."""
    dd = path / "dataset_dict.json"
    if not dd.exists():
        return path
    try:
        splits = json.loads(dd.read_text())["splits"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GGTrainError(f"{dd}: not a valid dataset_dict.json ({e})") from None
    if not splits:
        raise GGTrainError(f"{dd}: the dataset has no splits")
    return path / ("train" if "train" in splits else splits[0])


def is_hf_dir(path: Path) -> bool:
    """Whether a directory holds a Hugging Face dataset: save_to_disk output (dataset_dict.json or
    state.json) or Arrow / parquet files."""
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return True
    return any(True for _ in path.rglob("*.parquet")) or any(True for _ in path.rglob("*.arrow"))


def _parquet_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*.parquet") if p.is_file())


def read_rows(path: Path) -> list[dict[str, Any]]:
    """All rows of the dataset at `path` as dicts (column -> value)."""
    try:
        import datasets  # noqa: F401
        have_datasets = True
    except ImportError:
        have_datasets = False
    try:
        import pyarrow  # noqa: F401
        have_arrow = True
    except ImportError:
        have_arrow = False
    if not (have_datasets or have_arrow):
        raise _missing(path)

    path = _split_dir(path)
    is_saved = path.is_dir() and (path / "state.json").exists()
    parquet = [] if is_saved else _parquet_files(path)
    if not is_saved and not parquet and not (path.is_file() and path.suffix == ".arrow"):
        raise GGTrainError(f"{path}: not a Hugging Face dataset: no state.json (save_to_disk output) "
                           f"and no .parquet files")
    if have_datasets:
        return _rows_datasets(path, is_saved, parquet)
    return _rows_pyarrow(path, is_saved, parquet)


def _rows_datasets(path: Path, is_saved: bool, parquet: list[Path]) -> list[dict[str, Any]]:
    import datasets

    try:
        if is_saved:
            ds = datasets.load_from_disk(str(path))
        elif parquet:
            ds = datasets.load_dataset("parquet", data_files=[str(p) for p in parquet], split="train")
        else:
            ds = datasets.Dataset.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the user needs the message
        raise GGTrainError(f"{path}: cannot load the dataset: {e}") from None
    return ds.to_list()


def _rows_pyarrow(path: Path, is_saved: bool, parquet: list[Path]) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    try:
        if is_saved:
            state = json.loads((path / "state.json").read_text())
            for f in state["_data_files"]:
                tables.append(_read_arrow(path / f["filename"]))
        elif parquet:
            tables = [pq.read_table(p) for p in parquet]
        else:
            tables = [_read_arrow(path)]
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as e:
        raise GGTrainError(f"{path}: cannot load the dataset: {e}") from None
    rows: list[dict[str, Any]] = []
    for t in tables:
        rows.extend(t.to_pylist())
    return rows


def _read_arrow(path: Path):
    """save_to_disk writes Arrow IPC streams; accept the IPC file format too."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as src:
        try:
            return pa.ipc.open_stream(src).read_all()
        except pa.ArrowInvalid:
            pass
    with pa.memory_map(str(path)) as src:
        return pa.ipc.open_file(src).read_all()
