"""The Flower side of the training benchmark (bench/training.py): a Flower server with a timed
FedAvg strategy, and PyTorch clients that train the same model on the same data as cxrfed's
nodes — the bundled tiny network plus a zero-initialised `cardiomegaly` head, backbone frozen
(forward in train mode, frozen state restored after training, as cxrfed does), Adam, BCE.

    python bench/flower_app.py server --port P --rounds R --out result.json --base DIR
    python bench/flower_app.py client --port P --data DIR --epochs E --batch 8 --lr 0.02 --seed S

A site's data directory holds `inputs.u8` and `index.json` from `cxrfed-bench inputs` (the
node's own preprocessing) and `labels.json` (cardiomegaly and held-out flags per file).
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from model import Net  # noqa: E402  (the tiny network with cxrfed's parameter names)

import flwr as fl  # noqa: E402
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays  # noqa: E402

HEAD = "cardiomegaly"


class FedNet(Net):
    """The bundled network plus one binary head for the custom field."""

    def __init__(self):
        super().__init__("tiny")
        self.heads[HEAD] = nn.Linear(256, 1)

    def new_head_logit(self, x):
        return self.heads[HEAD](self.backbone(x)).squeeze(1)


def base_state(base_dir):
    from safetensors.torch import load_file
    card = json.load(open(os.path.join(base_dir, "card.json")))
    state = load_file(os.path.join(base_dir, card["weights"]))
    state[f"heads.{HEAD}.weight"] = torch.zeros(1, 256)
    state[f"heads.{HEAD}.bias"] = torch.zeros(1)
    return state


def names(net):
    return list(net.state_dict().keys())


def to_ndarrays(net):
    return [v.detach().cpu().numpy() for v in net.state_dict().values()]


def load_ndarrays(net, arrays):
    state = {k: torch.from_numpy(np.array(a)) for k, a in zip(names(net), arrays)}
    net.load_state_dict(state, strict=True)


def nbytes(arrays):
    return int(sum(a.nbytes for a in arrays))


def load_site(data_dir):
    index = json.load(open(os.path.join(data_dir, "index.json")))
    labels = json.load(open(os.path.join(data_dir, "labels.json")))
    size = index["size"]
    raw = np.fromfile(os.path.join(data_dir, "inputs.u8"), dtype=np.uint8)
    images = raw.reshape(len(index["files"]), 1, size, size).astype(np.float32) / 255.0
    images = (images - 0.5) / 0.25
    y = np.array([labels[f]["cardiomegaly"] for f in index["files"]], dtype=np.float32)
    held = np.array([labels[f]["held_out"] for f in index["files"]], dtype=bool)
    return (torch.from_numpy(images[~held]), torch.from_numpy(y[~held]),
            torch.from_numpy(images[held]), torch.from_numpy(y[held]))


def auroc(scores, labels):
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater) / (len(pos) * len(neg))


def evaluate(net, x, y):
    net.eval()
    with torch.no_grad():
        p = torch.sigmoid(net.new_head_logit(x)).numpy()
    y = y.numpy()
    return {"accuracy": float(((p > 0.5) == (y > 0.5)).mean()), "auroc": auroc(p, y), "n": len(y)}


def train_head(net, x, y, epochs, batch, lr, seed):
    """cxrfed's local step: train-mode forward, only the new head's parameters optimised (Adam,
    no weight decay), batches of fewer than two skipped, frozen state restored afterwards."""
    frozen = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith(f"heads.{HEAD}.")}
    params = list(net.heads[HEAD].parameters())
    for name, p in net.named_parameters():
        p.requires_grad_(name.startswith(f"heads.{HEAD}."))
    opt = torch.optim.Adam(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        total, batches = 0.0, 0
        for i in range(0, len(order), batch):
            ids = order[i:i + batch]
            if len(ids) < 2:
                continue
            loss = F.binary_cross_entropy_with_logits(net.new_head_logit(x[ids]), y[ids])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach())
            batches += 1
        losses.append(total / max(batches, 1))
    state = net.state_dict()
    state.update(frozen)
    net.load_state_dict(state)
    return losses[-1]


class Client(fl.client.NumPyClient):
    def __init__(self, args):
        # Three clients share the machine's cores: one intra-op thread each is PyTorch's
        # fastest setting here (the default, one per core, was several times slower with
        # three processes on two cores).
        torch.set_num_threads(args.threads)
        self.args = args
        self.net = FedNet()
        self.x, self.y, self.hx, self.hy = load_site(args.data)

    def get_parameters(self, config):
        return to_ndarrays(self.net)

    def fit(self, parameters, config):
        start = time.perf_counter()
        load_ndarrays(self.net, parameters)
        loss = train_head(self.net, self.x, self.y, self.args.epochs, self.args.batch, self.args.lr,
                          self.args.seed + int(config.get("round", 0)))
        seconds = time.perf_counter() - start
        return to_ndarrays(self.net), len(self.y), {"loss": loss, "local_seconds": seconds}

    def evaluate(self, parameters, config):
        start = time.perf_counter()
        load_ndarrays(self.net, parameters)
        m = evaluate(self.net, self.hx, self.hy)
        m["local_seconds"] = time.perf_counter() - start
        return 0.0, int(m["n"]), {k: float(v) for k, v in m.items()}


class Timed(fl.server.strategy.FedAvg):
    """FedAvg that records, per round, the wall time of the fit and evaluate phases, the
    clients' local seconds, the parameter bytes sent each way and the pooled metrics."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.rounds = {}

    def _r(self, server_round):
        return self.rounds.setdefault(server_round, {"bytes_down": 0, "bytes_up": 0})

    def configure_fit(self, server_round, parameters, client_manager):
        out = super().configure_fit(server_round, parameters, client_manager)
        r = self._r(server_round)
        r["fit_start"] = time.perf_counter()
        r["bytes_down"] += nbytes(parameters_to_ndarrays(parameters)) * len(out)
        for _, ins in out:
            ins.config["round"] = server_round
        return out

    def aggregate_fit(self, server_round, results, failures):
        r = self._r(server_round)
        out = super().aggregate_fit(server_round, results, failures)
        r["fit_seconds"] = time.perf_counter() - r["fit_start"]
        r["fit_local_max"] = max(res.metrics["local_seconds"] for _, res in results)
        r["bytes_up"] += sum(nbytes(parameters_to_ndarrays(res.parameters)) for _, res in results)
        r["sites"] = len(results)
        return out

    def configure_evaluate(self, server_round, parameters, client_manager):
        out = super().configure_evaluate(server_round, parameters, client_manager)
        r = self._r(server_round)
        r["eval_start"] = time.perf_counter()
        r["bytes_down"] += nbytes(parameters_to_ndarrays(parameters)) * len(out)
        return out

    def aggregate_evaluate(self, server_round, results, failures):
        r = self._r(server_round)
        out = super().aggregate_evaluate(server_round, results, failures)
        r["eval_seconds"] = time.perf_counter() - r["eval_start"]
        r["eval_local_max"] = max(res.metrics["local_seconds"] for _, res in results)
        n = sum(res.num_examples for _, res in results)
        for key in ("accuracy", "auroc"):
            r[key] = sum(res.metrics[key] * res.num_examples for _, res in results) / max(n, 1)
        r["held_out"] = n
        return out


def server(args):
    net = FedNet()
    net.load_state_dict(base_state(args.base), strict=True)
    strategy = Timed(
        fraction_fit=1.0, fraction_evaluate=1.0, min_fit_clients=args.sites,
        min_evaluate_clients=args.sites, min_available_clients=args.sites,
        initial_parameters=ndarrays_to_parameters(to_ndarrays(net)),
    )
    start = time.perf_counter()
    fl.server.start_server(server_address=f"127.0.0.1:{args.port}",
                           config=fl.server.ServerConfig(num_rounds=args.rounds), strategy=strategy)
    total = time.perf_counter() - start
    json.dump({"rounds": strategy.rounds, "total_seconds": total}, open(args.out, "w"))


def client(args):
    fl.client.start_client(server_address=f"127.0.0.1:{args.port}", client=Client(args).to_client(),
                           insecure=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=["server", "client"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--base")
    p.add_argument("--out")
    p.add_argument("--data")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    (server if args.role == "server" else client)(args)


if __name__ == "__main__":
    main()
