"""DALI's outputs reach the model on the GPU with no host round trip; AMP stays close to
fp32; channels_last holds from the loader to the first convolution.

AMP tolerance, after 5 optimizer steps of SGD (momentum 0.9, lr 0.05, 2 micro-batches
per step, gradients clipped at norm 0.5) on the same batches from the same weights:
each step's loss within 3 % (bf16: 8 mantissa bits) or 1 % (fp16: 11 bits) of fp32's,
and the distance between the AMP and fp32 weights at most 10 % (bf16) or 3 % (fp16) of
how far fp32's weights moved. The bugs this catches move the weights by a different
amount altogether: the loss not divided by the accumulation count (x2), clipping the
still-scaled fp16 gradients (updates 65536x too small), a skipped unscale or step.
fp32 itself runs with TF32 off, so it is the reference.
"""
import pytest
import torch

from hvdtrain import pipeline
from hvdtrain import step as S
from hvdtrain.loader import DaliLoader
from tests.gpu.common import CLASSES, GPU, device_batches, params, small_cfg

pytestmark = GPU
TOL = {"bf16": (0.03, 0.10), "fp16": (0.01, 0.03)}  # (loss, weights), relative


def mixed_loader(shards, cfg) -> DaliLoader:
    """The loader training builds (loader.from_config): the shards' own `shuffled` flag decides
    whether it interleaves them."""
    spec = pipeline.spec_from_config(cfg, "train", device_id=0, threads=2, written_shuffled=shards.shuffled)
    return DaliLoader(shards, spec, num_classes=shards.num_classes, device=torch.device("cuda", 0),
                      channels_last=cfg.data.channels_last)


def is_dtoh(name: str) -> bool:
    return "DtoH" in name or "Device -> Pageable" in name or "Device -> Pinned" in name


def torch_issued_dtoh(events) -> tuple[list, list]:
    """(copies issued through a torch op, copies issued outside torch), each (device event,
    issuing op or None). A device event's `linked_correlation_id` is the id of the torch op
    that was running on the launching thread (torch/autograd/profiler.py,
    _parse_kineto_results); DALI's own copies, from its threads, have no torch op."""
    ops = {e.id: e for e in events if e.device_type == torch.autograd.DeviceType.CPU
           and getattr(e, "linked_correlation_id", 0) == 0}
    ours, others = [], []
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CUDA and is_dtoh(e.name):
            op = ops.get(getattr(e, "linked_correlation_id", 0))
            (ours if op is not None else others).append((e, op))
    return ours, others


def within(op, name: str) -> bool:
    """`op` ran inside record_function(name)."""
    while op is not None:
        if op.name == name:
            return True
        op = op.cpu_parent
    return False


def describe_copy(e, op) -> str:
    if op is None:
        return f"{e.name} (no torch op: issued outside torch)"
    stack = " <- ".join(op.stack[:6]) if op.stack else "no Python stack recorded"
    return f"{e.name} by {op.name} on thread {op.thread}: {stack}"


@pytest.mark.parametrize("normalize", ["dali", "kernel"])
def test_dali_outputs_reach_the_model_with_no_device_to_host_copy(hvd, photo_shards, normalize):
    """No device->host copy issued by the training code in a profiled loader + step. The
    profiler sees every CUDA copy of the process, DALI's background decoding of the next
    batches included, so only copies issued through torch ops count (the training thread,
    autograd's); a deliberate copy inside `record_function("control")` proves the filter
    sees copies the code issues."""
    from torch.profiler import ProfilerActivity, profile, record_function

    cfg = small_cfg(amp="bf16", accum=1)
    cfg.data.decode, cfg.data.normalize = "mixed", normalize
    loader = mixed_loader(photo_shards, cfg)
    state = S.make_state(cfg, photo_shards.num_classes)
    it = loader.forever()
    S.train_step(state, [next(it)])  # one-time set-up
    probe = torch.ones(4, device="cuda")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        with record_function("control"):
            probe.cpu()
        batch = next(it)
        assert all(v.is_cuda for v in batch.views), "DALI's views arrived on the host"
        S.train_step(state, [batch])
        torch.cuda.synchronize()
    events = prof.events()
    assert any(e.device_type == torch.autograd.DeviceType.CUDA for e in events), \
        "the profiler recorded no GPU activity: the check would prove nothing"
    ours, others = torch_issued_dtoh(events)
    control = [(e, op) for e, op in ours if within(op, "control")]
    assert control, ("the control copy was not attributed to its torch op: the filter cannot tell the code's "
                     f"copies from DALI's. Copies seen: {[describe_copy(e, op) for e, op in ours + others]}")
    bad = [(e, op) for e, op in ours if not within(op, "control")]
    assert bad == [], (f"{len(bad)} device->host copies issued by the training code in one loader + train step:\n"
                       + "\n".join(describe_copy(e, op) for e, op in bad)
                       + f"\n(and {len(others)} outside torch, not counted: DALI's own work)")


