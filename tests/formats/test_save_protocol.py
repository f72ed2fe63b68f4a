"""The write protocol of adapter directories (adapter_files): kills at every step of three
saves in a row, temporaries, concurrent saves, file modes, and a folder where a file goes."""
import fcntl
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import soslora_ext as sl
from soslora_ext.formats.native import (
    CONFIG_NAME,
    PREVIOUS_WEIGHTS_NAME,
    WEIGHTS_NAME,
    read_adapter_config,
)

import save_kills

TESTS = Path(__file__).resolve().parents[1]
KINDS = ["ours", "peft"]


def run_script(tmp_path, kind, mode):
    result = subprocess.run([sys.executable, str(TESTS / "save_kills.py"), str(tmp_path), kind,
                             mode], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("kind", KINDS)
def test_every_kill_point_of_three_saves_in_a_row_leaves_the_last_committed_save(tmp_path,
                                                                                   kind):
    # Before the fix, a save killed between its renames followed by one killed right after it
    # linked the old weights left a directory that was refused: the old weights were gone.
    result = save_kills.enumerate_kills(kind, str(tmp_path))
    print(result)
    assert result["kill_points"] > 3 * 15 and result["directories"] > 20


@pytest.mark.parametrize("kind", KINDS)
def test_real_kills_leave_what_the_recorded_kill_points_show(tmp_path, kind):
    assert run_script(tmp_path, kind, "crosscheck")["kill_points"] >= 15


def test_two_saves_killed_in_a_row_keep_the_first(tmp_path):
    # Save v1; kill save v2 between its renames; kill save v3 right after it links the
    # weights to PREVIOUS_WEIGHTS_NAME: v1 still loads (checked by the script, bit-exactly).
    result = run_script(tmp_path, "ours", "scenario")
    assert result["codes"] == [10, 10]  # both killed before their commit
    assert PREVIOUS_WEIGHTS_NAME in result["files"]


def llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=56, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()


def peft_export(directory, rank, seed):
    model = sl.apply_sos_lora(llama(), ["q_proj"], num_experts=2, rank=rank)
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, layer in sl.sos_layers(model):
            layer.lora_B.normal_(0, 0.3)
    sl.export_peft(model, directory)
    return model


def test_peft_export_killed_between_its_renames_imports_the_previous_export(tmp_path):
    # A rank-16 export over a rank-8 one, stopped between its renames: the rank-8 config, the
    # rank-16 weights, and the rank-8 weights kept aside.
    old, new = tmp_path / "old", tmp_path / "new"
    peft_export(old, 8, 1)
    peft_export(new, 16, 2)
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    (crashed / CONFIG_NAME).write_bytes((old / CONFIG_NAME).read_bytes())
    (crashed / WEIGHTS_NAME).write_bytes((new / WEIGHTS_NAME).read_bytes())
    (crashed / PREVIOUS_WEIGHTS_NAME).write_bytes((old / WEIGHTS_NAME).read_bytes())
    expected = sl.import_peft(llama(), old, num_experts=2)
    got = sl.import_peft(llama(), crashed, num_experts=2)
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(),
                                                  expected.state_dict().values()))
    # Without the old weights (as the previous export protocol left it) the pair is refused:
    # before, it imported rank-16 factors with the rank-8 scaling, an update 50% off.
    (crashed / PREVIOUS_WEIGHTS_NAME).unlink()
    fresh = llama()
    with pytest.raises(sl.AdapterError, match="the factors have rank 16, but adapter_config.json "
                                              "gives this layer r=8"):
        sl.import_peft(fresh, crashed, num_experts=2)
    assert not list(sl.sos_layers(fresh))


# ---- temporaries, concurrent saves, modes ------------------------------------------------------
def tiny(version=0):
    return save_kills.adapted(version)


