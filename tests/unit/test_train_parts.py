"""The training tool's parts in one process: models, lr schedule, weight-decay groups,
config aliases and presets, checkpoints (atomic, keep-N, best, safe load), the run
folder's lock, and resume's provenance refusal."""
import json
import os
import subprocess
import sys

import pytest
import torch

from hvdtrain.data import files
from hvdtrain import checkpoint as ckpt
from hvdtrain import config as C
from hvdtrain import exits
from hvdtrain import model as M
from hvdtrain import optim
from hvdtrain import resume as R
from tests.conftest import ROOT


# ---------------------------------------------------------------- models
@pytest.mark.parametrize("name,params", [("resnet18", 11_689_512), ("resnet50", 25_557_032)])
def test_resnets_have_the_published_parameter_counts(name, params):
    """torchvision's counts with a 1000-class head: the same architecture, written here."""
    model = M.build(C.ModelConfig(name=name), 1000)
    assert sum(p.numel() for p in model.parameters()) == params
    assert M.head_classes(model) == 1000


def test_resnet_blocks_start_as_identity_and_small_stem_keeps_resolution():
    enc = M.ResNet("resnet18", small_stem=True)
    x = torch.randn(2, 64, 8, 8)
    block = enc.layers[0].eval()
    assert torch.allclose(block(x), torch.relu(x))  # zero-initialised last norm: identity + ReLU
    m = C.ModelConfig(name="resnet18", embed_dim=32, norm="gn", small_stem=True)
    assert M.build(m, None)(torch.randn(2, 3, 32, 32)).shape == (2, 32)


@pytest.mark.parametrize("name", M.names())
def test_every_registered_model_builds_both_heads_and_the_config_takes_it(name):
    m = C.ModelConfig(name=name, width=4, embed_dim=16, small_stem=True)
    x = torch.randn(2, 3, 32, 32)
    clf, emb = M.build(m, 7), M.build(m, None)
    assert clf(x).shape == (2, 7) and M.head_classes(clf) == 7
    assert emb(x).shape == (2, 16) and M.head_classes(emb) is None
    cfg, _ = C.parse_args(["--preset", "ci", f"--model.name={name}"])
    assert cfg.model.name == name


def test_a_new_model_is_one_registered_function():
    """The recipe of docs/architecture.md: register a builder; the config accepts it."""
    @M.register("tiny-test", "a test's model")
    def _tiny(m, num_classes):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(num_classes or m.embed_dim))
    try:
        cfg, _ = C.parse_args(["--preset", "ci", "--model.name=tiny-test"])
        assert M.build(cfg.model, 3)(torch.randn(2, 3, 8, 8)).shape == (2, 3)
        assert "| `tiny-test` | a test's model |" in M.readme_table()
    finally:
        del M.REGISTRY["tiny-test"]
    with pytest.raises(C.ConfigError, match="model.name must be one of convnet, resnet18, resnet50"):
        C.parse_args(["--preset", "ci", "--model.name=tiny-test"])


# ---------------------------------------------------------------- optimisation
def cfg_with(**optim_kw) -> C.Config:
    cfg = C.preset("ci")
    cfg.train.steps = 100
    for k, v in optim_kw.items():
        setattr(cfg.optim, k, v)
    return cfg


def test_lr_scales_with_the_global_batch():
    cfg = cfg_with(lr=0.1, lr_ref_batch=256)
    cfg.train.batch_size, cfg.train.grad_accum_steps = 64, 2
    assert optim.global_batch(cfg, 4) == 512
    assert optim.peak_lr(cfg, 4) == pytest.approx(0.2)
    assert optim.peak_lr(cfg_with(lr=0.1, lr_ref_batch=0), 4) == 0.1  # 0 = as given


def test_warmup_then_cosine_and_step_schedules():
    cfg = cfg_with(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    f = [optim.lr_factor(cfg, s) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(f[:10], f[1:10]))
    assert f[10] == pytest.approx(1.0) and f[55] == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-9)
    assert f[99] == pytest.approx(0.1, abs=1e-3)
    cfg = cfg_with(schedule="step", step_at=[0.5, 0.8], step_gamma=0.1)
    assert [optim.lr_factor(cfg, s) for s in (49, 50, 79, 80)] == pytest.approx([1, 0.1, 0.1, 0.01])


