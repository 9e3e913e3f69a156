"""Footprint benchmark: what each role's process costs, before and after the binaries were split
by role (cxrfed = the CLI, cxrfed-node = the node with libtorch, cxrfed-coordinator = the
coordinator without it).

Measures, for each build given:
  - CLI start-up: `cxrfed query --help` and `cxrfed stats --help`, wall time (median of N runs)
    and peak resident memory;
  - the coordinator's resident memory once started and idle (VmRSS after it accepts
    connections and settles);
  - its peak during a DenseNet-121 round (VmHWM): the model (`cxrfed-bench model-init`,
    about 28 MB of f32 weights) is imported into the registry, one node with annotated
    phantoms links, and a one-round job trains a new head; growth = peak - idle.

The "before" build is the single `cxrfed` binary of the previous layout (every role mapped
libtorch); pass it with --before. Writes docs/bench/footprint.md.

    python bench/footprint.py --after target/release --before .cxrfed/before
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time

from common import free_port


def cli(cxrfed, *args):
    return subprocess.run([cxrfed, *args], check=True, capture_output=True, text=True).stdout


def status_kb(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise KeyError(key)


def startup(cxrfed, args, runs):
    """Median wall seconds of `cxrfed ARGS`, and its median peak RSS (MB), each run's own
    (wait4 reports the rusage of that one child)."""
    times, peaks = [], []
    for _ in range(runs):
        t = time.perf_counter()
        p = subprocess.Popen([cxrfed, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, _, usage = os.wait4(p.pid, 0)
        times.append(time.perf_counter() - t)
        peaks.append(usage.ru_maxrss / 1024)
        p.returncode = 0
    return statistics.median(times), statistics.median(peaks)


def reset_peak(pid):
    """Resets the process's peak RSS (VmHWM) to its current RSS (Linux clear_refs 5)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def wait_port(port, proc, what):
    import socket
    for _ in range(1200):
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited during start-up")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{what} did not start")


