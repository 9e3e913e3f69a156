//! The node's `/metrics` values read from state at scrape time (the event metrics — RPC
//! latencies, stage timings, refusals, DP releases — are recorded as they happen, in
//! `cxrfed_server::metrics::Metrics`). Operational values only: queue depths, batch sizes,
//! throughput counters, link and receiver state; no identity, record or cohort count.

use std::sync::atomic::Ordering;

use cxrfed_server::metrics::{counter, gauge};
use prometheus_client::registry::Registry;

use crate::state::Node;

pub fn snapshot(node: &Node, r: &mut Registry) {
    gauge(
        r,
        "in_flight",
        "gRPC requests being processed",
        f64::from(node.in_flight().load(Ordering::Relaxed)),
    );
    gauge(
        r,
        "uptime_seconds",
        "Seconds since the node started",
        node.uptime().as_secs_f64(),
    );
    let pipeline = node.pipeline();
    gauge(
        r,
        "decode_slots_busy",
        "Decode workers busy (of decode_workers)",
        pipeline.decode_slots_busy() as f64,
    );
    gauge(
        r,
        "decode_slots",
        "Decode workers (decode_workers)",
        node.config().decode_workers as f64,
    );
    if let Some(model) = pipeline.model() {
        let s = model.stats();
        let config = model.config();
        gauge(
            r,
            "inference_queue_depth",
            "Images waiting for the inference worker",
            s.queued as f64,
        );
        gauge(
            r,
            "inference_queue_capacity",
            "The inference queue's bound",
            config.queue_capacity as f64,
        );
        gauge(
            r,
            "inference_incoming",
            "Images being decoded for the model (a batch waits only while some are)",
            s.incoming as f64,
        );
        counter(
            r,
            "inference_batches_unwaited",
            "Batches run before max_wait because nothing more was on its way",
            s.unwaited,
        );
        counter(r, "inference_images", "Images through the model", s.images);
        counter(
            r,
            "inference_batches",
            "Forward passes (batches)",
            s.batches,
        );
        counter(
            r,
            "inference_rejected",
            "Images refused because the inference queue was full",
            s.rejected,
        );
        gauge(
            r,
            "inference_batch_size_mean",
            "Mean images per batch since start",
            s.mean_batch,
        );
        gauge(
            r,
            "inference_batch_size_max",
            "Largest batch since start",
            s.max_batch_seen as f64,
        );
        gauge(
            r,
            "inference_forward_seconds_mean",
            "Mean forward time per batch",
            s.mean_forward_ms / 1000.0,
        );
    }
    let jobs = node.jobs().all();
    let running: Vec<_> = jobs
        .iter()
        .map(|j| j.to_pb())
        .filter(|j| j.state == "running")
        .collect();
    gauge(
        r,
        "ingest_jobs_running",
        "Ingest and pull jobs running",
        running.len() as f64,
    );
    gauge(
        r,
        "ingest_files_per_second",
        "Files per second over the running ingest jobs",
        running.iter().map(|j| j.files_per_second).sum(),
    );
    if let Some(link) = node.link() {
        gauge(
            r,
            "coordinator_link_up",
            "1 while the link to the coordinator is up",
            if link.connected { 1.0 } else { 0.0 },
        );
    }
    if let Some(b) = node.backfill_status() {
        gauge(
            r,
            "backfill_running",
            "1 while a back-fill with a promoted model runs",
            if b.state == "running" { 1.0 } else { 0.0 },
        );
    }
    if let Some(d) = node.receiver_stats().to_pb() {
        gauge(
            r,
            "dicom_associations_active",
            "DICOM associations open",
            d.associations_active as f64,
        );
        counter(
            r,
            "dicom_associations",
            "DICOM associations accepted",
            d.associations_total,
        );
        counter(
            r,
            "dicom_instances_received",
            "Instances received by C-STORE",
            d.instances_received,
        );
        counter(
            r,
            "dicom_instances_stored",
            "Instances stored as records",
            d.instances_stored,
        );
        let refused = prometheus_client::metrics::family::Family::<
            cxrfed_server::metrics::Reason,
            prometheus_client::metrics::counter::Counter,
        >::default();
        for (reason, n) in d
            .instances_refused
            .iter()
            .chain(d.associations_rejected.iter())
        {
            refused
                .get_or_create(&cxrfed_server::metrics::Reason {
                    reason: reason.clone(),
                })
                .inc_by(*n);
        }
        r.register(
            "dicom_refusals",
            "DICOM associations and instances refused, by reason",
            refused,
        );
    }
}
