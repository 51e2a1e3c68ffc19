//! The fake LLM server as a program, for the benchmark: `fake_llm PORT DELAY_MS [REQUEST_LOG]`.

fn main() {
    let mut args = std::env::args().skip(1);
    let port: u16 = args.next().and_then(|a| a.parse().ok()).unwrap_or(0);
    let delay_ms: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(200);
    let log = args.next().map(std::path::PathBuf::from);
    memory_ext_cluster_tests::fake_llm::serve_forever(
        port,
        std::time::Duration::from_millis(delay_ms),
        log,
    );
}
