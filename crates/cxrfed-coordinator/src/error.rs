//! The coordinator's one error type and its one mapping to a gRPC status.

use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The request itself is malformed (a job file, an unreadable card, a bad signature's
    /// contents): INVALID_ARGUMENT.
    #[error("{0}")]
    InvalidArgument(String),
    /// Well-formed, but not possible in the current state (an unknown head, a job that is not
    /// running): FAILED_PRECONDITION.
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    PermissionDenied(String),
    /// Too few sites answered: UNAVAILABLE (the caller may retry later).
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Store(#[from] cxrfed_store::StoreError),
    #[error(transparent)]
    Aggregate(#[from] cxrfed_fl::AggregateError),
    #[error(transparent)]
    Codec(#[from] cxrfed_fl::tensor::CodecError),
    #[error("{0}")]
    Internal(String),
}

impl CoordinatorError {
    pub fn internal(e: impl std::fmt::Display) -> CoordinatorError {
        CoordinatorError::Internal(e.to_string())
    }

    pub fn invalid(e: impl std::fmt::Display) -> CoordinatorError {
        CoordinatorError::InvalidArgument(e.to_string())
    }

    pub fn precondition(e: impl std::fmt::Display) -> CoordinatorError {
        CoordinatorError::FailedPrecondition(e.to_string())
    }
}

impl From<CoordinatorError> for Status {
    fn from(e: CoordinatorError) -> Status {
        let message = e.to_string();
        match e {
            CoordinatorError::InvalidArgument(_) => Status::invalid_argument(message),
            CoordinatorError::FailedPrecondition(_) => Status::failed_precondition(message),
            CoordinatorError::NotFound(_) => Status::not_found(message),
            CoordinatorError::AlreadyExists(_) => Status::already_exists(message),
            CoordinatorError::PermissionDenied(_) => Status::permission_denied(message),
            CoordinatorError::Unavailable(_) => Status::unavailable(message),
            CoordinatorError::Store(_)
            | CoordinatorError::Aggregate(_)
            | CoordinatorError::Codec(_)
            | CoordinatorError::Internal(_) => Status::internal(message),
        }
    }
}

pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;
