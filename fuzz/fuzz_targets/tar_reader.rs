//! libFuzzer entry point; the property is [`ringfeed_fuzz::tar_reader`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ringfeed_fuzz::tar_reader(data));