def test_scheduler_resumed_at_a_step_sets_that_steps_lr():
    cfg = cfg_with(schedule="cosine", warmup_steps=10, lr=1.0)
    model = torch.nn.Linear(2, 2)
    opt = optim.build(cfg, model, 1)
    sched = optim.scheduler(cfg, opt, start_step=37)
    assert opt.param_groups[0]["lr"] == pytest.approx(optim.lr_factor(cfg, 37))
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(optim.lr_factor(cfg, 38))


def test_no_weight_decay_on_norms_and_biases():
    model = M.build(C.ModelConfig(name="resnet18"), 10)
    groups = optim.param_groups(model, 1e-4, wd_norm_bias=False)
    decayed, free = groups
    assert decayed["weight_decay"] == 1e-4 and free["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim == 1 for p in free["params"])
    bn = model[0].stem[1]
    assert any(p is bn.weight for p in free["params"]) and any(p is model[1].bias for p in free["params"])
    assert len(optim.param_groups(model, 1e-4, wd_norm_bias=True)) == 1


# ---------------------------------------------------------------- config
def test_user_flags_and_presets():
    cfg, _ = C.parse_args(["--preset", "ci", "--task", "classify", "--resume", "auto", "--resume-anyway"])
    assert cfg.train.task == "classify" and cfg.run.resume == "auto" and cfg.run.resume_anyway is True
    r50 = C.preset("resnet50")
    assert (r50.model.name, r50.data.size, r50.data.channels_last, r50.optim.lr, r50.optim.lr_ref_batch) == \
        ("resnet50", 224, True, 0.1, 256)
    tiny = C.preset("tinyimagenet")
    assert (tiny.model.name, tiny.data.size, tiny.train.task) == ("resnet18", 64, "classify")
    with pytest.raises(C.ConfigError, match="model.name must be one of"):
        C.parse_args(["--model.name=vgg"])
    a, b = C.preset("ci"), C.preset("ci")
    b.run.resume, b.data.train = "auto", "/elsewhere"
    assert C.config_hash(a) == C.config_hash(b)  # resuming or moving the data keeps the hash
    b.train.eval_every, b.train.ckpt_every, b.data.on_error = 7, 9, "skip"  # cadence, not maths
    assert C.config_hash(a) == C.config_hash(b)
    b.optim.lr = 1.0
    assert C.config_hash(a) != C.config_hash(b)


# ---------------------------------------------------------------- checkpoints
def payload(step: int, blob: int = 10) -> dict:
    return {"format": ckpt.FORMAT, "step": step, "model": {"w": torch.full((blob,), float(step))},
            "provenance": {"config_hash": "c1", "data_fingerprint": {"train": "d1"}}}


def test_save_keeps_the_newest_n_and_best_survives_pruning(tmp_path):
    for step in (5, 10, 15, 20):
        ckpt.save(str(tmp_path), payload(step), step, keep_last=2, best=(step == 5))
    names = sorted(os.listdir(tmp_path))
    assert names == ["best.pt", "ckpt-00000015.pt", "ckpt-00000020.pt"]
    assert ckpt.load(str(tmp_path / "best.pt"))["step"] == 5  # a hard link: outlives ckpt-5
    assert R.find_resume(str(tmp_path))[1]["step"] == 20


def test_an_unreadable_newest_checkpoint_is_skipped_with_a_message(tmp_path):
    ckpt.save(str(tmp_path), payload(5), 5, keep_last=3)
    good = (tmp_path / "ckpt-00000005.pt").read_bytes()
    (tmp_path / "ckpt-00000010.pt").write_bytes(good[: len(good) // 2])   # a torn file from a plain writer
    (tmp_path / "ckpt-00000015.pt.tmp-123-456").write_bytes(good[:100])  # an atomic writer's leftover (data.files)
    said = []
    path, got = R.find_resume(str(tmp_path), log=said.append)
    assert path.endswith("ckpt-00000005.pt") and got["step"] == 5
    assert len(said) == 1 and "ckpt-00000010.pt is unreadable" in said[0]


class Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_loading_never_runs_code_from_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"format": ckpt.FORMAT, "step": 1, "x": Evil()}, "ckpt-00000001.pt")
    with pytest.raises(ckpt.CheckpointError, match="ckpt-00000001.pt is unreadable"):
        ckpt.load("ckpt-00000001.pt")
    assert not (tmp_path / "PWNED").exists()
    torch.save({"not": "ours"}, "other.pt")
    with pytest.raises(ckpt.CheckpointError, match="not an hvdtrain checkpoint"):
        ckpt.load("other.pt")


def test_resume_refusal_names_both_hashes_and_fingerprints():
    saved = {"config_hash": "aaa", "data_fingerprint": {"train": "d1", "val": "v1"}}
    now = {"config_hash": "bbb", "data_fingerprint": {"train": "d2", "val": "v1"}}
    with pytest.raises(exits.Refused) as e:
        R.check_provenance(saved, now, anyway=False)
    msg = str(e.value)
    assert "config hash aaa (checkpoint) != bbb (this run)" in msg
    assert "train data fingerprint d1 (checkpoint) != d2 (this run)" in msg and "val data" not in msg
    assert len(R.check_provenance(saved, now, anyway=True)) == 2


_KILL_WRITER = """
import sys, torch
sys.path.insert(0, {root!r})
from hvdtrain.data import files
from hvdtrain import checkpoint as ckpt
step = 1
while True:
    ckpt.save({d!r}, {{"format": ckpt.FORMAT, "step": step, "w": torch.randn(8_000_000)}}, step, keep_last=2)
    print(step, flush=True)
    step += 1
"""


def test_kill9_while_writing_leaves_a_loadable_previous_checkpoint(tmp_path):
    """A writer saving 32 MB checkpoints in a loop is SIGKILLed mid-write (after its second
    save, during the third): what is left under a checkpoint name loads."""
    p = subprocess.Popen([sys.executable, "-c", _KILL_WRITER.format(root=ROOT, d=str(tmp_path))],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "1" and p.stdout.readline().strip() == "2"
    finally:
        p.kill()
        p.wait()
    found = ckpt.list_checkpoints(str(tmp_path))
    assert found and all(ckpt.load(f)["w"].numel() == 8_000_000 for f in found)
    assert R.find_resume(str(tmp_path))[1]["step"] >= 2


_FULL_DISK = """
import resource, signal, sys, torch
sys.path.insert(0, {root!r})
from hvdtrain.data import files
from hvdtrain import checkpoint as ckpt
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)        # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))  # files up to 4 MiB: a small disk
ckpt.save({d!r}, {{"format": ckpt.FORMAT, "step": 1, "w": torch.zeros(1000)}}, 1, keep_last=3)
try:
    ckpt.save({d!r}, {{"format": ckpt.FORMAT, "step": 2, "w": torch.zeros(4_000_000)}}, 2, keep_last=3)
except ckpt.CheckpointError as e:
    print(e)
    sys.exit(3)
"""


def test_a_write_that_runs_out_of_space_says_so_and_keeps_the_old_checkpoint(tmp_path):
    r = subprocess.run([sys.executable, "-c", _FULL_DISK.format(root=ROOT, d=str(tmp_path))],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr[-2000:]
    assert "could not write checkpoint" in r.stdout and "ckpt-00000002.pt" in r.stdout
    assert "File too large" in r.stdout and "ckpt-00000001.pt is intact" in r.stdout
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000001.pt"]  # no temp file left behind
    assert ckpt.load(str(tmp_path / "ckpt-00000001.pt"))["step"] == 1


# ---------------------------------------------------------------- the run folder's lock
def test_non_finite_tensors_are_named():
    sd = {"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")]), "c": torch.tensor([float("inf")]),
          "steps": torch.tensor([3]), "note": "x"}
    assert ckpt.non_finite(sd) == ["b", "c"]


