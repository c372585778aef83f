//! The `z4j-agentd` binary: everything lives in the library.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    z4j_agentd::cli::main()
}
