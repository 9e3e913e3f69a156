"""The research workflow's benchmarks, side by side with pandas, Polars and DuckDB:

1. Exact crosstab over 1,000,000 records: cxrfed's columnar statistics (parse + bind + one
   pass, the code the node's Stats RPC runs) versus pandas.crosstab on the same records read
   from CSV (categorical dtype, and plain object dtype), Polars (categorical columns, filter +
   group-by count) and DuckDB (an in-memory table, WHERE + GROUP BY), same filter, same
   counts.
2. Ingest throughput of a phantom folder through a node (`cxrfed ingest`), versus the node's
   single-request extraction throughput times the cores it uses.

Writes docs/bench/research.md.

    python bench/research.py --cxrfed target/release/cxrfed --bin target/release/cxrfed-bench
"""

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import tempfile
import time

import pandas as pd

from common import Node, run, run_json

QUERY = 'crosstab image_quality, analysis_confidence where age_group in ("60-69", "70-79")'


def pandas_crosstab(path, repeats, categorical):
    dtype = {c: "category" for c in ("image_quality", "analysis_confidence", "age_group", "view", "month")} \
        if categorical else None
    df = pd.read_csv(path, dtype=dtype, keep_default_na=False)
    millis = []
    table = None
    for _ in range(repeats):
        t = time.perf_counter()
        cohort = df[df["age_group"].isin(["60-69", "70-79"])]
        table = pd.crosstab(cohort["image_quality"], cohort["analysis_confidence"])
        millis.append((time.perf_counter() - t) * 1000)
    return statistics.median(millis), int(table.values.sum())


def polars_crosstab(path, repeats):
    import polars as pl
    cats = ("image_quality", "analysis_confidence", "age_group", "view", "month")
    df = pl.read_csv(path, schema_overrides={c: pl.Categorical for c in cats})
    millis, total = [], 0
    for _ in range(repeats):
        t = time.perf_counter()
        table = (df.lazy().filter(pl.col("age_group").is_in(["60-69", "70-79"]))
                 .group_by("image_quality", "analysis_confidence").len().collect())
        millis.append((time.perf_counter() - t) * 1000)
        total = int(table["len"].sum())
    return statistics.median(millis), total, pl.__version__


