//! The audit chain on the wire: the store's entries and verification report as messages, the
//! same for the node's and the coordinator's chain (and the CLI reading a stopped node's
//! store). Here rather than in cxrfed-proto, which holds no store types.

use cxrfed_proto::v1 as pb;

/// An audit entry as the wire carries it.
pub fn entry(e: cxrfed_store::AuditEntry) -> pb::AuditEntry {
    pb::AuditEntry {
        seq: e.seq,
        time: e.time,
        identity: e.identity,
        role: e.role,
        method: e.method,
        query: e.query,
        epsilon: e.epsilon,
        delta: e.delta,
        digest: e.digest,
        prev: e.prev,
        hash: e.hash,
        via: e.via,
    }
}

/// A verification of the audit chain as the wire carries it.
pub fn verification(report: cxrfed_store::AuditReport) -> pb::VerifyAuditResponse {
    pb::VerifyAuditResponse {
        ok: report.broken.is_none(),
        entries: report.entries,
        head: report.head,
        broken_seq: report.broken.as_ref().map_or(0, |b| b.seq),
        reason: report.broken.map(|b| b.reason).unwrap_or_default(),
    }
}
