use clap::Parser;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Log files of local runs (`onevision run`) stay free of colour codes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = onevision::cli::Cli::parse();
    if let Err(err) = onevision::cli::run(cli) {
        eprintln!("error: {err:#}");
        // Runtime errors carry their exit code: 78 tells the operator not to retry.
        let code = err
            .downcast_ref::<onevision::runtime::RuntimeError>()
            .map_or(1, onevision::runtime::RuntimeError::exit_code);
        std::process::exit(code);
    }
}
