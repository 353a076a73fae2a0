//! Replays every committed corpus file (`fuzz/corpus/<target>/*`) through its
//! target function, so the corpora and the targets cannot rot between fuzz
//! runs. Runs in `make test` without libFuzzer:
//! `cargo test --manifest-path fuzz/Cargo.toml --no-default-features`.

use std::path::Path;

#[test]
fn every_corpus_file_passes_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut total = 0;
    for (name, target) in meshpatterns_fuzz::TARGETS {
        let dir = root.join(name);
        let mut files: Vec<_> = match std::fs::read_dir(&dir) {
            Ok(d) => d.filter_map(Result::ok).map(|e| e.path()).collect(),
            Err(e) => panic!("no corpus for {name} at {}: {e}", dir.display()),
        };
        files.sort();
        assert!(!files.is_empty(), "empty corpus for {name}");
        for f in &files {
            let data = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            if std::panic::catch_unwind(|| target(&data)).is_err() {
                panic!("{name} fails on {}", f.display());
            }
        }
        total += files.len();
    }
    // Every corpus folder belongs to a target.
    for entry in std::fs::read_dir(&root).into_iter().flatten().filter_map(Result::ok) {
        let n = entry.file_name().to_string_lossy().into_owned();
        assert!(meshpatterns_fuzz::TARGETS.iter().any(|(t, _)| *t == n), "corpus/{n} has no target");
    }
    assert!(total > 0);
}
