"""Preemption across ranks: a request seen by one rank only (a signal to the last rank,
or the batch shell's request file, which rank 0 reads) stops every rank after the same
optimizer step, through the one allreduce of `Preempt.requested()`."""
import os
import signal

import pytest

from hvdtrain import config as C
from hvdtrain import dist
from hvdtrain import loader as L
from hvdtrain import preempt as P
from hvdtrain import step as S
from tests.parallel.harness import make_data


@pytest.fixture(scope="module")
def shards(shared_dir):
    return make_data(shared_dir, "preempt", n=160, shard_size=40)


@pytest.mark.parametrize("how", ["signal to the last rank", "request file on rank 0"])
def test_one_ranks_request_stops_every_rank_at_the_same_step(shared_dir, shards, preempt_handlers, how):
    run_dir = os.path.join(shared_dir, f"run-{how.split()[0]}")
    os.makedirs(run_dir, exist_ok=True)
    cfg = C.preset("ci")
    cfg.train.task = "classify"
    state = S.make_state(cfg, shards.num_classes)
    loader = L.from_config(cfg, shards, "train", threads=1)
    p = P.Preempt(run_dir, dist.is_primary(), poll_s=0)

    def on_step(st):  # after step 3, on one rank only
        if st.step != 3:
            return
        if how.startswith("signal") and dist.rank() == dist.size() - 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        if how.startswith("request") and dist.is_primary():
            with open(p.request_path, "w") as f:
                f.write("SIGUSR1 test\n")

    res = S.run_loop(state, loader, 20, on_step=on_step, stop=lambda st: p.requested())
    p.drain()
    steps = dist.allgather_object((res.stopped, state.step, p.reason), name="preempt_steps")
    assert len(steps) == dist.size()
    want = "SIGUSR1 on 1 of %d rank(s)" % dist.size() if how.startswith("signal") else \
        f"{P.REQUEST_NAME} from the batch shell"
    # seen after step 3, sent with step 4's check, read at step 5's: every rank stops after step 5
    assert steps == [(True, 5, want)] * dist.size(), steps
    assert P.received() == (["SIGUSR1"] if how.startswith("signal") and dist.rank() == dist.size() - 1 else [])
