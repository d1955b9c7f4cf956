"""Subprocess side of tests/test_checkpoint_faults.py: saves killed at every filesystem step, racing writers.

It imports once and forks one child per save, so that a killed save costs a fork, not an import of
JAX. The parent never touches a JAX backend (forking after that is unsafe); the children do.

    python tests/_checkpoint_child.py faults OUT MODE         # OUT/steps.json, OUT/k<i>/ per kill point
    python tests/_checkpoint_child.py race OUT MODE ROUNDS    # OUT/r<i>/ per round, OUT/results.json

MODE is "single" (``overwrite=True`` over a checkpoint) or "step" (step 2 over step 1, ``max_to_keep=1``).
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Callable

import ml_dtypes
import numpy as np

import ia3_jax

CONFIG = ia3_jax.IA3Config(target_modules=["k", "v"], modules_to_save=["head"])
PARALLEL = 2  # the CI machine has two cores


def adapter(seed: int) -> dict:
    """A small adapter with distinct values per seed (numpy: nothing to compile)."""
    rng = np.random.default_rng(seed)
    return {
        "k": {"ia3_l": rng.standard_normal(8).astype(np.float32)},
        "v": {"ia3_l": rng.standard_normal(8).astype(ml_dtypes.bfloat16)},
        "head": {"kernel": rng.standard_normal((8, 3)).astype(np.float32), "bias": np.zeros(3, np.float32)},
    }


def opt_state(seed: int) -> dict:
    return {"mu": np.full(8, float(seed), np.float32), "count": np.array(seed, np.int32)}


def target(directory: str, mode: str) -> str:
    return os.path.join(directory, "ckpt" if mode == "single" else "run")


def save(directory: str, mode: str, seed: int) -> None:
    """The save under test: `seed`'s adapter over the previous checkpoint (seed 1) in `directory`."""
    if mode == "single":
        path = target(directory, mode)
        ia3_jax.save_adapter(path, adapter(seed), CONFIG, opt_state=opt_state(seed), overwrite=True)
    else:
        ia3_jax.save_adapter(target(directory, mode), adapter(seed), CONFIG, step=seed, max_to_keep=1)


def instrument(kill_at: int | None) -> list[str]:
    """Counts every filesystem step (mkdir, rename, unlink, rmdir, opening for writing, os.write), each as
    ``"<call> <path> [<second path>]"``. Shared by the checkpoint and the PEFT-file kill tests.

    At step number `kill_at` (from 1) the process SIGKILLs itself before the step runs.
    """
    steps: list[str] = []

    def wrap(name: str, fn: Callable, counted: Callable[..., bool] = lambda *a, **k: True) -> Callable:
        def step(*args, **kwargs):
            if counted(*args, **kwargs):
                steps.append(" ".join([name, *(str(a) for a in args[:2] if isinstance(a, str | os.PathLike))]))
                if len(steps) == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)

        return step

    for name in ("mkdir", "rename", "replace", "unlink", "remove", "rmdir", "write"):
        setattr(os, name, wrap(name, getattr(os, name)))
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT
    os.open = wrap("os.open", os.open, lambda path, flags, *a, **k: bool(flags & writes))
    builtins.open = wrap("open", builtins.open, lambda file, mode="r", *a, **k: any(c in mode for c in "wax+"))
    return steps


def same(tree: dict, seed: int) -> bool:
    """Whether `tree` is bit-identical to ``adapter(seed)`` (keys, dtypes, shapes, bytes)."""
    want = adapter(seed)
    return tree.keys() == want.keys() and all(
        tree[m].keys() == want[m].keys()
        and all(
            np.asarray(tree[m][n]).dtype == want[m][n].dtype
            and np.asarray(tree[m][n]).tobytes() == want[m][n].tobytes()
            and np.shape(tree[m][n]) == want[m][n].shape
            for n in want[m]
        )
        for m in want
    )


