//! Request traces in the Mooncake format, and generators for other shapes.
//!
//! A trace is JSON lines, one request each: `timestamp` (ms from the start),
//! `input_length` and `output_length` (tokens), and `hash_ids`, one id per 512-token
//! block of the prompt; two prompts share a block id exactly when they share all
//! tokens up to the end of that block. The simulator turns ids back into tokens
//! (each id expands to 512 tokens derived from it), so the router and the workers
//! hash real token blocks at whatever block size the simulation uses.

use std::io::{BufRead, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::SimError;
use crate::rng::Rng;

/// Tokens per `hash_ids` entry in Mooncake traces.
pub const TRACE_BLOCK_TOKENS: usize = 512;

/// One request of a trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceRequest {
    /// Arrival, in milliseconds from the start of the trace.
    pub timestamp: f64,
    pub input_length: usize,
    pub output_length: usize,
    pub hash_ids: Vec<u64>,
}

impl TraceRequest {
    /// The prompt's tokens: position `p` gets a token derived from the id of its
    /// 512-token block and its offset there; positions past the ids get tokens unique
    /// to `salt` (the request's index), so they are never shared.
    pub fn prompt_tokens(&self, salt: u64) -> Vec<u32> {
        (0..self.input_length)
            .map(|p| {
                let (key, off) = match self.hash_ids.get(p / TRACE_BLOCK_TOKENS) {
                    Some(&id) => (id, p % TRACE_BLOCK_TOKENS),
                    None => (salt | 1 << 63, p),
                };
                token_of(key, off as u64)
            })
            .collect()
    }
}

/// A token id in 0..100_000 from a key and a position.
fn token_of(key: u64, pos: u64) -> u32 {
    let mut z = key
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(pos.wrapping_mul(0xD1B5_4A32_D192_ED03));
    z = (z ^ (z >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    ((z ^ (z >> 32)) % 100_000) as u32
}

/// Reads a JSON-lines trace, sorted by arrival.
pub fn load(path: &Path) -> Result<Vec<TraceRequest>, SimError> {
    let file = std::fs::File::open(path).map_err(|e| SimError::Trace {
        path: path.display().to_string(),
        line: 0,
        message: e.to_string(),
    })?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let err = |message: String| SimError::Trace {
            path: path.display().to_string(),
            line: i + 1,
            message,
        };
        let line = line.map_err(|e| err(e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        let r: TraceRequest = serde_json::from_str(&line).map_err(|e| err(e.to_string()))?;
        if !r.timestamp.is_finite() || r.timestamp < 0.0 {
            return Err(err(format!("bad timestamp {}", r.timestamp)));
        }
        out.push(r);
    }
    out.sort_by(|a, b| a.timestamp.total_cmp(&b.timestamp));
    Ok(out)
}

/// Writes a trace as JSON lines.
pub fn write(path: &Path, trace: &[TraceRequest]) -> Result<(), SimError> {
    let io = |e: std::io::Error| SimError::Trace {
        path: path.display().to_string(),
        line: 0,
        message: e.to_string(),
    };
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    for r in trace {
        let line = serde_json::to_string(r).map_err(|e| SimError::Trace {
            path: path.display().to_string(),
            line: 0,
            message: e.to_string(),
        })?;
        writeln!(f, "{line}").map_err(io)?;
    }
    f.flush().map_err(io)
}

/// Shapes of generated traces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Shape {
    /// Many short multi-turn chats over a few shared system prompts: each turn's
    /// prompt is the whole conversation so far.
    Conversations,
    /// A few long documents, each asked many short questions (popularity skewed).
    Documents,
}

impl std::str::FromStr for Shape {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "conversations" => Ok(Shape::Conversations),
            "documents" => Ok(Shape::Documents),
            _ => Err(format!(
                "unknown trace shape {s:?}; expected conversations or documents"
            )),
        }
    }
}

/// Block ids for a growing token sequence: appending text re-ids the partial last block.
struct Content {
    ids: Vec<u64>,
    len: usize,
}

impl Content {
    fn new() -> Self {
        Self {
            ids: Vec::new(),
            len: 0,
        }
    }

    fn append(&mut self, tokens: usize, next_id: &mut u64) {
        if tokens == 0 {
            return;
        }
        if !self.len.is_multiple_of(TRACE_BLOCK_TOKENS) {
            // The partial block's content changes, so it becomes a new block.
            self.ids.pop();
        }
        self.len += tokens;
        while self.ids.len() < self.len.div_ceil(TRACE_BLOCK_TOKENS) {
            self.ids.push(*next_id);
            *next_id += 1;
        }
    }

