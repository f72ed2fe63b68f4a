"""Errors that name what is wrong: a load racing a save, a safetensors header over the size
limit, metadata whose keys JSON cannot sort or tell apart."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import soslora_ext as sl
from soslora_ext.formats import files
from soslora_ext.formats.files import (
    CONFIG_NAME,
    MAX_HEADER_BYTES,
    PREVIOUS_WEIGHTS_NAME,
    WEIGHTS_NAME,
)

import save_kills

TESTS = Path(__file__).resolve().parents[1]


WANT = {}


def loaded_version(directory):
    """Which of versions 0 and 1 the directory loads as, bit-exactly (None: neither)."""
    torch.manual_seed(0)
    got = sl.load_adapter(save_kills.Tiny(), directory).state_dict()
    for version in (0, 1):
        want = WANT.setdefault(version, save_kills.adapted(version).state_dict())
        if got.keys() == want.keys() and all(torch.equal(v, want[k]) for k, v in got.items()):
            return version
    return None


@pytest.mark.parametrize("kind", ["ours", "peft"])
def test_a_save_committing_while_a_load_opens_the_previous_weights(tmp_path, kind, monkeypatch):
    # The reader finds the config of save 1 and the weights of save 2 (a save between its
    # renames), so it opens the previous weights; that save commits and deletes them first.
    # Before: FileNotFoundError for .adapter_model.safetensors.previous (3 of ~1150 loads of
    # a real race). Now: the reader reads the committed pair.
    old, new, racing = tmp_path / "old", tmp_path / "new", tmp_path / "racing"
    save_kills.save(kind, 1, old)
    save_kills.save(kind, 2, new)
    racing.mkdir()
    shutil.copy(old / CONFIG_NAME, racing / CONFIG_NAME)
    shutil.copy(new / WEIGHTS_NAME, racing / WEIGHTS_NAME)
    shutil.copy(old / WEIGHTS_NAME, racing / PREVIOUS_WEIGHTS_NAME)
    real_open, opened = open, []

    def committing_open(path, *args, **kwargs):
        if Path(path).name == PREVIOUS_WEIGHTS_NAME and not opened:
            opened.append(path)
            shutil.copy(new / CONFIG_NAME, racing / ".config")  # the commit, then the cleanup
            os.replace(racing / ".config", racing / CONFIG_NAME)
            os.unlink(racing / PREVIOUS_WEIGHTS_NAME)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(files, "open", committing_open, raising=False)
    save_kills.check(kind, str(racing), 2)
    assert opened


@pytest.mark.parametrize("kind", ["ours", "peft"])
def test_two_saves_between_reading_the_config_and_the_weights(tmp_path, kind, monkeypatch):
    # The reader has read the config of version 1; save 2 completes, the reader opens its
    # weights, then save 3 completes with the config bytes of version 1. Before: refused
    # ("tensor 'lora_A' is torch.float32 (4, 5), expected ... (8, 5)": 3 of ~4800 loads of a real
    # race), as the config read again looked unchanged. Now: read again, as files were renamed in.
    racing = tmp_path / "racing"
    save_kills.save(kind, 1, racing)
    first = (racing / CONFIG_NAME).read_bytes()
    real_open, opened = open, []

    def racing_open(path, *args, **kwargs):
        if Path(path).name != WEIGHTS_NAME or opened:
            return real_open(path, *args, **kwargs)
        save_kills.save(kind, 2, racing)
        opened.append(real_open(path, *args, **kwargs))  # the weights of version 2
        save_kills.save(kind, 1, racing)
        assert (racing / CONFIG_NAME).read_bytes() == first
        return opened[0]

    monkeypatch.setattr(files, "open", racing_open, raising=False)
    save_kills.check(kind, str(racing), 1)
    assert opened


def test_a_weights_file_that_cannot_be_opened_is_an_adapter_error(tmp_path, monkeypatch):
    # Before: the raw PermissionError (as for a file of mode 000, for a user other than root).
    directory = sl.save_adapter(save_kills.adapted(0), tmp_path / "a")
    real_open = open

    def denied(path, *args, **kwargs):
        if Path(path).name == WEIGHTS_NAME:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(files, "open", denied, raising=False)
    with pytest.raises(sl.AdapterError, match=f"{WEIGHTS_NAME}: cannot be read "
                                              r"\(Permission denied\)"):
        sl.load_adapter(save_kills.Tiny(), directory)


SAVER = """
import sys, time
sys.path.insert(0, {tests!r})
import save_kills
directory, end = sys.argv[1], time.time() + float(sys.argv[2])
version = 0
while time.time() < end:
    version += 1
    save_kills.save("ours", version % 2, directory)
