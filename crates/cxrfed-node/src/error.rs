//! The node's error type and its one mapping to gRPC status codes.

use cxrfed_imaging::ImagingError;
use cxrfed_model::ModelError;
use cxrfed_proto::v1::TaskErrorCode;
use cxrfed_store::StoreError;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Imaging(#[from] ImagingError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// Refused by this site's policy (who signed, for which study, site or time).
    #[error("refused: {0}")]
    Refused(String),
    #[error("upload of {size} bytes exceeds the limit of {limit} bytes")]
    UploadTooLarge { size: u64, limit: u64 },
    #[error("record {0} not found")]
    NotFound(String),
    /// The request is valid but the node is not in a state to do it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A per-caller or per-node concurrency limit is reached; retry later.
    #[error("busy: {0}")]
    Busy(String),
    /// The work did not finish within its deadline; nothing was released or charged.
    #[error("deadline exceeded: {0}")]
    Deadline(String),
    #[error("the node is shutting down; retry against a running node")]
    ShuttingDown,
    #[error("upload stream failed: {}", .0.message())]
    Stream(Status),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl NodeError {
    pub(crate) fn code(&self) -> Code {
        match self {
            NodeError::Imaging(e) => match e {
                ImagingError::Empty
                | ImagingError::UnrecognizedFormat { .. }
                | ImagingError::MalformedDicom(_)
                | ImagingError::Unsupported(_)
                | ImagingError::Corrupt(_) => Code::InvalidArgument,
                ImagingError::UnsupportedTransferSyntax { .. } => Code::Unimplemented,
                ImagingError::FileTooLarge { .. }
                | ImagingError::DimensionsTooLarge { .. }
                | ImagingError::ResourceLimit(_)
                | ImagingError::DecodeBudgetBusy(_) => Code::ResourceExhausted,
                ImagingError::Quarantined(_) => Code::FailedPrecondition,
                ImagingError::DecoderPanic => Code::Internal,
            },
            NodeError::Store(e) => match e {
                StoreError::NewerSchema { .. } => Code::FailedPrecondition,
                StoreError::BudgetExhausted { .. } => Code::ResourceExhausted,
                StoreError::Replay { .. } => Code::AlreadyExists,
                StoreError::Locked { .. }
                | StoreError::Sled(_)
                | StoreError::Corrupt { .. }
                | StoreError::Encode(_) => Code::Internal,
            },
            NodeError::InvalidRequest(_) => Code::InvalidArgument,
            NodeError::Refused(_) => Code::PermissionDenied,
            NodeError::UploadTooLarge { .. } | NodeError::Busy(_) => Code::ResourceExhausted,
            NodeError::Deadline(_) => Code::DeadlineExceeded,
            NodeError::NotFound(_) => Code::NotFound,
            NodeError::FailedPrecondition(_) => Code::FailedPrecondition,
            NodeError::ShuttingDown => Code::Unavailable,
            NodeError::Stream(status) => status.code(),
            NodeError::Internal(_) => Code::Internal,
            NodeError::Model(e) => match e {
                ModelError::QueueFull { .. } => Code::ResourceExhausted,
                _ => Code::Internal,
            },
        }
    }

    /// A stable machine-readable kind, sent as the `x-cxrfed-error` trailer and logged.
    pub fn kind(&self) -> &'static str {
        match self {
            NodeError::Imaging(e) => e.kind(),
            NodeError::Store(StoreError::BudgetExhausted { .. }) => "budget_exhausted",
            NodeError::Store(StoreError::Replay { .. }) => "replay",
            NodeError::Store(_) => "store",
            NodeError::InvalidRequest(_) => "invalid_request",
            NodeError::Refused(_) => "refused",
            NodeError::UploadTooLarge { .. } => "file_too_large",
            NodeError::Busy(_) => "busy",
            NodeError::Deadline(_) => "deadline",
            NodeError::NotFound(_) => "not_found",
            NodeError::FailedPrecondition(_) => "failed_precondition",
            NodeError::ShuttingDown => "shutting_down",
            NodeError::Stream(_) => "stream",
            NodeError::Internal(_) => "internal",
            NodeError::Model(ModelError::QueueFull { .. }) => "queue_full",
            NodeError::Model(_) => "model",
        }
    }
}

impl NodeError {
    /// What the coordinator is told when a federated task fails: derived from the error's kind,
    /// never from its message.
    pub fn task_error_code(&self) -> TaskErrorCode {
        match self {
            NodeError::Store(StoreError::BudgetExhausted { .. }) => TaskErrorCode::BudgetExhausted,
            NodeError::Store(StoreError::Replay { .. }) | NodeError::Refused(_) => {
                TaskErrorCode::Refused
            }
            NodeError::InvalidRequest(_) => TaskErrorCode::Invalid,
            _ => TaskErrorCode::Internal,
        }
    }
}

impl From<NodeError> for Status {
    fn from(e: NodeError) -> Status {
        // Messages are built from our own error types: they never carry header values.
        let mut status = Status::new(e.code(), e.to_string());
        if let Ok(value) = e.kind().parse() {
            status.metadata_mut().insert("x-cxrfed-error", value);
        }
        if let NodeError::Model(ModelError::QueueFull { retry_after_ms, .. }) = &e
            && let Ok(value) = retry_after_ms.to_string().parse()
        {
            status.metadata_mut().insert("retry-after-ms", value);
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_error_codes_follow_the_error_kind() {
        assert_eq!(
            NodeError::Refused("not a researcher".into()).task_error_code(),
            TaskErrorCode::Refused
        );
        assert_eq!(
            NodeError::Store(StoreError::Replay { nonce: "n".into() }).task_error_code(),
            TaskErrorCode::Refused
        );
        // A message that merely mentions a refusal is still what it is.
        assert_eq!(
            NodeError::InvalidRequest("refused: the query".into()).task_error_code(),
            TaskErrorCode::Invalid
        );
        assert_eq!(
            NodeError::Internal("disk".into()).task_error_code(),
            TaskErrorCode::Internal
        );
    }
}
