use clap::Parser;

fn main() {
    let cli = onevision::cli::Cli::parse();
    // Spans are exported when OTEL_EXPORTER_OTLP_ENDPOINT is set (docs/observability.md).
    let guard = match onevision::telemetry::process_tracing(cli.command.role()).init() {
        Ok(g) => g,
        Err(err) => {
            // A malformed OTEL_* setting: restarting cannot fix it.
            eprintln!("error: {err}");
            std::process::exit(onevision::EXIT_PERMANENT);
        }
    };
    let result = onevision::cli::run(cli);
    // Flush the spans still buffered before exiting: `process::exit` runs no destructors.
    drop(guard);
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        // Runtime errors carry their exit code: 78 tells the operator not to retry.
        let code = err
            .downcast_ref::<onevision::runtime::RuntimeError>()
            .map_or(1, onevision::runtime::RuntimeError::exit_code);
        std::process::exit(code);
    }
}
