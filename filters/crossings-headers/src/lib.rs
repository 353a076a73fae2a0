//! crossings-headers: the bench-only crossings module (filters/crossings)
//! without `proxy_on_response_body`, as the modules it stands for
//! (consistent-hash, rate-limiter, experiment-splitter).

crossings::export_crossings!();