def test_stale_temporaries_are_deleted_by_the_next_save(tmp_path):
    directory = sl.save_adapter(tiny(0), tmp_path / "a")
    ours = [".adapter_model.safetensors.k3j_x9a2.tmp",          # as mkstemp named them
            ".adapter_config.json.0123456789abcdef.tmp",
            "..adapter_model.safetensors.previous.fedcba9876543210.tmp"]  # a copy of it
    others = ["notes.tmp", ".other.abcdefgh.tmp", ".adapter_model.safetensors.tmp"]
    for name in ours + others:
        (directory / name).write_bytes(b"x" * 1000)
    sl.save_adapter(tiny(1), directory)
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [CONFIG_NAME, WEIGHTS_NAME] + others)
    torch.manual_seed(0)
    assert sl.load_adapter(save_kills.Tiny(), directory) is not None


def test_a_save_waits_for_the_save_in_progress_and_keeps_its_temporaries(tmp_path):
    # Another process saving here holds the directory's lock and has a temporary in flight:
    # the second save waits, and deletes temporaries only once it holds the lock itself.
    directory = sl.save_adapter(tiny(0), tmp_path / "a")
    in_flight = directory / ".adapter_model.safetensors.0011223344556677.tmp"
    in_flight.write_bytes(b"being written")
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        saver = threading.Thread(target=sl.save_adapter, args=(tiny(1), directory), daemon=True)
        saver.start()
        time.sleep(0.5)
        assert saver.is_alive() and in_flight.exists()
        assert read_adapter_config(directory)["modules"]["up"]["config"]["rank"] == 4
    finally:
        os.close(fd)  # the other save is done
    saver.join(60)
    assert not saver.is_alive() and not in_flight.exists()
    assert read_adapter_config(directory)["modules"]["up"]["config"]["rank"] == 8


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_are_created_with_the_umask(tmp_path, kind, umask):
    old = os.umask(umask)
    try:
        save_kills.save(kind, 0, tmp_path / "a")
        save_kills.save(kind, 1, tmp_path / "a")  # replacing files: new ones, same rule
    finally:
        os.umask(old)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert (tmp_path / "a" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target", [CONFIG_NAME, WEIGHTS_NAME, PREVIOUS_WEIGHTS_NAME])
def test_a_folder_where_a_file_goes_is_refused_and_nothing_changes(tmp_path, kind, target):
    directory = tmp_path / "a"
    save_kills.save(kind, 0, directory)
    path = directory / target
    path.unlink(missing_ok=True)
    path.mkdir()
    (path / "inside").write_text("kept")
    before = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
    with pytest.raises(sl.AdapterError, match=f"{target}: is a directory or another non-file"):
        save_kills.save(kind, 1, directory)
    assert {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in directory.iterdir()) == sorted(list(before) + [target])
    assert (path / "inside").read_text() == "kept"


@pytest.mark.parametrize("target", [CONFIG_NAME, WEIGHTS_NAME])
def test_reading_a_folder_where_a_file_goes_is_refused(tmp_path, target):
    directory = sl.save_adapter(tiny(0), tmp_path / "a")
    (directory / target).unlink()
    (directory / target).mkdir()
    with pytest.raises(sl.AdapterError, match=f"{target}: is a directory, not a file"):
        sl.load_adapter(save_kills.Tiny(), directory)


def test_saving_into_a_file_is_refused(tmp_path):
    (tmp_path / "a").write_text("a file")
    with pytest.raises(sl.AdapterError, match="is a file, not a directory"):
        sl.save_adapter(tiny(0), tmp_path / "a")
    assert (tmp_path / "a").read_text() == "a file"


@pytest.mark.parametrize("kind", KINDS)
def test_saving_through_a_dangling_link_is_refused(tmp_path, kind):
    # Before: FileExistsError from mkdir.
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(sl.AdapterError, match="a link to .*nowhere.*which does not exist"):
        save_kills.save(kind, 0, tmp_path / "link")
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_a_full_disk_is_an_adapter_error_and_the_last_save_stays(tmp_path, kind, monkeypatch):
    # Before: a raw OSError (e.g. PermissionError on a read-only folder) reached the caller.
    import errno

    save_kills.save(kind, 0, tmp_path / "a")
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}

    def full_disk(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(sl.AdapterError, match="cannot save the adapter .*No space left.*still "
                                              "holds its last committed save"):
        save_kills.save(kind, 1, tmp_path / "a")
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before
