"""The two files of an adapter directory, written so that a reader never sees a mix of two saves.

A directory holds ``adapter_config.json`` (the commit record) and ``adapter_model.safetensors``.
Each config names its weights: ours by the SHA-256 of the weights file (``weights_sha256``).
A PEFT config should hold only PEFT's keys (PEFT warns about others, older versions refuse
them), so there it is the other way round: the weights' safetensors metadata holds the SHA-256
of the config written with them (CONFIG_SHA256_KEY). When a PEFT export's config is
byte-identical to the one it replaces, the export is complete once its weights are renamed in.

A save (``save_pair``):
  1. locks the directory (flock, lock.py: concurrent saves take turns; one waiting says whose
     lock it waits for and gives up after its lock_timeout), deletes temporaries of our naming
     left by interrupted saves, and completes an interrupted save (``_recover``): afterwards the
     weights file holds the weights the config names and PREVIOUS_WEIGHTS_NAME is gone;
  2. writes both files to temporaries (mode 0666 minus the umask, as open() creates files) and
     fsyncs them;
  3. links the current weights to PREVIOUS_WEIGHTS_NAME, renames the new weights into place, then
     the new config (the commit), and deletes PREVIOUS_WEIGHTS_NAME.
A save killed at any step leaves a directory that loads as the last committed save: between
the two renames the config names the old weights, which the reader finds under
PREVIOUS_WEIGHTS_NAME. Without flock (some network file systems) saves do not take turns and
temporaries are left for the user to delete, since one may belong to a save in progress.

Reading checks the safetensors header (an 8-byte little-endian length, then JSON) and the file
size it implies before any tensor data is read, hashed or allocated. A file that a save deletes
or changes while it is read (ChangedWhileRead) makes read_pair read the directory again.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import AdapterError
from .lock import DEFAULT_LOCK_TIMEOUT, locked

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREVIOUS_WEIGHTS_NAME = ".adapter_model.safetensors.previous"  # only while a save renames
FORMAT = "soslora_ext"
CONFIG_SHA256_KEY = "soslora_ext.config_sha256"  # in a PEFT export's safetensors metadata
MAX_CONFIG_BYTES = 64 << 20
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
# Temporaries of our naming (mkstemp's 8 characters included, as older versions named them).
TMP_PATTERN = re.compile(r"\.(%s)\.[A-Za-z0-9_]{8,32}\.tmp" % "|".join(
    re.escape(n) for n in (CONFIG_NAME, WEIGHTS_NAME, PREVIOUS_WEIGHTS_NAME)))

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
for _name, _dtype in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                      ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _dtype):
        DTYPES[_name] = getattr(torch, _dtype)

TensorSpec = tuple  # (torch.dtype, shape tuple)


class ChangedWhileRead(AdapterError):
    """A file vanished or changed while it was read: a save ran beside the reader."""


# ---- reading ---------------------------------------------------------------------------------
def _require_file(path: Path) -> None:
    if path.is_dir():
        raise AdapterError(f"{path}: is a directory, not a file")
    if not path.is_file():
        raise AdapterError(f"{path}: file not found (not an adapter directory?)")


def _open(path: Path):
    """The file open for reading; an OSError is an AdapterError (ChangedWhileRead for a file
    gone since it was seen: a save beside the reader renamed or deleted it)."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise ChangedWhileRead(f"{path}: deleted while the adapter was read (a save ran beside "
                               "it)") from None
    except OSError as e:
        raise AdapterError(f"{path}: cannot be read ({e.strerror or e})") from None


def _loads(data: bytes, what: str, **kwargs):
    try:
        return json.loads(data, **kwargs)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, a duplicate key
        raise AdapterError(f"{what}: not valid JSON ({e})") from None
    except RecursionError:
        raise AdapterError(f"{what}: JSON nested too deeply") from None


def read_config(directory: Path) -> tuple[bytes, dict]:
    """(bytes, parsed JSON object) of the directory's adapter_config.json."""
    path = Path(directory) / CONFIG_NAME
    _require_file(path)
    with _open(path) as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise AdapterError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes: not an adapter config")
    config = _loads(data, str(path), object_pairs_hook=_no_duplicates)
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    return data, config


@dataclass
class Header:
    """The safetensors header: {name: (dtype, shape)}, its metadata, and the file's size."""

    tensors: dict[str, TensorSpec]
    metadata: dict[str, str]
    size: int


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate keys {sorted({k for k in keys if keys.count(k) > 1})}")
    return dict(pairs)


