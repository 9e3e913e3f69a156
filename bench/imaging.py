#!/usr/bin/env python3
"""Imaging benchmark: cxrfed vs the Python pipelines a hospital team would write, side by side.

Each pipeline does the same work per image: read the file, decode the pixels, de-identify
(age band, sex, view, month, HMAC pseudonym of PatientID), apply the modality LUT and the VOI
window, invert MONOCHROME1, resize anti-aliased to 224 keeping the aspect (pad), normalise.
cxrfed additionally hashes the decoded pixels (SHA-256), which the peers skip.

Peers:
  opencv  - pydicom + numpy windowing + OpenCV INTER_AREA (the fastest common Python pipeline)
  skimage - pydicom apply_modality_lut/apply_voi_lut + scikit-image anti-aliased resize (the
            seed articles' style)

Every measurement runs in a fresh process (so peak RSS is per pipeline and per image), latency
on one thread, throughput with one worker per core (threads for cxrfed, processes for Python).

Usage: bench/imaging.py --bin target/release/cxrfed-bench --out docs/bench/imaging.md
"""
import argparse
import datetime
import hashlib
import hmac
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

SIZE = 224
SECRET = bytes([42] * 32)


# ---------------------------------------------------------------------------------------------
# The Python pipelines (imported lazily so the harness itself starts fast).

def deidentify(ds):
    """The same facts cxrfed keeps: age band, sex, view, month, keyed pseudonym."""
    def da(v):
        v = str(v or "").strip()
        return (int(v[:4]), int(v[4:6]), int(v[6:8])) if len(v) >= 8 and v[:8].isdigit() else None
    age = None
    pa = str(ds.get("PatientAge", "") or "")
    if len(pa) == 4 and pa[:3].isdigit():
        age = int(pa[:3]) // {"Y": 1, "M": 12, "W": 52, "D": 365}.get(pa[3], 1)
    birth, study = da(ds.get("PatientBirthDate")), da(ds.get("StudyDate") or ds.get("AcquisitionDate"))
    if age is None and birth and study:
        age = study[0] - birth[0] - ((study[1], study[2]) < (birth[1], birth[2]))
    acq = da(ds.get("AcquisitionDate") or ds.get("StudyDate"))
    pid = str(ds.get("PatientID", "") or "").strip()
    return {
        "age_group": f"{age // 10 * 10}-{age // 10 * 10 + 9}" if age is not None else "",
        "sex": str(ds.get("PatientSex", "") or ""),
        "view": str(ds.get("ViewPosition", "") or ""),
        "month": f"{acq[0]:04d}-{acq[1]:02d}" if acq else "",
        "pseudonym": hmac.new(SECRET, b"cxrfed-patient-v1\0" + pid.encode(), hashlib.sha256).hexdigest() if pid else "",
    }


def _first(v):
    try:
        return float(v[0])
    except TypeError:
        return float(v)


def pad_place(resized, np):
    out = np.zeros((SIZE, SIZE), np.float32)
    h, w = resized.shape
    r0, c0 = (SIZE - h) // 2, (SIZE - w) // 2
    out[r0:r0 + h, c0:c0 + w] = resized
    return (out - 0.5) / 0.25


def target_shape(h, w):
    return (SIZE, max(1, round(w * SIZE / h))) if h >= w else (max(1, round(h * SIZE / w)), SIZE)


def opencv_pipeline(path):
    import cv2
    import numpy as np
    import pydicom
    ds = pydicom.dcmread(path)
    deidentify(ds)
    img = ds.pixel_array.astype(np.float32)
    img = img * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        c, w = _first(ds.WindowCenter), _first(ds.WindowWidth)
        lo, hi = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
    else:
        lo, hi = np.percentile(img, [0.5, 99.5])
    img = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        img = 1.0 - img
    h, w = img.shape
    th, tw = target_shape(h, w)
    return pad_place(cv2.resize(img, (tw, th), interpolation=cv2.INTER_AREA), np)


def skimage_pipeline(path):
    import numpy as np
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
    from skimage.transform import resize
    ds = pydicom.dcmread(path)
    deidentify(ds)
    img = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float32)
    lo, hi = float(img.min()), float(img.max())
    img = (img - lo) / max(hi - lo, 1e-6)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        img = 1.0 - img
    h, w = img.shape
    return pad_place(resize(img, target_shape(h, w), anti_aliasing=True).astype(np.float32), np)


