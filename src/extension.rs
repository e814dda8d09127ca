//! Where the extension is installed. Code that runs SQL names the extension's
//! objects by schema: it never relies on the caller's search_path.
use pgrx::prelude::*;

/// The extension's schema, quoted as an identifier.
pub fn schema() -> String {
    crate::sql::one::<String>(
        "SELECT pg_catalog.quote_ident(n.nspname) FROM pg_catalog.pg_extension e \
           JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) e.extnamespace \
          WHERE e.extname OPERATOR(pg_catalog.=) 'fraiseql_obs'::pg_catalog.name",
        &[],
    )
    .ok()
    .flatten()
    .unwrap_or_else(|| error!("fraiseql_obs: the extension is not installed"))
}
