"""Model benchmark: cxrfed (Rust, tch/libtorch) against Python PyTorch, same architecture and
same weights, side by side in one run; plus the node's end-to-end extraction throughput as a
share of pure forward throughput.

usage: python bench/model.py --bin target/release/cxrfed-bench --cxrfed target/release/cxrfed \
           --out docs/bench/model.md

The Python models below mirror the tch module paths exactly, so the safetensors file written by
cxrfed loads with strict=True: a missing or misnamed parameter fails the benchmark instead of
comparing different networks. Outputs on a reference input are compared too.
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from common import Node, run_json

SCHEMA_V1_WIDTHS = [
    ("image_quality", 4), ("rib_fracture", 1), ("clavicle_symmetry", 2), ("spine_alignment", 2),
    ("opacity_distribution", 6), ("opacity_severity", 4), ("vascular_pattern", 3),
    ("interstitial_markings", 2), ("hyperlucency", 1), ("cardiac_contour", 3),
    ("cardiothoracic_ratio", 1), ("aortic_knob", 2), ("hilar_size", 2), ("diaphragm_position", 3),
    ("diaphragm_contour", 2), ("costophrenic_angle", 4),
]


class ConvBn(nn.Module):
    def __init__(self, c_in, c_out, k, stride):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class TinyBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = ConvBn(1, 16, 5, 2)
        self.c2 = ConvBn(16, 32, 3, 2)
        self.c3 = ConvBn(32, 48, 3, 2)
        self.c4 = ConvBn(48, 64, 3, 2)
        self.c5 = ConvBn(64, 96, 3, 2)
        self.trunk = nn.Linear(96 * 17, 256)

    def forward(self, x):
        x = self.c5(self.c4(self.c3(self.c2(self.c1(x)))))
        g = F.adaptive_avg_pool2d(x, 1).flatten(1)
        grid = F.adaptive_avg_pool2d(x, 4).flatten(1)
        return F.relu(self.trunk(torch.cat([g, grid], 1)))


class DenseLayer(nn.Module):
    def __init__(self, c_in, bn_size, growth):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm1(x))))))
        return torch.cat([x, y], 1)


class Transition(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.norm = nn.BatchNorm2d(c_in)
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x):
        # tch's avg_pool2d_default passes divisor_override=1 (a 2x2 sum); mirrored here.
        return F.avg_pool2d(self.conv(F.relu(self.norm(x))), 2, divisor_override=1)


class DenseNet121(nn.Module):
    """Same structure and names as tch::vision::densenet::densenet121 (torchvision's layout)."""

    def __init__(self, out):
        super().__init__()
        features = nn.Module()
        features.conv0 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        features.norm0 = nn.BatchNorm2d(64)
        nfeat = 64
        self.blocks = []
        for i, nlayers in enumerate([6, 12, 24, 16]):
            block = nn.Module()
            for j in range(nlayers):
                setattr(block, f"denselayer{j + 1}", DenseLayer(nfeat + j * 32, 4, 32))
            setattr(features, f"denseblock{i + 1}", block)
            nfeat += nlayers * 32
            if i != 3:
                setattr(features, f"transition{i + 1}", Transition(nfeat, nfeat // 2))
                nfeat //= 2
        features.norm5 = nn.BatchNorm2d(nfeat)
        self.features = features
        self.classifier = nn.Linear(nfeat, out)

    def forward(self, x):
        f = self.features
        x = F.max_pool2d(F.relu(f.norm0(f.conv0(x))), 3, 2, 1)
        for i, nlayers in enumerate([6, 12, 24, 16]):
            block = getattr(f, f"denseblock{i + 1}")
            for j in range(nlayers):
                x = getattr(block, f"denselayer{j + 1}")(x)
            if i != 3:
                x = getattr(f, f"transition{i + 1}")(x)
        # tch's densenet passes divisor_override=1 to its final 7x7 pool too (a sum, not a
        # mean); the twin does the same so that both run the very same network.
        x = F.avg_pool2d(F.relu(f.norm5(x)), 7, 1, divisor_override=1).flatten(1)
        return self.classifier(x)


class DenseBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.densenet = DenseNet121(512)

    def forward(self, x):
        return F.relu(self.densenet(x.expand(-1, 3, -1, -1)))


class Net(nn.Module):
    def __init__(self, arch):
        super().__init__()
        if arch == "tiny":
            self.backbone, width = TinyBackbone(), 256
        elif arch == "densenet121":
            self.backbone, width = DenseBackbone(), 512
        else:
            raise SystemExit(f"no Python twin for {arch}")
        self.heads = nn.ModuleDict({name: nn.Linear(width, w) for name, w in SCHEMA_V1_WIDTHS})

    def forward(self, x):
        f = self.backbone(x)
        return torch.cat([self.heads[name](f) for name, _ in SCHEMA_V1_WIDTHS], 1)


def load_python_model(model_dir):
    card = json.load(open(os.path.join(model_dir, "card.json")))
    net = Net(card["architecture"]).eval()
    state = load_file(os.path.join(model_dir, card["weights"]))
    net.load_state_dict(state, strict=True)
    return net, card


def python_forward(model_dir, batch, repeats, images, reference):
    net, card = load_python_model(model_dir)
    size = card["input"]["size"]
    with torch.inference_mode():
        if reference:
            x = torch.linspace(-1, 1, size * size).view(1, 1, size, size)
            json.dump(net(x).flatten().tolist(), open(reference, "w"))
        xs = torch.randn(batch, 1, size, size)
        for _ in range(2):
            net(xs)
        n = max(1, -(-images // batch))
        rates = []
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(n):
                net(xs)
            rates.append(n * batch / (time.perf_counter() - t))
    return {"images_per_s": statistics.median(rates), "samples": rates, "threads": torch.get_num_threads()}


def python_batch_pipeline(model_dir, files, images, batch, workers, out_path):
    """The pipeline a CXR researcher writes (TorchXRayVision's process_batch.py pattern):
    pydicom + numpy + OpenCV decode and preprocess in a multiprocessing pool (the imaging
    benchmark's `opencv_pipeline`: de-identified facts, modality rescale, VOI window,
    MONOCHROME1, INTER_AREA to 224 with padding), batched torch inference with the same weights
    in the parent, each image's outputs written to a CSV file. It hashes nothing and stores
    nothing; the node does both."""
    import multiprocessing as mp

    from imaging import opencv_pipeline
    paths = [files[i % len(files)] for i in range(images)]
    # Forked workers, as a DataLoader's: they run no torch, only pydicom, numpy and OpenCV.
    with mp.get_context("fork").Pool(workers) as pool:
        pool.map(opencv_pipeline, files[:workers])  # warm the workers
        net, _ = load_python_model(model_dir)
        with torch.inference_mode():
            net(torch.zeros(batch, 1, 224, 224))
            start = time.perf_counter()
            with open(out_path, "w") as out:
                pending = []

                def flush():
                    x = torch.from_numpy(numpy.stack(pending)).unsqueeze(1)
                    for row in net(x).tolist():
                        out.write(",".join(f"{v:.6f}" for v in row) + "\n")
                    pending.clear()
                for image in pool.imap(opencv_pipeline, paths, chunksize=1):
                    pending.append(image)
                    if len(pending) == batch:
                        flush()
                if pending:
                    flush()
            seconds = time.perf_counter() - start
    return {"images_per_s": images / seconds, "seconds": seconds, "workers": workers}


def node_limit(bench, model_dir, files, images, batch, reduced="lossy"):
    """The same node's pipeline in process (no transport, no store): the ceiling."""
    return run_json([bench, "limit", "--model", model_dir, "--images", str(images), "--concurrency", "32",
                     "--max-batch", str(batch), "--max-wait-ms", "50", "--j2k-reduced-decode", reduced,
                     "--files", *files])


def proc_status_mib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def node_memory(cxrfed, bench, model_dir, files, images, batch):
    """A long ingest (`images` uploads of 12 MB files by 32 clients) with the node's resident
    set sampled every second: it must stay flat, whatever the number of files."""
    import threading
    node = Node(cxrfed, ["--model", model_dir, "--device", "cpu", "--max-batch", str(batch), "--max-wait-ms", "50",
                         "--inference-queue", "512", "--log-level", "warn"])
    samples, stop = [], threading.Event()

    def sample():
        while not stop.wait(1.0):
            samples.append(proc_status_mib(node.proc.pid, "VmRSS"))
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = run_json([bench, "node", "--url", node.url, "--images", str(images), "--clients", "32",
                           "--files", *files])
    finally:
        stop.set()
        sampler.join()
        peak = proc_status_mib(node.proc.pid, "VmHWM")
        node.stop()
    tenth = max(1, len(samples) // 10)
    return {"images": images, "images_per_s": result["images_per_s"], "peak_mib": peak,
            "first_tenth_mib": statistics.median(samples[:tenth]), "last_tenth_mib": statistics.median(samples[-tenth:]),
            "samples": len(samples)}


def node_throughput(cxrfed, bench, model_dir, files, clients, images, batch, reduced="lossy"):
    node = Node(cxrfed, ["--model", model_dir, "--device", "cpu", "--max-batch", str(batch), "--max-wait-ms", "50",
                         "--inference-queue", "512", "--j2k-reduced-decode", reduced, "--log-level", "warn"])
    try:
        return run_json([bench, "node", "--url", node.url, "--images", str(images),
                         "--clients", str(clients), "--files", *files])
    finally:
        node.stop()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bin", default="target/release/cxrfed-bench")
    p.add_argument("--cxrfed", default="target/release/cxrfed")
    p.add_argument("--out", default="docs/bench/model.md")
    p.add_argument("--tiny", default="models/tiny-phantom-v1")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--node-images", type=int, default=256)
    p.add_argument("--e2e-repeats", type=int, default=3)
    p.add_argument("--rss-images", type=int, default=10000, help="files of the long-ingest memory run (0: skip)")
    args = p.parse_args()

    work = tempfile.mkdtemp(prefix="cxrfed-bench-model-")
    dense = os.path.join(work, "densenet121")
    subprocess.run([args.bin, "model-init", "--arch", "densenet121", "--out", dense], check=True)
    models = [("tiny", args.tiny), ("densenet121", dense)]
    rows, checks = [], []
    pure = {}
    for name, model_dir in models:
        # Same weights, same outputs: compare the logits of a reference input.
        rust_ref, py_ref = os.path.join(work, f"{name}-rust.json"), os.path.join(work, f"{name}-py.json")
        for b in [int(x) for x in args.batches.split(",")]:
            images = 64 if name == "tiny" else 32 if b > 1 else 8
            rust = run_json([args.bin, "forward", "--model", model_dir, "--batch", str(b), "--repeats",
                             str(args.repeats), "--images", str(images), "--device", args.device,
                             *(["--reference", rust_ref] if b == 1 else [])])
            py = python_forward(model_dir, b, args.repeats, images, py_ref if b == 1 else None)
            rows.append((name, b, rust["images_per_s"], py["images_per_s"], rust["threads"], py["threads"]))
            pure[(name, b)] = rust["images_per_s"]
            print(f"{name} batch {b}: cxrfed {rust['images_per_s']:.1f}/s python {py['images_per_s']:.1f}/s", flush=True)
        a, b = json.load(open(rust_ref)), json.load(open(py_ref))
        diff = max(abs(x - y) for x, y in zip(a, b))
        checks.append((name, len(a), diff))
        if diff > 1e-3:
            raise SystemExit(f"{name}: Rust and Python outputs differ by {diff}")

    # End to end: phantoms through a real node (upload + decode + infer + store), once with
    # uncompressed files (decode is cheap: the share shows the serving overhead) and once with
    # JPEG 2000 (OpenJPEG decode dominates on 2 CPU cores that also run the model).
    e2e = []
    # JPEG 2000 twice: decoded in full (the default for lossless) and with `j2k_reduced_decode =
    # "all"` (only the resolution levels the 224 px input needs; identity from the codestream).
    for label, syntax, reduced in [("explicit LE", "explicit", "lossy"), ("JPEG 2000 lossless", "j2k", "lossy"),
                                   ("JPEG 2000 lossless, reduced decode", "j2k", "all")]:
        phantoms = os.path.join(work, f"phantoms-{syntax}")
        if not os.path.isdir(phantoms):
            subprocess.run([args.cxrfed, "phantom", "--out", phantoms, "--count", "16", "--seed", "3",
                            "--site", "university", "--transfer-syntax", syntax], check=True,
                           stdout=subprocess.DEVNULL)
        files = sorted(os.path.join(phantoms, f) for f in os.listdir(phantoms) if f.endswith(".dcm"))
        for name, model_dir in models:
            images = args.node_images if name == "tiny" else 64
            if syntax == "j2k" and reduced == "lossy":
                images = min(images, 48)
            # Interleaved repeats: the three measurements see the same machine noise.
            runs = {"node": [], "limit": [], "python": []}
            for _ in range(args.e2e_repeats):
                runs["node"].append(node_throughput(args.cxrfed, args.bin, model_dir, files, 32, images, 32,
                                                    reduced))
                runs["limit"].append(node_limit(args.bin, model_dir, files, images, 32, reduced))
                runs["python"].append(python_batch_pipeline(model_dir, files, min(images, 48) if syntax == "j2k"
                                                            else images, 32, os.cpu_count(),
                                                            os.path.join(work, "python-results.csv")))
            rate = {k: statistics.median(r["images_per_s"] for r in v) for k, v in runs.items()}
            client_share = statistics.median(r["client_share"] for r in runs["node"])
            refused = sum(r["refused"] for r in runs["node"])
            e2e.append((name, label, rate["node"], rate["limit"], rate["python"], pure[(name, 32)], refused,
                        client_share))
            print(f"{name} ({label}): node {rate['node']:.1f}/s, limit {rate['limit']:.1f}/s "
                  f"({rate['node'] / rate['limit']:.0%}), python pipeline {rate['python']:.1f}/s "
                  f"({rate['node'] / rate['python']:.2f}x)", flush=True)
        if syntax == "explicit" and args.rss_images:
            memory = node_memory(args.cxrfed, args.bin, args.tiny, files, args.rss_images, 32)
            print(f"memory over {args.rss_images} files: {memory}", flush=True)

    cpu = platform.processor() or platform.machine()
    with open(args.out, "w") as out:
        out.write("# Model benchmark: cxrfed (Rust, tch) vs PyTorch (Python)\n\n")
        out.write(f"Generated by `make bench-model` on {cpu}, {os.cpu_count()} cores, device {args.device}, "
                  f"torch {torch.__version__}. Medians of {args.repeats} repeats; the machine is shared "
                  "and noisy, so read ratios, not absolute numbers.\n\n")
        out.write("## Pure forward throughput (images/s, eval mode, no grad, same weights)\n\n")
        out.write("| model | batch | cxrfed | PyTorch | ratio | threads (Rust/Python) |\n|---|---:|---:|---:|---:|---|\n")
        for name, b, r, py, tr, tp in rows:
            out.write(f"| {name} | {b} | {r:.1f} | {py:.1f} | {r / py:.2f}x | {tr}/{tp} |\n")
        out.write("\nSame network check (logits of a reference input, Rust vs Python):\n\n")
        for name, n, diff in checks:
            out.write(f"- {name}: {n} logits, max abs difference {diff:.2e}\n")
        out.write("\n## Node end to end (32 concurrent clients, max batch 32)\n\n")
        out.write("Upload (gRPC `Extract`, 1 MiB chunks) + decode + de-identify + hash + preprocess + batched "
                  "inference + store of `university` phantoms (2048-2500 px, 12-bit), `force` so every upload "
                  "is processed. The client runs on the same cores as the node. Side by side, medians of "
                  f"{args.e2e_repeats} interleaved runs:\n\n"
                  "- **limit**: `cxrfed-bench limit`, the same node pipeline in process with the node's worker "
                  "settings (decode workers, batch, wait) on files already in memory: no transport, no store;\n"
                  "- **Python pipeline**: pydicom + numpy + OpenCV in a `multiprocessing` pool of one worker per "
                  "core, batched PyTorch inference (batch 32) of the same weights, outputs to a CSV file "
                  "(TorchXRayVision's `process_batch.py` pattern; no hash, no store);\n"
                  "- **reduced decode**: the node with `j2k_reduced_decode = \"all\"`, which decodes a JPEG 2000 "
                  "frame only down to the resolution level that still covers the 224 px input (OpenJPEG's reduce "
                  "factor: 1/8 for these files) and takes the record's identity from the codestream; the default "
                  "(`lossy`) decodes lossless JPEG 2000 in full, so that it de-duplicates against an uncompressed "
                  "copy.\n\n")
        out.write("| model | files | node images/s | limit images/s | node / limit | Python pipeline images/s "
                  "| node / Python | client CPU share | forward images/s (batch 32) | refused |\n"
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
        for name, label, node, limit, python, fwd, refused, client in e2e:
            out.write(f"| {name} | {label} | {node:.1f} | {limit:.1f} | {node / limit:.0%} | {python:.1f} "
                      f"| {node / python:.2f}x | {client:.0%} | {fwd:.1f} | {refused} |\n")
        out.write("\nClient CPU share: the benchmark client's CPU time over the timed window, as a share of "
                  "all cores. It encodes and sends every 12 MB file through the kernel's loopback on the cores "
                  "the node decodes on; a client on another machine would leave those cycles to the node.\n")
        if args.rss_images:
            m = memory
            out.write(f"\n## Memory over a long ingest ({m['images']} files)\n\n"
                      f"Tiny model, explicit LE phantoms, 32 clients, the node's resident set sampled every second "
                      f"({m['samples']} samples) at {m['images_per_s']:.1f} images/s:\n\n"
                      "| first tenth (median) | last tenth (median) | peak (VmHWM) |\n|---:|---:|---:|\n"
                      f"| {m['first_tenth_mib']:.0f} MiB | {m['last_tenth_mib']:.0f} MiB | {m['peak_mib']:.0f} MiB |\n")
    print(f"wrote {args.out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
