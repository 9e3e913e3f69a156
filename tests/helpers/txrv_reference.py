"""TorchXRayVision's side of the import tests: checkpoints made the way TXRV publishes them,
and TXRV's own pipeline on files, for the node's outputs to be compared with.

    txrv_reference.py densenet OUT.pt SEED [--op-threshs]
        A seeded random xrv.models.DenseNet(weights=None), saved whole with torch.save (as
        the densenet121-res224-* files are). Its classifier is rescaled so that its logits on
        the calibration images (the files after `--`) have unit spread: a random network's
        probabilities would otherwise sit at 0 or 1 and compare trivially. With
        --op-threshs it carries operating points, one of them NaN (TXRV's "untrained").
    txrv_reference.py resnet OUT.pt SEED
        torchvision's ResNet-50 with TXRV's one-channel conv1, its state dict saved (as
        resnet50-res512-all is), rescaled the same way.
    txrv_reference.py predict [--cv2] KIND CHECKPOINT FILE...
        TXRV's pipeline: xrv.utils.load_image (read_xray_dcm for DICOM, imread + normalize(255)
        otherwise), XRayCenterCrop, XRayResizer(resolution), the model's forward (sigmoid,
        then op_norm when it has operating points). Prints {file: {target: probability}}.
        --cv2 resizes with TXRV's other engine (cv2 INTER_AREA), for a near miss.
    txrv_reference.py tensor SIZE OUT_DIR FILE...
        TXRV's model input for each file (load_image, XRayCenterCrop, XRayResizer(SIZE)) as
        raw little-endian f32, OUT_DIR/<index>.f32.
    txrv_reference.py png DICOM OUT.png|OUT.jpg
        An 8-bit grayscale PNG (or JPEG, quality 90) of a DICOM (stored values scaled to 0-255, MONOCHROME1
        flipped): a real radiograph as a picture.
"""

import json
import sys

import numpy as np
import torch
import torchvision
import torchxrayvision as xrv


def load(kind, path):
    """A model ready for TXRV's forward."""
    if kind == "densenet":
        model = torch.load(path, map_location="cpu", weights_only=False)
        resolution = 224
    else:
        model = xrv.models.ResNet.__new__(xrv.models.ResNet)
        torch.nn.Module.__init__(model)
        model.model = resnet50()
        model.model.load_state_dict(torch.load(path, map_location="cpu"))
        model.weights = "resnet50-res512-all"
        model.targets = list(xrv.datasets.default_pathologies)
        resolution = model.input_resolution = 512
    model.apply_sigmoid = True
    model.eval()
    return model, resolution


def resnet50():
    net = torchvision.models.resnet50(num_classes=18, weights=None)
    net.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return net


def inputs(files, resolution, engine="skimage"):
    transform = torchvision.transforms.Compose(
        [xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(resolution, engine=engine)]
    )
    return torch.stack([torch.from_numpy(transform(xrv.utils.load_image(f))) for f in files])


def rescale(linear, features):
    """Logits on `features` ([N, F]) spread over about [-2, 2] across the outputs."""
    with torch.no_grad():
        logits = features @ linear.weight.T
        spread = logits.std().clamp(min=1e-6)
        linear.weight /= spread
        linear.bias.copy_(-(logits.mean() / spread) + torch.randn(linear.bias.shape))


def make(kind, out, seed, files, op_threshs):
    torch.manual_seed(seed)
    if kind == "densenet":
        thresholds = None
        if op_threshs:
            thresholds = torch.linspace(0.2, 0.6, 18)
            thresholds[13] = float("nan")
        model = xrv.models.DenseNet(weights=None, op_threshs=thresholds)
        model.eval()
        with torch.no_grad():
            features = model.features2(inputs(files, 224))
        rescale(model.classifier, features)
        torch.save(model, out)
    else:
        net = resnet50()
        net.eval()
        with torch.no_grad():
            x = inputs(files, 512)
            trunk = torch.nn.Sequential(*list(net.children())[:-1])
            features = torch.flatten(trunk(x), 1)
        rescale(net.fc, features)
        torch.save(net.state_dict(), out)


def predict(kind, path, files, engine):
    model, resolution = load(kind, path)
    with torch.no_grad():
        out = model(inputs(files, resolution, engine))
    targets = list(model.targets)
    print(json.dumps({f: dict(zip(targets, row.tolist())) for f, row in zip(files, out)}))


def png(dicom, out):
    import pydicom
    import skimage.io

    ds = pydicom.dcmread(dicom)
    data = ds.pixel_array.astype(np.float64)
    top = 2 ** ds.BitsStored - 1
    if ds.PhotometricInterpretation == "MONOCHROME1":
        data = top - data
    pixels = np.round(data / top * 255).astype(np.uint8)
    if out.endswith(".jpg"):
        import imageio.v3 as iio
        iio.imwrite(out, pixels, quality=90)
    else:
        skimage.io.imsave(out, pixels, check_contrast=False)


def main(argv):
    command = argv[0]
    if command in ("densenet", "resnet"):
        rest = argv[1:]
        files = rest[rest.index("--") + 1:] if "--" in rest else []
        flags = rest[: rest.index("--")] if "--" in rest else rest
        make(command, flags[0], int(flags[1]), files, "--op-threshs" in flags)
    elif command == "predict":
        engine = "skimage"
        if argv[1] == "--cv2":
            engine, argv = "cv2", argv[1:]
        predict(argv[1], argv[2], argv[3:], engine)
    elif command == "tensor":
        size, out = int(argv[1]), argv[2]
        for i, f in enumerate(argv[3:]):
            x = inputs([f], size)[0, 0].numpy().astype("<f4")
            x.tofile(f"{out}/{i}.f32")
    elif command == "png":
        png(argv[1], argv[2])
    else:
        sys.exit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
