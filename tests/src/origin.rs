//! A slow origin for the caching-layer tests and demo: a real HTTP server
//! (an [`Upstream`] with a custom handler) that takes a fixed time per request
//! and marks its responses cacheable or not by path.
//!
//! | path | `cache-control` |
//! |---|---|
//! | `/static/...` | `public, max-age=300` |
//! | `/short/...` | `public, max-age=3` |
//! | `/nostore/...` | `no-store` |
//! | anything else | `no-cache` |
//!
//! Every response carries a `date` header (HTTP caches need it to compute
//! the age) and a body with a serial number, so a body seen twice was served
//! from a cache.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::upstream::{Reply, Request};
use crate::Upstream;

/// Start the slow origin, named `origin`, answering each request after `delay`.
pub fn slow_origin(delay: Duration) -> Upstream {
    let serial = Arc::new(AtomicU64::new(0));
    Upstream::with_handler(
        "origin",
        Arc::new(move |_name: &str, r: &Request| {
            std::thread::sleep(delay);
            let n = serial.fetch_add(1, Ordering::SeqCst) + 1;
            Reply::new(200, format!("{} served by the origin as #{n}\n", r.path))
                .header("cache-control", cache_control_for(&r.path))
                .header("date", &http_date(SystemTime::now()))
                .header("content-type", "text/plain")
                .header("x-replica", "origin")
        }),
    )
}

/// The `cache-control` the slow origin sends for `path`.
pub fn cache_control_for(path: &str) -> &'static str {
    if path.starts_with("/static/") {
        "public, max-age=300"
    } else if path.starts_with("/short/") {
        "public, max-age=3"
    } else if path.starts_with("/nostore/") {
        "no-store"
    } else {
        "no-cache"
    }
}

/// An IMF-fixdate (RFC 9110 §5.6.7), e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
pub fn http_date(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let (h, m, s) = (secs % 86_400 / 3600, secs % 3600 / 60, secs % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    format!("{}, {day:02} {} {year} {h:02}:{m:02}:{s:02} GMT", WEEKDAYS[days.rem_euclid(7) as usize], MONTHS[(month - 1) as usize])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_date_matches_known_instants() {
        assert_eq!(http_date(UNIX_EPOCH), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(http_date(UNIX_EPOCH + Duration::from_secs(784_111_777)), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(http_date(UNIX_EPOCH + Duration::from_secs(951_782_400)), "Tue, 29 Feb 2000 00:00:00 GMT");
        assert_eq!(http_date(UNIX_EPOCH + Duration::from_secs(1_798_761_599)), "Thu, 31 Dec 2026 23:59:59 GMT");
    }
}
