"""hvdtrain's core path in one page: DALI reads WebDataset shards and augments the images,
Horovod's DistributedOptimizer averages the gradients of every rank, with gradient
accumulation. No run machinery (config tree, checkpoints, reports, guards): hvdtrain adds
those around this same loop.

    horovodrun -np 2 -H localhost:2 python examples/minimal.py --data runs/data/synth-c10-s64-seed1337/train

`make sanity` builds that data set: 10 classes of 64 px JPEGs in WebDataset tars, each
with the DALI index (`.idx`) beside it, and `_info.json` with the class count.
"""
import argparse
import glob
import hashlib
import json
import os

import horovod.torch as hvd
import torch
import torch.nn.functional as F
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]  # ImageNet's channel means and stds, on 0-255 pixels
STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]
LABEL_BYTES = 8  # a .cls member holds the label as ASCII digits ("7"); padded to one width, DALI can batch it


@pipeline_def
def shards_pipeline(tars, indexes, size, shard_id, num_shards):
    # Every rank lists every tar but reads only its own contiguous share of the samples
    # (shard_id = its global rank): each sample once per epoch across ranks.
    # pad_last_batch gives every rank the same number of batches per epoch: a rank with
    # one batch fewer would leave the others waiting in an allreduce it never starts.
    jpegs, labels = fn.readers.webdataset(paths=tars, index_paths=indexes, ext=["jpg", "cls"],
                                          random_shuffle=True, initial_fill=256, shard_id=shard_id,
                                          num_shards=num_shards, pad_last_batch=True, name="Reader")
    # decode only a random crop window of each JPEG (fewer pixels through the decoder), then resize it
    images = fn.decoders.image_random_crop(jpegs, output_type=types.RGB, random_area=(0.25, 1.0))
    images = fn.resize(images, size=(size, size))
    # cast, random horizontal flip, (x - mean) / std and HWC -> CHW in one fused operator
    images = fn.crop_mirror_normalize(images, mirror=fn.random.coin_flip(), dtype=types.FLOAT,
                                      output_layout="CHW", mean=MEAN, std=STD)
    return images, fn.pad(labels, fill_value=0, shape=[LABEL_BYTES])


def batches(args, rank, size):
    """(images [B, 3, S, S] float32, labels [B] int64), epoch after epoch."""
    tars = sorted(glob.glob(os.path.join(args.data, "*.tar")))
    # device_id=None: DALI's CPU backend; on a GPU node pass the local rank (and decode with device="mixed")
    pipe = shards_pipeline(tars, [t[:-4] + ".idx" for t in tars], args.size, rank, size,
                           batch_size=args.batch_size, num_threads=1, device_id=None, seed=args.seed + rank)
    pipe.build()
    it = DALIGenericIterator([pipe], ["images", "labels"], reader_name="Reader",
                             last_batch_policy=LastBatchPolicy.DROP, auto_reset=True)
    while True:  # the loop counts optimizer steps, not epochs
        for out in it:
            ascii_labels = out[0]["labels"].numpy()
            yield out[0]["images"], torch.tensor([int(bytes(row).rstrip(b"\0")) for row in ascii_labels])


def small_net(num_classes, width=16):
    """Three stride-2 conv stages, global average pooling, a linear classifier. GroupNorm,
    not BatchNorm: its output does not depend on the other images of a micro-batch."""
    layers, cin = [], 3
    for cout in (width, 2 * width, 4 * width):
        layers += [torch.nn.Conv2d(cin, cout, 3, stride=2, padding=1), torch.nn.GroupNorm(8, cout), torch.nn.ReLU()]
        cin = cout
    head = [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(cin, num_classes)]
    return torch.nn.Sequential(*layers, *head)


def main():
    p = argparse.ArgumentParser(description="hvdtrain's core path in one page")
    p.add_argument("--data", required=True, help="a folder of WebDataset .tar shards with .idx and _info.json")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=16, help="micro-batch per rank, images")
    p.add_argument("--accum", type=int, default=2, help="micro-batches accumulated per optimizer step")
    p.add_argument("--size", type=int, default=32, help="crop side, pixels")
    p.add_argument("--lr", type=float, default=0.0025, help="learning rate per 16 images of the global batch")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    hvd.init()  # horovodrun starts one process per rank; each learns its rank and the world size here
    rank, size = hvd.rank(), hvd.size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // hvd.local_size()))  # ranks on a machine share its cores
    torch.manual_seed(args.seed)
    with open(os.path.join(args.data, "_info.json")) as f:
        model = small_net(json.load(f)["num_classes"])

    # One optimizer step sees batch x accum x size images: the lr grows with that global batch.
    global_batch = args.batch_size * args.accum * size
    opt = torch.optim.SGD(model.parameters(), lr=args.lr * global_batch / 16, momentum=0.9)
    # DistributedOptimizer allreduces (averages over ranks) once every `accum` backward
    # passes, not after each: accumulation costs no extra communication.
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                   backward_passes_per_step=args.accum)
    # Every rank starts from rank 0's weights and optimizer state, so they stay identical.
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)

    data, losses = batches(args, rank, size), []
    for step in range(1, args.steps + 1):
        step_loss = torch.zeros(())
        for _ in range(args.accum):
            images, labels = next(data)
            # divide by accum: the optimizer sums the gradients of the passes, and the mean is wanted
            loss = F.cross_entropy(model(images), labels) / args.accum
            loss.backward()
            step_loss += loss.detach()
        opt.step()  # waits for the allreduce, then updates the weights: the same update on every rank
        opt.zero_grad()
        # the loss as the mean over ranks: one small collective per step (hvdtrain batches
        # these into one per log line, the only point its loop waits for the device)
        losses.append(hvd.allreduce(step_loss, name="loss").item())
        if rank == 0 and (step % 10 == 0 or step == 1):
            print(f"step {step:4d}  loss {losses[-1]:.4f}  ({global_batch} images per step, {size} ranks)", flush=True)

    # Every rank applied the same averaged gradients to the same weights: their bytes match.
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    digest = hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16]
    k = min(5, len(losses))
    print(f"rank {rank}: done, loss {sum(losses[:k]) / k:.4f} -> {sum(losses[-k:]) / k:.4f} (means of the first "
          f"and last {k} steps), parameters sha256 {digest}", flush=True)


if __name__ == "__main__":
    main()
