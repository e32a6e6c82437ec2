"""Read back an offline wandb run (the `run-<id>.wandb` file) without network access.

wandb has no public reader for its offline files. The file is a 7-byte header (":W&B",
magic 0xBEE1, version) followed by LevelDB-log framed records in 32 KiB blocks, each
payload a protobuf `Record`. This is the one place that knows the format.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

_BLOCK = 32 * 1024
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a wandb run file (bad header)")
    records, pending, offset = [], b"", _HEADER
    while offset + _HEADER <= len(data):
        room = _BLOCK - offset % _BLOCK
        if room < _HEADER:  # block trailer is zero padding
            offset += room
            continue
        length, kind = struct.unpack_from("<HB", data, offset + 4)
        if length == 0 and kind == 0:
            offset += room
            continue
        payload = data[offset + _HEADER : offset + _HEADER + length]
        offset += _HEADER + length
        pending = payload if kind in (_FULL, _FIRST) else pending + payload
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def read_offline_run(run_file: str | Path) -> dict:
    """What one offline run file holds, as plain Python:

    `run_id`, `group`, `job_type`; `history` (one dict per logged row; media such as images
    and tables are dicts with their `path` under `files_dir`); `config` and `summary` (the
    last value of each key); `metrics` (each define_metric: `name` or `glob_name`, and
    `step_metric`); `artifacts` (`name`, `type`, `aliases`, `metadata`, and `files`: each
    file's path in the artifact mapped to its `local_path`, `size` and `digest`); `files_dir`,
    the directory of the run's saved files."""
    run = {"run_id": None, "group": None, "job_type": None, "history": [], "config": {}, "summary": {},
           "metrics": [], "artifacts": [], "files_dir": Path(run_file).parent / "files"}
    for record in read_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(run_id=record.run.run_id, group=record.run.run_group, job_type=record.run.job_type)
            _apply_updates(run["config"], record.run.config.update)
        elif kind == "config":
            _apply_updates(run["config"], record.config.update)
        elif kind == "history":
            row: dict = {}
            _apply_updates(row, record.history.item)
            run["history"].append(row)
        elif kind == "summary":
            _apply_updates(run["summary"], record.summary.update)
        elif kind == "metric":
            metric = record.metric
            run["metrics"].append({"name": metric.name, "glob_name": metric.glob_name, "step_metric": metric.step_metric})
        elif kind == "artifact":
            artifact = record.artifact
            run["artifacts"].append({
                "name": artifact.name,
                "type": artifact.type,
                "aliases": list(artifact.aliases),
                "metadata": json.loads(artifact.metadata) if artifact.metadata else {},
                "files": {entry.path: {"local_path": entry.local_path, "size": entry.size, "digest": entry.digest}
                          for entry in artifact.manifest.contents},
            })
    return run


def _apply_updates(target: dict, items) -> None:
    """Config, summary and history items: `key`, or `nested_key` for a value inside a dict."""
    for item in items:
        path = [item.key] if item.key else list(item.nested_key)
        place = target
        for part in path[:-1]:
            place = place.setdefault(part, {})
        place[path[-1]] = json.loads(item.value_json)


def find_run_files(wandb_dir: str | Path) -> list[Path]:
    """All offline run files under a directory, oldest first."""
    return sorted(Path(wandb_dir).rglob("offline-run-*/run-*.wandb"))
