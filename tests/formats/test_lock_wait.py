"""A save waiting for the directory's lock: it says whose lock after a few seconds and gives up
after lock_timeout, writing nothing; a holder stopped (SIGSTOP) or killed blocks no save for
ever."""
import inspect
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import soslora_ext as sl
from soslora_ext.formats import lock
from soslora_ext.formats.native import read_adapter_config

import save_kills

TESTS = Path(__file__).resolve().parents[1]
HOLDER = """
import fcntl, os, sys, time
from pathlib import Path
if sys.argv[2] == "ours":  # as a save holds it: the lock and its record
    from soslora_ext.formats.lock import locked
    with locked(Path(sys.argv[1]), 10.0, "holder") as held:
        print("locked", held, flush=True)
        time.sleep(600)
fd = os.open(sys.argv[1], os.O_RDONLY)  # as another program (or an older version) holds it
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(600)
"""


def hold(directory, how="ours"):
    """A child process holding the directory's lock, stopped with SIGSTOP once it holds it."""
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), how],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().startswith("locked")
    os.kill(child.pid, signal.SIGSTOP)
    return child


def kill(child):
    child.kill()  # SIGKILL ends a stopped process too
    child.wait(30)


def contents(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir()}


@pytest.fixture
def quick_warning(monkeypatch):
    monkeypatch.setattr(lock, "LOCK_WARN_AFTER", 0.5)


@pytest.mark.parametrize("kind", ["ours", "peft"])
def test_a_stopped_holder_is_named_and_the_save_gives_up(tmp_path, quick_warning, kind):
    # Before: the save waited for ever, saying nothing.
    directory = tmp_path / "a"
    save_kills.save(kind, 0, directory)
    before = contents(directory)
    child = hold(directory)
    try:
        start = time.monotonic()
        with pytest.warns(RuntimeWarning, match=rf"waiting for the lock on .*a: held by pid "
                                                rf"{child.pid} on host "
                                                rf"{socket.gethostname()} for \d+ s"):
            with pytest.raises(sl.AdapterError, match=rf"gave up after 2 s waiting for the lock "
                                                      rf"on .*held by pid {child.pid} .*stopped "
                                                      rf"or hung.*lock_timeout.*nothing was "
                                                      "written"):
                model = save_kills.adapted(1)
                if kind == "ours":
                    sl.save_adapter(model, directory, lock_timeout=2)
                else:
                    sl.export_peft(model, directory, lock_timeout=2)
        assert 2 <= time.monotonic() - start < 10
        assert contents(directory) == before
    finally:
        kill(child)
    # Killed, the holder releases the lock: the next save (default timeout) goes through.
    save_kills.save(kind, 1, directory)
    save_kills.check(kind, str(directory), 1)
    assert sorted(p.name for p in directory.iterdir()) == sorted(before)


def test_a_holder_that_records_nothing_is_named_by_its_pid(tmp_path, quick_warning):
    # Another program (or an older version of this package) holding the lock: the kernel
    # (/proc/locks) still tells its pid.
    directory = sl.save_adapter(save_kills.adapted(0), tmp_path / "a")
    child = hold(directory, "flock")
    try:
        with pytest.warns(RuntimeWarning, match=rf"held by pid {child.pid} \(for an unknown "
                                                r"time: it records nothing"):
            with pytest.raises(sl.AdapterError, match=rf"held by pid {child.pid}"):
                sl.save_adapter(save_kills.adapted(1), directory, lock_timeout=1)
    finally:
        kill(child)
    assert read_adapter_config(directory)["modules"]["up"]["config"]["rank"] == 4


def test_a_record_left_by_a_killed_holder_is_not_believed(tmp_path, quick_warning):
    # The holder that wrote the record was killed; another process holds the lock now.
    directory = sl.save_adapter(save_kills.adapted(0), tmp_path / "a")
    first = hold(directory)
    kill(first)  # its record stays behind
    second = hold(directory, "flock")
    try:
        with pytest.raises(sl.AdapterError, match=rf"held by pid {second.pid} \(") as error:
            sl.save_adapter(save_kills.adapted(1), directory, lock_timeout=0.5)
        assert str(first.pid) not in str(error.value)
    finally:
        kill(second)


def test_a_short_wait_says_nothing(tmp_path, recwarn):
    # A save that waits less than LOCK_WARN_AFTER for another save warns of nothing.
    directory = sl.save_adapter(save_kills.adapted(0), tmp_path / "a")
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), "ours"],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().startswith("locked")
    threading.Timer(0.5, child.kill).start()
    try:
        sl.save_adapter(save_kills.adapted(1), directory)
    finally:
        child.wait(30)
    assert not [w for w in recwarn if "waiting for the lock" in str(w.message)]
    assert read_adapter_config(directory)["modules"]["up"]["config"]["rank"] == 8


def test_lock_timeout_defaults_and_values(tmp_path):
    for function in (sl.save_adapter, sl.export_peft, sl.formats.native.write_peft_lora):
        default = inspect.signature(function).parameters["lock_timeout"].default
        assert default == lock.DEFAULT_LOCK_TIMEOUT == 300
    directory = tmp_path / "a"
    sl.save_adapter(save_kills.adapted(0), directory, lock_timeout=0)  # free: no wait needed
    sl.save_adapter(save_kills.adapted(1), directory, lock_timeout=math.inf)  # wait for ever
    sl.save_adapter(save_kills.adapted(1), directory, lock_timeout=None)  # the same
    before = contents(directory)
    for bad in (-1, math.nan, "5", True, [3]):
        for save in (sl.save_adapter, sl.export_peft):
            with pytest.raises(sl.AdapterError, match=r"lock_timeout must be a number of "
                                                      r"seconds >= 0.*got " + re.escape(repr(bad))):
                save(save_kills.adapted(0), directory, lock_timeout=bad)
    assert contents(directory) == before
