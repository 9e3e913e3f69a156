//! The federated-learning contract of cxrfed, shared by the node, the coordinator and the
//! model crate: model cards and label maps (`card`, `labelmap`), job files and the local
//! settings of a round (`spec`), the one f32 safetensors codec (`tensor`), aggregation —
//! FedAvg, FedProx, FedAdam and DP-FedAvg noise (`aggregate`), chunked transfer assembly
//! (`transfer`) and the job/round/site state machines (`state`).
//!
//! Architecture invariant: cxrfed-fl links neither torch nor tonic (nor prost): it is plain
//! data and arithmetic, so the coordinator aggregates without libtorch and the model crate
//! trains without knowing the wire.

#![forbid(unsafe_code)]

pub mod aggregate;
pub mod card;
pub mod labelmap;
pub mod policy;
pub mod secagg;
pub mod spec;
pub mod state;
pub mod tensor;
pub mod transfer;

pub use aggregate::{AdamMoments, AggregateError, Aggregator, Algorithm, ServerAdam};
pub use card::{CardError, InputSpec, ModelCard, ModelFormat};
pub use labelmap::{Head, HeadKind, LabelMap};
pub use policy::SitePolicy;
pub use spec::{BUNDLED_VERSION, JobSpec, LocalSpec, NewHead, NewHeadKind, Trainable};
pub use state::{JobState, RoundState, SiteStatus};
pub use tensor::{Tensor, Weights};
pub use transfer::Assembly;
