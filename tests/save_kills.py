"""Kills saves at every file-system step and checks what is left.

A save changes the file system only through these calls: creating or opening a file for
writing, write, fsync, link, replace, rename, unlink, mkdir ("steps"). A process killed just
before step k (SIGKILL, os._exit: no cleanup runs) leaves the directory exactly as it was at
that moment; a write can also be torn (half of it written). `recorded_save` runs one save and
copies the directory at each of those moments, which gives every kill point of that save in
one run; `killed_save` kills a forked child for real (os._exit at step k), and the script mode
`crosscheck` shows both give the same directories.

    python save_kills.py WORKDIR ours|peft crosscheck  real kills == recorded kill points
    python save_kills.py WORKDIR ours|peft scenario    v2 killed between its renames, then v3
                                                       right after it links the old weights
print one JSON line; they exit non-zero with the reason on any failure.
"""
import hashlib
import json
import os
import shutil
import sys

import torch
import torch.nn as nn

import soslora_ext as sl
from soslora_ext.formats.files import CONFIG_NAME, TMP_PATTERN, WEIGHTS_NAME
from soslora_ext.formats.peft import folded_factors

STEPS = ("open", "write", "fsync", "link", "replace", "rename", "unlink", "mkdir")
REAL = {name: getattr(os, name) for name in STEPS}
WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down, self.head = nn.Linear(6, 5), nn.Linear(5, 3), nn.Linear(3, 2)


def adapted(version):
    """Consecutive versions differ in rank too, so a mixed pair is also a shape mismatch."""
    torch.manual_seed(0)
    model = sl.apply_sos_lora(Tiny(), ["up", "down"], modules_to_save=["head"], num_experts=2,
                              rank=4 if version % 2 == 0 else 8, scale_mode="channel", gate=True)
    torch.manual_seed(1000 + version)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    return model


def save(kind, version, directory):
    if kind == "ours":
        sl.save_adapter(adapted(version), directory, metadata={"version": version})
    else:
        sl.export_peft(adapted(version), directory)


def check(kind, directory, version):
    """The directory loads as exactly `version`, or fail."""
    want = adapted(version)
    if kind == "ours":
        torch.manual_seed(0)
        got = sl.load_adapter(Tiny(), directory).state_dict()
        ok = got.keys() == want.state_dict().keys() and all(
            torch.equal(v, want.state_dict()[k]) for k, v in got.items())
    else:
        _, factors, whole = sl.formats.native.read_peft_lora(directory)
        layers = dict(sl.sos_layers(want))
        ok = factors.keys() == layers.keys() and all(
            torch.equal(a, b) for n in layers for a, b in zip(factors[n][:2],
                                                                folded_factors(layers[n])))
        ok = ok and all(torch.equal(whole[f"head.{k}"], v)
                        for k, v in want.head.named_parameters())
    if not ok:
        sys.exit(f"{directory}: does not load as version {version}")