def test_a_nan_val_loss_stops_the_run_even_with_the_bound_off():
    from hvdtrain.valpass import val_loss_problem
    assert val_loss_problem(1.0, 15.9, 3.0, 200) is None
    assert "above the bound 15.9 (3.0 x ln(200)" in val_loss_problem(16.0, 15.9, 3.0, 200)
    assert val_loss_problem(float("nan"), 15.9, 3.0, 200) == "is not finite"  # nan > bound is False
    assert val_loss_problem(float("inf"), None, 0.0, 200) == "is not finite"  # the bound off: still stops
    assert val_loss_problem(1e9, None, 0.0, 200) is None


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_ones(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = ckpt.RunLock(str(tmp_path))
        (tmp_path / ".lock").write_text(json.dumps({"pid": live.pid, "host": lock.me["host"],
                                                    "start": files.proc_start(live.pid), "since": "then"}))
        with pytest.raises(ckpt.LockError, match=f"in use by a live run \\(pid {live.pid}"):
            lock.acquire()
    finally:
        live.kill()
        live.wait()
    said = []
    lock.acquire(log=said.append)  # the holder is dead now
    assert "taking over the stale lock" in said[0] and f"dead pid {live.pid}" in said[0]
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / ".lock").exists()


def test_lock_held_on_another_host_is_not_guessed_at(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "node-elsewhere", "since": "then"}))
    with pytest.raises(ckpt.LockError, match="on host node-elsewhere.*delete"):
        ckpt.RunLock(str(tmp_path)).acquire()



