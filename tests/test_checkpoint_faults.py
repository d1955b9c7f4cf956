"""save_adapter under faults: SIGKILL at every filesystem step, two writers at once, damaged files.

The subprocess side is tests/_checkpoint_child.py (one import, one fork per save); it reports what
it found as JSON and the assertions are here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import ia3_jax
from ia3_jax import CheckpointError
from tests._checkpoint_child import CONFIG, adapter, opt_state, same

CHILD = os.path.join(os.path.dirname(__file__), "_checkpoint_child.py")
ROUNDS = 6


def _run_children(*argvs: list[str]) -> None:
    """Runs the helper once per argv, all at once; fails with the helper's stderr."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(CHILD)))
    env.pop("XLA_FLAGS", None)  # one CPU device starts faster than eight, in each of the ~100 children
    procs = [subprocess.Popen([sys.executable, CHILD, *argv], stderr=subprocess.PIPE, env=env) for argv in argvs]
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err.decode()[-3000:]


@pytest.mark.slow
def test_killed_at_every_step_leaves_last_complete_checkpoint(tmp_path):
    modes = ("single", "step")
    for mode in modes:
        (tmp_path / mode).mkdir()
    _run_children(*[["faults", str(tmp_path / mode), mode] for mode in modes])
    for mode in modes:
        steps = json.loads((tmp_path / mode / "steps.json").read_text())
        facts = json.loads((tmp_path / mode / "facts.json").read_text())
        # lock, orbax's writes, the manifest, our renames, every unlink of the old copy, the lock's unlink
        assert len(facts) == len(steps) > 40
        # The step that puts the new checkpoint in place: renaming the verified staging directory.
        commit = next(
            i for i, s in enumerate(steps, 1) if re.fullmatch(r"rename \S*\.ia3-staging-[0-9a-f]{8}-[0-9a-f]{8} \S+", s)
        )
        kinds = {s.split()[0] for s in steps}
        assert {"os.open", "write", "mkdir", "open", "rename", "unlink", "rmdir"} <= kinds, kinds
        for fact in facts:
            k, step = fact["k"], steps[fact["k"] - 1]
            assert fact["end"] == -9, (mode, k, step)  # SIGKILLed before step k ran
            # Before the commit the previous checkpoint loads, after it the new one; bit for bit, either way.
            assert fact["loaded"] == (1 if k <= commit else 2), (mode, k, step, fact["loaded"])
            assert fact["resaved"] == "ok" and fact["loaded_after"] == 3, (mode, k, step, fact)
            # The next save swept every leftover (staging, replaced and trash directories, the lock file).
            want = (
                ["ckpt", *sorted(os.listdir(tmp_path / mode / "template" / "ckpt"))]
                if mode == "single"
                else ["run", "3"]
            )
            assert fact["left"] == want, (mode, k, step, fact["left"])
        assert steps[0].startswith("os.open") and steps[0].endswith(".ia3-lock")  # the lock comes first
        assert steps[-1].startswith("unlink") and steps[-1].endswith(".ia3-lock")  # and goes last
        if mode == "single":  # killed between the two renames: the old copy is put back by the next save
            aside = next(i for i, s in enumerate(steps, 1) if re.fullmatch(r"rename \S*/ckpt \S+", s))
            assert facts[aside]["loaded"] == 1 and commit == aside + 1, (steps[aside - 1 : aside + 1], facts[aside])


@pytest.mark.slow
def test_two_writers_on_one_path(tmp_path):
    modes = ("single", "step")
    for mode in modes:
        (tmp_path / mode).mkdir()
    _run_children(*[["race", str(tmp_path / mode), mode, str(ROUNDS)] for mode in modes])
    for mode in modes:
        rounds = json.loads((tmp_path / mode / "facts.json").read_text())
        assert len(rounds) == ROUNDS
        refused = 0
        for r, facts in enumerate(rounds):
            outcomes = [w["outcome"] for w in facts["writers"]]
            # Each writer succeeded or was refused as the second writer; nothing else.
            for outcome in outcomes:
                assert outcome == "ok" or re.match(r"CheckpointError: (another save|step \d+ is older)", outcome), (
                    mode,
                    r,
                    outcomes,
                )
            done = sorted((w for w in facts["writers"] if w["outcome"] == "ok"), key=lambda w: w["end"])
            assert done, (mode, r, outcomes)
            # The path loads, and holds exactly what the writer that reported success last wrote.
            assert facts["loaded"] == done[-1]["seed"], (mode, r, facts)
            refused += len(facts["writers"]) - len(done)
        assert refused, "the writers never overlapped: the race was not exercised"


def _damage(file: str, how: str) -> None:
    with open(file, "rb") as f:
        data = f.read()
    if how == "delete":
        os.unlink(file)
        return
    middle = len(data) // 2
    damaged = {
        "truncate": data[:middle],
        "zero": bytes(len(data)),
        "flip": data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :],
    }[how]
    with open(file, "wb") as f:
        f.write(damaged)


def test_damaged_files_give_checkpoint_error_or_exact_values(tmp_path):
    original = ia3_jax.save_adapter(tmp_path / "original", adapter(1), CONFIG, opt_state=opt_state(1))
    files = sorted(os.path.relpath(os.path.join(d, f), original) for d, _, names in os.walk(original) for f in names)
    assert len(files) > 15 and "config/metadata" in files
    errors = 0
    for rel in files:
        for how in ("truncate", "zero", "flip", "delete"):
            case = tmp_path / "case"
            shutil.rmtree(case, ignore_errors=True)
            shutil.copytree(original, case)
            _damage(os.path.join(case, rel), how)
            try:
                tree, config = ia3_jax.load_adapter(case)
            except CheckpointError as err:
                assert rel in str(err), (rel, how, str(err))  # names the damaged file
                assert not rel.startswith("opt_state/"), (rel, how, str(err))  # load_adapter never reads it
                errors += 1
            else:
                assert same(tree, 1) and config == CONFIG, (rel, how)
            if rel.startswith("opt_state/"):
                try:
                    state = ia3_jax.load_opt_state(case, opt_state(0))
                except CheckpointError as err:
                    assert "opt_state" in str(err), (rel, how, str(err))
                else:
                    assert all(np.asarray(state[n]).tobytes() == v.tobytes() for n, v in opt_state(1).items()), (
                        rel,
                        how,
                    )
    assert errors > 20
