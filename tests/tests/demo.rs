//! `make demo` starts every section and its self-checks pass.

#[test]
fn demo_sections_start_and_self_check() {
    let sections = meshpatterns_tests::demo::start_all().unwrap_or_else(|e| panic!("demo failed: {e}"));
    assert!(!sections.is_empty());
    for s in &sections {
        assert!(s.lines.iter().any(|l| l.starts_with("self-check")), "{} has no self-check", s.title);
        assert!(s.lines.iter().any(|l| l.contains("curl")), "{} prints nothing to try", s.title);
    }
}
