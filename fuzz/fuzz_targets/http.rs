#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| paligemma_fuzz::http(data));
