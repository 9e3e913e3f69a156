"""mTLS overhead of a node: the extraction RPC with 16 concurrent clients (each on its own
connection) against the same node binary served with mutual TLS 1.3 and with --insecure-dev
plaintext, side by side; plus the cost of setting up a connection (TCP + TLS handshake with
client certificate + HTTP/2 + first RPC).

Runs alternate (plain, mTLS, mTLS, plain, plain, mTLS, ...) so that the shared machine's noise hits both;
medians and ratios are reported. Writes docs/bench/tls.md.

    python bench/tls.py --cxrfed target/release/cxrfed --bin target/release/cxrfed-bench
"""

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import tempfile
import time


def run(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out.stdout


def run_json(cmd):
    return json.loads(run(cmd).strip().splitlines()[-1])


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Node:
    def __init__(self, cxrfed, pki, tls, model):
        self.data = tempfile.mkdtemp(prefix="cxrfed-bench-tls-")
        self.port = free_port()
        cmd = [cxrfed, "node", "serve", "--data-dir", self.data, "--listen", f"127.0.0.1:{self.port}",
               "--model", model, "--device", "cpu", "--log-level", "warn", "--inference-queue", "512"]
        if tls:
            cmd += ["--ca", f"{pki}/ca/ca.pem", "--cert", f"{pki}/node/cert.pem",
                    "--key", f"{pki}/node/key.pem"]
            self.url = f"https://127.0.0.1:{self.port}"
        else:
            cmd += ["--insecure-dev"]
            self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(600):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("node did not start")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)
        shutil.rmtree(self.data, ignore_errors=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cxrfed", default="target/release/cxrfed")
    p.add_argument("--bin", default="target/release/cxrfed-bench")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--out", default="docs/bench/tls.md")
    args = p.parse_args()

    work = tempfile.mkdtemp(prefix="cxrfed-bench-pki-")
    pki = os.path.join(work, "pki")
    run([args.cxrfed, "certs", "init", "--out", f"{pki}/ca", "--study", "bench"])
    run([args.cxrfed, "certs", "issue", "--ca", f"{pki}/ca", "--role", "node", "--name", "node-bench",
         "--site", "local", "--out", f"{pki}/node"])
    run([args.cxrfed, "certs", "issue", "--ca", f"{pki}/ca", "--role", "admin", "--name", "bench",
         "--site", "local", "--out", f"{pki}/admin"])
    profile = f"{pki}/admin/profile.toml"

    def phantoms(name, size, count):
        out = os.path.join(work, name)
        run([args.cxrfed, "phantom", "--out", out, "--count", str(count), "--seed", "11",
             "--max-size", str(size), "--transfer-syntax", "explicit"])
        return sorted(os.path.join(out, f) for f in os.listdir(out) if f.endswith(".dcm"))

    scenarios = [
        # Transport-bound: a 256 px image, no model: what is left is upload, decode, store.
        ("256 px DICOM, no model", phantoms("small", 256, 8), "none", 4000),
        # Typical: a 1024 px DICOM through the bundled model.
        ("1024 px DICOM, bundled tiny model", phantoms("large", 1024, 8), "bundled", 480),
    ]
    results = {}
    connect = {True: [], False: []}
    for label, files, model, images in scenarios:
        # One unrecorded run per transport first: page cache, CPU frequency, allocator.
        for tls in (False, True):
            node = Node(args.cxrfed, pki, tls, model)
            try:
                cmd = [args.bin, "node", "--url", node.url, "--images", str(images // 4),
                       "--clients", str(args.clients), "--files", *files]
                run_json(cmd + (["--profile", profile] if tls else []))
            finally:
                node.stop()
        for r in range(args.rounds):
            # Alternate which transport goes first, so order effects cancel out.
            for tls in ((False, True) if r % 2 == 0 else (True, False)):
                node = Node(args.cxrfed, pki, tls, model)
                try:
                    cmd = [args.bin, "node", "--url", node.url, "--images", str(images),
                           "--clients", str(args.clients), "--files", *files]
                    if tls:
                        cmd += ["--profile", profile]
                    res = run_json(cmd)
                    results.setdefault((label, tls), []).append(res)
                    if model == "none":
                        cmd = [args.bin, "connect", "--url", node.url, "--count", "50"]
                        if tls:
                            cmd += ["--profile", profile]
                        connect[tls].append(run_json(cmd))
                finally:
                    node.stop()
                print(f"{label} {'mTLS' if tls else 'plain'} round {r}: {res['images_per_s']:.1f} req/s "
                      f"p50 {res['p50_ms']:.1f} ms p99 {res['p99_ms']:.1f} ms", flush=True)

    def med(runs, key):
        return statistics.median(x[key] for x in runs)

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as out:
        out.write("# mTLS overhead of the extraction RPC\n\n")
        out.write(f"Generated by `make bench-tls` (`python bench/tls.py`) on {platform.node()} "
                  f"({os.cpu_count()} cores), {time.strftime('%Y-%m-%d')}. The same release binary "
                  "serves mutual TLS 1.3 (ECDSA P-256 certificates from `cxrfed certs`, client "
                  "certificate verified against the study CA and CRL, authorization layer) and "
                  "`--insecure-dev` plaintext (the same authorization layer, no TLS). "
                  f"{args.clients} concurrent clients, each on its own connection, stream "
                  f"`Extract` uploads with `force`; one unrecorded warm-up run per transport, then "
                  f"{args.rounds} rounds alternating which transport runs first; medians. "
                  "Clients and node share the machine's cores.\n\n")
        out.write("| workload | transport | requests/s | p50 ms | p99 ms | mTLS / plaintext throughput |\n")
        out.write("| --- | --- | ---: | ---: | ---: | ---: |\n")
        for label, _, _, _ in scenarios:
            plain = results[(label, False)]
            tls = results[(label, True)]
            ratio = med(tls, "images_per_s") / med(plain, "images_per_s")
            for name, runs, cell in (("plaintext", plain, ""), ("mTLS", tls, f"{ratio:.1%}")):
                out.write(f"| {label} | {name} | {med(runs, 'images_per_s'):.1f} | "
                          f"{med(runs, 'p50_ms'):.1f} | {med(runs, 'p99_ms'):.1f} | {cell} |\n")
        out.write("\n## Connection set-up\n\n")
        out.write("Fresh connection + first `Status` call, 50 sequential connections per round "
                  "(median of the rounds' p50 and p99):\n\n")
        out.write("| transport | p50 ms | p99 ms |\n| --- | ---: | ---: |\n")
        for tls in (False, True):
            out.write(f"| {'mTLS 1.3' if tls else 'plaintext'} | {med(connect[tls], 'p50_ms'):.2f} | "
                      f"{med(connect[tls], 'p99_ms'):.2f} |\n")
        out.write("\nTarget (issue 4): steady-state throughput with mTLS within 10% of plaintext.\n")
    print(open(args.out).read())
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
