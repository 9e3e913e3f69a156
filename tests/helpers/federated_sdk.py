"""Drives the Python SDK's Coordinator against a real federation: the registry, a signed
federated count and crosstab. Prints one JSON line of what it saw."""

import argparse
import json

from cxrfed_client import Coordinator, CxrfedError


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--coordinator", required=True)
    p.add_argument("--profile", required=True)
    args = p.parse_args()
    with Coordinator(args.coordinator, profile=args.profile) as study:
        sites = study.sites()
        count = study.query("count", epsilon=0.5, min_sites=3)
        crosstab = study.query("crosstab view, sex", epsilon=0.5)
        try:
            study.query("summary cardiothoracic_ratio", epsilon=0.5)
            refused = None
        except CxrfedError as e:
            refused = e.code
    print(json.dumps({
        "study": study.study,
        "sites": sorted(sites["site"]),
        "connected": int(sites["connected"].sum()),
        "count": count["count"][0],
        "count_bound": count["count_error_bound"][0],
        "answered": count.attrs["answered"],
        "charged": [s["epsilon"] for s in count.attrs["sites"]],
        "crosstab_columns": list(crosstab.columns),
        "crosstab_index": list(crosstab.index),
        "summary_refused": refused,
    }))


if __name__ == "__main__":
    main()
