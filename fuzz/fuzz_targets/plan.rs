//! Structured target: the input is an `arbitrary`-derived description of a statement
//! (`sde_gateway_fuzz::sql`), rendered to SQL and sent down the parse -> policy -> plan path.
//! An input whose first byte is 0 is the rest of its bytes as raw SQL.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let sql = sde_gateway_fuzz::sql::render_bytes(data);
    if std::env::var_os("SDE_FUZZ_PRINT").is_some() {
        eprintln!(
            "---- SQL ({} bytes) ----\n{}",
            sql.len(),
            sql.chars().take(4000).collect::<String>()
        );
    }
    let _ = sde_gateway_fuzz::run(&sql);
});
