//! The `tollgate` binary: a thin shell over [`tollgate::cli`].

fn main() -> std::process::ExitCode {
    tollgate::cli::main()
}
