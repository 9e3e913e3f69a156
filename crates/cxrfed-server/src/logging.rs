//! The only place that initialises tracing (every binary calls one of these). A server writes
//! JSON lines to stdout and to `DATA_DIR/logs/KIND.log`; client commands log warnings to
//! stderr.

use std::path::Path;

use crate::layout::Layout;

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, fmt};

/// JSON logs for a serving process into its log file and stdout. Keep the guard alive until
/// exit so the file gets flushed.
pub fn init_server(layout: &Layout, level: &str) -> anyhow::Result<WorkerGuard> {
    let log_file = layout.log_file();
    let log_dir = log_file.parent().unwrap_or(Path::new("."));
    let file_name = log_file.file_name().unwrap_or_default();
    std::fs::create_dir_all(log_dir)?;
    let file = tracing_appender::rolling::never(log_dir, file_name);
    let (file, guard) = tracing_appender::non_blocking(file);
    let filter = EnvFilter::try_new(level)
        .map_err(|e| anyhow::anyhow!("invalid log level {level:?}: {e}"))?;
    tracing_subscriber::registry()
        .with(filter)
        .with(
            fmt::layer()
                .json()
                .with_current_span(true)
                .with_span_list(false)
                .with_writer(std::io::stdout),
        )
        .with(
            fmt::layer()
                .json()
                .with_current_span(true)
                .with_span_list(false)
                .with_writer(file),
        )
        .try_init()
        .map_err(|e| anyhow::anyhow!("logging already initialised: {e}"))?;
    Ok(guard)
}

/// Warnings and errors to stderr for client commands.
pub fn init_client() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("CXRFED_LOG").unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
}