def _read_header(f, path: Path) -> Header:
    """Parse and check the header of the open file `f`: every tensor's dtype, shape and byte
    range, the ranges tiling the data exactly, and the data ending where the file ends."""
    def bad(message):
        raise AdapterError(f"{path}: unreadable safetensors file ({message})")

    size = os.fstat(f.fileno()).st_size
    if size < 8:
        bad(f"{size} bytes, shorter than the 8-byte header length")
    n = int.from_bytes(f.read(8), "little")
    if n > size - 8:
        bad(f"header length {n} is more than the file's {size - 8} bytes after it")
    if n > MAX_HEADER_BYTES:
        bad(f"header length {n} is over the limit of {MAX_HEADER_BYTES} bytes (safetensors' "
            "own)")
    try:
        raw = _loads(f.read(n), "header", object_pairs_hook=_no_duplicates)
    except AdapterError as e:
        bad(str(e))
    if not isinstance(raw, dict):
        bad("the header is not a JSON object")
    metadata = raw.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        bad("__metadata__ must map strings to strings")
    tensors, ranges = {}, []
    for name, info in raw.items():
        ok = (isinstance(info, dict) and info.get("dtype") in DTYPES
              and isinstance(info.get("shape"), list) and isinstance(info.get("data_offsets"), list)
              and all(type(d) is int and d >= 0 for d in info["shape"])
              and len(info["data_offsets"]) == 2
              and all(type(o) is int and o >= 0 for o in info["data_offsets"]))
        if not ok:
            bad(f"tensor {name!r}: expected a known dtype, a shape and two data offsets, got "
                f"{str(info)[:200]}")
        dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
        begin, end = info["data_offsets"]
        if end - begin != math.prod(shape) * dtype.itemsize:
            bad(f"tensor {name!r}: {end - begin} bytes for a {info['dtype']} {list(shape)}")
        tensors[name] = (dtype, shape)
        ranges.append((begin, end))
    position = 0
    for begin, end in sorted(ranges):
        if begin != position:
            bad("the tensors' byte ranges overlap or leave gaps")
        position = end
    if 8 + n + position != size:
        raise AdapterError(f"{path}: {size} bytes, but its header declares {8 + n + position} "
                           "(the file is truncated, extended or damaged)")
    return Header(tensors, metadata, size)


def _pairs_with(config: dict, config_bytes: bytes, header: Header, data: Callable[[], bytes]
                ) -> bool | None:
    """Whether the weights belong to the config: True, False, or None (nothing records it)."""
    if config.get("format") == FORMAT:
        return hashlib.sha256(data()).hexdigest() == config.get("weights_sha256")
    recorded = header.metadata.get(CONFIG_SHA256_KEY)
    return None if recorded is None else recorded == hashlib.sha256(config_bytes).hexdigest()


def _choose_weights(directory: Path, config: dict, config_bytes: bytes,
                    check_header: Callable[[dict], None]) -> tuple[Path, bytes]:
    """(path, contents) of the weights that belong to the config: the weights file, or the
    previous weights while a save is between its renames. Our format must match its checksum;
    a PEFT directory where no weights record this config (made by PEFT, or a config edited by
    hand) falls back to weights that record no config, then to the weights file. Headers are
    checked before any data is read."""
    weights, previous = directory / WEIGHTS_NAME, directory / PREVIOUS_WEIGHTS_NAME
    _require_file(weights)
    ours = config.get("format") == FORMAT
    errors, fallbacks = [], []
    for path in [weights] + ([previous] if previous.is_file() else []):
        try:
            # A save may delete or replace the previous weights since is_file() saw them:
            # ChangedWhileRead, and read_pair reads again.
            with _open(path) as f:
                header = _read_header(f, path)
                check_header(header.tensors)
                contents = []

                def data():
                    if not contents:
                        f.seek(0)
                        contents.append(f.read())
                        if len(contents[0]) != header.size:
                            raise ChangedWhileRead(f"{path}: changed while it was read")
                    return contents[0]

                paired = _pairs_with(config, config_bytes, header, data)
                if paired:
                    return path, data()
                if not ours:
                    fallbacks.append((paired is False, len(fallbacks), path, data()))
        except ChangedWhileRead:
            raise
        except AdapterError as e:
            errors.append(e)
            continue
        errors.append(AdapterError(f"{weights}: contents do not match the checksum in "
                                   f"{CONFIG_NAME} (the file is corrupted or was edited)"))
    if fallbacks:
        return min(fallbacks)[2:]
    raise errors[0]


