"""Writes a tiny TorchScript model for the bring-your-own-model test.

usage: make_torchscript.py OUT.pt WIDTH SIZE
The module maps [N, 1, SIZE, SIZE] to [N, WIDTH] logits (average pool + linear).
"""
import sys

import torch


class Tiny(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(8, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        x = torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def main() -> None:
    out, width, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.manual_seed(0)
    module = torch.jit.script(Tiny(width).eval())
    module.save(out)
    # A reference output for a fixed input, so the test can compare numbers, not just shapes.
    x = torch.linspace(-1, 1, size * size).view(1, 1, size, size)
    with torch.no_grad():
        y = module(x)
    print(",".join(f"{v:.6f}" for v in y.flatten().tolist()))


if __name__ == "__main__":
    main()
