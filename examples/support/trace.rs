//! Logging for the examples: log lines as `RUST_LOG` says (default: warnings)
//! and, with `SIRE_TRACE=<file>`, a Chrome/Perfetto trace of every load,
//! prefetch, part use, wait, offload and spill, with their threads (open it in
//! <https://ui.perfetto.dev>, or draw it with `scripts/trace-plot.py`).

/// Installs the subscriber; the trace is written when the returned guard drops.
pub fn init() -> Option<tracing_chrome::FlushGuard> {
    use tracing_subscriber::prelude::*;
    let filter =
        tracing_subscriber::EnvFilter::new(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()));
    let fmt = tracing_subscriber::fmt::layer().with_filter(filter);
    let (chrome, guard) = match std::env::var_os("SIRE_TRACE") {
        Some(path) => {
            let (layer, guard) =
                tracing_chrome::ChromeLayerBuilder::new().file(path).include_args(true).build();
            (Some(layer), Some(guard))
        }
        None => (None, None),
    };
    tracing_subscriber::registry().with(fmt).with(chrome).init();
    guard
}
