//! Raw target: the input's bytes are the SQL text (invalid UTF-8 replaced, as a string over
//! Flight SQL cannot carry it), sent down the parse -> policy -> plan path.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let sql = String::from_utf8_lossy(data);
    let _ = sde_gateway_fuzz::run(&sql);
});
