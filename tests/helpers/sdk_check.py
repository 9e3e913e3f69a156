"""Drives the Python SDK against a real node: extract a folder of images, list records, ask a
question, exact statistics and an export as DataFrames. Prints one JSON line of what it saw."""

import argparse
import json
import os

from cxrfed_client import CxrfedError, Node


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--node", required=True)
    p.add_argument("--profile", required=True)
    p.add_argument("--folder", required=True)
    p.add_argument("--researcher-profile")
    args = p.parse_args()
    with Node(args.node, profile=args.profile) as node:
        files = sorted(f for f in os.listdir(args.folder) if f.endswith(".dcm"))
        created = [node.extract(os.path.join(args.folder, f))["created"] for f in files]
        again = node.extract(os.path.join(args.folder, files[0]))
        records = node.records()
        answer = node.ask(records[0]["record_id"], "Is the left costophrenic angle blunted?")
        node.define_field("pneumothorax", "bool", description="visible pleural line", synonyms=["气胸"])
        labelled = node.annotate("pneumothorax", True, record_id=records[0]["record_id"], annotator="sdk")
        crosstab = node.stats("crosstab image_quality, analysis_confidence")
        count = node.stats("count where view = PA")
        export = node.export()
        node_fields = node.fields()
        pa = node.export(where="view = PA")
        try:
            node.stats("crosstab image_quality analysis_confidence")
            parse_error = None
        except CxrfedError as e:
            parse_error = [e.code, e.kind, e.message]
    dp = None
    if args.researcher_profile:
        with Node(args.node, profile=args.researcher_profile) as researcher:
            before = researcher.budget()
            frame = researcher.dp_stats("histogram view", epsilon=0.5)
            after = researcher.budget()
            try:
                researcher.stats("count")
                exact_error = None
            except CxrfedError as e:
                exact_error = e.code
            dp = {
                "columns": list(frame.columns),
                "index": list(frame.index),
                "bounds_positive": bool((frame["count_error_bound"] > 0).all()),
                "epsilon": frame.attrs["epsilon"],
                "spent_before": before["epsilon_spent"],
                "spent_after": after["epsilon_spent"],
                "exact_error": exact_error,
            }
    print(json.dumps({
        "dp": dp,
        "created": created,
        "again_created": again["created"],
        "records": len(records),
        "answer_field": answer["field"],
        "answer_understood": answer["understood"],
        "crosstab_total": int(crosstab["total"].sum()),
        "crosstab_index": list(crosstab.index),
        "count_pa": int(count["count"][0]),
        "export_rows": len(export),
        "export_columns": list(export.columns)[:8],
        "export_pa_rows": len(pa),
        "labelled": labelled["value"],
        "fields": [f["name"] for f in node_fields],
        "export_pneumothorax_true": int((export["pneumothorax"] == True).sum()),  # noqa: E712
        "pandas_crosstab_total": int(export.groupby(["image_quality", "analysis_confidence"]).size().sum()),
        "parse_error": parse_error,
    }))


if __name__ == "__main__":
    main()
