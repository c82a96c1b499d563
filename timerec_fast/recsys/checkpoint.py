"""Atomic file writes and checkpoint I/O.

Every file is written to a temporary file in the same directory, flushed and fsync'ed, then
moved over the target with :func:`os.replace` (atomic on POSIX and Windows). A crash at any
moment leaves either the previous complete file or the new complete file, never a torn one.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from typing import Any

import torch

from .errors import CheckpointError


def atomic_write_bytes(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` with the temp-file + ``os.replace`` protocol."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_json(obj: Any, path: str) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def load(path: str) -> Any:
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torn/corrupt file written by something else
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
