//! The `paddock` binary: master, agent and CLI in one.

fn main() -> std::process::ExitCode {
    paddock::cli::main()
}
