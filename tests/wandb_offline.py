"""Reads back what W&B wrote in offline mode (``offline-run-*/run-*.wandb``), so tests can assert
on the runs a dashboard would show after ``wandb sync``.

The file is wandb's transaction log: a 7-byte header (``:W&B``, magic, version), then LevelDB-log
style 32 KiB blocks of chunks (crc32, length, type) that join into protobuf ``Record`` messages.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:  # block trailer: padding
            pos += left_in_block
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def _items(items) -> dict[str, Any]:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


@dataclass
class OfflineRun:
    """One offline run directory: one process's part of a W&B run (a resumed run has several)."""

    directory: Path
    id: str = ""
    job_type: str = ""
    group: str = ""
    name: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    artifacts: list[tuple[str, str, list[str]]] = field(default_factory=list)
    exit_code: int | None = None

    @property
    def started(self) -> str:
        return self.directory.name.split("-")[2]  # offline-run-YYYYMMDD_HHMMSS-ID

    def keys(self) -> set[str]:
        """Logged keys; a media value's fields appear as ``key/field``."""
        return {key for row in self.history for key in row}

    def table(self, key: str) -> dict[str, Any]:
        """The last logged wandb.Table under ``key``: {"columns": [...], "data": [[...], ...]}."""
        path = [row[f"{key}/path"] for row in self.history if row.get(f"{key}/_type") == "table-file"][-1]
        return json.loads((self.directory / "files" / path).read_text())


def read_offline_runs(root: Path) -> list[OfflineRun]:
    """Every offline run under ``root`` (searched recursively), oldest first."""
    runs = []
    for path in Path(root).rglob("offline-run-*/run-*.wandb"):
        run = OfflineRun(path.parent)
        for record in records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                r = record.run
                run.id, run.job_type, run.group, run.name = r.run_id, r.job_type, r.run_group, r.display_name
                run.config.update(_items(r.config.update))
            elif kind == "config":
                run.config.update(_items(record.config.update))
            elif kind == "history":
                run.history.append(_items(record.history.item))
            elif kind == "artifact":
                a = record.artifact
                run.artifacts.append((a.name, a.type, sorted(a.aliases)))
            elif kind == "exit":
                run.exit_code = record.exit.exit_code
        runs.append(run)
    return sorted(runs, key=lambda r: (r.started, str(r.directory)))
