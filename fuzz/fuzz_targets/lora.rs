//! Fuzz target: `sire::fuzzing::lora` (see its documentation).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = sire::fuzzing::lora(data);
});
