//! Serves one model through the OpenAI API with an in-process engine.
//!
//! `cargo run --release -p tandem-openai --example serve -- [ADDR] [API_KEY]`
//! (ADDR defaults to 127.0.0.1:8080; the model is `$TANDEM_MODEL` or the pulled default).

use tandem_engine::engine::EngineConfig;
use tandem_openai::{ApiConfig, EngineGenerator, router, serve};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:8080".into());
    let config = ApiConfig {
        api_keys: args.collect(),
        ..ApiConfig::default()
    };
    config.validate()?;
    let path = std::env::var_os("TANDEM_MODEL")
        .map_or_else(tandem_engine::paths::default_model_path, Into::into);
    let generator = EngineGenerator::load("SmolLM2-135M-Instruct", &path, EngineConfig::default())?;
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!(
        "serving {} on http://{}/v1",
        path.display(),
        listener.local_addr()?
    );
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    serve(listener, router(generator, config), shutdown).await?;
    Ok(())
}
