//! Cohort statistics over a node's records: the query language ([`query`]), the compact
//! columnar form a node keeps in sync with its store ([`columns`]) and exact aggregation
//! ([`exact`]) and the differentially private release built on opendp ([`dp`]). Knows nothing
//! of gRPC or storage.
//!
//! Exact results are for the site's own admin only; the node enforces that. Every result meant
//! for a remote party goes through [`dp`].
//!
//! Architecture invariant: cxrfed-stats depends on neither tonic, sled nor tch.

pub mod columns;
pub mod dp;
pub mod exact;
pub mod pool;
pub mod query;

pub use columns::Columns;
pub use exact::{Table, TableCell};
pub use query::{Query, QueryError};

/// Parses, binds and evaluates `text` exactly.
pub fn exact(columns: &Columns, text: &str) -> Result<Table, QueryError> {
    exact_query(columns, query::parse(text)?)
}

/// Binds and evaluates a parsed (or structured) query exactly.
pub fn exact_query(columns: &Columns, query: Query) -> Result<Table, QueryError> {
    let bound = exact::bind(columns, query)?;
    Ok(exact::evaluate(columns, &bound))
}
