"""Training from a bucket as users run it: `horovodrun -np 2 python -m hvdtrain.train
--data.train=s3://...` (and gs://) against real servers in their own processes (moto's S3
server, the GCS emulator; tests/stores.py), with the fault proxy in front where a test
needs 503s, resets or an outage. The shards are webdataset.ShardWriter's (no .idx, no
_info.json) beside objects that are not shards; every remote run is compared with the
same run on local copies of the shards read in the same windows."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import webdataset as wds

from tests.conftest import ROOT, jpeg
from tests.e2e.harness import HOROVODRUN, TRAIN, finish, kill_job, losses, run, wait_for
from tests.stores import SECRET, FaultProxy, GCSServer, S3Server

ARGS = ["--preset", "ci", "--task", "classify", "--run.progress=False", "--run.tensorboard=False",
        "--train.log_every=1", "--train.ckpt_every=5", "--train.steps=24"]
WINDOWS = ["--data.window_shards=2"]


def write_shards(folder, n, per, seed):
    os.makedirs(folder)
    with wds.ShardWriter(os.path.join(str(folder), "part-%06d.tar"), maxcount=per, verbose=0) as sink:
        for i in range(n):
            sink.write({"__key__": f"s{seed}-{i:05d}", "jpg": jpeg(seed * 10000 + i, 24), "cls": str(i % 8),
                        "json": json.dumps({"i": i})})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Train (16 shards of 20) and val (2 of 32) in a folder, and in an S3 and a GCS bucket
    beside a README and a tar one level down; a fault proxy in front of the S3 server."""
    root = tmp_path_factory.mktemp("remote")
    write_shards(root / "train", 320, 20, 1)
    write_shards(root / "val", 64, 32, 2)
    (root / "extra").mkdir()
    (root / "extra" / "README.md").write_text("how these shards were made")
    with S3Server() as s3, GCSServer() as gcs, FaultProxy(s3) as proxy:
        for server in (s3, gcs):
            for split in ("train", "val"):
                server.upload(str(root / split), "hvd-train", f"tiny/{split}/", create=split == "train")
                server.upload(str(root / "extra"), "hvd-train", f"tiny/{split}/", create=False)
            server.upload(str(root / "val"), "hvd-train", "tiny/train/old/", create=False)
        yield {"root": root, "s3": s3, "gcs": gcs, "proxy": proxy}


def env_with(*envs, **more) -> dict:
    out = {**os.environ}
    for e in envs:
        out.update(e)
    out.update(more)
    return out


def local_copies(world, tmp_path) -> list[str]:
    """The same shards in a folder of the run's own (indexes get written beside them)."""
    for split in ("train", "val"):
        shutil.copytree(world["root"] / split, tmp_path / "local" / split)
    return [f"--data.train={tmp_path}/local/train", f"--data.val={tmp_path}/local/val"]


def remote(scheme: str) -> list[str]:
    return [f"--data.train={scheme}://hvd-train/tiny/train/", f"--data.val={scheme}://hvd-train/tiny/val/"]


def val_of(run_dir) -> dict:
    return json.load(open(os.path.join(run_dir, "summary.json")))


@pytest.fixture(scope="module")
def local_run(world, tmp_path_factory):
    d = tmp_path_factory.mktemp("local")
    r = run(HOROVODRUN + TRAIN + ARGS + WINDOWS + local_copies(world, d) + [f"--run.dir={d}/run"],
            env=env_with(HVDTRAIN_CACHE=str(d / "cache")))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "windows of 40 samples (2 shards)" in r.stdout
    return d / "run"