def read_weights(directory: Path, config: dict, config_bytes: bytes,
                 check_header: Callable[[dict], None]) -> dict[str, torch.Tensor]:
    """The tensors of the weights that belong to the config (see _choose_weights)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path, data = _choose_weights(Path(directory), config, config_bytes, check_header)
    try:
        return load(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterError(f"{path}: unreadable safetensors file ({e})") from None


def _files_now(directory: Path) -> tuple | None:
    """Which config and weights files the directory holds: a save puts new files in (renames)."""
    try:
        return tuple((s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns) for s in
                     (os.stat(directory / CONFIG_NAME), os.stat(directory / WEIGHTS_NAME)))
    except OSError:
        return None


def read_pair(directory: str | os.PathLike,
              validate: Callable[[dict], Callable[[dict], None]]) -> tuple[dict, dict]:
    """(config, tensors). validate(config) checks the config and returns the check of the
    weights' header ({name: (dtype, shape)}), which runs before any tensor data is read. A
    pair refused while saves ran beside the reader is read again (up to 5 times)."""
    directory = Path(directory)
    for attempt in range(5):
        files = _files_now(directory)
        config_bytes, config = read_config(directory)
        check_header = validate(config)
        try:
            return config, read_weights(directory, config, config_bytes, check_header)
        except AdapterError as e:
            # Saves that renamed files in while we read (even one whose config has the bytes
            # of the one we read, the weights of another): read the pair they left.
            if attempt == 4 or not (isinstance(e, ChangedWhileRead)
                                    or _files_now(directory) != files):
                raise
    raise AssertionError("unreachable")


# ---- writing ---------------------------------------------------------------------------------
def _sync_directory(directory: Path) -> None:
    """Makes the directory's renames durable (a no-op where directories cannot be fsynced)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_temporary(directory: Path, target: str, data: bytes, created: list[Path]) -> Path:
    """A new file beside `target` holding `data`, fsynced; created with mode 0666 & ~umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | \
        getattr(os, "O_BINARY", 0)
    while True:
        path = directory / f".{target}.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(path, flags, 0o666)
            break
        except FileExistsError:
            continue
    created.append(path)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[: 1 << 30]):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def _remove_stale_temporaries(directory: Path) -> None:
    for entry in os.scandir(directory):
        if TMP_PATTERN.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)


def _recover(directory: Path) -> None:
    """Completes a save interrupted between linking and deleting the previous weights: keep
    whichever weights the config names under WEIGHTS_NAME, then delete the previous ones."""
    previous = directory / PREVIOUS_WEIGHTS_NAME
    if not os.path.lexists(previous):
        return
    try:
        config_bytes, config = read_config(directory)
        chosen, _ = _choose_weights(directory, config, config_bytes, lambda header: None)
    except AdapterError:
        chosen = None  # nothing loadable here: nothing to keep
    if chosen == previous:
        os.replace(previous, directory / WEIGHTS_NAME)
    else:
        os.unlink(previous)
    _sync_directory(directory)


def _keep_previous(weights: Path, previous: Path, created: list[Path]) -> None:
    try:
        os.link(weights, previous)
    except OSError as e:
        if isinstance(e, FileExistsError):  # a save running beside this one, without flock
            raise
        # No hard links on this file system: a copy, renamed into place.
        with open(weights, "rb") as f:
            copy = _write_temporary(previous.parent, PREVIOUS_WEIGHTS_NAME, f.read(), created)
        os.replace(copy, previous)


def save_pair(directory: str | os.PathLike, config_bytes: bytes, weights_bytes: bytes,
              lock_timeout: float = DEFAULT_LOCK_TIMEOUT, where: str | None = None) -> Path:
    """Writes adapter_config.json and adapter_model.safetensors as described above. On any
    error before the commit the previous files stay and no temporaries are left; a file
    system error (permissions, a full disk, a dangling link) is an AdapterError, and so is
    waiting longer than `lock_timeout` seconds for the directory's lock (lock.py; `where`
    names the caller in its messages)."""
    directory = Path(directory)
    try:
        return _save_pair(directory, config_bytes, weights_bytes, lock_timeout,
                          where or str(directory))
    except OSError as e:
        # Whatever step failed, the protocol leaves the last committed save loadable.
        raise AdapterError(f"{directory}: cannot save the adapter ({e.strerror or e}: "
                           f"{e.filename or directory}); the directory still holds its last "
                           "committed save, if any") from None


def _save_pair(directory: Path, config_bytes: bytes, weights_bytes: bytes, lock_timeout: float,
               where: str) -> Path:
    if directory.exists() and not directory.is_dir():
        raise AdapterError(f"{directory}: is a file, not a directory; nothing was written")
    if directory.is_symlink() and not directory.exists():
        raise AdapterError(f"{directory}: a link to {os.readlink(directory)!r}, which does not "
                           "exist; nothing was written")
    directory.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_NAME, WEIGHTS_NAME, PREVIOUS_WEIGHTS_NAME):
        path = directory / name
        if path.is_dir() or (path.exists() and not path.is_file()):
            raise AdapterError(f"{path}: is a directory or another non-file, where the save "
                               "writes a file; nothing was written")
    weights, previous = directory / WEIGHTS_NAME, directory / PREVIOUS_WEIGHTS_NAME
    with locked(directory, lock_timeout, where) as held:
        if held:  # no other save runs now: every temporary of ours is stale
            _remove_stale_temporaries(directory)
        _recover(directory)
        created: list[Path] = []
        try:
            weights_tmp = _write_temporary(directory, WEIGHTS_NAME, weights_bytes, created)
            config_tmp = _write_temporary(directory, CONFIG_NAME, config_bytes, created)
            if weights.is_file():
                _keep_previous(weights, previous, created)
                _sync_directory(directory)
            os.replace(weights_tmp, weights)
            _sync_directory(directory)
            os.replace(config_tmp, directory / CONFIG_NAME)  # the commit
        except BaseException:
            for path in created:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise
        _sync_directory(directory)
        if os.path.lexists(previous):
            os.unlink(previous)
    return directory
