"""Preemption on a real two-node Slurm cluster (n1, n2 on loopback): a training job under
LAUNCHER=srun is sent Slurm's warning the way an operator sends it (`scancel
--signal=USR1 --batch`), checkpoints at the next step, requeues itself, continues with
--resume auto in the same run folder and ends COMPLETED with the per-step losses of an
uninterrupted run (the kill -9 test's standard: equal, not close). Meanwhile the ranks
and the batch shell are sent more USR1s while the checkpoint is written: it still loads."""
import json
import os
import subprocess
import time

from hvdtrain import checkpoint as ckpt
from hvdtrain import preempt as P
from tests.conftest import ROOT
from tests.e2e.harness import HOROVODRUN, TRAIN, losses, run
from tests.slurm.jobs import cluster_fixture, job_field, sbatch, wait_job, wait_until

cluster2 = cluster_fixture(nodes=2)

STEPS = 24
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


def test_usr1_checkpoints_requeues_and_resumes_with_the_same_losses(cluster2, synth_data, tmp_path):
    t_test = time.monotonic()
    data = f"--data.train={synth_data}/train"
    ref = run(HOROVODRUN + TRAIN + ARGS + [data, f"--run.dir={tmp_path}/ref"], timeout=300)
    assert ref.returncode == 0, (ref.stdout + ref.stderr)[-3000:]

    job = sbatch(cluster2, "train.sbatch", *ARGS, data, opts=["--nodes=2", "--ntasks-per-node=1"],
                 extra_env={"LAUNCHER": "srun"})
    run_dir = os.path.join(ROOT, "runs", f"slurm-{job}")
    record = os.path.join(run_dir, P.RECORD_NAME)
    wait_until(cluster2, job, "step 3 logged", lambda: len(logged_steps(run_dir)) >= 3, 300)

    t_sig = time.time()
    scancel_usr1(cluster2, job, batch=True)  # what #SBATCH --signal=B:USR1@90 sends
    out = os.path.join(ROOT, "runs", f"slurm-{job}.out")
    wait_until(cluster2, job, "the batch shell's trap", lambda: "slurm_run: got SIGUSR1" in open(out).read(), 60, 0.05)
    # more USR1s, to the ranks (srun's tasks) and to the batch shell, until the stop is recorded:
    # they come while rank 0 writes the checkpoint, and are only recorded there
    sent = []

    def stopped():
        if os.path.exists(record):
            return True
        scancel_usr1(cluster2, job, batch=len(sent) % 2 == 1)
        sent.append(1)
        return False
    wait_until(cluster2, job, f"{P.RECORD_NAME} written", stopped, 120, 0.05)
    rec = json.load(open(record))
    k = rec["step"]
    path = os.path.join(run_dir, f"ckpt-{k:08d}.pt")
    assert rec["checkpoint"] == path and ckpt.load(path)["step"] == k and 3 <= k < STEPS, rec
    t_ckpt = os.stat(path).st_mtime

    def resumed():
        return k + 1 in logged_steps(run_dir)
    wait_until(cluster2, job, f"step {k + 1} logged after the requeue", resumed, 300, 0.1)
    t_again = time.time()
    state, text = wait_job(cluster2, job, timeout_s=300)
    t_done = time.time()
    assert state == "COMPLETED", text[-3000:]
    assert job_field(cluster2, job, "Restarts") == "1"
    assert f"slurm_run: preempted after step {k}; requeueing job {job}" in text
    assert f"restart 1 of job {job}: continuing with --resume auto in runs/slurm-{job}" in text
    assert f"resume: runs/slurm-{job}/ckpt-{k:08d}.pt (step {k}" in text
    a, b = losses(tmp_path / "ref"), losses(run_dir)
    assert sorted(b) == list(range(1, STEPS + 1))
    assert [b[s] for s in range(1, STEPS + 1)] == [a[s] for s in range(1, STEPS + 1)]
    assert json.load(open(os.path.join(run_dir, "summary.json")))["steps"] == STEPS
    print(f"\nPREEMPT_TIMES job {job}: stop at step {k} ({rec['reason']}); USR1 -> checkpoint on disk "
          f"{t_ckpt - t_sig:.1f} s (its write {rec['checkpoint_s']} s, {rec['signals_while_saving']} signal(s) "
          f"meanwhile, {len(sent)} more sent); -> training again after the requeue {t_again - t_sig:.1f} s; "
          f"-> COMPLETED {t_done - t_sig:.1f} s; the test {time.monotonic() - t_test:.0f} s")
