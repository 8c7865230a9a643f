"""Preemption in one process (Horovod size 1): the signal handlers only record, a second
signal during a checkpoint write leaves a checkpoint that loads, the batch shell's request
file, the loop's `stop` hook, exit 4 with preempted.json and a checkpoint that --resume
auto continues from, the sanity's exit 4, and slurm_run.sh's --resume auto on a restart."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from hvdtrain.data.shards import open_shards
from hvdtrain import checkpoint as ckpt
from hvdtrain import config as C
from hvdtrain import exits
from hvdtrain import loader as L
from hvdtrain import preempt as P
from hvdtrain import step as S
from tests.conftest import ROOT
from tests.e2e.harness import CI, TRAIN, finish, wait_for

SANITY = [sys.executable, "-m", "hvdtrain.sanity"]


@pytest.fixture(scope="module")
def hvd():
    from hvdtrain import dist

    dist.init()  # one rank: no launcher
    return dist


def test_signals_are_recorded_and_do_not_end_the_process(preempt_handlers):
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.monotonic() + 5
    while len(P.received()) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert P.received() == ["SIGUSR1", "SIGTERM"]


def test_after_the_run_a_late_usr1_does_not_kill_the_process():
    """preempt.retire() at an entry point's end: SIGUSR1 every millisecond while the process
    finishes and exits (CPython's finalization would put SIG_DFL back for a Python handler,
    and the default ends the process: a finished job reported FAILED) leaves exit 0."""
    child = ("import os, signal, time\nfrom hvdtrain import preempt\npreempt.install()\npreempt.retire()\n"
             "print('ready', flush=True)\ntime.sleep(0.3)\nprint('done', flush=True)\n")
    p = subprocess.Popen([sys.executable, "-c", child], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    sent = 0
    while p.poll() is None:
        try:
            p.send_signal(signal.SIGUSR1)
            sent += 1
        except ProcessLookupError:
            break
        time.sleep(0.001)
    out = p.stdout.read()
    assert p.wait(timeout=30) == 0 and "done" in out and sent > 10, (p.returncode, sent)


def test_a_signal_storm_during_checkpoint_writes_leaves_checkpoints_that_load(preempt_handlers, tmp_path):
    """A thread sends SIGUSR1 and SIGTERM every millisecond while 24 MB checkpoints are
    written: the writes complete, the signals were taken meanwhile, every file loads."""
    done = threading.Event()

    def storm():
        while not done.is_set():
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.001)
    t = threading.Thread(target=storm, daemon=True)
    t.start()
    try:
        for step in (1, 2, 3):
            before = len(P.received())
            ckpt.save(str(tmp_path), {"format": ckpt.FORMAT, "step": step, "w": torch.full((6_000_000,), step)},
                      step, keep_last=3)
            assert len(P.received()) > before, "no signal came during the write"
    finally:
        done.set()
        t.join()
    found = ckpt.list_checkpoints(str(tmp_path))
    assert len(found) == 3 and [ckpt.load(f)["w"][-1].item() for f in found] == [1, 2, 3]
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]


def test_the_request_file_is_read_by_rank_0_only_and_consumed(hvd, tmp_path):
    p, other = P.Preempt(str(tmp_path), primary=True, poll_s=0), P.Preempt(str(tmp_path), primary=False, poll_s=0)
    assert p.local() == [0, 0, 0] and not p.requested()
    (tmp_path / P.REQUEST_NAME).write_text("SIGUSR1 2025-01-01T00:00:00\n")
    assert other.local() == [0, 0, 0]
    assert not p.requested()  # sent now, read at the next call (the next step)
    assert p.requested() and p.reason == f"{P.REQUEST_NAME} from the batch shell"
    p.drain()
    assert p.request_text() == "SIGUSR1 2025-01-01T00:00:00"
    p.consume()
    assert not (tmp_path / P.REQUEST_NAME).exists()


def test_a_signal_on_this_rank_is_a_request(hvd, preempt_handlers, tmp_path):
    p = P.Preempt(str(tmp_path), primary=True, poll_s=0)
    os.kill(os.getpid(), signal.SIGUSR1)
    assert not p.requested() and p.requested() and p.reason == "SIGUSR1 on 1 of 1 rank(s)"
    p.drain()


@pytest.fixture(scope="module")
def small_loader(hvd, synth_data):
    cfg = C.preset("ci")
    cfg.train.task, cfg.train.log_every = "classify", 4
    shards = open_shards(f"{synth_data}/train")
    return cfg, shards, L.from_config(cfg, shards, "train", threads=1)


def test_the_loops_stop_hook_ends_it_after_that_step_with_its_losses_logged(small_loader):
    cfg, shards, loader = small_loader
    state = S.make_state(cfg, shards.num_classes)
    asked, stepped = [], []

    def stop(st):
        asked.append(st.step)
        return st.step == 3
    res = S.run_loop(state, loader, 10, on_step=lambda st: stepped.append(st.step), stop=stop)
    assert res.stopped and state.step == 3 and asked == [1, 2, 3] and stepped == [1, 2, 3]
    assert len(res.step_losses) == 3  # the interval was logged at the stop, not lost (log_every 4)
    # never asked after the last step: there is nothing left to stop
    res = S.run_loop(state, loader, 2, stop=lambda st: asked.append(st.step) or True)
    assert res.stopped and state.step == 4 and asked[-1] == 4
    res = S.run_loop(state, loader, 1, stop=lambda st: asked.append(st.step) or True)
    assert not res.stopped and state.step == 5 and asked[-1] == 4


def start(cmd, run_dir):
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    wait_for("the first log line", lambda: os.path.exists(os.path.join(run_dir, "metrics.jsonl")), 180, p)
    return p


def finish_run(p, limit_s=120):
    return finish(p, limit_s, "did not end after the request")


def test_train_exits_4_with_a_checkpoint_and_resume_auto_continues_from_it(synth_data, tmp_path):
    """A signal to the (one) rank, then the batch shell's request file to the resumed run."""
    run_dir = str(tmp_path / "run")
    cmd = TRAIN + CI + [f"--data.train={synth_data}/train", "--train.steps=100000", "--train.log_every=1",
                        f"--run.dir={run_dir}"]
    p = start(cmd, run_dir)
    p.send_signal(signal.SIGUSR1)
    out, err = finish_run(p)
    assert p.returncode == exits.PREEMPTED, err[-3000:]
    rec = json.load(open(os.path.join(run_dir, P.RECORD_NAME)))
    k = rec["step"]
    assert rec["reason"] == "SIGUSR1 on 1 of 1 rank(s)" and rec["resumable"] and 1 <= k < 100000
    assert rec["checkpoint"] == os.path.join(run_dir, f"ckpt-{k:08d}.pt") and ckpt.load(rec["checkpoint"])["step"] == k
    assert f"hvdtrain.train: preempted (SIGUSR1 on 1 of 1 rank(s)): stopped after step {k} of 100000" in err
    assert "--resume auto" in err
    logged = [json.loads(x)["step"] for x in open(os.path.join(run_dir, "metrics.jsonl")) if "train_loss" in x]
    assert logged[-1] == k  # every step up to the stop is in metrics.jsonl
    p = start(cmd + ["--resume", "auto"], run_dir)
    with open(os.path.join(run_dir, P.REQUEST_NAME), "w") as f:
        f.write("SIGUSR1 from a test\n")
    out, err = finish_run(p)
    assert p.returncode == exits.PREEMPTED, err[-3000:]
    assert f"resume: {run_dir}/ckpt-{k:08d}.pt (step {k}" in out
    again = json.load(open(os.path.join(run_dir, P.RECORD_NAME)))
    assert again["step"] > k and again["reason"] == f"{P.REQUEST_NAME} from the batch shell"
    assert again["request"] == "SIGUSR1 from a test" and not os.path.exists(os.path.join(run_dir, P.REQUEST_NAME))