def killed_save(kind, version, directory, kill_at, torn=False, kill_after=None):
    """Saves in a forked child killed (os._exit) at step `kill_at` (or just after the first
    step named `kill_after`); returns its exit code: 10 killed before the commit (the config's
    rename), 11 after it, 12 the save ran to its end, 13 it raised, 14 a torn write was asked
    at a step that is not a write."""
    pid = os.fork()
    if pid:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    count, committed = [0], [False]

    def hooked(name):
        def step(*args, **kwargs):
            if name == "open" and not args[1] & WRITING:
                return REAL[name](*args, **kwargs)  # reading changes nothing
            if count[0] == kill_at:
                if torn:
                    if name != "write":
                        os._exit(14)
                    REAL["write"](args[0], bytes(args[1][: len(args[1]) // 2]))
                os._exit(11 if committed[0] else 10)
            count[0] += 1
            result = REAL[name](*args, **kwargs)
            committed[0] |= name == "replace" and os.path.basename(args[1]) == CONFIG_NAME
            if name == kill_after:
                os._exit(11 if committed[0] else 10)
            return result
        return step

    for name in STEPS:
        setattr(os, name, hooked(name))
    try:
        save(kind, version, directory)
    except BaseException:
        os._exit(13)
    os._exit(12)


def recorded_save(kind, version, directory, snapshots, new_config=None):
    """Runs the save, copying the directory before each step and in the middle of each write
    into a new folder under `snapshots`: [(folder, committed)] in step order, the completed
    save last. The save commits at its config's rename, or at its weights' rename when the
    config in place already has the bytes of its config `new_config` (a PEFT export of the
    same structure: then nothing tells the two moments apart)."""
    taken, committed, copying = [], [False], [False]

    def snapshot():
        folder = os.path.join(snapshots, str(len(taken)))
        copying[0] = True  # copying makes folders: not steps of the save
        shutil.copytree(directory, folder, copy_function=shutil.copyfile)
        copying[0] = False
        taken.append((folder, committed[0]))

    def hooked(name):
        def step(*args, **kwargs):
            if copying[0] or (name == "open" and not args[1] & WRITING):
                return REAL[name](*args, **kwargs)
            snapshot()
            if name == "write":  # torn: half of it on disk
                half = REAL["write"](args[0], bytes(args[1][: len(args[1]) // 2]))
                snapshot()
                return half + REAL["write"](args[0], args[1][half:])
            if name == "fsync":
                return None  # only power loss needs it: keeps the test fast
            result = REAL[name](*args, **kwargs)
            target = os.path.basename(args[1]) if name == "replace" else None
            committed[0] |= target == CONFIG_NAME or (  # not _recover's rename of previous
                target == WEIGHTS_NAME and bool(TMP_PATTERN.fullmatch(os.path.basename(args[0])))
                and config_bytes(directory) == new_config)
            return result
        return step

    try:
        for name in STEPS:
            setattr(os, name, hooked(name))
        save(kind, version, directory)
    finally:
        for name in STEPS:
            setattr(os, name, REAL[name])
    taken.append((directory, True))
    return taken


def config_bytes(directory):
    with open(os.path.join(directory, CONFIG_NAME), "rb") as f:
        return f.read()


def content(name: str, data: bytes):
    """A file's contents; a safetensors file by its parsed header, since safetensors writes the
    metadata's keys in an order that varies from run to run (one cut inside its header: by
    its length)."""
    if "safetensors" not in name:
        return hashlib.sha256(data).hexdigest()
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8:8 + n])
    except ValueError:
        return len(data)
    metadata = header.pop("__metadata__", {})
    return (json.dumps([metadata, header], sort_keys=True),
            hashlib.sha256(data[8 + n:]).hexdigest())


def state(directory):
    """What a directory holds, temporaries by content (their names are random)."""
    files = []
    for name in sorted(os.listdir(directory)):
        match = TMP_PATTERN.fullmatch(name)
        with open(os.path.join(directory, name), "rb") as f:
            files.append((f"tmp of {match.group(1)}" if match else name, content(name, f.read())))
    return tuple(sorted(files, key=str))


def enumerate_kills(kind, work, saves=3):
    """Every kill point of `saves` consecutive saves (versions 1, 2, ...) over version 0, every
    sequence of them: after each, the directory loads as the last committed version; a save
    completed over any directory reached leaves just the two files. Identical directories
    (same files, same committed version) are explored once: what follows depends only on them."""
    start = os.path.join(work, "start")
    save(kind, 0, start)
    frontier, seen, kill_points = [(start, 0)], set(), 0
    for version in range(1, saves + 1):
        reached, alone = [], os.path.join(work, f"v{version}")
        save(kind, version, alone)
        for i, (directory, committed) in enumerate(frontier):
            snapshots = os.path.join(work, f"v{version}-{i}")
            run = os.path.join(snapshots, "run")
            shutil.copytree(directory, run)
            for folder, done in recorded_save(kind, version, run, snapshots,
                                              config_bytes(alone)):
                kill_points += 1
                now = version if done else committed
                key = (version, now, state(folder))
                if key not in seen:
                    seen.add(key)
                    check(kind, folder, now)
                    reached.append((folder, now))
        frontier = reached
    for directory, _ in frontier:
        save(kind, saves + 1, directory)
        check(kind, directory, saves + 1)
        if sorted(os.listdir(directory)) != sorted([CONFIG_NAME, WEIGHTS_NAME]):
            sys.exit(f"{directory}: left {sorted(os.listdir(directory))}")
    return dict(kill_points=kill_points, directories=len(seen), final=len(frontier))


def crosscheck(kind, work):
    """A real kill at each step of a save leaves what recorded_save copied at that step."""
    start = os.path.join(work, "start")
    save(kind, 0, start)
    run = os.path.join(work, "run")
    shutil.copytree(start, run)
    recorded = [state(folder) for folder, _ in recorded_save(kind, 1, run, os.path.join(work, "s"))]
    real, k = [], 0
    while True:
        for torn in (False, True):
            trial = os.path.join(work, f"k{k}{'torn' if torn else ''}")
            shutil.copytree(start, trial)
            code = killed_save(kind, 1, trial, k, torn)
            if code not in (10, 11, 12, 14):
                sys.exit(f"killed at step {k}: exit code {code}")
            if code == 14:  # not a write: nothing to tear
                continue
            real.append(state(trial))
            if code == 12:
                break
        if code == 12:
            break
        k += 1
    if real != recorded:
        sys.exit(f"real kills left {len(real)} directories, recorded {len(recorded)}, not the "
                 "same")
    return dict(kill_points=len(real))


def scenario(kind, work):
    directory = os.path.join(work, "adapter")
    save(kind, 1, directory)
    codes = [killed_save(kind, 2, directory, None, kill_after="replace"),  # weights renamed
             killed_save(kind, 3, directory, None, kill_after="link")]
    check(kind, directory, 1)
    return dict(codes=codes, files=sorted(os.listdir(directory)))


if __name__ == "__main__":
    torch.set_num_threads(1)  # no thread pool in the process that forks
    work, kind, mode = sys.argv[1:4]
    print(json.dumps({"crosscheck": crosscheck, "scenario": scenario}[mode](kind, work)))
