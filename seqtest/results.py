"""The run-folder format: every file is written atomically (temp file + rename), so a reader
never sees half a file, and read back by the same module.

Files of one run folder:

* ``metrics.jsonl``: one JSON object per evaluation, with ``step``, ``train_loss``,
  ``val_loss``, ``val_metric``, ``grad_norm`` (pre-clip), ``elapsed_s`` (and extra fields).
* ``summary.json``: written once at the end (see `seqtest.run.summarise`).
* ``.seqtest.lock``: held (flock) by the process writing the folder (`exclusive_folder`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
LOCK_FILE = ".seqtest.lock"


class RunFolderBusy(RuntimeError):
    """Another live process is writing the run folder."""


@contextmanager
def exclusive_folder(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on a run folder while a run writes it.

    Two processes writing one folder overwrite each other's files silently; that happens when
    a sweep is relaunched into a folder whose earlier workers still run (joblib's workers
    outlive a signal to the launching process). The second one stops with `RunFolderBusy`
    instead. The lock is an `flock` on `LOCK_FILE`, which the system releases when the holding
    process ends, however it ends, so an interrupted run can be resumed at once. Where
    `fcntl` does not exist (Windows) nothing is locked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RunFolderBusy(
                f"run folder {folder} is being written by another process (pid {holder}); "
                "stop it, or write this run to another folder"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as strings a reader can still recognise."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


@contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; on success rename it onto `path`, so a
    reader sees the old file or the new one, never half of one; on failure remove it. The
    file gets the permissions a plain `open` would give (mkstemp's are owner-only), so others
    on a shared file system can read the results."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, mode) as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (see `atomic_file`)."""
    with atomic_file(path) as handle:
        handle.write(text)


def write_json(path: Path, obj: dict) -> None:
    write_atomic(path, json.dumps(_clean(obj), indent=2) + "\n")


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    write_atomic(path, "".join(json.dumps(_clean(r)) + "\n" for r in records))


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def read_summary(run_dir: Path) -> dict:
    return read_json(Path(run_dir) / SUMMARY_FILE)


def read_metrics(run_dir: Path) -> list[dict]:
    return read_jsonl(Path(run_dir) / METRICS_FILE)


def find_run_dirs(root: Path) -> list[Path]:
    """Every folder under `root` (itself included) that is a run folder: it holds a summary,
    a metrics file or Hydra's `.hydra` record of a job."""
    root = Path(root)
    markers = (SUMMARY_FILE, METRICS_FILE, ".hydra")
    found = [
        d for d in [root, *root.rglob("*")] if d.is_dir() and any((d / m).exists() for m in markers)
    ]
    return sorted(found, key=lambda d: [int(p) if p.isdigit() else p for p in d.parts])


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain aligned text table; floats get 4 significant digits."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    body = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [
        max(len(c), *(len(r[i]) for r in body)) if body else len(c) for i, c in enumerate(columns)
    ]
    line = lambda cells: "  ".join(v.ljust(w) for v, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, body)])
