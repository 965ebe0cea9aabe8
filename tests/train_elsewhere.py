"""A classifier trained the way a user's own code would train it: plain PyTorch and torchvision, no valley.

    python tests/train_elsewhere.py FASHION_MNIST_DIR OUT.pt IMAGES EPOCHS

Reads the last IMAGES Fashion-MNIST training images from the IDX files, trains torchvision's
resnet18 on them (grey copied to three channels, normalised with the dataset's mean and std) and
saves a checkpoint dict holding `model_state_dict`, as PyTorch's tutorials do.
"""

from __future__ import annotations

import gzip
import sys

import numpy as np
import torch
import torchvision


def read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    array: np.ndarray = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)
    return array


def main() -> None:
    folder, out, count, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    images = torch.from_numpy(read_idx(f"{folder}/train-images-idx3-ubyte.gz")[-count:].copy()).float()[:, None]
    labels = torch.from_numpy(read_idx(f"{folder}/train-labels-idx1-ubyte.gz")[-count:].astype(np.int64))
    images = ((images / 255 - 0.2860) / 0.3530).repeat(1, 3, 1, 1)
    torch.manual_seed(0)
    network = torchvision.models.resnet18(num_classes=10)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for epoch in range(epochs):
        order = torch.randperm(len(labels))
        for start in range(0, len(labels), 64):
            batch = order[start:start + 64]
            loss = torch.nn.functional.cross_entropy(network(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}", flush=True)
    torch.save({"epoch": epochs, "model_state_dict": network.state_dict(), "optimizer": optimizer.state_dict()}, out)


if __name__ == "__main__":
    main()
