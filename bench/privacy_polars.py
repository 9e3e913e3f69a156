"""The DP crosstab of bench/privacy.py with OpenDP's Polars API (a peer, run in its own
package path because opendp[polars] pins a Polars release of its own): the same records, the
same filter, k records per patient (OpenDP's `truncate_per_group` on the patient identifier),
counts by the two fields over their public keys, integer Laplace noise at epsilon per release.
Prints JSON: the median milliseconds of a release (context, plan and collect) and its cells.

    PYTHONPATH=.cxrfed/opendp-polars python bench/privacy_polars.py records.csv
"""

import argparse
import itertools
import json
import statistics
import time

import opendp.prelude as dp
import polars as pl

QUALITY = ["excellent", "good", "fair", "poor"]
CONFIDENCE = ["high", "medium", "low", "insufficient"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("csv")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--epsilon", type=float, default=1.0)
    p.add_argument("--k", type=int, default=1)
    args = p.parse_args()
    dp.enable_features("contrib")
    columns = ["patient_pseudonym", "age_group", "image_quality", "analysis_confidence"]
    data = pl.read_csv(args.csv, columns=columns, schema_overrides={c: pl.String for c in columns})
    data = data.with_columns(pl.col(c).fill_null("") for c in columns)
    keys = pl.LazyFrame(list(itertools.product(QUALITY + [""], CONFIDENCE + [""])),
                        schema=["image_quality", "analysis_confidence"], orient="row")
    millis, cells = [], 0
    for _ in range(args.repeats):
        start = time.perf_counter()
        context = dp.Context.compositor(
            data=data.lazy(),
            privacy_unit=dp.unit_of(contributions=1, identifier="patient_pseudonym"),
            privacy_loss=dp.loss_of(epsilon=args.epsilon),
            split_evenly_over=1,
        )
        released = (context.query()
                    .filter((pl.col("age_group") == "60-69") | (pl.col("age_group") == "70-79"))
                    .truncate_per_group(args.k)
                    .group_by(["image_quality", "analysis_confidence"])
                    .agg(dp.len(signed=False))  # clamped at zero, as cxrfed releases counts
                    .with_keys(keys)
                    .release()
                    .collect())
        millis.append((time.perf_counter() - start) * 1000)
        cells = released.height
    print(json.dumps({"p50_ms": statistics.median(millis), "cells": cells, "samples": millis}))


if __name__ == "__main__":
    main()
