"""The seed's analysis: image quality versus analysis confidence at one node, as a crosstab
and a stacked bar chart, from the node's exact statistics (site admin) — and the same crosstab
recomputed with pandas from an export, to show they agree.

    python clients/python/examples/quality_vs_confidence.py --profile alice/profile.toml --out chart.png
"""

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from cxrfed_client import Node  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--node", help="node URL (default: the profile's, else https://127.0.0.1:50051)")
    p.add_argument("--profile", help="client profile (default: $CXRFED_PROFILE)")
    p.add_argument("--out", default="quality_vs_confidence.png")
    args = p.parse_args()

    with Node(args.node, profile=args.profile) as node:
        counts = node.stats("crosstab image_quality, analysis_confidence")
        shares = node.stats("crosstab image_quality, analysis_confidence normalize=row")
        export = node.export()
    print(f"{counts.attrs['cohort_size']} records")
    print(counts)

    # The same numbers from the flattened export, with pandas.
    check = pd.crosstab(export["image_quality"], export["analysis_confidence"])
    for quality, row in check.iterrows():
        for confidence, n in row.items():
            assert counts.loc[quality, f"analysis_confidence={confidence}"] == n, (quality, confidence)
    print("pandas.crosstab over the export agrees")

    shares = shares.drop(columns="total")
    shares.columns = [c.split("=", 1)[1] for c in shares.columns]
    ax = shares.plot(kind="bar", stacked=True, figsize=(7, 4), colormap="viridis")
    ax.set_xlabel("image quality")
    ax.set_ylabel("share of records")
    ax.set_title("Image quality vs analysis confidence")
    ax.legend(title="analysis confidence", bbox_to_anchor=(1.02, 1), loc="upper left")
    plt.tight_layout()
    plt.savefig(args.out, dpi=120)
    print(f"chart written to {args.out}")


if __name__ == "__main__":
    main()
