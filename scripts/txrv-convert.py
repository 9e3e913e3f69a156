#!/usr/bin/env python3
"""Reads a TorchXRayVision checkpoint as TXRV publishes it and writes what
`cxrfed model import --torchxrayvision` turns into a cxrfed model directory.

    txrv-convert.py CHECKPOINT OUT_DIR [--weights NAME]

CHECKPOINT is a `torch.save`d `xrv.models.DenseNet` (how the densenet121-res224-* files are
published; unpickling it needs TXRV's classes, so torchxrayvision must be importable), or a
state dict: a DenseNet's, or the torchvision ResNet-50 inside `xrv.models.ResNet` (how
resnet50-res512-all is published), optionally under `state_dict` or with `module.` /
`model.` prefixes. NAME (e.g. densenet121-res224-all) picks the targets, operating points and
input resolution from TXRV's own table, `xrv.models.model_urls`; without it, the file name is
looked up there, then the checkpoint's own attributes, then TXRV's 18 default pathologies.

OUT_DIR receives `txrv.safetensors` (the checkpoint's tensors in f32 under TXRV's names,
batch-norm counters dropped) and `txrv.json` (architecture, targets, thresholds with NaN as
null, input resolution, the TXRV version). Nothing is renamed here: the mapping to cxrfed's
heads is the Rust importer's (one implementation).
"""

import argparse
import hashlib
import json
import math
import os
import sys

import torch
from safetensors.torch import save_file


def fail(message):
    print(f"txrv-convert: {message}", file=sys.stderr)
    sys.exit(2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--weights", help="TXRV weights name, e.g. densenet121-res224-all")
    args = parser.parse_args()

    try:
        import torchxrayvision as xrv
    except ImportError as e:
        fail(f"torchxrayvision is not importable ({e}); install it in this Python")

    with open(args.checkpoint, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    try:
        obj = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling error is the user's file
        fail(f"{args.checkpoint}: not a torch checkpoint TXRV could load: {e}")

    module_targets, module_threshs = None, None
    if isinstance(obj, torch.nn.Module):
        # Old pickles lack attributes newer torch expects (TXRV patches the same way).
        for mod in obj.modules():
            if not hasattr(mod, "_non_persistent_buffers_set"):
                mod._non_persistent_buffers_set = set()
        module_targets = getattr(obj, "targets", None) or getattr(obj, "pathologies", None)
        threshs = getattr(obj, "op_threshs", None)
        if threshs is not None:
            module_threshs = [float(t) for t in threshs.flatten().tolist()]
        state = obj.state_dict()
    elif isinstance(obj, dict):
        state = obj.get("state_dict", obj)
        if not isinstance(state, dict):
            fail(f"{args.checkpoint}: 'state_dict' is not a dict of tensors")
    else:
        fail(f"{args.checkpoint}: holds a {type(obj).__name__}, not a model or state dict")

    tensors = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        for prefix in ("module.", "model."):
            if name.startswith(prefix):
                name = name[len(prefix):]
        if name.endswith("num_batches_tracked"):
            continue
        if name == "op_threshs":
            module_threshs = [float(t) for t in value.flatten().tolist()]
            continue
        tensors[name] = value.detach().to(torch.float32).contiguous()

    if "features.conv0.weight" in tensors:
        arch, head, resolution = "txrv-densenet121", "classifier", 224
        layers = {k.split(".")[2] for k in tensors if k.startswith("features.denseblock3.")}
        if len(layers) != 24 or "features.denseblock4.denselayer16.conv2.weight" not in tensors:
            fail("a DenseNet checkpoint, but not DenseNet-121 (blocks 6-12-24-16)")
        channels = tensors["features.conv0.weight"].shape[1]
    elif "conv1.weight" in tensors and "layer4.2.conv3.weight" in tensors:
        arch, head, resolution = "txrv-resnet50", "fc", 512
        if "layer3.5.conv3.weight" not in tensors or "layer3.6.conv3.weight" in tensors:
            fail("a ResNet checkpoint, but not ResNet-50 (blocks 3-4-6-3)")
        channels = tensors["conv1.weight"].shape[1]
    else:
        fail("neither TXRV's DenseNet-121 (features.conv0) nor its ResNet-50 (conv1, layer4)")
    if channels != 1:
        fail(f"the first convolution takes {channels} channels; TXRV models take 1")
    outputs = tensors[f"{head}.weight"].shape[0]

    entry = None
    table = getattr(xrv.models, "model_urls", {})
    if args.weights:
        entry = table.get(args.weights)
        if entry is None:
            fail(f"unknown TXRV weights {args.weights!r}: {', '.join(sorted(table))}")
    else:
        base = os.path.basename(args.checkpoint)
        for name, candidate in table.items():
            if os.path.basename(candidate.get("weights_url", "")) == base:
                args.weights, entry = name, candidate
    targets = list((entry or {}).get("labels") or module_targets or xrv.datasets.default_pathologies)
    threshs = (entry or {}).get("op_threshs", module_threshs)
    resolution = int((entry or {}).get("input_resolution", resolution))
    if len(targets) != outputs:
        fail(f"the classifier has {outputs} outputs but {len(targets)} targets are known")
    if threshs is not None:
        threshs = [None if (t is None or math.isnan(float(t))) else float(t) for t in threshs]
        if len(threshs) != outputs:
            fail(f"{len(threshs)} operating points for {outputs} outputs")

    os.makedirs(args.out, exist_ok=True)
    save_file(tensors, os.path.join(args.out, "txrv.safetensors"))
    meta = {
        "architecture": arch,
        "head": head,
        "targets": targets,
        "op_threshs": threshs,
        "input_resolution": resolution,
        "weights": args.weights,
        "checkpoint_sha256": digest,
        "torchxrayvision_version": getattr(xrv, "__version__", "unknown"),
        "torch_version": torch.__version__,
    }
    with open(os.path.join(args.out, "txrv.json"), "w") as f:
        json.dump(meta, f, indent=2)


if __name__ == "__main__":
    main()
