"""An independent computation over a `cxrfed export` CSV, with nothing but the standard library:
a crosstab of two columns (counts) within a cohort, and the summary of a numeric column by a
grouping column. Prints JSON.

    stats_from_csv.py EXPORT.csv --row image_quality --col analysis_confidence \
        --where view=PA --numeric cardiothoracic_ratio --by view
"""

import argparse
import csv
import json
import statistics


def main():
    p = argparse.ArgumentParser()
    p.add_argument("csv")
    p.add_argument("--row", required=True)
    p.add_argument("--col", required=True)
    p.add_argument("--where", action="append", default=[], help="column=value")
    p.add_argument("--numeric", required=True)
    p.add_argument("--by", required=True)
    args = p.parse_args()
    with open(args.csv, newline="") as f:
        rows = list(csv.DictReader(f))
    conditions = [w.split("=", 1) for w in args.where]
    cohort = [r for r in rows if all(r[k] == v for k, v in conditions)]
    crosstab = {}
    for r in cohort:
        key = f"{r[args.row] or '(missing)'}|{r[args.col] or '(missing)'}"
        crosstab[key] = crosstab.get(key, 0) + 1
    summary = {}
    groups = {}
    for r in rows:
        if r[args.numeric] != "":
            groups.setdefault(r[args.by], []).append(float(r[args.numeric]))
    for group, values in groups.items():
        summary[group] = {
            "n": len(values),
            "mean": statistics.fmean(values),
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
        }
    print(json.dumps({"cohort": len(cohort), "total": len(rows), "crosstab": crosstab,
                      "summary": summary}))


if __name__ == "__main__":
    main()
