//! Where tandem keeps downloaded models, and how tests and commands find the default one.

use std::path::PathBuf;

/// File name of the default model inside the model cache.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The cache directory: `$TANDEM_CACHE`, else `$XDG_CACHE_HOME/tandem`, else `~/.cache/tandem`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TANDEM_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("tandem");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache").join("tandem")
}

/// Where `tandem model pull` puts the default model.
pub fn default_model_path() -> PathBuf {
    cache_dir().join("models").join(DEFAULT_MODEL_FILE)
}

/// The model tests run against: `$TANDEM_MODEL` if set, else the pulled default model.
///
/// # Panics
/// If the file does not exist, with a message saying how to get it: a test
/// that needs the model must fail, not skip, when it is missing.
pub fn test_model_path() -> PathBuf {
    let path = std::env::var_os("TANDEM_MODEL").map_or_else(default_model_path, PathBuf::from);
    assert!(
        path.exists(),
        "model not found at {}: run `tandem model pull` or set TANDEM_MODEL",
        path.display()
    );
    path
}

/// The llama.cpp reference outputs for the default model, as JSON text.
pub fn reference_json() -> &'static str {
    include_str!("../../tests/reference/smollm2-llamacpp.json")
}
