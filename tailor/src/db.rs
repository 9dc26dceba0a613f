//! The database: connection pool and the embedded migrations from `migrations/`.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::code::Code;

/// Every migration in `migrations/`, compiled into the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// Why the database could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("DATABASE_URL is not a valid PostgreSQL URL: {0}")]
    InvalidUrl(String),
    #[error("cannot reach PostgreSQL: {0}")]
    Unreachable(#[source] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Query(#[from] sqlx::Error),
}

/// The code for a failed statement: `DATABASE_UNAVAILABLE` when PostgreSQL could not be reached
/// (nothing was written; retry later), `DATABASE_ERROR` for anything else.
pub fn error_code(error: &sqlx::Error) -> Code {
    match error {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::Io(_)
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_) => Code::DatabaseUnavailable,
        _ => Code::DatabaseError,
    }
}

impl DbError {
    /// A stable, machine-readable code for this error.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidUrl(_) => Code::ConfigInvalid,
            Self::Unreachable(_) => Code::DatabaseUnavailable,
            Self::Migration(_) => Code::MigrationFailed,
            Self::Query(_) => Code::DatabaseError,
        }
    }
}

/// Opens a pool. The URL's password is never echoed back in errors.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, DbError> {
    let options: PgConnectOptions = url
        .parse()
        .map_err(|e: sqlx::Error| DbError::InvalidUrl(redact_url_error(&e)))?;
    PgPoolOptions::new()
        .max_connections(max_connections)
        // Statements are short; a burst of them waits its turn rather than failing.
        .acquire_timeout(Duration::from_secs(15))
        .connect_with(options)
        .await
        .map_err(DbError::Unreachable)
}

/// Applies every pending migration. Safe to run concurrently from several processes:
/// sqlx serialises them with an advisory lock.
/// Applies pending migrations; returns how many the schema now has (all of them).
pub async fn migrate(pool: &PgPool) -> Result<usize, DbError> {
    MIGRATOR.run(pool).await?;
    Ok(MIGRATOR.iter().count())
}

fn redact_url_error(error: &sqlx::Error) -> String {
    // sqlx's parse errors describe the problem without repeating the URL; keep only the kind.
    match error {
        sqlx::Error::Configuration(inner) => inner.to_string(),
        _ => "unparseable URL".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_unreachable_database_is_unavailable() {
        assert_eq!(
            error_code(&sqlx::Error::PoolTimedOut),
            Code::DatabaseUnavailable
        );
        assert_eq!(
            error_code(&sqlx::Error::PoolClosed),
            Code::DatabaseUnavailable
        );
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(
            error_code(&sqlx::Error::Io(refused)),
            Code::DatabaseUnavailable
        );
        assert_eq!(error_code(&sqlx::Error::RowNotFound), Code::DatabaseError);
        assert_eq!(
            error_code(&sqlx::Error::Protocol("unexpected message".into())),
            Code::DatabaseError
        );
    }
}
