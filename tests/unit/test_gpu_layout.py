"""One rank per GPU: the check hvdtrain.dist.init() runs before DALI and NCCL start."""
import pytest

from hvdtrain.dist import GpuLayoutError, gpu_for_rank


def test_one_rank_per_gpu_by_local_rank():
    assert [gpu_for_rank(r, 2, 2) for r in range(2)] == [0, 1]
    assert [gpu_for_rank(r, 4, 8) for r in range(4)] == [0, 1, 2, 3]  # fewer ranks than GPUs is fine
    assert gpu_for_rank(0, 1, 1) == 0


def test_no_visible_gpu_is_the_cpu_path():
    assert gpu_for_rank(0, 2, 0) is None and gpu_for_rank(1, 2, 0) is None


def test_more_ranks_than_gpus_stops_and_says_what_to_run():
    with pytest.raises(GpuLayoutError) as e:
        gpu_for_rank(1, 2, 1)  # `horovodrun -np 2` on a one-GPU machine
    msg = str(e.value)
    assert "2 ranks on this node but it shows 1 GPU(s)" in msg
    assert "horovodrun -np 1 -H localhost:1" in msg and "CUDA_VISIBLE_DEVICES= horovodrun -np 2" in msg
    with pytest.raises(GpuLayoutError, match="horovodrun -np 4 -H localhost:4"):
        gpu_for_rank(0, 8, 4)  # every rank stops, local rank 0 too
