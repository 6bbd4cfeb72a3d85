//! `migrator`: the csvd operator CLI.

fn main() -> std::process::ExitCode {
    // Like other command-line tools, end quietly when the reader of the output goes away
    // (`migrator vm show g1 | head`) instead of failing on the next print.
    #[allow(unsafe_code)]
    // SAFETY: restoring SIGPIPE's default disposition before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    csvd_migrator::cli::main()
}