# ---------------------------------------------------------------- the banner: dirty and stale checkouts
def git(repo, *args):
    subprocess.run(["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t", *args], check=True,
                   capture_output=True)


def test_banner_says_dirty_and_stale_checkouts(tmp_path):
    from hvdtrain import provenance as P

    up, local = tmp_path / "upstream", tmp_path / "local"
    git(tmp_path, "init", "-q", "-b", "main", str(up))
    (up / "train.py").write_text("v1\n")
    git(up, "add", ".")
    git(up, "commit", "-qm", "v1")
    git(tmp_path, "clone", "-q", str(up), str(local))
    clean = P.code_state(str(local))
    assert clean["git_dirty"] is False and clean["git_behind"] == 0
    assert "DIRTY" not in P.banner(clean, "h", {}, 1, "cpu") and "STALE" not in P.banner(clean, "h", {}, 1, "cpu")
    (up / "train.py").write_text("v2\n")
    git(up, "commit", "-qam", "v2")
    git(local, "fetch", "-q")
    (local / "train.py").write_text("local edit\n")
    state = P.code_state(str(local))
    text = P.banner(state, "h", {}, 1, "cpu")
    assert state["git_dirty"] is True and state["git_changed"] == ["train.py"]
    assert "DIRTY (1 changed: train.py)" in text
    assert "STALE: 1 commit(s) behind origin/main" in text and f"from {local}" in text


def test_the_straggler_is_the_rank_much_busier_than_the_others_and_is_named_with_its_node():
    from hvdtrain import timing
    from hvdtrain.watchdog import peers_state

    where = [{"rank": 0, "node": "h1", "pid": os.getpid()}, {"rank": 1, "node": "h2", "pid": 1},
             {"rank": 2, "node": "h1", "pid": 2 ** 22 + 7}]
    s = timing.straggler([1.0, 4.0, 1.2], [3.0, 0.1, 2.8], where)
    assert (s["rank"], s["node"], s["others_busy_s"], s["others_wait_s"]) == (1, "h2", 1.1, 2.9)
    assert timing.straggler([1.0, 1.2, 1.1], [0, 0, 0], where) is None  # within 1.3x: nobody is named
    assert timing.straggler([2.0], [0.0], where[:1]) is None
    d = {**timing.diagnose({"allreduce": 3.0, "fwd_bwd": 1.0}), "straggler": s}
    assert "waiting on a peer: rank 1 on h2 is the straggler (busy 4.00 s, 3.6x" in timing.describe(d)
    msg = peers_state(where, 0)
    assert "rank 1 on h2 (another node: silent" in msg and f"rank 2 on h1 (pid {2 ** 22 + 7}, exited)" in msg
