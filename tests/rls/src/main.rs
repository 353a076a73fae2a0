//! `meshpatterns-rls --config LIMITS.yaml --redis redis://HOST:PORT [--listen ADDR]`:
//! see the library docs.

fn main() -> std::process::ExitCode {
    meshpatterns_rls::main()
}
