"""Checksums of a checkpoint's files: written beside them when a save is finished, verified before a restore.

Each item directory of a step (`state_file/` or `state/`) gets `checksums.json`: the size and CRC-32 of every file in
it (read back from disk once the item's files are final), the CRC-32 of the step's custom metadata (the run's config,
kept by Orbax in `_CHECKPOINT_METADATA`, which Orbax rewrites after the item is final, so only its content is
checked), and a CRC-32 of this record itself. CRC-32 (zlib) reads about 5 GB/s here (3 ms for 16 MB), several times
faster than blake2b or sha256; it is there to catch truncated, missing and flipped bytes, not tampering.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any

MANIFEST = "checksums.json"
_UNLISTED = {MANIFEST, "commit_success.txt"}  # the manifest itself; Orbax's marker, written after the manifest
_CHUNK = 4 << 20


class CheckpointDamaged(Exception):
    """A checkpoint step that fails verification: `step`, `path` (the file, relative to the checkpoints' parent
    directory) and `fault` (what failed); `reason` is one word for file names."""

    def __init__(self, step: int, path: str, fault: str, reason: str):
        super().__init__(f"checkpoint step {step} is damaged: {path}: {fault}")
        self.step, self.path, self.fault, self.reason = step, path, fault, reason


def crc32_hex(data: bytes, start: int = 0) -> str:
    return f"{zlib.crc32(data, start) & 0xFFFFFFFF:08x}"


def json_crc(value: Any) -> str:
    """The CRC-32 of `value`'s canonical JSON (keys sorted), so that what was saved and what was parsed compare."""
    return crc32_hex(json.dumps(value, sort_keys=True, separators=(",", ":")).encode())


def file_crc(path: str) -> tuple[int, str]:
    """(size, CRC-32) of the file at `path`, read in chunks."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc, size = zlib.crc32(chunk, crc), size + len(chunk)
    return size, f"{crc & 0xFFFFFFFF:08x}"


def _files(directory: str) -> list[str]:
    out = []
    for root, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), directory).replace(os.sep, "/")
            if rel not in _UNLISTED:
                out.append(rel)
    return sorted(out)


def write_manifest(directory: str, meta_crc: str, expected: dict[str, tuple[int, str]] | None = None) -> None:
    """Reads back every file under `directory` and writes their sizes and CRC-32s to `directory/checksums.json`.
    `expected`: {file: (size, crc)} of bytes the writer computed from memory; a file read back otherwise raises
    OSError (then Orbax neither finalizes this step nor deletes older ones)."""
    files = {}
    for rel in _files(directory):
        size, crc = file_crc(os.path.join(directory, rel))
        want = (expected or {}).get(rel)
        if want is not None and (size, crc) != tuple(want):
            raise OSError(f"{directory}/{rel} read back as {size} bytes crc32 {crc}, written {want[0]} crc32 {want[1]}")
        files[rel] = {"bytes": size, "crc32": crc}
    body = {"files": files, "meta_crc32": meta_crc}
    with open(os.path.join(directory, MANIFEST), "w") as f:
        json.dump({**body, "crc32": json_crc(body)}, f)


def verify_item(directory: str, step: int, custom: dict[str, Any], show: str) -> None:
    """Checks the files of one item directory against its manifest and the step's custom metadata against the crc
    recorded there; raises CheckpointDamaged naming the first file that fails. `show`: how `directory` is named in
    messages (relative to the run's directory)."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as f:
            record = json.load(f)
        body = {"files": record["files"], "meta_crc32": record["meta_crc32"]}
        if json_crc(body) != record["crc32"]:
            raise ValueError(f"its own checksum is {json_crc(body)}, recorded {record['crc32']}")
    except FileNotFoundError:
        raise CheckpointDamaged(step, f"{show}/{MANIFEST}", "missing", "missing") from None
    except (OSError, ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointDamaged(step, f"{show}/{MANIFEST}", f"unreadable ({_brief(e)})", "manifest") from None
    for rel, want in record["files"].items():
        try:
            size, crc = file_crc(os.path.join(directory, rel))
        except FileNotFoundError:
            raise CheckpointDamaged(step, f"{show}/{rel}", "missing", "missing") from None
        except OSError as e:
            raise CheckpointDamaged(step, f"{show}/{rel}", f"unreadable ({_brief(e)})", "unreadable") from None
        if size != want["bytes"]:
            what = "truncated" if size < want["bytes"] else "size mismatch"
            fault = f"{what} ({size} bytes, expected {want['bytes']})"
            raise CheckpointDamaged(step, f"{show}/{rel}", fault, what.split()[0])
        if crc != want["crc32"]:
            fault = f"checksum mismatch (crc32 expected {want['crc32']}, got {crc})"
            raise CheckpointDamaged(step, f"{show}/{rel}", fault, "checksum")
    if json_crc(custom) != record["meta_crc32"]:
        fault = f"custom metadata checksum mismatch (crc32 expected {record['meta_crc32']}, got {json_crc(custom)})"
        raise CheckpointDamaged(step, f"{os.path.dirname(show)}/_CHECKPOINT_METADATA", fault, "metadata")


def read_step_metadata(step_dir: str, step: int, show: str) -> dict[str, Any]:
    """The step's Orbax custom metadata, read from `_CHECKPOINT_METADATA` directly (Orbax logs an unreadable file
    and goes on without it); raises CheckpointDamaged when it is missing or unreadable."""
    path = os.path.join(step_dir, "_CHECKPOINT_METADATA")
    try:
        with open(path) as f:
            record = json.load(f)
        if not isinstance(record, dict):
            raise ValueError(f"holds a {type(record).__name__}, not an object")
    except FileNotFoundError:
        raise CheckpointDamaged(step, f"{show}/_CHECKPOINT_METADATA", "missing", "missing") from None
    except (OSError, ValueError) as e:
        fault = f"unreadable metadata ({_brief(e)})"
        raise CheckpointDamaged(step, f"{show}/_CHECKPOINT_METADATA", fault, "metadata") from None
    return record.get("custom_metadata") or {}


def _brief(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:200]
