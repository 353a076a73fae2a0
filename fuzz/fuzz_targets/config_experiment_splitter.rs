#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| meshpatterns_fuzz::config_experiment_splitter(data));
