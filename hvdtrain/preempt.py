"""Preemption and time limits: Slurm's warning reaches the ranks, every rank agrees to
stop at the same optimizer step, rank 0 checkpoints there, and the run ends with
`hvdtrain.exits.PREEMPTED` ("preempted, resume me"). launch/slurm_run.sh then requeues the job,
which continues with --resume auto in the same run folder:

    #SBATCH --signal=B:USR1@90   # launch/train.sbatch: Slurm warns the batch shell 90 s before the end
    scancel --signal=USR1 --batch JOBID   # the same warning, sent by hand

Two ways in, and neither does anything but leave a mark that the loop reads later:
- a signal to a rank: SIGUSR1 (`scancel --signal=USR1 JOBID` reaches the srun tasks) or
  SIGTERM (Slurm's end of time, scancel). The handler only records it, so a second
  signal during a checkpoint write cannot interrupt the write; it is installed with
  SA_RESTART (`siginterrupt(False)`), so reads and writes in DALI's, Gloo's and torch's
  threads are restarted rather than failed with EINTR.
- the request file `<run dir>/preempt.request`, written by the batch shell's trap:
  Slurm's `B:` signal goes to the batch shell only, never to ranks under horovodrun or
  srun. Rank 0 looks for it (the batch shell runs on the first node, beside rank 0, and
  rank 0 writes the run folder anyway), at most once a second, and removes it once acted on.

`Preempt.requested()` makes the local marks one decision with one allreduce of three
numbers per optimizer step, so every rank stops at the same step and none stops alone.
The allreduce is started after one step and read after the next, so it never makes the
loop wait (a blocking one cost 6 ms median, 10 ms mean per step on 2 CPU ranks of a
2-core machine).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time

from hvdtrain.data.files import write_atomic
from hvdtrain import exits

REQUEST_NAME = "preempt.request"
RECORD_NAME = "preempted.json"
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

_received: list[str] = []   # signal names, in arrival order; appended by the handler only


def _on_signal(signum, _frame) -> None:
    _received.append(signal.Signals(signum).name)  # nothing else: see the module docstring


def install() -> None:
    """SIGUSR1 and SIGTERM are recorded instead of ending the process (main thread; idempotent)."""
    for sig in SIGNALS:
        signal.signal(sig, _on_signal)
        signal.siginterrupt(sig, False)


def leave(rc: int) -> None:
    """End the process with `rc`. A refusal (exits.REFUSED) leaves at once, stdio flushed:
    it wrote nothing to tear down, and under horovodrun the first rank to exit makes the
    launcher SIGTERM the others, which would otherwise die of it in interpreter shutdown
    (exit 143) after deciding on a refusal themselves."""
    retire()
    if rc == exits.REFUSED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exits.REFUSED)
    sys.exit(rc)


def retire() -> None:
    """The run is over: a warning that comes now has nothing left to stop, so SIGUSR1 is
    ignored from here to the process's end. Without this, CPython's finalization puts
    SIG_DFL back for every Python handler, and a USR1 during teardown (Slurm's warning, or
    `scancel --signal=USR1` a moment late) ends a rank whose work is done: srun reports the
    task killed and the job FAILED. SIGTERM keeps ending the process: a teardown that hangs
    must still stop on scancel."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def received() -> list[str]:
    """The signals this process has recorded so far."""
    return list(_received)


class Preempted(Exception):
    """The run stopped at an optimizer-step boundary because it was preempted: exits.PREEMPTED."""


class Preempt:
    """This rank's view of a preemption request for the run in `run_dir`."""

    def __init__(self, run_dir: str, primary: bool, poll_s: float = 1.0):
        self.request_path = os.path.join(run_dir, REQUEST_NAME)
        self.primary, self.poll_s = primary, poll_s
        self._next_poll = 0.0
        self.file_seen = False
        self.reason: str | None = None   # set on every rank once requested() said True
        self._pending = None             # the allreduce in flight (requested())

    def local(self) -> list[int]:
        """[SIGUSR1 seen, SIGTERM seen, request file seen] on this rank, as 0/1."""
        sigs = set(_received)
        if self.primary and not self.file_seen and time.monotonic() >= self._next_poll:
            self._next_poll = time.monotonic() + self.poll_s  # a stat a second at most (shared file systems)
            self.file_seen = os.path.exists(self.request_path)
        return [int("SIGUSR1" in sigs), int("SIGTERM" in sigs), int(self.file_seen)]

    def requested(self) -> bool:
        """Whether any rank has been asked to stop; every rank gets the same answer. One
        collective per call, overlapped with the next step: the counts sent after step k
        are read after step k+1 (done by then: no wait), so every rank stops one step
        after the first to see a request, all at the same step. Call it on every rank at
        the same steps, and `drain()` after the loop."""
        import torch

        from hvdtrain import dist

        counts = dist.synchronize(self._pending).tolist() if self._pending is not None else [0, 0, 0]
        self._pending = dist.allreduce_sum_async(torch.tensor(self.local(), dtype=torch.int32), name="preempt")
        if not any(counts):
            return False
        parts = [f"{name} on {n} of {dist.size()} rank(s)" for name, n in zip(("SIGUSR1", "SIGTERM"), counts) if n]
        if counts[2]:
            parts.append(f"{REQUEST_NAME} from the batch shell")
        self.reason = ", ".join(parts)
        return True

    def forget(self) -> None:
        """An elastic reset: the collective in flight died with the old world."""
        self._pending = None

    def drain(self) -> None:
        """Wait for the collective in flight (every rank, after the loop)."""
        if self._pending is not None:
            from hvdtrain import dist

            dist.synchronize(self._pending)
            self._pending = None

    def request_text(self) -> str | None:
        """What the batch shell wrote into the request file (its signal and time), if any."""
        try:
            with open(self.request_path) as f:
                return f.read().strip() or None
        except OSError:
            return None

    def consume(self) -> None:
        """Rank 0: the request is acted on; a later run in this folder must not see it."""
        if self.primary:
            try:
                os.remove(self.request_path)
            except FileNotFoundError:
                pass


def stopped(p: Preempt, run_dir: str, step: int, steps: int, checkpoint: str | None, save_s: float,
            signals_while_saving: int) -> Preempted:
    """After the stop (and the checkpoint, if the run writes them): rank 0 writes
    preempted.json and removes the request file; then every rank returns together (a
    barrier: the launcher ends the others when one exits, and launch/slurm_run.sh reads
    the record once the launcher has exited). Returns the exception the run raises."""
    from hvdtrain import dist

    if p.primary:
        rec = {"step": step, "of_steps": steps, "reason": p.reason, "request": p.request_text(),
               "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "unix_time": time.time(), "checkpoint": checkpoint,
               "resumable": checkpoint is not None, "checkpoint_s": round(save_s, 3),
               "signals_while_saving": signals_while_saving,
               "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
               "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", 0))}
        path = os.path.join(run_dir, RECORD_NAME)
        write_atomic(path, json.dumps(rec, indent=1))
        p.consume()
    dist.barrier()
    if checkpoint is None:
        return Preempted(f"preempted ({p.reason}) after step {step} of {steps}: this run writes no checkpoints "
                         f"and cannot be resumed; run it again (record: {os.path.join(run_dir, RECORD_NAME)})")
    return Preempted(f"preempted ({p.reason}): stopped after step {step} of {steps} with checkpoint {checkpoint}; "
                     f"continue with --resume auto --run.dir={run_dir} (launch/train.sbatch requeues itself and "
                     f"does this)")
