"""Preemption on a real two-node Slurm cluster (n1, n2 on loopback): a training job under
LAUNCHER=srun is preempted twice, first the way Slurm warns it (`#SBATCH
--signal=B:USR1@90`, sent here with `scancel --signal=USR1 --batch`), then with USR1 to
its ranks. Each time every rank stops at one step, rank 0 checkpoints, the job requeues
itself and continues with --resume auto in the same run folder; it ends COMPLETED with
the per-step losses of an uninterrupted run (the kill -9 test's standard: equal, not
close). Signals keep coming while the checkpoint is written: it still loads."""
import json
import os
import re
import subprocess
import time

import pytest

from hvdtrain import checkpoint as ckpt
from hvdtrain import preempt as P
from tests.conftest import ROOT
from tests.e2e.harness import HOROVODRUN, TRAIN, losses, run
from tests.slurm.jobs import job_field, sbatch, wait_job, wait_until


@pytest.fixture(scope="module")
def cluster2(two_nodes):
    """The two-node cluster (tests/slurm/conftest.py): its client environment."""
    return two_nodes["env"]

# long enough that both stops land well before the end: rank 0 looks for the batch shell's
# request once a second, and a CPU step here is 0.03-0.06 s, so the first stop comes up to
# ~40 steps after the signal (40 steps in all lost that race in CI: the second leg's signals
# came after the last step)
STEPS = 200
# log every step (the losses compared), checkpoints every 10 (the preemption adds its own),
# one torch thread per rank in both runs: two nodes here are one machine, and the
# reference runs both ranks on it too (same threads, same sums, same losses)
ARGS = ["--preset", "ci", "--task", "classify", "--run.progress=False", "--run.tensorboard=False",
        "--train.log_every=1", "--train.ckpt_every=10", f"--train.steps={STEPS}", "--train.torch_threads=1"]


def logged_steps(run_dir) -> list[int]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(x)["step"] for x in open(path).read().splitlines() if '"train_loss"' in x]


def scancel_usr1(env, job, batch: bool) -> None:
    subprocess.run(["scancel", "--signal=USR1", *(["--batch"] if batch else []), job], env=env,
                   capture_output=True, timeout=30)


def stop_recorded(run_dir, after: int):
    """preempted.json's record once it is for a step past `after`, else None."""
    try:
        rec = json.load(open(os.path.join(run_dir, P.RECORD_NAME)))
    except (OSError, ValueError):
        return None
    return rec if rec["step"] > after else None


