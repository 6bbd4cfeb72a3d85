//! `migrator`: the csvd operator CLI.

fn main() -> std::process::ExitCode {
    csvd_migrator::cli::main()
}
