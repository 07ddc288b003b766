//! How long a simulated worker's step takes.
//!
//! A step runs a batch of prefill chunks and decode tokens, as the engine's
//! continuous batching does. Its duration is a fixed overhead, a per-token cost for
//! prefill tokens, an attention term that grows with each prefill token's context,
//! and per-sequence and per-context-token costs for decodes:
//!
//! ```text
//! step = overhead
//!      + prefill_ms_per_token * prefill_tokens
//!      + attention_ms_per_token_pair * sum over chunks of take * (start + take / 2)
//!      + decode_step_ms if the step has any decode
//!      + decode_ms_per_seq * decodes
//!      + decode_ms_per_context_token * sum over decodes of context
//! ```

use serde::Serialize;

/// Step-time coefficients, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TimingModel {
    pub step_overhead_ms: f64,
    pub prefill_ms_per_token: f64,
    pub attention_ms_per_token_pair: f64,
    pub decode_step_ms: f64,
    pub decode_ms_per_seq: f64,
    pub decode_ms_per_context_token: f64,
}

/// What one step computes, as the timing model needs it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepShape {
    pub prefill_tokens: usize,
    /// Sum over prefill chunks of `take * (start + take / 2)`.
    pub prefill_token_pairs: f64,
    pub decodes: usize,
    /// Sum over decodes of the context length.
    pub decode_context: usize,
}

impl TimingModel {
    /// tandem's CPU engine on SmolLM2-135M Q4_1 with 2 threads on the project's 2-core
    /// VM (docs/benchmarks.md): 512-token prefill at ~360 tok/s, decode ~160 tok/s
    /// for one stream and ~270 tok/s for 8. Attention terms were not measured (the
    /// model is small and contexts short), so they are 0.
    pub fn cpu() -> Self {
        Self {
            step_overhead_ms: 2.9,
            prefill_ms_per_token: 2.77,
            attention_ms_per_token_pair: 0.0,
            decode_step_ms: 0.0,
            decode_ms_per_seq: 3.35,
            decode_ms_per_context_token: 0.0,
        }
    }

    /// An 8B-class model on one GPU as Dynamo's mocker models it: ~13.5k prefill
    /// tok/s falling off with context, decode steps of 15 ms plus ~44 ms when 1M
    /// tokens of context are read. The default, so results compare with Dynamo's.
    pub fn gpu() -> Self {
        Self {
            step_overhead_ms: 15.0,
            prefill_ms_per_token: 0.074,
            attention_ms_per_token_pair: 1.3e-6,
            decode_step_ms: 0.0,
            decode_ms_per_seq: 0.02,
            decode_ms_per_context_token: 4.2e-5,
        }
    }

    /// Llama-3-8B-shaped bf16 kernels timed on one NVIDIA H200 with PyTorch 2.11
    /// (scripts/calibrate_gpu_timing.py, least-squares fit; docs/benchmarks.md):
    /// ~47k prefill tok/s, and a decode pass costing ~11 ms plus KV reads. Kernel
    /// time in eager mode, without an engine's host overhead.
    pub fn h200() -> Self {
        Self {
            step_overhead_ms: 3.3,
            prefill_ms_per_token: 0.0213,
            attention_ms_per_token_pair: 9.1e-7,
            decode_step_ms: 8.1,
            decode_ms_per_seq: 0.0,
            decode_ms_per_context_token: 2.86e-5,
        }
    }

    /// A named profile: `cpu`, `gpu` or `h200`.
    pub fn profile(name: &str) -> Option<Self> {
        match name {
            "cpu" => Some(Self::cpu()),
            "gpu" => Some(Self::gpu()),
            "h200" => Some(Self::h200()),
            _ => None,
        }
    }

    /// Every coefficient multiplied by `factor` (a slower or faster worker).
    pub fn scaled(self, factor: f64) -> Self {
        Self {
            step_overhead_ms: self.step_overhead_ms * factor,
            prefill_ms_per_token: self.prefill_ms_per_token * factor,
            attention_ms_per_token_pair: self.attention_ms_per_token_pair * factor,
            decode_step_ms: self.decode_step_ms * factor,
            decode_ms_per_seq: self.decode_ms_per_seq * factor,
            decode_ms_per_context_token: self.decode_ms_per_context_token * factor,
        }
    }

    /// Every coefficient is finite and non-negative.
    pub fn is_valid(&self) -> bool {
        [
            self.step_overhead_ms,
            self.prefill_ms_per_token,
            self.attention_ms_per_token_pair,
            self.decode_step_ms,
            self.decode_ms_per_seq,
            self.decode_ms_per_context_token,
        ]
        .iter()
        .all(|x| x.is_finite() && *x >= 0.0)
    }

    /// The step's duration in microseconds (at least 1).
    pub fn step_us(&self, s: &StepShape) -> u64 {
        let ms = self.step_overhead_ms
            + self.prefill_ms_per_token * s.prefill_tokens as f64
            + self.attention_ms_per_token_pair * s.prefill_token_pairs
            + if s.decodes > 0 {
                self.decode_step_ms
            } else {
                0.0
            }
            + self.decode_ms_per_seq * s.decodes as f64
            + self.decode_ms_per_context_token * s.decode_context as f64;
        ((ms * 1000.0).round() as u64).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_profile_reproduces_the_measured_rates() {
        let cpu = TimingModel::cpu();
        let prefill = StepShape {
            prefill_tokens: 512,
            ..StepShape::default()
        };
        let tok_s = 512.0 / (cpu.step_us(&prefill) as f64 / 1e6);
        assert!((340.0..380.0).contains(&tok_s), "{tok_s}");
        let one = StepShape {
            decodes: 1,
            ..StepShape::default()
        };
        let eight = StepShape {
            decodes: 8,
            ..StepShape::default()
        };
        let one_s = 1e6 / cpu.step_us(&one) as f64;
        let eight_s = 8e6 / cpu.step_us(&eight) as f64;
        assert!((150.0..170.0).contains(&one_s), "{one_s}");
        assert!((260.0..280.0).contains(&eight_s), "{eight_s}");
    }
}