def loaded(directory: str, mode: str) -> int | str:
    """The seed whose adapter (and optimizer state) `load_adapter` reads back exactly, or what it raised."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the recovery warning after an interrupted overwrite
            tree, config = ia3_jax.load_adapter(target(directory, mode))
            seed = next((s for s in range(64) if same(tree, s)), None)
            if seed is None or config != CONFIG:
                return "other values"
            if mode == "single":
                state = ia3_jax.load_opt_state(target(directory, mode), opt_state(0))
                if any(np.asarray(state[n]).tobytes() != v.tobytes() for n, v in opt_state(seed).items()):
                    return "other optimizer state"
            return seed
    except Exception as err:
        return f"{type(err).__name__}: {err}"


def outcome(save_once: Callable[[], None]) -> str:
    try:
        save_once()
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return "ok"


def fork(body: Callable[[], None]) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            body()
        except BaseException as err:  # reported through the exit code and stderr
            print(f"{type(err).__name__}: {err}", file=sys.stderr)
            code = 1
        os._exit(code)
    return pid


def wait(pid: int) -> int:
    """The child's exit code, or minus the signal that ended it."""
    status = os.waitpid(pid, 0)[1]
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def faults(out: str, mode: str) -> None:
    template = os.path.join(out, "template")
    assert wait(fork(lambda: save(template, mode, 1))) == 0

    def counted() -> None:
        shutil.copytree(template, os.path.join(out, "count"))
        steps = instrument(None)
        save(os.path.join(out, "count"), mode, 2)
        recorded = list(steps)  # before the report below adds its own step
        with open(os.path.join(out, "steps.json"), "w") as f:
            json.dump(recorded, f)

    assert wait(fork(counted)) == 0
    with open(os.path.join(out, "steps.json")) as f:
        n = len(json.load(f))
    ends: dict[int, int] = {}
    running: dict[int, int] = {}
    for k in range(1, n + 1):
        directory = os.path.join(out, f"k{k}")
        shutil.copytree(template, directory)
        running[fork(lambda d=directory, k=k: (instrument(k), save(d, mode, 2)))] = k
        while len(running) >= PARALLEL or (k == n and running):
            pid, status = os.wait()
            ends[running.pop(pid)] = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    # No more forks: this process may now use JAX itself, to check what each kill left.
    facts = []
    for k in range(1, n + 1):
        directory = os.path.join(out, f"k{k}")
        fact = {"k": k, "end": ends[k], "loaded": loaded(directory, mode)}
        fact["resaved"] = outcome(lambda d=directory: save(d, mode, 3))
        fact["loaded_after"] = loaded(directory, mode)
        fact["left"] = sorted(os.listdir(directory)) + sorted(os.listdir(target(directory, mode)))
        facts.append(fact)
    with open(os.path.join(out, "facts.json"), "w") as f:
        json.dump(facts, f)


def race(out: str, mode: str, rounds: int) -> None:
    """Per round two writers save to one path at once (writer 1 starting a little later each round)."""
    template = os.path.join(out, "template")
    assert wait(fork(lambda: save(template, mode, 1))) == 0
    for r in range(rounds):
        directory = os.path.join(out, f"r{r}")
        shutil.copytree(template, directory)
        go_read, go_write = os.pipe()

        def writer(w: int, directory: str = directory, r: int = r, go: tuple[int, int] = (go_read, go_write)) -> None:
            os.close(go[1])
            os.read(go[0], 1)  # both start together
            time.sleep(w * 0.004 * (r % 8))
            seed = 10 + 2 * r + w
            result = {"seed": seed, "outcome": outcome(lambda: save(directory, mode, seed)), "end": time.monotonic_ns()}
            with open(os.path.join(out, f"r{r}.writer{w}.json"), "w") as f:
                json.dump(result, f)

        pids = [fork(lambda w=w: writer(w)) for w in (0, 1)]
        os.close(go_read)
        os.write(go_write, b"go")
        os.close(go_write)
        assert [wait(pid) for pid in pids] == [0, 0]
    # No more forks: check each round here.
    results = []
    for r in range(rounds):
        writers = []
        for w in (0, 1):
            with open(os.path.join(out, f"r{r}.writer{w}.json")) as f:
                writers.append(json.load(f))
        directory = os.path.join(out, f"r{r}")
        results.append({"writers": writers, "loaded": loaded(directory, mode)})
    with open(os.path.join(out, "facts.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    command, out, mode = sys.argv[1:4]
    if command == "faults":
        faults(out, mode)
    else:
        race(out, mode, int(sys.argv[4]))
