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
    """History rows, config and run id of one offline run file."""
    history, config, run_id = [], {}, None
    for record in read_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
        elif kind in ("config", "run"):
            updates = record.config.update if kind == "config" else record.run.config.update
            config.update({item.key: json.loads(item.value_json) for item in updates})
            run_id = record.run.run_id if kind == "run" else run_id
    return {"run_id": run_id, "history": history, "config": config}


def find_run_files(wandb_dir: str | Path) -> list[Path]:
    """All offline run files under a directory, oldest first."""
    return sorted(Path(wandb_dir).rglob("offline-run-*/run-*.wandb"))