    fn request(&self, timestamp: f64, output_length: usize) -> TraceRequest {
        TraceRequest {
            timestamp,
            input_length: self.len,
            output_length,
            hash_ids: self.ids.clone(),
        }
    }
}

fn uniform(rng: &mut Rng, lo: usize, hi: usize) -> usize {
    lo + rng.below(hi - lo + 1)
}

/// Generates `requests` requests of a shape arriving at `rate` per second on average.
pub fn generate(shape: Shape, requests: usize, rate: f64, seed: u64) -> Vec<TraceRequest> {
    let mut rng = Rng::new(seed);
    let mut next_id = 0u64;
    let mean_gap_ms = 1000.0 / rate.max(1e-9);
    let mut out = Vec::with_capacity(requests);
    match shape {
        Shape::Conversations => {
            // 16 system prompts of 1-4k tokens; conversations of 2-12 turns, turns
            // 30 s apart on average, new conversations starting as a Poisson process.
            let systems: Vec<Content> = (0..16)
                .map(|_| {
                    let mut c = Content::new();
                    c.append(uniform(&mut rng, 1024, 4096), &mut next_id);
                    c
                })
                .collect();
            let mut start = 0.0;
            while out.len() < requests {
                let system = &systems[rng.below(systems.len())];
                let mut conv = Content {
                    ids: system.ids.clone(),
                    len: system.len,
                };
                let turns = uniform(&mut rng, 2, 12);
                let mut t = start;
                for _ in 0..turns {
                    conv.append(uniform(&mut rng, 50, 800), &mut next_id);
                    let output = uniform(&mut rng, 50, 500);
                    out.push(conv.request(t, output));
                    conv.append(output, &mut next_id);
                    t += rng.exponential(30_000.0);
                }
                // A conversation carries `turns` requests: space starts to keep the rate.
                start += rng.exponential(mean_gap_ms * turns as f64);
            }
        }
        Shape::Documents => {
            // 160 documents of 8-48k tokens (4.5M tokens in all, more than one
            // worker's cache) behind a shared 1k-token instruction; document
            // popularity falls off as 1/rank.
            let mut instruction = Content::new();
            instruction.append(1024, &mut next_id);
            let docs: Vec<Content> = (0..160)
                .map(|_| {
                    let mut c = Content {
                        ids: instruction.ids.clone(),
                        len: instruction.len,
                    };
                    c.append(uniform(&mut rng, 8 * 1024, 48 * 1024), &mut next_id);
                    c
                })
                .collect();
            let weights: Vec<f64> = (1..=docs.len()).map(|r| 1.0 / r as f64).collect();
            let total: f64 = weights.iter().sum();
            let mut t = 0.0;
            for _ in 0..requests {
                let mut x = rng.next_f64() * total;
                let mut d = docs.len() - 1;
                for (i, w) in weights.iter().enumerate() {
                    x -= w;
                    if x <= 0.0 {
                        d = i;
                        break;
                    }
                }
                let mut q = Content {
                    ids: docs[d].ids.clone(),
                    len: docs[d].len,
                };
                q.append(uniform(&mut rng, 20, 300), &mut next_id);
                out.push(q.request(t, uniform(&mut rng, 20, 400)));
                t += rng.exponential(mean_gap_ms);
            }
        }
    }
    out.truncate(requests);
    out.sort_by(|a, b| a.timestamp.total_cmp(&b.timestamp));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_traces_share_prefixes_as_ids_say() {
        for shape in [Shape::Conversations, Shape::Documents] {
            let trace = generate(shape, 200, 5.0, 1);
            assert_eq!(trace.len(), 200);
            let a = &trace[0];
            for b in &trace[1..] {
                assert_eq!(
                    b.hash_ids.len(),
                    b.input_length.div_ceil(TRACE_BLOCK_TOKENS)
                );
                // Same id at the same position means the same tokens up to that block.
                let shared = a
                    .hash_ids
                    .iter()
                    .zip(&b.hash_ids)
                    .take_while(|(x, y)| x == y)
                    .count();
                let n = (shared * TRACE_BLOCK_TOKENS)
                    .min(a.input_length)
                    .min(b.input_length);
                assert_eq!(a.prompt_tokens(0)[..n], b.prompt_tokens(1)[..n]);
            }
            assert!(trace.windows(2).all(|w| w[0].timestamp <= w[1].timestamp));
        }
    }
}
