"""Drives the Python SDK's Coordinator over a federation that has run a training job: the
registry, the jobs and one job's round log as DataFrames. Prints one JSON line."""

import argparse
import json

from cxrfed_client import Coordinator


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--coordinator", required=True)
    p.add_argument("--profile", required=True)
    p.add_argument("--job", required=True)
    args = p.parse_args()
    with Coordinator(args.coordinator, profile=args.profile) as study:
        models = study.models()
        jobs = study.jobs()
        log = study.job(args.job)
    completed = log[log["state"] == "completed"]
    final = log[log["state"] == "evaluation"]
    print(json.dumps({
        "versions": list(models.index),
        "parent_of_last": models.loc[jobs.loc[args.job, "latest_model"], "parent"],
        "job_state": log.attrs["state"],
        "completed_rounds": sorted(set(int(r) for r in completed["round"])),
        "sites_per_round": int(completed.groupby("round")["site"].count().min()),
        # Sites report noisy counts; the pooled accuracy is their ratio.
        "final_accuracy": float(final["metric.cardiomegaly.correct"].sum()
                                / final["metric.cardiomegaly.total"].sum()),
    }))


if __name__ == "__main__":
    main()
