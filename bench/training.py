"""Federated training benchmark: cxrfed against Flower (PyPI `flwr`, PyTorch clients), side by
side on the same model, data split, number of sites, rounds and local epochs, on loopback; and
centralised PyTorch training on the pooled data as the accuracy reference.

The task: a new binary head for a researcher-defined field (cardiomegaly: cardiothoracic ratio
above 0.5) on the bundled tiny network, backbone frozen, FedAvg, three non-IID phantom sites
(university, community, icu profiles). cxrfed runs as real processes: a coordinator and three
nodes with mutual TLS, the sites' images ingested and labelled through the CLI. Flower runs a
server and three client processes (no TLS) whose inputs are the nodes' own preprocessed inputs
(`cxrfed-bench inputs`), split into training and held-out records by the same image-hash rule.

Writes docs/bench/training.md.

    python bench/training.py --cxrfed target/release/cxrfed --bin target/release/cxrfed-bench \
        --flower-path .cxrfed/flower
"""
import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from common import free_port, run

SITES = [("site-a", "university", 201), ("site-b", "community", 202), ("site-c", "icu", 203)]


def held_out(sha):
    return int(sha[:2], 16) < 52


def cli(cxrfed, *args, **kw):
    return subprocess.run([cxrfed, *args], check=True, capture_output=True, text=True, **kw).stdout


def make_sites(cxrfed, bench, root, count):
    """Phantoms per site, their cardiomegaly labels (CSV for cxrfed, JSON for Flower) and the
    node's preprocessed inputs."""
    for site, profile, seed in SITES:
        d = os.path.join(root, f"phantoms-{site}")
        cli(cxrfed, "phantom", "--out", d, "--site", profile, "--count", str(count), "--seed", str(seed),
            "--max-size", "256")
        rows = list(csv.DictReader(open(os.path.join(d, "labels.csv"), newline="")))
        with open(os.path.join(d, "cardiomegaly.csv"), "w", newline="") as out:
            w = csv.writer(out)
            w.writerow(["image_sha256", "cardiomegaly"])
            for r in rows:
                w.writerow([r["image_sha256"], str(float(r["cardiothoracic_ratio"]) > 0.5).lower()])
        flower = os.path.join(root, f"flower-{site}")
        run([bench, "inputs", "--folder", d, "--out", flower])
        labels = {r["file"]: {"cardiomegaly": float(float(r["cardiothoracic_ratio"]) > 0.5),
                              "held_out": held_out(r["image_sha256"])} for r in rows}
        json.dump(labels, open(os.path.join(flower, "labels.json"), "w"))