def test_sanity_exits_4_saying_it_cannot_be_resumed(synth_data, tmp_path):
    run_dir = str(tmp_path / "run")
    p = start(SANITY + ["--preset", "ci", f"--data.train={synth_data}/train", "--train.steps=100000",
                        "--run.progress=False", f"--run.dir={run_dir}"], run_dir)
    p.send_signal(signal.SIGTERM)
    out, err = finish_run(p)
    assert p.returncode == exits.PREEMPTED, err[-3000:]
    assert "hvdtrain.sanity: preempted (SIGTERM on 1 of 1 rank(s))" in err and "cannot be resumed" in err
    rec = json.load(open(os.path.join(run_dir, P.RECORD_NAME)))
    assert rec["resumable"] is False and rec["checkpoint"] is None
    assert not ckpt.list_checkpoints(run_dir)


def dry_run(script, *args, restarts="1"):
    env = {**os.environ, "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "node01", "SLURM_TASKS_PER_NODE": "2",
           "SLURM_NTASKS": "2", "SLURM_SUBMIT_DIR": ROOT, "DRY_RUN": "1", "SLURM_RESTART_COUNT": restarts}
    r = subprocess.run([os.path.join(ROOT, "launch", script), "--preset", "ci", *args], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_a_requeued_training_job_resumes_auto_in_its_own_run_folder():
    out = dry_run("train.sbatch")
    assert "--preset ci --run.dir=runs/slurm-42 --resume auto\n" in out
    assert "restart 1 of job 42: continuing with --resume auto in runs/slurm-42" in out
    assert "--resume auto" not in dry_run("train.sbatch", restarts="0")
    assert "--resume auto" not in dry_run("train.sbatch", "--resume=runs/x/ckpt-00000005.pt")
    assert "--run.dir runs/mine --resume auto" in dry_run("train.sbatch", "--run.dir", "runs/mine")
    assert "--resume auto" not in dry_run("sanity.sbatch")  # not resumable
