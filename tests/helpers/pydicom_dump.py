#!/usr/bin/env python3
"""Dump pydicom's decoded pixel arrays (first frame, modality LUT applied) for every DICOM file
in pydicom's test data and the pydicom-data package, for cxrfed's decode conformance test.

Usage: pydicom_dump.py OUT_DIR

Writes OUT_DIR/manifest.json (one entry per file) and OUT_DIR/<n>.f64 (little-endian float64,
row-major, rows x columns) for every file pydicom could decode. Colour images are reduced to
BT.601 luma exactly as cxrfed does; monochrome images get pydicom's apply_rescale.
"""
import json
import os
import sys
import warnings

import numpy as np
import pydicom
import glob
from pydicom.pixels import apply_rescale

warnings.filterwarnings("ignore")


def main(out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    # Glob the installed directories: pydicom.data.get_testdata_files() would try to download
    # files that are not installed, and this machine (like CI) may have no network.
    roots = [os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")]
    try:
        import data_store  # the pydicom-data package

        roots.append(os.path.join(os.path.dirname(data_store.__file__), "data"))
    except ImportError:
        sys.exit("pydicom-data is not installed: run `make venv`")
    files = sorted(
        p for root in roots for p in glob.glob(os.path.join(root, "**", "*"), recursive=True)
        if os.path.isfile(p) and not p.endswith((".py", ".pyc", ".json", ".txt", ".gz", ".bz2", ".zip"))
    )
    manifest = []
    for n, path in enumerate(files):
        entry = {"path": path, "name": os.path.basename(path)}
        manifest.append(entry)
        try:
            ds = pydicom.dcmread(path)
        except Exception as e:  # not a Part 10 file, or broken on purpose
            entry["status"] = "unreadable"
            entry["error"] = type(e).__name__
            continue
        entry["transfer_syntax"] = str(getattr(ds.file_meta, "TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
        if "PixelData" not in ds:
            entry["status"] = "no_pixel_data"
            continue
        entry["rows"] = int(ds.get("Rows", 0))
        entry["columns"] = int(ds.get("Columns", 0))
        entry["samples_per_pixel"] = int(ds.get("SamplesPerPixel", 1))
        entry["bits_stored"] = int(ds.get("BitsStored", 0))
        entry["photometric"] = str(ds.get("PhotometricInterpretation", ""))
        try:
            arr = ds.pixel_array
        except Exception as e:
            entry["status"] = "pydicom_error"
            entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            continue
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        spp = entry["samples_per_pixel"]
        if frames > 1:
            arr = arr[0]
        if spp == 3:
            arr = arr.astype(np.float64)
            luma = 0.299 * arr[..., 0] + 0.587 * arr[..., 1] + 0.114 * arr[..., 2]
            top = 255 if arr.max() <= 255 and int(ds.BitsAllocated) == 8 else 65535
            out = np.clip(np.round(luma), 0, top)
        else:
            try:
                out = np.asarray(apply_rescale(arr, ds), dtype=np.float64)
            except Exception as e:
                entry["status"] = "pydicom_error"
                entry["error"] = f"apply_rescale: {type(e).__name__}"
                continue
            # A Modality LUT Sequence is a table, not a rescale; cxrfed applies rescale only.
            if "ModalityLUTSequence" in ds:
                entry["modality_lut_table"] = True
        if out.ndim != 2:
            entry["status"] = "unexpected_shape"
            entry["error"] = str(out.shape)
            continue
        out = np.ascontiguousarray(out, dtype="<f8")
        out.tofile(os.path.join(out_dir, f"{n}.f64"))
        entry["status"] = "ok"
        entry["array"] = f"{n}.f64"
        entry["shape"] = list(out.shape)
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"{len(manifest)} files, {sum(e.get('status') == 'ok' for e in manifest)} decoded by pydicom")


if __name__ == "__main__":
    main(sys.argv[1])