def run_cxrfed(cxrfed, data, args, tag, extra):
    """One cxrfed job (a fresh coordinator, three nodes and PKI under DATA/TAG) with the job
    settings EXTRA on top of the common ones."""
    root = os.path.join(data, tag)
    os.makedirs(root)
    pki = os.path.join(root, "pki")
    cli(cxrfed, "certs", "init", "--out", f"{pki}/ca", "--study", "bench-training", "--days", "2")
    cli(cxrfed, "certs", "issue", "--ca", f"{pki}/ca", "--role", "coordinator", "--name", "coordinator",
        "--out", f"{pki}/coordinator")
    cli(cxrfed, "certs", "issue", "--ca", f"{pki}/ca", "--role", "study-admin", "--name", "study-admin",
        "--out", f"{pki}/study-admin")
    cport = free_port()
    coordinator = f"https://127.0.0.1:{cport}"
    procs = [subprocess.Popen([cxrfed, "coordinator", "serve", "--data-dir", f"{root}/coordinator",
                               "--listen", f"127.0.0.1:{cport}", "--ca", f"{pki}/ca/ca.pem",
                               "--cert", f"{pki}/coordinator/cert.pem", "--key", f"{pki}/coordinator/key.pem",
                               "--heartbeat-secs", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for site, _, _ in SITES:
            cli(cxrfed, "certs", "issue", "--ca", f"{pki}/ca", "--role", "node", "--name", f"node-{site}",
                "--site", site, "--out", f"{pki}/node-{site}")
            cli(cxrfed, "certs", "issue", "--ca", f"{pki}/ca", "--role", "admin", "--name", f"admin-{site}",
                "--site", site, "--out", f"{pki}/admin-{site}")
            port = free_port()
            procs.append(subprocess.Popen(
                [cxrfed, "node", "serve", "--data-dir", f"{root}/{site}", "--listen", f"127.0.0.1:{port}",
                 "--ca", f"{pki}/ca/ca.pem", "--cert", f"{pki}/node-{site}/cert.pem",
                 "--key", f"{pki}/node-{site}/key.pem", "--coordinator", coordinator, "--log-level", "warn"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            node = ["--node", f"https://127.0.0.1:{port}", "--profile", f"{pki}/admin-{site}/profile.toml"]
            d = os.path.join(data, f"phantoms-{site}")
            for _ in range(200):
                try:
                    cli(cxrfed, "ingest", d, *node, "--state", f"{root}/ingest-{site}.jsonl",
                        "--report", f"{root}/rejects-{site}.jsonl")
                    break
                except subprocess.CalledProcessError:
                    time.sleep(0.1)
            cli(cxrfed, "field", "define", "cardiomegaly", "--type", "bool", *node)
            cli(cxrfed, "annotate", "import", os.path.join(d, "cardiomegaly.csv"), *node)
            # Training is off until the site admin opts in.
            cli(cxrfed, "node", "training-policy", "set", "enabled=true", "min_local_steps=1", "min_held_out=1",
                "max_metrics_epsilon=10", "--data-dir", f"{root}/{site}",
                "--profile", f"{pki}/admin-{site}/profile.toml")
            cli(cxrfed, "node", "budget", "set", "--identity", "training", "--epsilon", "1000", "--delta", "0.5",
                "--data-dir", f"{root}/{site}", "--profile", f"{pki}/admin-{site}/profile.toml")
        admin = ["--coordinator", coordinator, "--profile", f"{pki}/study-admin/profile.toml"]
        for _ in range(300):
            sites = json.loads(cli(cxrfed, "coordinator", "sites", "--json", *admin))
            if sum(s["connected"] for s in sites) == len(SITES):
                break
            time.sleep(0.2)
        job = os.path.join(root, "job.toml")
        with open(job, "w") as f:
            f.write(f'new_heads = [{{ name = "cardiomegaly", kind = "binary" }}]\ntrainable = "heads"\n'
                    f'algorithm = "fedavg"\nrounds = {args.rounds}\nlocal_epochs = {args.epochs}\n'
                    f'batch_size = {args.batch}\nlearning_rate = {args.lr}\nmin_sites = 3\n'
                    'round_deadline_secs = 900\nmetrics_epsilon = 10\n' + extra)
        start = time.perf_counter()
        job_id = cli(cxrfed, "job", "start", "--job", job, "--detach", *admin).strip()
        while True:
            status = json.loads(cli(cxrfed, "job", "status", job_id, "--json", *admin))
            if status["state"] != "running":
                break
            time.sleep(0.2)
        total = time.perf_counter() - start
        if status["state"] != "completed":
            raise SystemExit(f"cxrfed job {status['state']}: {status['reason']}")
        return status, total
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()


def run_flower(root, args):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([args.flower_path, os.path.dirname(__file__)])
    port = free_port()
    out = os.path.join(root, "flower.json")
    app = os.path.join(os.path.dirname(__file__), "flower_app.py")
    server = subprocess.Popen([sys.executable, app, "server", "--port", str(port), "--rounds", str(args.rounds),
                               "--base", args.base, "--out", out], env=env,
                              stdout=subprocess.DEVNULL, stderr=open(os.path.join(root, "flower-server.log"), "w"))
    time.sleep(3)
    clients = [subprocess.Popen([sys.executable, app, "client", "--port", str(port),
                                 "--data", os.path.join(root, f"flower-{site}"), "--epochs", str(args.epochs),
                                 "--batch", str(args.batch), "--lr", str(args.lr), "--seed", str(seed)],
                                env=env, stdout=subprocess.DEVNULL,
                                stderr=open(os.path.join(root, f"flower-{site}.log"), "w"))
               for site, _, seed in SITES]
    if server.wait(timeout=1800) != 0:
        raise SystemExit(open(os.path.join(root, "flower-server.log")).read()[-3000:])
    for c in clients:
        c.wait(timeout=60)
    return json.load(open(out))


def run_central(root, args):
    """PyTorch on the pooled training records, rounds x epochs epochs, same step."""
    sys.path.insert(0, args.flower_path)
    sys.path.insert(0, os.path.dirname(__file__))
    import torch
    from flower_app import FedNet, base_state, evaluate, load_site, train_head
    parts = [load_site(os.path.join(root, f"flower-{site}")) for site, _, _ in SITES]
    x = torch.cat([p[0] for p in parts]); y = torch.cat([p[1] for p in parts])
    hx = torch.cat([p[2] for p in parts]); hy = torch.cat([p[3] for p in parts])
    net = FedNet()
    net.load_state_dict(base_state(args.base), strict=True)
    start = time.perf_counter()
    train_head(net, x, y, args.rounds * args.epochs, args.batch, args.lr, 1)
    seconds = time.perf_counter() - start
    m = evaluate(net, hx, hy)
    return {"accuracy": m["accuracy"], "auroc": m["auroc"], "held_out": m["n"], "train": len(y),
            "seconds": seconds}


def run_central_dp(root, args, seed):
    """Central DP-FedAvg (the first generation's mechanism) on the same sites, in PyTorch:
    each round every site trains the head from the global model with cxrfed's local step,
    its delta is clipped to L2 norm `clip`, the coordinator sums the deltas, adds Gaussian
    noise of std `noise * clip` to the sum and divides by the number of sites. Same ε as
    cxrfed's DP run (the same noise in the sum). Returns the pooled held-out accuracy."""
    sys.path.insert(0, args.flower_path)
    sys.path.insert(0, os.path.dirname(__file__))
    import torch
    from flower_app import HEAD, FedNet, base_state, evaluate, load_site, train_head
    parts = [load_site(os.path.join(root, f"flower-{site}")) for site, _, _ in SITES]
    net = FedNet()
    net.load_state_dict(base_state(args.base), strict=True)
    keys = [f"heads.{HEAD}.weight", f"heads.{HEAD}.bias"]
    gen = torch.Generator().manual_seed(seed)
    for r in range(args.rounds):
        global_state = {k: v.clone() for k, v in net.state_dict().items()}
        total = {k: torch.zeros_like(global_state[k]) for k in keys}
        for i, (x, y, _, _) in enumerate(parts):
            local = FedNet()
            local.load_state_dict(global_state)
            train_head(local, x, y, args.epochs, args.batch, args.lr, seed * 100 + r * 10 + i)
            delta = {k: local.state_dict()[k] - global_state[k] for k in keys}
            norm = torch.sqrt(sum((d ** 2).sum() for d in delta.values()))
            scale = min(1.0, args.clip / float(norm)) if float(norm) > 0 else 1.0
            for k in keys:
                total[k] += delta[k] * scale
        state = net.state_dict()
        for k in keys:
            noise = torch.randn(total[k].shape, generator=gen) * (args.noise * args.clip)
            state[k] = global_state[k] + (total[k] + noise) / len(parts)
        net.load_state_dict(state)
    hx = torch.cat([p[2] for p in parts]); hy = torch.cat([p[3] for p in parts])
    return evaluate(net, hx, hy)["accuracy"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cxrfed", default="target/release/cxrfed")
    p.add_argument("--bin", default="target/release/cxrfed-bench")
    p.add_argument("--flower-path", default=".cxrfed/flower")
    p.add_argument("--base", default="models/tiny-phantom-v1")
    p.add_argument("--count", type=int, default=80, help="phantoms per site")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--clip", type=float, default=0.5, help="DP-FedAvg clipping norm")
    p.add_argument("--noise", type=float, default=1.0, help="DP-FedAvg noise multiplier")
    p.add_argument("--dp-runs", type=int, default=5, help="runs of each DP variant (accuracy medians)")
    p.add_argument("--out", default="docs/bench/training.md")
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="cxrfed-bench-training-")
    make_sites(args.cxrfed, args.bin, root, args.count)
    # The same job three ways: plain FedAvg; with secure aggregation (masked updates);
    # DP-FedAvg with secure aggregation and the sites' local noise.
    configs = [
        ("plain", "secure_aggregation = false\n"),
        ("secure", "secure_aggregation = true\n"),
        ("dp", f"secure_aggregation = true\nclip = {args.clip}\nnoise_multiplier = {args.noise}\n"
               "dp_delta = 1e-5\n"),
    ]
    runs = {tag: run_cxrfed(args.cxrfed, root, args, tag, extra)[0] for tag, extra in configs}
    # DP accuracy varies with the noise drawn: more runs of the DP job for its median.
    dp_accuracies = [runs["dp"]] + [run_cxrfed(args.cxrfed, root, args, f"dp{i}", configs[2][1])[0]
                                    for i in range(2, args.dp_runs + 1)]
    ours = runs["plain"]
    flower = run_flower(root, args)
    central = run_central(root, args)
    central_dp = [run_central_dp(root, args, seed) for seed in range(1, args.dp_runs + 1)]

    def rows_of(job):
        out = []
        for r in job["round_log"]:
            if r["state"] != "completed":
                continue
            local = max(s["train_seconds"] for s in r["sites"])
            out.append({"seconds": r["seconds"], "overhead": r["seconds"] - local,
                        "bytes": r["bytes_down"] + r["bytes_up"]})
        return out

    def accuracy_of(job):
        final = next(r for r in job["round_log"] if r["state"] == "evaluation")
        return final["pooled_metrics"]["cardiomegaly.accuracy"]

    cx_rows = {tag: rows_of(job) for tag, job in runs.items()}
    fl_rows = []
    for _, r in sorted(flower["rounds"].items(), key=lambda kv: int(kv[0])):
        seconds = r["fit_seconds"] + r["eval_seconds"]
        overhead = (r["fit_seconds"] - r["fit_local_max"]) + (r["eval_seconds"] - r["eval_local_max"])
        fl_rows.append({"seconds": seconds, "overhead": overhead, "bytes": r["bytes_down"] + r["bytes_up"]})
    last_fl = flower["rounds"][str(args.rounds)] if str(args.rounds) in flower["rounds"] else \
        list(flower["rounds"].values())[-1]
    med = lambda rows, k: statistics.median(x[k] for x in rows)  # noqa: E731
    dp_epsilon = runs["dp"]["dp_epsilon"]

    with open(args.out, "w") as out:
        out.write("# Federated training benchmark\n\n")
        out.write(f"Generated by `make bench-training` (`python bench/training.py`) on {platform.node()} "
                  f"({os.cpu_count()} cores), {time.strftime('%Y-%m-%d')}.\n\n")
        out.write(f"Task: a new binary head (`cardiomegaly`, cardiothoracic ratio > 0.5) on the bundled tiny "
                  f"network, backbone frozen; FedAvg over 3 non-IID phantom sites (university, community, icu "
                  f"profiles; {args.count} images each, about 20% held out by image hash), {args.rounds} rounds "
                  f"of {args.epochs} local epochs, batch {args.batch}, Adam at {args.lr}. Both systems train the "
                  "same network from the same weights on the same preprocessed inputs (the node's own, exported "
                  "by `cxrfed-bench inputs` for Flower) with the same local step. cxrfed: coordinator and three "
                  "nodes as processes with mutual TLS 1.3, every job a study admin's signed order verified by "
                  "each node against its training policy, weights down in 1 MiB chunks, only the trained "
                  "layers' delta up, each site evaluating the incoming model in the same round and reporting "
                  "noisy counts (metrics_epsilon 10 here, so the accuracy shown is close to exact), every round "
                  "charged to the site's training account. Three cxrfed runs: **plain** FedAvg; **secure** — "
                  "secure aggregation, each update masked with X25519/ChaCha20 pair masks in 2^-20 fixed point "
                  "after a signed key exchange; **DP** — secure aggregation plus DP-FedAvg with the noise added "
                  f"at the sites (clip {args.clip}, noise multiplier {args.noise}, each of the 3 sites adding "
                  f"std {args.noise}·{args.clip}/√3 so the sum carries exactly central DP-FedAvg's noise; "
                  f"site-level ε {dp_epsilon:.2f} at δ 1e-5 over the job). Flower "
                  f"{flower_version(args.flower_path)}: `start_server` + three `NumPyClient` processes on "
                  "loopback without TLS, the standard FedAvg strategy exchanging every parameter, a fit and an "
                  "evaluate phase per round; each client with one PyTorch thread, its fastest setting here (the "
                  "default of one thread per core was several times slower with three clients on two cores). "
                  "cxrfed's nodes run libtorch with its defaults. Everything shares the machine's cores.\n\n")
        out.write("| | cxrfed plain | cxrfed secure | cxrfed DP + secure | Flower | ratio (plain / Flower) | "
                  "ratio (secure / plain) |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n")
        table = [
            ("wall time per round, median (s)", "seconds", "{:.2f}"),
            ("protocol overhead per round, median (s)", "overhead", "{:.3f}"),
            ("bytes per round (payload, all sites)", "bytes", "{:,.0f}"),
        ]
        for name, key, fmt in table:
            a, sec, dp, b = (med(cx_rows["plain"], key), med(cx_rows["secure"], key),
                             med(cx_rows["dp"], key), med(fl_rows, key))
            out.write(f"| {name} | {fmt.format(a)} | {fmt.format(sec)} | {fmt.format(dp)} | {fmt.format(b)} | "
                      f"{a / b if b else float('nan'):.2f} | {sec / a if a else float('nan'):.2f} |\n")
        accs = [accuracy_of(runs[t]) for t in ("plain", "secure", "dp")]
        out.write(f"| held-out accuracy after the last round | {accs[0]:.3f} | {accs[1]:.3f} | {accs[2]:.3f} | "
                  f"{last_fl['accuracy']:.3f} | {accs[0] / last_fl['accuracy']:.2f} | {accs[1] / accs[0]:.2f} |\n")
        totals = [sum(r["seconds"] for r in runs[t]["round_log"]) for t in ("plain", "secure", "dp")]
        fl_total = sum(r["fit_seconds"] + r["eval_seconds"] for r in flower["rounds"].values())
        out.write(f"| all rounds and evaluations (s) | {totals[0]:.2f} | {totals[1]:.2f} | {totals[2]:.2f} | "
                  f"{fl_total:.2f} | {totals[0] / fl_total:.2f} | {totals[1] / totals[0]:.2f} |\n")
        ours_dp = [accuracy_of(job) for job in dp_accuracies]
        out.write(f"\nDP at the same ε ({dp_epsilon:.2f}): cxrfed's DP job (noise added at the sites, summed "
                  f"under secure aggregation), {len(ours_dp)} runs, reaches a median held-out accuracy "
                  f"{statistics.median(ours_dp):.3f} (range {min(ours_dp):.3f} to {max(ours_dp):.3f}); central "
                  f"DP-FedAvg (the same clipping and the same noise added once to the sum at the coordinator, "
                  f"simulated in PyTorch on the same sites), {len(central_dp)} seeds, a median "
                  f"{statistics.median(central_dp):.3f} (range {min(central_dp):.3f} to {max(central_dp):.3f}): "
                  f"a difference of {abs(statistics.median(ours_dp) - statistics.median(central_dp)) * 100:.1f} "
                  f"points between medians. On {central['held_out']} held-out records one record is "
                  f"{100 / max(central['held_out'], 1):.1f} points. The table's DP column is the first run.\n")
        out.write(f"\nFlower's held-out AUROC after the last round: {last_fl['auroc']:.3f}. cxrfed reports no "
                  "AUROC: it is an exact function of the labels and not released as a noisy count.\n\n")
        out.write(f"Centralised reference (PyTorch, the pooled {central['train']} training records, "
                  f"{args.rounds * args.epochs} epochs): held-out accuracy {central['accuracy']:.3f}, AUROC "
                  f"{central['auroc']:.3f} on {central['held_out']} records.\n\n")
        out.write("Protocol overhead is a round's wall time minus the slowest site's local compute (building "
                  "its datasets, evaluating, training; for Flower the slowest fit plus the slowest evaluate): "
                  "serialisation, transfer, waiting, aggregation and, for cxrfed, TLS, the signed-order and "
                  "policy checks, the ledger charge, spooling updates to disk, the key exchange and masking "
                  "(secure) and the durable round commit. Bytes are parameter payloads (no gRPC or TLS "
                  "framing): Flower sends every parameter down for fit and again for evaluate and every "
                  "parameter up; cxrfed sends the weights down once per round and only the trained head's "
                  "delta up (as f32, or as masked u64 under secure aggregation: twice the bytes). Flower's "
                  "SecAgg+ (its `SecAggPlusWorkflow`) needs the ServerApp/ClientApp runtime with secure "
                  "aggregation mods rather than `start_server`; it is not run here.\n\n")
        out.write("Per round:\n\n| round | plain s | plain overhead s | secure s | secure overhead s | DP s | "
                  "Flower s | Flower overhead s |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")
        for i, (a, sec, dp, b) in enumerate(zip(cx_rows["plain"], cx_rows["secure"], cx_rows["dp"], fl_rows), 1):
            out.write(f"| {i} | {a['seconds']:.2f} | {a['overhead']:.3f} | {sec['seconds']:.2f} | "
                      f"{sec['overhead']:.3f} | {dp['seconds']:.2f} | {b['seconds']:.2f} | {b['overhead']:.3f} |\n")
    print(open(args.out).read())


def flower_version(path):
    for name in os.listdir(path):
        if name.startswith("flwr-") and name.endswith(".dist-info"):
            return name[len("flwr-"):-len(".dist-info")]
    return "?"


if __name__ == "__main__":
    main()