"""


def test_loads_beside_a_saving_process_never_raise_os_errors(tmp_path):
    # The race for real: a process saves two versions in turn for a few seconds while this
    # one loads. Every load gives one whole version (or, should saves follow one another
    # through all five reads of a load, an AdapterError), never an OSError.
    directory = tmp_path / "a"
    save_kills.save("ours", 0, directory)
    saver = subprocess.Popen([sys.executable, "-c", SAVER.format(tests=str(TESTS)),
                              str(directory), "6"], env={**os.environ, "OMP_NUM_THREADS": "1"})
    loads, refused = 0, 0
    try:
        time.sleep(1.0)
        while saver.poll() is None:
            try:
                assert loaded_version(directory) in (0, 1)
            except sl.AdapterError:
                refused += 1
            loads += 1
    finally:
        saver.wait(60)
    print(f"{loads} loads, {refused} refused")
    assert saver.returncode == 0 and loads > 10 and refused <= loads // 100


def test_a_header_over_the_size_limit_is_reported_as_such(tmp_path):
    # Before: "header length 100000001 is more than the file's 100000092 bytes after it".
    directory = sl.save_adapter(save_kills.adapted(0), tmp_path / "a")
    weights = directory / WEIGHTS_NAME
    with open(weights, "r+b") as f:
        f.write((MAX_HEADER_BYTES + 1).to_bytes(8, "little"))
        f.truncate(MAX_HEADER_BYTES + 100)  # sparse: larger than the length it declares
    with pytest.raises(sl.AdapterError, match=f"header length {MAX_HEADER_BYTES + 1} is over "
                                              f"the limit of {MAX_HEADER_BYTES} bytes"):
        sl.load_adapter(save_kills.Tiny(), directory)
    with open(weights, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(sl.AdapterError, match="is more than the file's 992 bytes after it"):
        sl.load_adapter(save_kills.Tiny(), directory)


@pytest.mark.parametrize("metadata,error,match", [
    ({1: "a", "b": 2}, TypeError, r"metadata has keys of different types \(int and str\)"),
    ({"outer": {"x": 1, None: 2}}, TypeError,
     r"metadata\['outer'\] has keys of different types \(NoneType and str\)"),
    ({1: "a", "1": "b"}, TypeError, r"metadata has keys of different types \(int and str\)"),
    ({"l": [{True: 0, "true": 1}]}, TypeError,
     r"metadata\['l'\]\[0\] has keys of different types \(bool and str\)"),
])
def test_metadata_keys_json_cannot_sort_are_refused_naming_metadata(tmp_path, metadata, error,
                                                                     match):
    # Before: TypeError "'<' not supported between instances of 'str' and 'int'", not saying
    # metadata (the config is written with sorted keys; 1 and "1" would also be one key).
    directory = sl.save_adapter(save_kills.adapted(0), tmp_path / "a")
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    with pytest.raises(error, match=r"save_adapter\(.*\): " + match + ".*nothing was written"):
        sl.save_adapter(save_kills.adapted(1), directory, metadata=metadata)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before


def test_metadata_with_number_keys_of_one_kind_is_saved_as_json_writes_it(tmp_path):
    directory = sl.save_adapter(save_kills.adapted(0), tmp_path / "a",
                                metadata={"labels": {0: "neg", 1: "pos"}})
    config = json.loads((directory / CONFIG_NAME).read_text())
    assert config["metadata"] == {"labels": {"0": "neg", "1": "pos"}}
