"""`python -m hvdtrain.export`: a checkpoint's weights as safetensors or a torch state dict,
with a JSON beside them that says how to rebuild the model and where the weights came from.

    python -m hvdtrain.export --checkpoint runs/tiny200 --out tiny200.safetensors
    python -m hvdtrain.export --checkpoint runs/sanity/ckpt-00000200.pt --out encoder.pt
    python -m hvdtrain.export --checkpoint runs/tiny200/best.pt --out weights.bin --format pt

`--checkpoint` takes a file, or a run folder (its best.pt, else its newest checkpoint:
as `hvdtrain.evaluate`). The format follows the suffix of `--out` (`.safetensors`, or
`.pt` / `.pth`: `torch.save` of the state dict, read back with `weights_only=True`), or
`--format`. It writes

- OUT: the whole model's state dict, the keys of `hvdtrain.model.build(ModelConfig(**json
  ["model"]), num_classes)` (`num_classes` None for a contrastive run's embedding model);
- OUT's stem + `.encoder` + suffix, for a contrastive run: the encoder alone, the network
  below the projection head (`model.encoder` where the model has a head on top, else the
  model itself: the convnet's embedding model is its encoder);
- OUT's stem + `.json`: the model config, task, classes (count and names), the input the
  model expects (size, mean and std on 0-255 pixels, NCHW float32), the checkpoint (path,
  step), its provenance (code SHA, config hash, data fingerprints and paths) and each
  file's sha256.

    from hvdtrain.export import load
    model = load("tiny200.safetensors")           # rebuilt from the JSON, weights loaded, eval mode
    encoder = load("encoder.encoder.pt")          # a contrastive run's encoder

Exit codes: `hvdtrain.exits` (REFUSED: usage, an unreadable checkpoint, a suffix and a
--format that disagree).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import torch

from hvdtrain.data.files import temp_name, write_atomic
from hvdtrain import checkpoint as ckpt
from hvdtrain import config as C
from hvdtrain import exits
from hvdtrain import model as M
from hvdtrain import task as TK
from hvdtrain.pipeline import MEAN, STD

FORMAT = "hvdtrain-export-v1"
SUFFIXES = {".safetensors": "safetensors", ".pt": "pt", ".pth": "pt"}


class ExportError(RuntimeError):
    """The export cannot be done as asked; the message says why."""


def choose_format(out: str, flag: str | None) -> str:
    by_suffix = SUFFIXES.get(os.path.splitext(out)[1])
    if flag and by_suffix and flag != by_suffix:
        raise ExportError(f"--out {out} says {by_suffix} but --format {flag}: drop one")
    if not (flag or by_suffix):
        raise ExportError(f"--out {out}: no format from its suffix (.safetensors, .pt, .pth); pass --format")
    return flag or by_suffix


def paths_for(out: str) -> dict[str, str]:
    """{"model": OUT, "encoder": OUT.encoder.<suffix>, "json": OUT.json} (stem: OUT without its suffix)."""
    stem, ext = os.path.splitext(out)
    return {"model": out, "encoder": f"{stem}.encoder{ext}", "json": f"{stem}.json"}


def encoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The network below the head: `model.encoder` (Classifier, Projected), else the model."""
    return getattr(model, "encoder", model)


