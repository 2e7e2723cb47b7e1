"""`distill run RECIPE --nproc N`: the same command again under torchrun, N processes on this machine
(PyTorch's own launcher and rendezvous, started in this process, listening on 127.0.0.1 only), and one clear
line if one fails.

Several machines use torchrun itself, the same command on each (see README):
    torchrun --nnodes M --node-rank R --nproc-per-node N --rdzv-backend c10d --rdzv-endpoint HOST:PORT \\
        -m distill run RECIPE
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
from typing import Any, Dict, List

from .errors import UserError


def under_torchrun() -> bool:
    """One of several processes torchrun started (readable before any Runtime exists)."""
    return int(os.environ.get("WORLD_SIZE", 1)) > 1


def is_main_process() -> bool:
    """Rank 0 of the job torchrun started, or a plain process: the one that writes and prints (readable before
    any Runtime exists, and after one failed to start)."""
    return not under_torchrun() or int(os.environ.get("RANK", 0)) == 0


def child_argv(argv: List[str]) -> List[str]:
    """`argv` without `--nproc N` / `--nproc=N` (a child is already one of the N)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _describe(failures: Dict[int, object]) -> str:
    """The processes that failed first: those killed by a signal (not the SIGTERM torchrun itself sends the
    rest), else those that exited with an error, else all; a survivor that stopped because it lost the
    others (exit code 1) is a consequence, not the cause."""
    killed = {r: f for r, f in failures.items() if f.exitcode < 0 and f.exitcode != -signal.SIGTERM}
    said, first = [], killed or {r: f for r, f in failures.items() if f.exitcode > 0} or failures
    for rank, f in sorted(first.items()):
        code = f.exitcode
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        said.append(f"process {rank} (pid {f.pid}) {how}")
    return ", ".join(said)


def check_processes(cfg: Dict[str, Any], nproc: int) -> None:
    """Before any process starts (each would say the same in a line of its own): no more processes than the
    machine runs at once, and a global batch each of them can take its share of."""
    import torch
    from .engine.sampling import Split
    from .recipe_schema import cores
    cpus, gpus = cores(), torch.cuda.device_count()
    if nproc > max(cpus, gpus):
        raise UserError(f"--nproc {nproc}: more processes than this machine's {cpus} CPU cores"
                        f"{f' and {gpus} GPUs' if gpus else ''}; give at most {max(cpus, gpus)}")
    from .recipe_checks import loaded_teacher
    # (each trained role's own accumulate, named as the recipe gives it; a loaded teacher trains no step)
    for role in ["student"] + ([] if loaded_teacher(cfg) else ["teacher"]):
        accumulate = cfg[role]["train"].get("accumulate", 1)
        try:
            Split(0, nproc, accumulate).check(cfg["data"]["batch_size"])
        except UserError as e:
            key = "train.accumulate" if accumulate == cfg["train"].get("accumulate", 1) else f"{role}.train.accumulate"
            raise UserError(str(e).replace("train.accumulate", key)) from None


ERRORS = "DISTILL_ERRORS"  # a folder the launcher gives its processes: each writes its user mistake there


def report_error(message: str) -> bool:
    """Under `--nproc`, a process's user mistake goes to the launcher, which says it once for all of them
    (they nearly always find the same one); False where there is no launcher to tell (plain torchrun)."""
    folder = os.environ.get(ERRORS)
    if not (folder and under_torchrun() and os.path.isdir(folder)):
        return False
    from .io import write_text
    write_text(os.path.join(folder, os.environ["RANK"]), message)  # (whole or not at all: atomic)
    # (torchrun stops the others once this process exits: a moment for them to say theirs, so that the same
    # mistake found by every process is said once, not as process 1's when process 0 was a little slower)
    import time
    deadline = time.monotonic() + REPORT_WAIT_S
    while time.monotonic() < deadline and len([f for f in os.listdir(folder) if f.isdigit()]) < \
            int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1))):
        time.sleep(0.05)
    return True


REPORT_WAIT_S = 5.0
STOPPED = "stopped"  # in the launcher's folder: the main process said where training stopped and how to go on


