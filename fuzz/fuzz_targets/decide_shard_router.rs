#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| meshpatterns_fuzz::decide_shard_router(data));