def coordinator_round(cxrfed, bench, root, phantoms, densenet, old_verbs):
    """The coordinator's RSS (MB): idle after start; the peak of the model's import; before
    the round (after the import) and the round's own peak (VmHWM reset before it)."""
    registry = ["models"] if old_verbs else ["registry"]
    job_start = ["train"] if old_verbs else ["job", "start"]
    pki = os.path.join(root, "pki")
    cli(cxrfed, "certs", "init", "--out", f"{pki}/ca", "--study", "bench-footprint", "--days", "2")
    cli(cxrfed, "certs", "issue", "--ca", f"{pki}/ca", "--role", "coordinator", "--name", "coordinator",
        "--out", f"{pki}/coordinator")
    # The first generation had no study-admin role: its study admin was an admin.
    study_admin = ["--role", "admin", "--site", "coordination"] if old_verbs else ["--role", "study-admin"]
    cli(cxrfed, "certs", "issue", "--ca", f"{pki}/ca", *study_admin, "--name", "study-admin",
        "--out", f"{pki}/study-admin")
    cli(cxrfed, "certs", "issue", "--ca", f"{pki}/ca", "--role", "node", "--name", "node-a",
        "--site", "site-a", "--out", f"{pki}/node-a")
    cli(cxrfed, "certs", "issue", "--ca", f"{pki}/ca", "--role", "admin", "--name", "admin-a",
        "--site", "site-a", "--out", f"{pki}/admin-a")
    cport = free_port()
    coordinator = f"https://127.0.0.1:{cport}"
    procs = []
    try:
        c = subprocess.Popen([cxrfed, "coordinator", "serve", "--data-dir", f"{root}/coordinator",
                              "--listen", f"127.0.0.1:{cport}", "--ca", f"{pki}/ca/ca.pem",
                              "--cert", f"{pki}/coordinator/cert.pem",
                              "--key", f"{pki}/coordinator/key.pem", "--heartbeat-secs", "1",
                              "--log-level", "warn"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(c)
        wait_port(cport, c, "coordinator")
        time.sleep(3)
        idle = status_kb(c.pid, "VmRSS:") / 1024
        nport = free_port()
        n = subprocess.Popen([cxrfed, "node", "serve", "--data-dir", f"{root}/site-a",
                              "--listen", f"127.0.0.1:{nport}", "--ca", f"{pki}/ca/ca.pem",
                              "--cert", f"{pki}/node-a/cert.pem", "--key", f"{pki}/node-a/key.pem",
                              "--coordinator", coordinator, "--log-level", "warn"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(n)
        wait_port(nport, n, "node")
        node = ["--node", f"https://127.0.0.1:{nport}", "--profile", f"{pki}/admin-a/profile.toml"]
        cli(cxrfed, "ingest", phantoms, *node, "--state", f"{root}/ingest.jsonl",
            "--report", f"{root}/rejects.jsonl")
        cli(cxrfed, "field", "define", "cardiomegaly", "--type", "bool", *node)
        cli(cxrfed, "annotate", "import", os.path.join(phantoms, "cardiomegaly.csv"), *node)
        if not old_verbs:
            # Training is off until the site admin opts in.
            cli(cxrfed, "node", "training-policy", "set", "enabled=true", "min_batch_size=2", "min_local_steps=1",
                "--data-dir", f"{root}/site-a", "--profile", f"{pki}/admin-a/profile.toml")
        admin = ["--coordinator", coordinator, "--profile", f"{pki}/study-admin/profile.toml"]
        reset_peak(c.pid)
        cli(cxrfed, *registry, "import", densenet, "--version", "densenet-bench", *admin)
        import_peak = status_kb(c.pid, "VmHWM:") / 1024
        for _ in range(300):
            sites = json.loads(cli(cxrfed, "coordinator", "sites", "--json", *admin))
            if any(s["connected"] for s in sites):
                break
            time.sleep(0.2)
        job = os.path.join(root, "job.toml")
        with open(job, "w") as f:
            f.write('base = "densenet-bench"\nnew_heads = [{ name = "cardiomegaly", kind = "binary" }]\n'
                    'rounds = 1\nlocal_steps = 1\nbatch_size = 2\nmin_sites = 1\nround_deadline_secs = 900\n'
                    + ('' if old_verbs else 'secure_aggregation = false\n'))
        time.sleep(1)
        before_round = status_kb(c.pid, "VmRSS:") / 1024
        reset_peak(c.pid)
        job_id = cli(cxrfed, *job_start, "--job", job, "--detach", *admin).strip()
        peak = 0.0
        while True:
            peak = max(peak, status_kb(c.pid, "VmHWM:") / 1024)
            state = json.loads(cli(cxrfed, "job", "status", job_id, "--json", *admin))
            if state["state"] != "running":
                break
            time.sleep(0.1)
        if state["state"] != "completed":
            raise SystemExit(f"job {state['state']}: {state['reason']}")
        peak = max(peak, status_kb(c.pid, "VmHWM:") / 1024)
        return idle, import_peak, before_round, peak
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=120)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--after", default="target/release", help="folder with cxrfed, cxrfed-node, cxrfed-coordinator")
    p.add_argument("--before", help="folder with the previous single cxrfed binary")
    p.add_argument("--bench", help="cxrfed-bench (model-init) [default: AFTER/cxrfed-bench]")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--phantoms", type=int, default=12)
    p.add_argument("--out", default="docs/bench/footprint.md")
    args = p.parse_args()
    bench = args.bench or os.path.join(args.after, "cxrfed-bench")
    builds = [("after", os.path.join(args.after, "cxrfed"))]
    if args.before:
        builds.insert(0, ("before", os.path.join(args.before, "cxrfed")))
    root = tempfile.mkdtemp(prefix="cxrfed-footprint-")
    try:
        densenet = os.path.join(root, "densenet")
        subprocess.run([bench, "model-init", "--arch", "densenet121", "--out", densenet], check=True,
                       capture_output=True)
        model_mb = os.path.getsize(os.path.join(densenet, "model.safetensors")) / 2**20
        phantoms = os.path.join(root, "phantoms")
        cli(builds[-1][1], "phantom", "--out", phantoms, "--site", "university", "--count", str(args.phantoms),
            "--seed", "5", "--max-size", "256")
        import csv
        rows = list(csv.DictReader(open(os.path.join(phantoms, "labels.csv"), newline="")))
        with open(os.path.join(phantoms, "cardiomegaly.csv"), "w", newline="") as out:
            w = csv.writer(out)
            w.writerow(["image_sha256", "cardiomegaly"])
            for r in rows:
                w.writerow([r["image_sha256"], str(float(r["cardiothoracic_ratio"]) > 0.5).lower()])
        results = {}
        for name, cxrfed in builds:
            q = startup(cxrfed, ["query", "--help"], args.runs)
            s = startup(cxrfed, ["stats", "--help"], args.runs)
            work = os.path.join(root, name)
            os.makedirs(work)
            idle, import_peak, before_round, peak = coordinator_round(
                cxrfed, bench, work, phantoms, densenet, name == "before")
            results[name] = {"query_help_s": q[0], "query_help_mb": q[1], "stats_help_s": s[0],
                             "stats_help_mb": s[1], "coordinator_idle_mb": idle,
                             "import_peak_mb": import_peak, "before_round_mb": before_round,
                             "round_peak_mb": peak, "round_over_idle_mb": peak - idle,
                             "round_over_before_mb": peak - before_round}
            print(name, json.dumps(results[name]), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    lines = ["# Footprint by role", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}. "
             f"Builds: `{args.after}`" + (f" (after) and `{args.before}` (before)" if args.before else "") + ". "
             f"Start-up: median of {args.runs} runs. DenseNet-121 weights: {model_mb:.1f} MB. "
             "Targets: coordinator idle <= 64 MB; a round <= 4x the model above idle.", "",
             "Reproduce: `make bench-footprint` (builds release binaries; the before build is the previous "
             "single `cxrfed` binary, see the script's docstring).", "",
             "| figure | " + " | ".join(results) + (" | ratio |" if len(results) == 2 else ""),
             "|---|" + "---|" * (len(results) + (1 if len(results) == 2 else 0))]
    figures = [("`cxrfed query --help` wall time", "query_help_s", "{:.3f} s"),
               ("`cxrfed query --help` peak RSS", "query_help_mb", "{:.1f} MB"),
               ("`cxrfed stats --help` wall time", "stats_help_s", "{:.3f} s"),
               ("`cxrfed stats --help` peak RSS", "stats_help_mb", "{:.1f} MB"),
               ("coordinator idle RSS (after start)", "coordinator_idle_mb", "{:.1f} MB"),
               ("coordinator peak RSS, importing DenseNet-121", "import_peak_mb", "{:.1f} MB"),
               ("coordinator RSS before the round", "before_round_mb", "{:.1f} MB"),
               ("coordinator peak RSS, DenseNet-121 round", "round_peak_mb", "{:.1f} MB"),
               ("round peak above idle", "round_over_idle_mb", "{:.1f} MB"),
               ("round peak above its start", "round_over_before_mb", "{:.1f} MB")]
    for label, key, fmt in figures:
        row = f"| {label} | " + " | ".join(fmt.format(r[key]) for r in results.values())
        if len(results) == 2:
            b, a = results["before"][key], results["after"][key]
            row += f" | {b / a:.1f}x |" if a > 0 else " | - |"
        else:
            row += " |"
        lines.append(row)
    after = results["after"]
    lines += ["", f"After: coordinator idle {after['coordinator_idle_mb']:.1f} MB "
              f"({'meets' if after['coordinator_idle_mb'] <= 64 else 'misses'} the 64 MB target); "
              f"a DenseNet-121 round peaks {after['round_over_idle_mb'] / model_mb:.1f}x the model above idle "
              f"({'meets' if after['round_over_idle_mb'] <= 4 * model_mb else 'misses'} the 4x target) "
              f"and {after['round_over_before_mb'] / model_mb:.1f}x above its own start.", ""]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