def write_weights(tensors: dict, path: str, fmt: str, meta: dict[str, str]) -> dict:
    """One state dict to `path` (atomically); its file entry for the JSON."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    tmp = temp_name(path)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(tensors, tmp, metadata=meta)
    else:
        torch.save(tensors, tmp)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)  # safetensors writes 0600: readable as any file this user writes
    os.replace(tmp, path)
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return {"file": os.path.basename(path), "format": fmt, "sha256": sha.hexdigest(), "tensors": len(tensors),
            "numel": sum(t.numel() for t in tensors.values())}


def export(checkpoint: str, out: str, flag: str | None = None) -> dict:
    """Write the files; returns the JSON document."""
    fmt = choose_format(out, flag)
    path, why = ckpt.resolve(checkpoint)
    payload = ckpt.load(path)
    cfg = C.from_dict(payload["config"])
    task = TK.get(cfg.train.task)
    head = task.head(payload.get("num_classes"))
    model = M.build(cfg.model, head)
    model.load_state_dict(payload["model"])  # strict: the checkpoint and this code agree on the model
    prov = payload["provenance"]
    files = paths_for(out)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    meta = {"hvdtrain": FORMAT, "json": os.path.basename(files["json"]), "model": cfg.model.name,
            "git_sha": str(prov.get("git_sha")), "config_hash": str(prov.get("config_hash"))}
    doc = {"format": FORMAT, "weights": write_weights(model.state_dict(), out, fmt, {**meta, "part": "model"}),
           "encoder": None, "model": C.to_dict(cfg)["model"], "task": task.name, "num_classes": head,
           "classes": prov.get("classes"),
           "input": {"size": cfg.data.size, "layout": "NCHW float32", "pixels": "0-255, RGB",
                     "mean": MEAN, "std": STD, "normalize": "(pixel - mean) / std per channel"},
           "checkpoint": {"path": path, "chosen": why, "step": payload["step"], "saved_at": payload.get("saved_at")},
           "provenance": {"git_sha": prov.get("git_sha"), "git_dirty": prov.get("git_dirty"),
                          "config_hash": prov.get("config_hash"), "data_fingerprint": prov.get("data_fingerprint"),
                          "data_train": cfg.data.train, "data_val": cfg.data.val},
           "config": C.to_dict(cfg)}
    if task.name == "contrastive":
        enc = encoder_of(model)
        doc["encoder"] = {**write_weights(enc.state_dict(), files["encoder"], fmt, {**meta, "part": "encoder"}),
                          "module": type(enc).__name__}
    write_atomic(files["json"], json.dumps(doc, indent=1))
    return doc


def read_weights(path: str, fmt: str | None = None) -> dict:
    """A state dict written by `export` (`fmt`: its format, else the suffix's; .pt otherwise)."""
    if (fmt or SUFFIXES.get(os.path.splitext(path)[1], "pt")) == "safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def load(path: str) -> torch.nn.Module:
    """The model (or, for an `.encoder` file, the encoder) an export describes, rebuilt from
    its JSON with `hvdtrain.model` and its weights loaded (strict), in eval mode."""
    stem, _ = os.path.splitext(path)
    part = "encoder" if stem.endswith(".encoder") else "model"
    with open((stem[:-len(".encoder")] if part == "encoder" else stem) + ".json") as f:
        doc = json.load(f)
    model = M.build(C.ModelConfig(**doc["model"]), doc["num_classes"])
    module = encoder_of(model) if part == "encoder" else model
    module.load_state_dict(read_weights(path, doc["weights"]["format"]))
    return module.eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hvdtrain.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint file, or a run folder (best.pt, else the newest)")
    p.add_argument("--out", required=True, help="weights file: .safetensors, .pt or .pth (or any name with --format)")
    p.add_argument("--format", choices=sorted(set(SUFFIXES.values())), help="overrides the suffix's format")
    a = p.parse_args(argv)
    try:
        doc = export(a.checkpoint, a.out, a.format)
    except (ExportError, ckpt.CheckpointError, KeyError, RuntimeError) as e:
        print(f"hvdtrain.export: {e}", file=sys.stderr)
        return exits.REFUSED
    w, files = doc["weights"], paths_for(a.out)
    print(f"hvdtrain.export: {doc['checkpoint']['path']} ({doc['checkpoint']['chosen']}), step "
          f"{doc['checkpoint']['step']}, {doc['model']['name']} {doc['task']}")
    print(f"  model    {a.out}  ({w['format']}, {w['tensors']} tensors, {w['numel']} values, sha256 {w['sha256'][:16]})")
    if doc["encoder"]:
        e = doc["encoder"]
        print(f"  encoder  {files['encoder']}  ({e['module']}, {e['tensors']} tensors, {e['numel']} values)")
    print(f"  json     {files['json']}  (model config, classes, input, provenance: code "
          f"{doc['provenance']['git_sha']}, config {doc['provenance']['config_hash']})")
    return exits.OK


if __name__ == "__main__":
    sys.exit(main())