@pytest.fixture(scope="module")
def s3_run(world, tmp_path_factory):
    """Through the proxy: a tenth of the GETs answered 503 SlowDown, a third cut by a reset
    mid-body. TensorBoard on: its files are searched for the secret too."""
    d = tmp_path_factory.mktemp("s3")
    proxy = world["proxy"]
    proxy.faults(slowdown=0.1, reset=0.34, reset_after=12000)
    before = proxy.stats()
    args = ARGS + WINDOWS + remote("s3") + [f"--run.dir={d}/run", f"--data.cache_dir={d}/shards",
                                           "--run.tensorboard=True"]
    r = run(HOROVODRUN + TRAIN + args, env=env_with(proxy.env(), HVDTRAIN_CACHE=str(d / "cache")))
    proxy.faults(slowdown=0.0, reset=0.0)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return {"dir": d / "run", "out": r.stdout + r.stderr, "args": args, "cache": d / "cache",
            "faults": {k: proxy.stats()[k] - before[k] for k in ("slowdowns", "resets")}}


def test_training_from_s3_equals_training_from_local_copies_despite_503s_and_resets(local_run, s3_run):
    a, b = losses(local_run), losses(s3_run["dir"])
    assert sorted(a) == list(range(1, 25)) and b == a  # bit for bit: the same samples in the same steps
    assert val_of(s3_run["dir"])["val_top1"] == val_of(local_run)["val_top1"]
    assert val_of(s3_run["dir"])["val_loss"] == val_of(local_run)["val_loss"]
    f, out = s3_run["faults"], s3_run["out"]
    assert f["slowdowns"] >= 1 and f["resets"] >= 1, f
    fetched = val_of(s3_run["dir"])["bucket_fetch"]
    assert fetched["retries"] >= f["slowdowns"] + f["resets"] - 2 and fetched["shards"] == 18, fetched
    assert "retrying" in out and "data    fetched from the bucket on this node: 18 shard(s)" in out
    print(f"503s and resets: {f['slowdowns']} SlowDown(s), {f['resets']} reset(s); {fetched['retries']} retries; "
          f"losses equal to the local run's")
    assert "store   train: endpoint http://127.0.0.1:" in out and "credentials from the environment" in out


def test_no_secret_is_printed_or_written(s3_run):
    """The secret key the run used appears nowhere: not in its output, not in any file of
    its run folder (banner, config.json, metrics, TensorBoard, checkpoints' provenance),
    not in the caches."""
    assert SECRET not in s3_run["out"]
    needle = SECRET.encode()
    for folder in (s3_run["dir"], s3_run["cache"]):
        for dirpath, _, files in os.walk(folder):
            for f in files:
                with open(os.path.join(dirpath, f), "rb") as fh:
                    assert needle not in fh.read(), os.path.join(dirpath, f)


def test_training_from_gs_equals_training_from_local_copies(world, local_run, tmp_path):
    r = run(HOROVODRUN + TRAIN + ARGS + WINDOWS + remote("gs") + [f"--run.dir={tmp_path}/run",
                                                                  f"--data.cache_dir={tmp_path}/shards"],
            env=env_with(world["gcs"].env(), HVDTRAIN_CACHE=str(tmp_path / "cache")))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert losses(tmp_path / "run") == losses(local_run)
    assert val_of(tmp_path / "run")["val_top1"] == val_of(local_run)["val_top1"]
    assert "the emulator at http://127.0.0.1:" in r.stdout


def test_kill9_mid_epoch_then_resume_auto_gives_the_uninterrupted_losses(world, s3_run, tmp_path):
    args = [a for a in s3_run["args"] if not a.startswith(("--run.dir", "--data.cache_dir", "--run.tensorboard"))]
    args += [f"--run.dir={tmp_path}/cut", f"--data.cache_dir={tmp_path}/shards"]
    env = env_with(world["proxy"].env(), HVDTRAIN_CACHE=str(s3_run["cache"]))
    metrics = tmp_path / "cut" / "metrics.jsonl"
    p = subprocess.Popen(HOROVODRUN + TRAIN + args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, env=env)
    try:
        wait_for("step 16 logged", lambda: metrics.exists() and any(
            json.loads(x).get("step") == 16 for x in metrics.read_text().splitlines()), 240, p, poll_s=0.02)
    finally:
        kill_job(p.pid)
        p.wait()
    saved = sorted(int(n[5:13]) for n in os.listdir(tmp_path / "cut") if n.startswith("ckpt-") and n.endswith(".pt"))
    k = saved[-1]
    assert k in (15, 20), saved  # 15: mid-epoch (10 steps an epoch here) and mid-window; 20 if the kill came late
    res = run(HOROVODRUN + TRAIN + args + ["--resume", "auto"], env=env)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    a, b = losses(s3_run["dir"]), losses(tmp_path / "cut")
    assert [b[s] for s in range(k + 1, 25)] == [a[s] for s in range(k + 1, 25)]


