//! Errors of the Rust-side SQL functions, turned into Postgres errors (message + SQLSTATE) only at
//! the edge, in `raise`.

use crate::summarizer::SummarizerError;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::spi::SpiError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ApiError {
    /// 22023: the caller passed something unusable.
    #[error("{0}")]
    InvalidParameter(String),
    /// 42501: the caller may not do this.
    #[error("{0}")]
    InsufficientPrivilege(String),
    /// 0A000: valid input we do not support in this context.
    #[error("{0}")]
    FeatureNotSupported(String),
    /// 22023: a misconfigured `memory_ext.summarizer`.
    #[error(transparent)]
    Summarizer(#[from] SummarizerError),
    /// 55000: the call can never succeed in the caller's current state.
    #[error("{0}")]
    WrongState(String),
    /// 22023: a setting that cannot be used (an unreadable key file).
    #[error(transparent)]
    Settings(#[from] crate::settings::SettingsError),
    /// 22021: text that must be UTF-8 is not (an identity read from a role name or the JWT).
    #[error("{0} is not valid UTF-8: memory_ext identities must be")]
    NotUtf8(&'static str),
    /// XX000: an internal query failed.
    #[error("internal query failed: {0}")]
    Spi(#[from] SpiError),
    /// XX000: claiming or finishing work failed.
    #[error(transparent)]
    Queue(#[from] crate::queue::QueueError),
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn sqlstate(&self) -> PgSqlErrorCode {
        match self {
            ApiError::InvalidParameter(_) | ApiError::Summarizer(_) | ApiError::Settings(_) => {
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE
            }
            ApiError::InsufficientPrivilege(_) => PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            ApiError::FeatureNotSupported(_) => PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            ApiError::WrongState(_) => PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            ApiError::NotUtf8(_) => PgSqlErrorCode::ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
            ApiError::Spi(_) | ApiError::Queue(_) => PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
        }
    }

    pub fn raise(self) -> ! {
        ErrorReport::new(self.sqlstate(), self.to_string(), "").report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }
}

/// Unwrap at the SQL edge.
pub fn or_raise<T>(r: ApiResult<T>) -> T {
    r.unwrap_or_else(|e| e.raise())
}