def said_stop() -> None:
    """The main process said where a signal stopped training, and the command that continues: under `--nproc`
    the launcher, stopped by the same signal, says no second line."""
    folder = os.environ.get(ERRORS)
    if folder and os.path.isdir(folder):
        open(os.path.join(folder, STOPPED), "w").close()


def _said(folder: str, nproc: int) -> List[str]:
    """The processes' user mistakes: one line when every process found the same, else one per process."""
    said: Dict[str, List[str]] = {}
    for rank in sorted((f for f in os.listdir(folder) if f.isdigit()), key=int):
        with open(os.path.join(folder, rank)) as fh:
            said.setdefault(fh.read(), []).append(rank)
    if len(said) == 1 and len(next(iter(said.values()))) == nproc:
        return [f"error: {next(iter(said))}"]
    return [f"error: process{'es' if len(r) > 1 else ''} {', '.join(r)}: {m}" for m, r in said.items()]


def local_store(port: int = 0):
    """The rendezvous store of a job on this machine, listening on 127.0.0.1 alone (torchrun --standalone's
    binds every interface, unauthenticated): its socket is bound here and handed over, and torchrun's static
    rendezvous shares it (a multi-tenant store of the same port, in this process). The processes' own sockets
    (gloo's, NCCL's bootstrap) use the loopback interface too, unless the environment names one."""
    import socket
    from torch.distributed import TCPStore
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    port = sock.getsockname()[1]
    store = TCPStore("127.0.0.1", port, is_master=True, multi_tenant=True, master_listen_fd=sock.detach(),
                     wait_for_workers=False)
    loopback = next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)
    added = [k for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if loopback and k not in os.environ]
    os.environ.update({k: loopback for k in added})  # (for the processes; taken back after them)
    return store, port, added


def launch(argv: List[str], nproc: int, resume: str) -> int:
    """Run `distill ARGV` in `nproc` processes; returns the exit code for the user (2: a user mistake, said
    once; 128 + the signal, 130 or 143: interrupted; 1: a process died)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run
    # the machine's cores shared out (torchrun's own default would be one thread each)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    store, port, added = local_store()  # (kept open while the processes run)
    args = parse_args(["--rdzv-backend=static", f"--rdzv-endpoint=127.0.0.1:{port}", "--master-addr=127.0.0.1",
                       f"--master-port={port}", "--nnodes=1", "--node-rank=0", f"--nproc-per-node={nproc}",
                       "--max-restarts=0", "--module", "distill", *argv])
    args.standalone = False  # (parse_args reads PET_* variables a cluster's launcher may have set: not here)
    errors = os.environ[ERRORS] = tempfile.mkdtemp(prefix="distill-errors-")
    # (torchrun's own log lines of a failed process repeat, less clearly, what is said below)
    # (each of its modules' loggers has a level of its own: every one is set, not the parent alone)
    elastic = [logging.getLogger(n) for n in ["torch.distributed.elastic", *logging.root.manager.loggerDict]
               if n.startswith("torch.distributed.elastic")]
    levels = [log.level for log in elastic]
    for log in elastic:
        log.setLevel(logging.CRITICAL)
    try:
        run(args)
        return 0
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        if 2 in codes:  # a user mistake
            for line in _said(errors, nproc):
                print(line, file=sys.stderr)
            return 2
        said = [c for c in codes if c in (130, 143)]
        # interrupted: the main process said where it stopped and how to continue (a process that torchrun
        # stopped after another's exit, its own handler of the signal done with, ended by the signal: -15)
        if said and all(c in (130, 143, -signal.SIGINT, -signal.SIGTERM) for c in codes):
            return said[0]
        print(f"error: {_describe(e.failures)}; the other processes were stopped and the last checkpoint is "
              f"kept; continue with: {resume}", file=sys.stderr)
        return 1
    except SignalException as e:
        if not os.path.exists(os.path.join(errors, STOPPED)):
            print(f"interrupted ({signal.Signals(e.sigval).name}); continue with: {resume}", file=sys.stderr)
        return 128 + e.sigval
    finally:
        del store
        for key in added:
            os.environ.pop(key, None)
        for log, level in zip(elastic, levels):
            log.setLevel(level)
        del os.environ[ERRORS]
        shutil.rmtree(errors, ignore_errors=True)
