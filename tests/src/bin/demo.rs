//! `make demo`: see `meshpatterns_tests::demo`.
fn main() {
    let hold = std::env::args().nth(1).and_then(|s| s.parse().ok()).map(std::time::Duration::from_secs);
    if let Err(e) = meshpatterns_tests::demo::run(hold) {
        eprintln!("demo failed: {e}");
        std::process::exit(1);
    }
}
