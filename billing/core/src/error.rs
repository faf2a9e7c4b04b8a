//! The error type of billing operations: caller mistakes (permanent) apart from store
//! failures (retryable), so CLIs and HTTP handlers can map them without string matching.

/// A billing operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    /// The input is not acceptable; retrying the same input fails the same way.
    #[error("{0}")]
    Invalid(String),
    /// The named thing does not exist.
    #[error("{what} not found")]
    NotFound {
        /// What was looked for, e.g. `customer cus_123`.
        what: String,
    },
    /// The store failed; the operation may succeed later.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

impl BillingError {
    /// True when retrying the same call later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            BillingError::Invalid(_) | BillingError::NotFound { .. } => false,
            BillingError::Database(e) => !matches!(
                e,
                sqlx::Error::RowNotFound
                    | sqlx::Error::ColumnDecode { .. }
                    | sqlx::Error::Decode(_)
            ),
        }
    }
}
