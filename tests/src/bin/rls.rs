//! The rate limit service of tests/rls (`meshpatterns-rls`), built with the
//! tests so that integration tests can start it (see tests/src/rls.rs).

fn main() -> std::process::ExitCode {
    meshpatterns_rls::main()
}
