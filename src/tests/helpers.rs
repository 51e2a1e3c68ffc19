// In-transaction tests of every SQL function, bad input included. They run inside a transaction
// that is rolled back, so the worker never sees these rows: work is driven with
// `memory.process_pending()`. Worker behaviour is tested against a real cluster in
// `tests/cluster`.

use pgrx::prelude::*;

fn run(sql: &str) {
    Spi::run(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
}

fn one<T: FromDatum + IntoDatum>(sql: &str) -> Option<T> {
    Spi::get_one::<T>(sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
}

fn text(sql: &str) -> String {
    one::<String>(sql).unwrap_or_default()
}

fn count(sql: &str) -> i64 {
    one::<i64>(&format!("SELECT count(*) FROM ({sql}) x")).unwrap()
}

/// "SQLSTATE: message" of the error `sql` raises ("ok" if it succeeds), in a subtransaction.
fn error_of(sql: &str) -> String {
    if one::<bool>("SELECT to_regprocedure('pg_temp.error_of(text)') IS NULL").unwrap() {
        run("CREATE FUNCTION pg_temp.error_of(q text) RETURNS text LANGUAGE plpgsql AS \
             $$ BEGIN EXECUTE q; RETURN 'ok'; \
                EXCEPTION WHEN OTHERS THEN RETURN SQLSTATE || ': ' || SQLERRM; END $$");
    }
    one::<String>(&format!(
        "SELECT pg_temp.error_of({})",
        pgrx::spi::quote_literal(sql)
    ))
    .unwrap()
}

/// The SQLSTATE `sql` fails with ("ok" if it succeeds). Runs in a subtransaction, like a client
/// statement: a failed call must leave nothing behind, which the callers then check.
fn sqlstate(sql: &str) -> String {
    let e = error_of(sql);
    if e == "ok" { e } else { e[..5].to_string() }
}

/// Act as another identity, the way PostgREST does.
fn as_user(sub: &str) {
    run(&format!(
        "SELECT set_config('request.jwt.claims', '{{\"sub\": \"{sub}\"}}', true)"
    ));
}

/// A non-superuser role allowed to call the API, so ownership checks apply to it.
fn become_app_role() {
    run("CREATE ROLE memory_test_app");
    run("SELECT memory.grant_usage('memory_test_app')");
    run("SET LOCAL ROLE memory_test_app");
}
