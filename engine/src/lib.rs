//! tandem's model runtime.
//!
//! It loads a GGUF model, tokenizes and templates prompts the way llama.cpp
//! does, and runs a Llama-family forward pass on the CPU over a paged KV cache
//! made of fixed-size blocks. Full blocks are named by the chained hash from
//! `tandem-protocol`, reused across sequences that share a prefix, and can be
//! exported and imported whole, which is what lets a prefill worker hand a
//! sequence to a decode worker. A continuous-batching scheduler runs many
//! sequences per step under a token budget. With the `cuda` feature the same
//! forward pass also runs on an NVIDIA GPU (`Device::Cuda`), with the weights
//! and the KV blocks in device memory.

pub mod backend;
pub mod chat_template;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod engine;
pub mod gguf;
pub mod kv_cache;
pub mod model;
pub mod paths;
pub mod sampling;
pub mod schedule;
pub mod synth;
pub mod tokenizer;