PIPELINES = {"opencv": opencv_pipeline, "skimage": skimage_pipeline}


def rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _pool_worker(args):
    name, path = args
    PIPELINES[name](path)
    return rss_mib()


def worker(args):
    """Runs one measurement of one Python pipeline in this (fresh) process; prints JSON."""
    import numpy as np  # noqa: F401  (imported before the baseline, like a real service)
    import cv2  # noqa: F401
    import pydicom  # noqa: F401
    import skimage.transform  # noqa: F401
    fn = PIPELINES[args.worker]
    baseline = rss_mib()
    out = fn(args.file)  # warm-up
    if args.mode == "latency":
        times = []
        for _ in range(args.iterations):
            t = time.perf_counter()
            out = fn(args.file)
            times.append((time.perf_counter() - t) * 1000)
        if args.dump:
            np.ascontiguousarray(out, dtype="<f4").tofile(args.dump)
        times.sort()
        q = lambda p: times[round((len(times) - 1) * p)]  # noqa: E731
        print(json.dumps({"median_ms": q(0.5), "p10_ms": q(0.1), "p90_ms": q(0.9),
                          "peak_rss_mib": rss_mib(), "baseline_rss_mib": baseline}))
    else:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(args.workers) as pool:
            pool.map(_pool_worker, [(args.worker, args.file)] * args.workers)  # warm the pool
            t = time.perf_counter()
            peaks = pool.map(_pool_worker, [(args.worker, args.file)] * args.images, chunksize=1)
            seconds = time.perf_counter() - t
        print(json.dumps({"images_per_s": args.images / seconds, "seconds": seconds,
                          "peak_rss_mib": max(peaks), "baseline_rss_mib": baseline}))


# ---------------------------------------------------------------------------------------------
# The harness.

def make_2048(path):
    import numpy as np
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:2048, 0:2048]
    img = (20000 + 15000 * np.sin(x / 300.0) * np.cos(y / 400.0) + rng.normal(0, 800, (2048, 2048)))
    img = np.clip(img, 0, 65535).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Bench^Patient", "BENCH-1", "19500101", "M"
    ds.StudyDate, ds.Modality, ds.ViewPosition = "20240301", "DX", "PA"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 2048, 2048, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.WindowCenter, ds.WindowWidth = 20000, 40000
    ds.PixelData = img.tobytes()
    ds.save_as(path, enforce_file_format=True)