def duckdb_crosstab(path, repeats):
    import duckdb
    con = duckdb.connect()
    con.execute(f"CREATE TABLE r AS SELECT * FROM read_csv_auto('{path}')")
    sql = ("SELECT image_quality, analysis_confidence, count(*) AS n FROM r "
           "WHERE age_group IN ('60-69', '70-79') GROUP BY ALL")
    millis, total = [], 0
    for _ in range(repeats):
        t = time.perf_counter()
        rows = con.execute(sql).fetchall()
        millis.append((time.perf_counter() - t) * 1000)
        total = sum(r[2] for r in rows)
    return statistics.median(millis), total, duckdb.__version__


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cxrfed", default="target/release/cxrfed")
    p.add_argument("--bin", default="target/release/cxrfed-bench")
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--ingest-files", type=int, default=96)
    p.add_argument("--out", default="docs/bench/research.md")
    p.add_argument("--crosstab-only", action="store_true", help="print the crosstab figures and stop")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="cxrfed-bench-research-")

    # 1. Crosstab.
    csv_path = os.path.join(work, "records.csv")
    ours = run_json([args.bin, "stats", "--records", str(args.records), "--query", QUERY,
                     "--repeats", str(args.repeats), "--csv", csv_path])
    pd_cat, pd_cat_n = pandas_crosstab(csv_path, args.repeats, True)
    pd_obj, pd_obj_n = pandas_crosstab(csv_path, args.repeats, False)
    pl_ms, pl_n, pl_version = polars_crosstab(csv_path, args.repeats)
    dk_ms, dk_n, dk_version = duckdb_crosstab(csv_path, args.repeats)
    assert pd_cat_n == ours["cohort"] == pd_obj_n == pl_n == dk_n, (ours, pd_cat_n, pd_obj_n, pl_n, dk_n)
    print(f"crosstab over {args.records} records: cxrfed p50 {ours['p50_ms']:.1f} ms, "
          f"pandas categorical {pd_cat:.1f} ms, pandas object {pd_obj:.1f} ms, "
          f"polars {pl_ms:.1f} ms, duckdb {dk_ms:.1f} ms", flush=True)
    if args.crosstab_only:
        print(json.dumps({"cxrfed": ours["p50_ms"], "pandas_categorical": pd_cat, "pandas_object": pd_obj,
                          "polars": pl_ms, "duckdb": dk_ms}))
        return

    # 2. Ingest.
    folder = os.path.join(work, "phantoms")
    run([args.cxrfed, "phantom", "--out", folder, "--count", str(args.ingest_files), "--seed", "17",
         "--max-size", "1024", "--transfer-syntax", "explicit"])
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".dcm"))
    pki = os.path.join(work, "pki")
    run([args.cxrfed, "certs", "init", "--out", f"{pki}/ca", "--study", "bench"])
    run([args.cxrfed, "certs", "issue", "--ca", f"{pki}/ca", "--role", "node", "--name", "n",
         "--site", "local", "--out", f"{pki}/node"])
    run([args.cxrfed, "certs", "issue", "--ca", f"{pki}/ca", "--role", "admin", "--name", "a",
         "--site", "local", "--out", f"{pki}/admin"])
    profile = f"{pki}/admin/profile.toml"

    def node():
        return Node(args.cxrfed, ["--log-level", "warn", "--device", "cpu"], pki,
                    prefix="cxrfed-bench-ingest-", dir=work)

    single, ingest = [], []
    for _ in range(3):
        n = node()
        try:
            single.append(run_json([args.bin, "node", "--url", n.url, "--profile", profile, "--clients", "1",
                                    "--images", str(len(files) // 2), "--files", *files])["images_per_s"])
        finally:
            n.stop()
        n = node()
        try:
            state = os.path.join(work, f"state-{time.time_ns()}.jsonl")
            out = run([args.cxrfed, "ingest", folder, "--node", n.url, "--profile", profile,
                       "--state", state, "--report", os.path.join(work, "rejects.jsonl")])
            ingest.append(float(re.search(r"\(([0-9.]+) files/s\)", out).group(1)))
        finally:
            n.stop()
        print(f"single {single[-1]:.1f}/s, ingest {ingest[-1]:.1f} files/s", flush=True)
    cores = os.cpu_count()
    single_m, ingest_m = statistics.median(single), statistics.median(ingest)
    share = ingest_m / (single_m * cores)

    with open(args.out, "w") as out:
        out.write("# Research workflow benchmarks\n\n")
        out.write(f"Generated by `make bench-research` (`python bench/research.py`) on {platform.node()} "
                  f"({cores} cores), {time.strftime('%Y-%m-%d')}. Medians.\n\n")
        out.write(f"## Exact crosstab over {args.records:,} records\n\n")
        out.write(f"Query: `{QUERY}` ({ours['cohort']:,} records in the cohort). cxrfed: the node's "
                  "columnar statistics (`cxrfed_stats::exact`: parse, bind, one pass over the "
                  "dictionary-coded columns), timed in process on the same synthetic records the "
                  "CSV holds, without the RPC. pandas: `df[df.age_group.isin(...)]` then "
                  f"`pd.crosstab`, on the CSV loaded once (pandas {pd.__version__}). Polars "
                  f"{pl_version}: categorical columns, lazy filter + `group_by(...).len()`. DuckDB "
                  f"{dk_version}: the CSV as an in-memory table, `WHERE age_group IN (...) GROUP BY ALL`. "
                  f"{args.repeats} repeats each.\n\n")
        out.write("| implementation | p50 ms | vs cxrfed |\n| --- | ---: | ---: |\n")
        out.write(f"| cxrfed columnar | {ours['p50_ms']:.1f} | 1.0× |\n")
        out.write(f"| pandas, categorical dtype | {pd_cat:.1f} | {pd_cat / ours['p50_ms']:.1f}× slower |\n")
        out.write(f"| pandas, object dtype (read_csv default) | {pd_obj:.1f} | {pd_obj / ours['p50_ms']:.1f}× slower |\n")
        for name, ms in (("Polars, categorical", pl_ms), ("DuckDB", dk_ms)):
            ratio = ms / ours["p50_ms"]
            word = f"{ratio:.1f}× slower" if ratio >= 1 else f"{1 / ratio:.1f}× faster"
            out.write(f"| {name} | {ms:.1f} | {word} |\n")
        out.write(f"\nBuilding the columns for {args.records:,} records took {ours['build_s']:.1f} s "
                  "(a node does this once at start-up, from sled, then updates them per record). "
                  "Target: ≤ 10 ms and ahead of pandas, Polars and DuckDB.\n\n")
        out.write(f"## Ingest throughput ({len(files)} phantoms, 1024 px, explicit VR LE, bundled model)\n\n")
        out.write("| measure | files/s |\n| --- | ---: |\n")
        out.write(f"| single-request extraction (1 client, sequential) | {single_m:.1f} |\n")
        out.write(f"| single-request × {cores} cores | {single_m * cores:.1f} |\n")
        out.write(f"| `cxrfed ingest` (4 in flight) | {ingest_m:.1f} |\n")
        out.write(f"| ingest / (single × cores) | {share:.0%} |\n")
        out.write("\nTarget: ingest ≥ 80% of single-request throughput × cores. Client and node share "
                  "the machine's cores.\n")
    print(open(args.out).read())
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
