//! Protobuf decoding of every message a server takes from a peer: the request of every node
//! and coordinator RPC, the link's messages both ways, and the signed payloads verified from
//! bytes (orders, query intents). The first byte picks the type; a decoded message must
//! re-encode to bytes that decode and re-encode the same.
#![no_main]

use cxrfed_proto::v1 as pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fn round_trip<M: Message + Default>(bytes: &[u8]) {
    if let Ok(message) = M::decode(bytes) {
        // Compared as bytes: a NaN double is not equal to itself.
        let encoded = message.encode_to_vec();
        let again = M::decode(encoded.as_slice()).expect("re-encoded decodes");
        assert_eq!(again.encode_to_vec(), encoded);
    }
}

macro_rules! each {
    ($selector:expr, $bytes:expr, $($ty:ty),+ $(,)?) => {{
        let types: &[fn(&[u8])] = &[$(round_trip::<$ty>),+];
        types[usize::from($selector) % types.len()]($bytes)
    }};
}

fuzz_target!(|bytes: &[u8]| {
    let Some((&selector, rest)) = bytes.split_first() else {
        return;
    };
    each!(
        selector,
        rest,
        // NodeService
        pb::ExtractRequest,
        pb::GetRecordRequest,
        pb::ListRecordsRequest,
        pb::StatusRequest,
        pb::StatsRequest,
        pb::ExportRequest,
        pb::AskRequest,
        pb::GetSchemaRequest,
        pb::DefineFieldRequest,
        pb::ListFieldsRequest,
        pb::AnnotateRequest,
        pb::StartIngestRequest,
        pb::IngestJobsRequest,
        pb::DpStatsRequest,
        pb::BudgetRequest,
        pb::SetBudgetRequest,
        pb::ListBudgetsRequest,
        pb::AuditLogRequest,
        pb::VerifyAuditRequest,
        pb::GetTrainingPolicyRequest,
        pb::TrainingPolicy,
        pb::RollbackModelRequest,
        // CoordinatorService
        pb::NodeMessage,
        pb::FederatedQueryRequest,
        pb::SitesRequest,
        pb::StartJobRequest,
        pb::GetJobRequest,
        pb::ListJobsRequest,
        pb::ListModelsRequest,
        pb::GetModelRequest,
        pb::ImportModelChunk,
        pb::PromoteModelRequest,
        // What a node decodes from the coordinator, and signed payloads.
        pb::CoordinatorMessage,
        pb::SignedOrder,
        pb::Order,
        pb::SignedQuery,
        pb::QueryIntent,
    )
});
