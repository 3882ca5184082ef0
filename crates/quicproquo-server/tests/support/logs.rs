//! The logs of the servers a test binary runs, captured for tests that read them.

/// Everything this test binary's servers log, from the first call to [`captured_logs`] on.
pub fn captured_logs() -> std::sync::Arc<std::sync::Mutex<Vec<u8>>> {
    static LOGS: std::sync::OnceLock<std::sync::Arc<std::sync::Mutex<Vec<u8>>>> =
        std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&logs);
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .with_writer(move || LogWriter(std::sync::Arc::clone(&sink)))
            .finish();
        // Another test of this binary may have installed one first: then nothing is captured
        // and the test below fails, saying so.
        let _ = tracing::subscriber::set_global_default(subscriber);
        logs
    })
    .clone()
}

/// Appends what the subscriber writes to the shared buffer.
struct LogWriter(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
