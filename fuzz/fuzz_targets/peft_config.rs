//! Fuzz target: `sire::fuzzing::peft_config` (see its documentation).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = sire::fuzzing::peft_config(data);
});
