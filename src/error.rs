//! The extension's errors: one enum, reported as SQL errors with a proper
//! SQLSTATE and a message that names the offending argument.
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{PgLogLevel, PgSqlErrorCode};

#[derive(Debug)]
pub enum ObsError {
    /// An argument has a value that is not allowed.
    InvalidArgument {
        argument: &'static str,
        reason: String,
    },
    /// A required argument is NULL or empty.
    MissingArgument { argument: &'static str },
}

impl ObsError {
    pub fn invalid(argument: &'static str, reason: impl Into<String>) -> Self {
        ObsError::InvalidArgument {
            argument,
            reason: reason.into(),
        }
    }

    fn code(&self) -> PgSqlErrorCode {
        match self {
            ObsError::InvalidArgument { .. } => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            ObsError::MissingArgument { .. } => PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
        }
    }

    /// Raise as an SQL ERROR (aborts the statement; nothing is half-written).
    pub fn report(self) -> ! {
        let code = self.code();
        ErrorReport::new(code, self.to_string(), function_name!()).report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }
}

impl std::fmt::Display for ObsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ObsError::InvalidArgument { argument, reason } => {
                write!(f, "fraiseql_obs: {argument} {reason}")
            }
            ObsError::MissingArgument { argument } => {
                write!(f, "fraiseql_obs: {argument} must not be NULL or empty")
            }
        }
    }
}

impl std::error::Error for ObsError {}
