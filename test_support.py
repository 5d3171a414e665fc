"""What the test files share: the one_thread fixture, and spawn() for the tests that run real multi-process gloo groups
on the CPU (test_data, test_dispersive, test_sample, test_train), started as torchrun would start them, under a
watchdog, so that a hung process ends the test with its stacks instead of hanging the suite; and the test of that
watchdog."""

import faulthandler
import os
import socket
import tempfile
import time
import warnings

import pytest
import torch
import torch.multiprocessing as mp

HANG_S = 240  # a 2-process test here takes ~10 s on 2 cores


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for a module of tiny tensors (import it there): on a busy 2-core machine, waking a second
    thread per op costs more than it saves."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _watched(rank, world, port, out, hang_s, fn, args):
    """Child side: torchrun's environment, one thread, then fn(rank, out, *args) under a watchdog that writes every
    thread's stack to out/hang_rank<r>.txt and exits if the process is still alive hang_s later (exit included)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    fd = os.open(os.path.join(out, f"hang_rank{rank}.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    faulthandler.dump_traceback_later(hang_s, exit=True, file=fd)  # armed until the interpreter is gone
    fn(rank, out, *args)


def spawn(fn, *args, nprocs=2, hang_s=HANG_S, attempts=2, root=None, start_method="spawn", grace_s=60):
    """fn(rank, out, *args) in nprocs processes of one group, spawned (or forked: start_method="fork"), with env://'s
    MASTER_PORT etc. set and a fresh port and folder `out` under root per attempt; returns `out`. A run that hangs is
    stopped after hang_s and run once more, with the hung stacks as a warning: a rare hang of a gloo group (seen once
    in CI, cause not found) must not cost the suite its time limit. A second hang fails the test with the stacks. A
    child still alive grace_s after its watchdog should have fired is killed (the test fails)."""
    for attempt in range(1, attempts + 1):
        out = tempfile.mkdtemp(prefix=f"spawn{attempt}-", dir=root)
        try:
            child_args = (nprocs, _free_port(), out, hang_s, fn, args)
            group = mp.start_processes(_watched, child_args, nprocs, join=False, start_method=start_method)
            deadline = time.monotonic() + hang_s + grace_s
            while not group.join(timeout=1):
                if time.monotonic() > deadline:
                    for process in group.processes:
                        process.kill()  # a watchdog that could not fire: the next join raises (SIGKILL)
            return out
        except mp.ProcessExitedException:
            dumps = [os.path.join(out, f"hang_rank{r}.txt") for r in range(nprocs)]  # absent: died before the watchdog
            stacks = "".join(f"--- rank {r}:\n{open(f).read()}" for r, f in enumerate(dumps)
                             if os.path.exists(f) and os.path.getsize(f))
            if not stacks:
                raise
            if attempt == attempts:
                pytest.fail(f"{fn.__name__} hung {attempts} time(s) (> {hang_s} s); the stacks:\n{stacks}")
            warnings.warn(f"{fn.__name__} hung (> {hang_s} s) and runs again; the stacks:\n{stacks}")


def _hang_on_first_attempt(rank, out):
    if rank == 1 and os.path.basename(out).startswith("spawn1-"):
        time.sleep(600)  # a hung rank
    open(os.path.join(out, f"done{rank}"), "w").close()


def test_a_hung_process_group_is_stopped_with_its_stacks_and_run_again(tmp_path):
    hung = r"(?s)_hang_on_first_attempt hung.*\(> 2 s\).*rank 1.*in _hang_on_first_attempt"  # and its stack
    with pytest.warns(UserWarning, match=hung):
        out = spawn(_hang_on_first_attempt, hang_s=2, root=tmp_path)
    assert os.path.basename(out).startswith("spawn2-") and {"done0", "done1"} <= set(os.listdir(out))
    with pytest.raises(pytest.fail.Exception, match=hung):  # the last attempt hangs: the test fails, with the stack
        spawn(_hang_on_first_attempt, hang_s=2, root=tmp_path, attempts=1)


def _hang_without_watchdog(rank, out):
    faulthandler.cancel_dump_traceback_later()  # as if the watchdog could not fire (it deadlocks in a forked child
    time.sleep(600)                             # of a process whose own watchdog was armed, e.g. by pytest's)


def test_a_child_whose_watchdog_cannot_fire_is_killed(tmp_path):
    with pytest.raises(mp.ProcessExitedException, match="SIGKILL"):
        spawn(_hang_without_watchdog, hang_s=5, grace_s=1, root=tmp_path)  # 5 s: time to cancel it