def test_cpu_decoded_crops_reach_the_gpu_intact_however_the_source_is_reused():
    """hvdtrain.batch.to_device stages a host tensor through torch's pinned memory: the copy
    to the GPU is queued behind busy work, the source is overwritten at once (what DALI's
    reuse of its buffer would do), and the GPU still gets the original bytes. A plain
    non_blocking copy from pinned memory torch did not allocate reads the zeros."""
    from hvdtrain.batch import to_device, to_model_input
    from hvdtrain.pipeline import MEAN, STD
    from hvdtrain.kernels.normalize import normalize_ref

    dev = torch.device("cuda", 0)
    g = torch.Generator().manual_seed(5)
    src = torch.randint(0, 256, (64, 224, 224, 3), dtype=torch.uint8, generator=g).pin_memory()
    want = src.clone()
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time ahead of the copy on this stream
    got = to_model_input(src, None, dev, torch.float32, False)
    raw = to_device(src[:1], dev)
    src.zero_()
    torch.cuda.synchronize()
    mean, std = torch.tensor(MEAN, device=dev), torch.tensor(STD, device=dev)
    assert torch.equal(raw.cpu(), want[:1])
    ref = normalize_ref(want.to(dev), mean, std, None, torch.float32, False)
    assert torch.allclose(got, ref, atol=1e-5), "the crops changed on their way to the GPU"


def train(cfg, batches, steps: int = 5) -> tuple[list[float], torch.Tensor, torch.Tensor]:
    """Losses per step, the weights at the start and after `steps` steps."""
    state = S.make_state(cfg, CLASSES)
    if state.scaler is not None:
        # an init scale that cannot overflow this small model's gradients: a skipped step
        # would put fp16 a step behind fp32 for a reason that is not the one under test
        state.scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10)
    start, accum, losses = params(state.model), cfg.train.grad_accum_steps, []
    for i in range(steps):
        losses.append(S.train_step(state, batches[i * accum:(i + 1) * accum])["loss"].item())
    if state.scaler is not None:
        assert state.scaler.get_scale() == 2.0 ** 10, "fp16 skipped a step (inf/NaN gradients)"
    return losses, start, params(state.model)


@pytest.fixture
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("amp,model,channels_last", [("bf16", "convnet", False), ("fp16", "convnet", False),
                                                     ("bf16", "resnet18", True), ("fp16", "resnet18", True)])
def test_amp_stays_close_to_fp32(hvd, no_tf32, amp, model, channels_last):
    kw = dict(accum=2, clip=0.5, model=model, channels_last=channels_last, optim="sgd", lr=0.05)
    batches = device_batches(small_cfg(**kw), 10, seed=3)
    ref_losses, start, ref_end = train(small_cfg(amp="off", **kw), batches)
    losses, start_amp, end = train(small_cfg(amp=amp, **kw), batches)
    assert torch.equal(start, start_amp)  # the same initial weights (same seed)
    tol_loss, tol_w = TOL[amp]
    rel = [abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)]
    assert max(rel) <= tol_loss, f"{amp} losses {losses} vs fp32 {ref_losses}"
    moved = float((ref_end - start).norm())
    apart = float((end - ref_end).norm())
    assert moved > 0 and apart <= tol_w * moved, (
        f"{amp}: weights {apart:.3g} apart from fp32's, which moved {moved:.3g} ({apart / moved:.1%}; "
        f"tolerance {tol_w:.0%})")


def layout(t: torch.Tensor) -> str:
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return "channels_last"
    return "contiguous" if t.is_contiguous() else "other"


@pytest.mark.parametrize("normalize", ["dali", "kernel"])
def test_channels_last_from_the_loader_to_the_first_convolution(hvd, photo_shards, normalize):
    """cuDNN keeps NHWC only when its input is NHWC: in a train step the first convolution
    gets channels_last input and gives channels_last output; an NCHW control shows the
    hook sees the difference, and gives the same numbers."""
    cfg = small_cfg(amp="bf16", accum=1, model="resnet18", channels_last=True)
    cfg.data.decode, cfg.data.normalize = "mixed", normalize
    batch = next(mixed_loader(photo_shards, cfg).forever())
    state = S.make_state(cfg, photo_shards.num_classes)
    conv = next(m for m in state.model.modules() if isinstance(m, torch.nn.Conv2d))
    calls = []
    hook = conv.register_forward_hook(lambda m, i, o: calls.append((layout(i[0]), layout(o))))
    try:
        S.train_step(state, [batch])                                   # calls[0]
        views, _ = S.to_device(state, batch)
        with torch.no_grad(), S.autocast(state):
            y_cl = state.model(views[0]).float()                       # calls[1]
            y_nchw = state.model(views[0].contiguous()).float()        # calls[2]
    finally:
        hook.remove()
    assert calls[0] == ("channels_last", "channels_last"), f"channels_last lost at the first convolution: {calls[0]}"
    assert calls[2] == ("contiguous", "contiguous")
    assert torch.allclose(y_cl, y_nchw, rtol=0.05, atol=0.05)
