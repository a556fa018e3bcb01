//! libFuzzer entry point; the property is [`ringfeed_fuzz::label`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ringfeed_fuzz::label(data));
