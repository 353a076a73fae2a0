//! crossings-body: the bench-only crossings module (filters/crossings) with
//! `proxy_on_response_body` among its exports, as the modules it stands for
//! (the pipeline, metrics-adapter, shard-router).

crossings::export_crossings!(response_body);
