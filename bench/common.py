"""Helpers the benchmark drivers share: running the cxrfed binaries and starting a node on a
free loopback port."""

import json
import shutil
import socket
import subprocess
import tempfile
import time


def run(cmd):
    """Runs a command to completion; returns its standard output."""
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def run_json(cmd):
    """Runs a command whose last output line is a JSON document; returns it."""
    return json.loads(run(cmd).strip().splitlines()[-1])


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Node:
    """`cxrfed node serve` on a free loopback port with `args` added: mutual TLS with the node
    certificate of the `pki` folder (as `cxrfed certs` lays it out), or `--insecure-dev` when
    `pki` is None. `stop()` ends it and removes its data directory."""

    def __init__(self, cxrfed, args, pki=None, prefix="cxrfed-bench-node-", dir=None):
        self.data = tempfile.mkdtemp(prefix=prefix, dir=dir)
        self.port = free_port()
        cmd = [cxrfed, "node", "serve", "--data-dir", self.data, "--listen", f"127.0.0.1:{self.port}", *args]
        if pki:
            cmd += ["--ca", f"{pki}/ca/ca.pem", "--cert", f"{pki}/node/cert.pem", "--key", f"{pki}/node/key.pem"]
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
        self.stop()
        raise RuntimeError("node did not start")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)
        shutil.rmtree(self.data, ignore_errors=True)
