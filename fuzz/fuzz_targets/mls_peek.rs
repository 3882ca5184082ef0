//! The MLS public-framing peek the Delivery Service runs on every message: never panics,
//! whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = quicproquo_core::group::inspect(data);
});