def small_cache(world, shards: int = 12) -> list[str]:
    """A cache of 12 of the 18 shards' bytes, read in windows of one shard: every epoch
    fetches again, so the fetcher is at work while training runs."""
    biggest = max(os.path.getsize(world["root"] / s / f) for s in ("train", "val")
                  for f in os.listdir(world["root"] / s))
    return ["--data.window_shards=1", f"--data.cache_gb={shards * biggest / 1e9}"]


def start_at_step(args, env, tmp_path, step: int) -> subprocess.Popen:
    """A 2-rank training run in its own session, returned once `step` is logged."""
    metrics = tmp_path / "run" / "metrics.jsonl"
    p = subprocess.Popen(HOROVODRUN + TRAIN + args + [f"--run.dir={tmp_path}/run"], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
    wait_for(f"step {step} logged", lambda: metrics.exists() and f'"step": {step},' in metrics.read_text(), 120, p)
    return p


def test_the_store_gone_for_20_s_mid_epoch_then_back_training_goes_on(world, tmp_path):
    with FaultProxy(world["s3"]) as proxy:
        args = ARGS + remote("s3") + small_cache(world) + [f"--data.cache_dir={tmp_path}/shards"]
        p = start_at_step(args, env_with(proxy.env(), HVDTRAIN_CACHE=str(tmp_path / "cache")), tmp_path, 3)
        t0 = time.monotonic()
        proxy.down(20)
        out, err = finish(p, 180, "the run did not end after the store came back")
        took = time.monotonic() - t0
    assert p.returncode == 0, (out + err)[-3000:]
    assert sorted(losses(tmp_path / "run")) == list(range(1, 25)) and took >= 15, took
    assert "EndpointConnectionError; retrying" in out, out[-3000:]
    print(f"store gone for 20 s mid-epoch: exit 0, the run ended {took:.1f} s after the store went")
    evicted = val_of(tmp_path / "run")["bucket_fetch"]["evicted"]
    assert evicted > 0  # the cache was smaller than the data set: shards were fetched during the outage's epoch


def test_the_store_gone_for_good_ends_the_job_naming_the_url_within_its_bound(world, tmp_path):
    """--data.remote_retry_s=8: the job ends within 8 s of retries plus 30 s (the last
    backoff, the other rank's failed collective, the launcher's teardown)."""
    with FaultProxy(world["s3"]) as proxy:
        args = ARGS + remote("s3") + small_cache(world) + ["--data.remote_retry_s=8", "--train.steps=200",
                                                           f"--data.cache_dir={tmp_path}/shards"]
        p = start_at_step(args, env_with(proxy.env(), HVDTRAIN_CACHE=str(tmp_path / "cache")), tmp_path, 3)
        t0 = time.monotonic()
        proxy.down(-1)
        out, err = finish(p, 8 + 30, "the job did not end within 38 s of the store going away")
        took = time.monotonic() - t0
    assert p.returncode != 0
    assert "s3://hvd-train/tiny/" in err and "GET failed for 8 s with no progress" in err, err[-3000:]
    print(f"store gone for good: the job ended {took:.1f} s after it went (retry budget 8 s)")


def test_an_object_replaced_during_the_run_is_refused_by_name(world, tmp_path):
    """The train shards are written again under the same keys mid-run (another data set's
    bytes): the next fetch of one is refused (its ETag is not the one the run indexed),
    never read at the old offsets. A cache of 9 of the 16 shards: fetches go on."""
    shutil.copytree(world["root"] / "train", tmp_path / "src")
    c = world["s3"].client()
    names = sorted(os.listdir(tmp_path / "src"))
    for name in names:
        c.upload_file(str(tmp_path / "src" / name), "hvd-train", f"swap/{name}")
    args = ARGS + ["--data.train=s3://hvd-train/swap/", "--train.steps=200",
                   f"--data.cache_dir={tmp_path}/shards"] + small_cache(world, 9)
    p = start_at_step(args, env_with(world["s3"].env(), HVDTRAIN_CACHE=str(tmp_path / "cache")), tmp_path, 2)
    t0 = time.monotonic()
    for name in names:
        c.upload_file(str(world["root"] / "val" / "part-000000.tar"), "hvd-train", f"swap/{name}")
    out, err = finish(p, 120)
    assert p.returncode != 0
    assert "s3://hvd-train/swap/part-0000" in err and ".tar was replaced while this run read it" in err, \
        (out + err)[-3000:]
    print(f"replaced objects: the job ended {time.monotonic() - t0:.1f} s after the replacement, exit {p.returncode}")


@pytest.mark.parametrize("case", ["wrong-key", "no-bucket", "empty-prefix", "gs-no-credentials"])
def test_bad_credentials_and_missing_data_stop_every_rank_with_exit_2(world, tmp_path, case):
    base = env_with(world["s3"].env(), HVDTRAIN_CACHE=str(tmp_path / "cache"))
    data = "s3://hvd-train/tiny/train/"
    if case == "wrong-key":
        auth = S3Server(auth=True)
        base.update(auth.env())
    elif case == "no-bucket":
        data = "s3://no-such-bucket/tiny/train/"
    elif case == "empty-prefix":
        data = "s3://hvd-train/tiny/nothing-here/"
    else:
        data = "gs://hvd-train/tiny/train/"
        base.pop("STORAGE_EMULATOR_HOST", None)
        base.update(HOME=str(tmp_path), GOOGLE_APPLICATION_CREDENTIALS="", CLOUDSDK_CONFIG=str(tmp_path / "gcloud"))
    t0 = time.monotonic()
    try:
        r = run(HOROVODRUN + TRAIN + ARGS + [f"--data.train={data}", f"--run.dir={tmp_path}/run"], timeout=60,
                env=base)
    finally:
        if case == "wrong-key":
            auth.stop()
    took = time.monotonic() - t0
    out = r.stdout + r.stderr
    # each rank refuses on its own (and says so); the launcher ends the job at the first exit 2
    assert "Exit code: 2" in out and "[1]<stderr>:hvdtrain.train: rank 1: refused to start" in out, out[-3000:]
    assert took < 30, took
    assert SECRET not in out
    expect = {"wrong-key": ["LIST refused: InvalidAccessKeyId", "credentials from the environment (AWS_ACCESS_KEY_ID)"],
              "no-bucket": ["s3://no-such-bucket/tiny/train/: LIST: no such bucket no-such-bucket"],
              "empty-prefix": ["s3://hvd-train/tiny/nothing-here/: no .tar objects directly under this prefix"],
              "gs-no-credentials": ["gs://hvd-train/tiny/train/", "Application Default Credentials: none found"]}
    for text in expect[case]:
        assert text in out, (text, out[-3000:])
    print(f"{case}: every rank exited 2, {took:.1f} s after the launch")


def test_dali_reads_the_bucket_itself_with_remote_direct(world, tmp_path):
    r = run(HOROVODRUN + TRAIN + ["--preset", "ci", "--task", "classify", "--run.progress=False",
                                  "--run.tensorboard=False", "--train.steps=6", "--data.remote=direct",
                                  "--data.train=s3://hvd-train/tiny/train/", f"--run.dir={tmp_path}/run"],
            env=env_with(world["s3"].env(), HVDTRAIN_CACHE=str(tmp_path / "cache")))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "bucket data read directly by DALI" in r.stdout and "read directly by DALI" in r.stdout
    assert not os.path.exists(tmp_path / "shards")


def test_on_error_skip_leaves_out_a_bad_sample_of_a_bucket(world, tmp_path):
    """A shard in the bucket holds an image that does not decode: --data.on_error=skip
    checks the shards from their copies in the node's cache (the ranks share the work),
    leaves the sample out, counts it in the banner, and trains."""
    src = tmp_path / "bad"
    write_shards(src, 60, 30, 3)
    with wds.TarWriter(str(src / "part-000002.tar")) as sink:
        sink.write({"__key__": "broken-0001", "jpg": b"not a jpeg at all", "cls": "1"})
        for i in range(7):
            sink.write({"__key__": f"fine-{i:04d}", "jpg": jpeg(900 + i, 24), "cls": str(i % 8)})
    world["s3"].upload(str(src), "hvd-train", "withbad/", create=False)
    r = run(HOROVODRUN + TRAIN + ["--preset", "ci", "--task", "classify", "--run.progress=False",
                                  "--run.tensorboard=False", "--train.steps=4", "--data.on_error=skip",
                                  "--data.train=s3://hvd-train/withbad/", f"--run.dir={tmp_path}/run",
                                  f"--data.cache_dir={tmp_path}/shards"],
            env=env_with(world["s3"].env(), HVDTRAIN_CACHE=str(tmp_path / "cache")))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert ("data    train: skipping 1 bad sample(s) (data.on_error=skip): s3://hvd-train/withbad/part-000002.tar: "
            "broken-0001: undecodable image") in r.stdout, r.stdout[-3000:]


def test_bench_remote_measures_each_line_and_prints_bench_json_last(world, tmp_path):
    """bench.remote as documented, on a small set: every loader line measured (local, through
    the cache, DALI direct), GETs counted from the S3 server's log, the bytes of each
    epoch (none in epoch 2 when the cache holds the set), its checks judged, one
    `BENCH_JSON` line last."""
    r = run([sys.executable, "-m", "bench.remote", "--s3", "s3://hvd-train/bench/", "--server-log", world["s3"].log,
             "--images", "512", "--shard-size", "16", "--threads", "1", "--batch-size", "16", "--window-shards", "2",
             "--windows", "1", "--rounds", "1", "--skip", "launch,clients",
             "--work", str(tmp_path / "work"), "--run-dir", str(tmp_path / "report")],
            env=env_with(world["s3"].env(), HVDTRAIN_CACHE=str(tmp_path / "cache")))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("BENCH_JSON "), last
    doc = json.loads(last[len("BENCH_JSON "):])
    assert doc["error"] is None and "errors" not in doc["results"], doc["results"].get("errors")
    lines = doc["results"]["loader"]
    for name in ("local", "s3_cache", "s3_cache_cold", "local_windows", "s3_direct"):
        assert lines[name]["error"] is None and lines[name]["img_s"] > 0, (name, lines[name])
    assert lines["s3_cache"]["gets_from"] == "server log" and lines["s3_direct"]["gets_from"] == "server log"
    assert lines["s3_direct"]["gets_per_sample"] > 1 > lines["s3_cache"]["gets_per_sample"]
    whole = doc["results"]["epochs"]["whole_cache"]
    assert whole["epochs"][0]["fetched_bytes"] == whole["set_bytes"] and whole["epochs"][1]["fetched_bytes"] == 0
    small = doc["results"]["epochs"]["small_cache"]
    assert small["max_held_bytes"] <= small["bound_bytes"] < small["set_bytes"]
    judged = {c["figure"]: c["result"] for c in doc["checks"]}
    assert judged["launch to first step, bucket vs local"] == "NOT MEASURED"  # skipped
    assert all(v in ("PASS", "FAIL") for k, v in judged.items() if "launch" not in k), judged
    assert "loader s3_direct" in r.stdout and os.path.exists(tmp_path / "report" / "bench-remote.md")