def test_usr1_checkpoints_requeues_and_resumes_with_the_same_losses(cluster2, synth_data, tmp_path):
    """Two preemptions of one job. The first as Slurm sends it: USR1 to the batch shell
    (again every 0.3 s until the ranks stop), which the ranks learn through the request
    file. The second straight to the ranks (srun's tasks), every 0.05 s until the stop is
    recorded, so signals keep coming while rank 0 writes the checkpoint."""
    t_test = time.monotonic()
    data = f"--data.train={synth_data}/train"
    ref = run(HOROVODRUN + TRAIN + ARGS + [data, f"--run.dir={tmp_path}/ref"], timeout=300)
    assert ref.returncode == 0, (ref.stdout + ref.stderr)[-3000:]

    job = sbatch(cluster2, "train.sbatch", *ARGS, data, opts=["--nodes=2", "--ntasks-per-node=1"],
                 extra_env={"LAUNCHER": "srun"})
    run_dir = os.path.join(ROOT, "runs", f"slurm-{job}")
    times, recs, sent = {}, [], []
    for leg, (batch, every_s) in enumerate([(True, 0.3), (False, 0.05)]):
        done = recs[-1]["step"] if recs else 0
        wait_until(cluster2, job, f"step {done + 3} logged", lambda: done + 3 in logged_steps(run_dir), 300, 0.1)
        times[f"signal{leg}"] = time.time()

        def stopped():
            if stop_recorded(run_dir, done):
                return True
            scancel_usr1(cluster2, job, batch)
            sent.append(leg)
            return False
        wait_until(cluster2, job, f"stop {leg + 1} recorded in {P.RECORD_NAME}", stopped, 120, every_s)
        rec = stop_recorded(run_dir, done)
        k, path = rec["step"], os.path.join(run_dir, f"ckpt-{rec['step']:08d}.pt")
        assert rec["checkpoint"] == f"runs/slurm-{job}/ckpt-{k:08d}.pt" and ckpt.load(path)["step"] == k, rec
        assert done + 3 <= k < STEPS and rec["slurm_restart_count"] == leg, rec
        times[f"ckpt{leg}"] = os.stat(path).st_mtime
        wait_until(cluster2, job, f"step {k + 1} logged after the requeue", lambda: k + 1 in logged_steps(run_dir),
                   300, 0.1)
        times[f"again{leg}"] = time.time()
        recs.append(rec)
    assert recs[0]["reason"] == f"{P.REQUEST_NAME} from the batch shell" and recs[0]["request"].startswith("SIGUSR1")
    assert re.fullmatch(r"SIGUSR1 on [12] of 2 rank\(s\)", recs[1]["reason"]), recs[1]  # one rank's is enough
    state, text = wait_job(cluster2, job, timeout_s=300)
    times["done"] = time.time()
    assert state == "COMPLETED", text[-3000:]
    assert job_field(cluster2, job, "Restarts") == "2"
    for leg, rec in enumerate(recs):
        k = rec["step"]
        assert f"slurm_run: preempted after step {k}; requeueing job {job}" in text
        assert f"restart {leg + 1} of job {job}: continuing with --resume auto in runs/slurm-{job}" in text
        assert f"resume: runs/slurm-{job}/ckpt-{k:08d}.pt (step {k}" in text
    a, b = losses(tmp_path / "ref"), losses(run_dir)
    assert sorted(b) == list(range(1, STEPS + 1))
    assert [b[s] for s in range(1, STEPS + 1)] == [a[s] for s in range(1, STEPS + 1)]
    assert json.load(open(os.path.join(run_dir, "summary.json")))["steps"] == STEPS
    for leg, rec in enumerate(recs):
        t0 = times[f"signal{leg}"]
        print(f"\nPREEMPT_TIMES job {job} stop {leg + 1}: step {rec['step']} ({rec['reason']}); signal -> checkpoint "
              f"on disk {times[f'ckpt{leg}'] - t0:.1f} s (write {rec['checkpoint_s']} s, {rec['signals_while_saving']} "
              f"signal(s) meanwhile, {sent.count(leg)} more sent); -> training again {times[f'again{leg}'] - t0:.1f} s")
    print(f"PREEMPT_TIMES job {job}: last signal -> COMPLETED {times['done'] - times['signal1']:.1f} s; "
          f"the test {time.monotonic() - t_test:.0f} s")


def test_scancel_checkpoints_but_does_not_requeue(cluster2, synth_data):
    """SIGTERM alone (scancel; the time limit without the warning) stops every rank at one
    step with a checkpoint, but the job stays cancelled: only USR1 requeues."""
    job = sbatch(cluster2, "train.sbatch", *ARGS, f"--data.train={synth_data}/train", "--train.steps=100000",
                 opts=["--nodes=2", "--ntasks-per-node=1"], extra_env={"LAUNCHER": "srun"})
    run_dir = os.path.join(ROOT, "runs", f"slurm-{job}")
    wait_until(cluster2, job, "step 3 logged", lambda: 3 in logged_steps(run_dir), 300, 0.1)
    subprocess.run(["scancel", job], env=cluster2, check=True, timeout=30)
    state, text = wait_job(cluster2, job, timeout_s=120)
    assert state == "CANCELLED" and job_field(cluster2, job, "Restarts") == "0", text[-3000:]
    rec = stop_recorded(run_dir, 0)
    assert rec and re.fullmatch(r"SIGTERM on [12] of 2 rank\(s\)", rec["reason"]), (rec, text[-3000:])
    assert ckpt.load(os.path.join(run_dir, f"ckpt-{rec['step']:08d}.pt"))["step"] == rec["step"]
    assert f"stopped by SIGTERM (scancel, or the time limit with no warning) after step {rec['step']}" in text
    assert "requeueing" not in text