def run_json(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def harness(args):
    import numpy as np
    import data_store
    rg1 = os.path.join(os.path.dirname(data_store.__file__), "data")
    tmp = tempfile.mkdtemp(prefix="cxrfed-bench-")
    big = os.path.join(tmp, "synthetic_2048x2048_16bit.dcm")
    make_2048(big)
    images = [
        ("RG1 uncompressed (1955x1841, 15-bit, MONOCHROME1)", os.path.join(rg1, "RG1_UNCI.dcm")),
        ("RG1 JPEG 2000 lossless", os.path.join(rg1, "RG1_J2KR.dcm")),
        ("2048x2048 16-bit uncompressed", big),
    ]
    me = os.path.abspath(__file__)
    results = []
    for label, path in images:
        row = {"image": label}
        for name in ["cxrfed", "opencv", "skimage"]:
            dump = os.path.join(tmp, f"{name}.f32")
            if name == "cxrfed":
                lat = run_json([args.bin, "latency", "--file", path, "--iterations", str(args.iterations), "--dump", dump])
                thr_cmd = [args.bin, "throughput", "--file", path, "--images", str(args.images), "--workers", "2"]
            else:
                base = [sys.executable, me, "--worker", name, "--file", path]
                lat = run_json(base + ["--mode", "latency", "--iterations", str(args.iterations), "--dump", dump])
                thr_cmd = base + ["--mode", "throughput", "--images", str(args.images), "--workers", "2"]
            # Throughput runs are noisy on shared machines: the median of several runs, with the range.
            runs = sorted(run_json(thr_cmd)["images_per_s"] for _ in range(args.repeats))
            thr = {"images_per_s": statistics.median(runs), "min": runs[0], "max": runs[-1]}
            row[name] = {"latency": lat, "throughput": thr, "output": np.fromfile(dump, "<f4")}
            print(f"{label:55s} {name:8s} median {lat['median_ms']:8.1f} ms  "
                  f"{thr['images_per_s']:6.1f} img/s  peak {lat['peak_rss_mib']:7.1f} MiB", file=sys.stderr)
        results.append(row)
    write_table(args, results)


def write_table(args, results):
    lines = [
        "# Imaging benchmark: decode + de-identify + preprocess to the 224x224 model input",
        "",
        f"Generated by `make bench` (`bench/imaging.py`) on {datetime.date.today().isoformat()}, "
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}. "
        "The machines are shared and noisy: read medians and ratios, not absolute numbers.",
        "",
        "Per image, every pipeline reads the file, decodes it, derives the de-identified facts "
        "(age band, sex, view, month, HMAC pseudonym), applies the modality LUT and VOI window, "
        "inverts MONOCHROME1 and resizes anti-aliased to 224 with padding. cxrfed also hashes "
        "the decoded pixels (SHA-256). Peers: **OpenCV** = pydicom + numpy windowing + OpenCV "
        "`INTER_AREA`; **seed-style** = pydicom `apply_modality_lut`/`apply_voi_lut` + "
        "scikit-image `resize(anti_aliasing=True)`. JPEG 2000 is decoded by OpenJPEG on both "
        "sides (OpenJPEG 2.5 via openjpeg-sys with its thread pool in cxrfed, pylibjpeg-openjpeg "
        "for pydicom), which is ~98% of the time for that image: multi-threaded decoding cuts "
        "cxrfed's single-image latency, while two-core throughput is bound by the same C code on "
        "both sides.",
        "",
        f"Latency: median (p10-p90) of {args.iterations} runs on one thread after a warm-up. "
        f"Throughput: {args.images} images with 2 workers (threads for cxrfed, a process pool "
        f"for Python); median (min-max) of {args.repeats} runs. Peak RSS: VmHWM of the latency process (Python's includes its imports; "
        "the baseline before the first image is in parentheses). Max |diff| compares each peer's "
        "model input with cxrfed's.",
        "",
        "| image | pipeline | latency ms | throughput img/s (2 cores) | peak RSS MiB | cxrfed throughput ratio | max abs diff vs cxrfed |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    names = {"cxrfed": "cxrfed", "opencv": "pydicom + OpenCV", "skimage": "pydicom + scikit-image (seed)"}
    summary = []
    for row in results:
        ours = row["cxrfed"]["throughput"]["images_per_s"]
        for name in ["cxrfed", "opencv", "skimage"]:
            r = row[name]
            lat, thr = r["latency"], r["throughput"]
            ratio = "1.00x" if name == "cxrfed" else f"{ours / thr['images_per_s']:.2f}x"
            diff = float(abs(r["output"] - row["cxrfed"]["output"]).max()) if r["output"].shape == row["cxrfed"]["output"].shape else float("nan")
            lines.append(
                f"| {row['image']} | {names[name]} | {lat['median_ms']:.1f} ({lat['p10_ms']:.1f}-{lat['p90_ms']:.1f}) "
                f"| {thr['images_per_s']:.1f} ({thr['min']:.1f}-{thr['max']:.1f}) | {lat['peak_rss_mib']:.0f} ({lat['baseline_rss_mib']:.0f}) | {ratio} "
                f"| {'-' if name == 'cxrfed' else f'{diff:.3f}'} |"
            )
        summary.append((row["image"], ours / row["opencv"]["throughput"]["images_per_s"],
                        row["opencv"]["latency"]["median_ms"] / row["cxrfed"]["latency"]["median_ms"]))
    lines += ["", "Summary against the OpenCV pipeline (target: >= 2x throughput on uncompressed input, "
              "no slower on JPEG 2000):", ""]
    for image, thr_ratio, lat_ratio in summary:
        lines.append(f"- {image}: throughput {thr_ratio:.2f}x, latency {lat_ratio:.2f}x faster")
    lines.append("")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", default="target/release/cxrfed-bench")
    p.add_argument("--out", default="docs/bench/imaging.md")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--images", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker", choices=sorted(PIPELINES))
    p.add_argument("--file")
    p.add_argument("--mode", choices=["latency", "throughput"])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--dump")
    args = p.parse_args()
    if args.worker:
        worker(args)
    else:
        harness(args)


if __name__ == "__main__":
    main()
