//! Tokenizers built from a GGUF file's `tokenizer.ggml.*` metadata, matching
//! llama.cpp's token ids.
//!
//! Two families:
//! - `gpt2`: byte-level BPE. Text is split by the model's pre-tokenizer regexes
//!   (chosen by `tokenizer.ggml.pre`, applied in sequence, unmatched text kept
//!   as its own piece, as llama.cpp does), each piece's bytes are mapped to
//!   GPT-2's printable alphabet, and merges apply by rank.
//! - `llama`: SentencePiece-style BPE. Spaces become `▁`, adjacent symbols merge
//!   while their concatenation is in the vocabulary, highest score first, and
//!   characters outside the vocabulary fall back to `<0xNN>` byte tokens.
//!
//! Control and user-defined tokens are matched literally before either runs
//! (control tokens only when parsing special tokens is asked for).

use std::collections::HashMap;

use fancy_regex::Regex;

use crate::gguf::{GgufError, GgufFile, MetaValue};

/// Errors from building a tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("unsupported tokenizer model {0:?} (supported: gpt2, llama)")]
    UnsupportedModel(String),
    #[error("unsupported pre-tokenizer {0:?}")]
    UnsupportedPre(String),
    #[error("tokenizer metadata {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

// llama.cpp's token types.
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;
const TYPE_BYTE: i64 = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Gpt2,
    Spm,
}

/// A tokenizer for one model's vocabulary.
pub struct Tokenizer {
    kind: Kind,
    /// Token text as stored in the vocabulary.
    tokens: Vec<String>,
    /// The bytes each token stands for.
    bytes: Vec<Vec<u8>>,
    ids: HashMap<String, u32>,
    /// gpt2: merge ranks of symbol pairs.
    merges: HashMap<(String, String), u32>,
    /// llama: token scores.
    scores: Vec<f32>,
    pre: Vec<Regex>,
    /// (text, id, is_control), longest text first.
    specials: Vec<(String, u32, bool)>,
    byte_tokens: [Option<u32>; 256],
    bos: Option<u32>,
    eos: Option<u32>,
    eog: Vec<u32>,
    add_bos: bool,
    add_space_prefix: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind)
            .field("vocab", &self.tokens.len())
            .finish()
    }
}

/// GPT-2's map from bytes to printable characters, so every byte string is text.
fn byte_to_char() -> &'static [char; 256] {
    static MAP: std::sync::OnceLock<[char; 256]> = std::sync::OnceLock::new();
    MAP.get_or_init(build_byte_to_char)
}

/// The inverse of [`byte_to_char`].
fn char_to_byte() -> &'static HashMap<char, u8> {
    static MAP: std::sync::OnceLock<HashMap<char, u8>> = std::sync::OnceLock::new();
    MAP.get_or_init(|| byte_to_char().iter().enumerate().map(|(b, &c)| (c, b as u8)).collect())
}

fn build_byte_to_char() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        map[b as usize] = if printable {
            char::from_u32(b).unwrap_or('\0')
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('\0')
        };
    }
    map
}

/// The pre-tokenizer regexes llama.cpp uses for a `tokenizer.ggml.pre` value.
fn pre_regexes(pre: &str) -> Result<Vec<&'static str>, TokenizerError> {
    const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
    const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" => vec![GPT2],
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            vec![r"\p{N}", GPT2]
        }
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" => vec![LLAMA3],
        "qwen2" | "deepseek-r1-qwen" => vec![QWEN2],
        other => return Err(TokenizerError::UnsupportedPre(other.into())),
    })
}

fn strings(file: &GgufFile, key: &'static str) -> Result<Vec<String>, TokenizerError> {
    file.get_array(key)?
        .iter()
        .map(|v| match v {
            MetaValue::String(s) => Ok(s.clone()),
            other => Err(TokenizerError::Invalid {
                key,
                reason: format!("expected strings, found {other:?}"),
            }),
        })
        .collect()
}

fn opt_id(file: &GgufFile, key: &str, vocab: usize) -> Option<u32> {
    file.get_u64(key).ok().filter(|&v| (v as usize) < vocab).map(|v| v as u32)
}

impl Tokenizer {
    /// Builds the tokenizer described by a GGUF file's metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, TokenizerError> {
        let model = file.get_str("tokenizer.ggml.model")?;
        let kind = match model {
            "gpt2" => Kind::Gpt2,
            "llama" => Kind::Spm,
            other => return Err(TokenizerError::UnsupportedModel(other.into())),
        };
        let tokens = strings(file, "tokenizer.ggml.tokens")?;
        let n = tokens.len();
        let types: Vec<i64> = match file.get_array("tokenizer.ggml.token_type") {
            Ok(a) => a.iter().map(|v| v.as_i64().unwrap_or(1)).collect(),
            Err(_) => vec![1; n],
        };
        if types.len() != n {
            return Err(TokenizerError::Invalid {
                key: "tokenizer.ggml.token_type",
                reason: format!("{} types for {n} tokens", types.len()),
            });
        }
        let ids: HashMap<String, u32> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();

        let mut merges = HashMap::new();
        let mut scores = Vec::new();
        let mut pre = Vec::new();
        match kind {
            Kind::Gpt2 => {
                for (rank, m) in strings(file, "tokenizer.ggml.merges")?.into_iter().enumerate() {
                    let Some((a, b)) = m.split_once(' ') else {
                        return Err(TokenizerError::Invalid {
                            key: "tokenizer.ggml.merges",
                            reason: format!("merge {m:?} has no space"),
                        });
                    };
                    merges.entry((a.to_string(), b.to_string())).or_insert(rank as u32);
                }
                let pre_name = file.get_str("tokenizer.ggml.pre").unwrap_or("default");
                for r in pre_regexes(pre_name)? {
                    pre.push(Regex::new(r).map_err(|e| TokenizerError::Invalid {
                        key: "tokenizer.ggml.pre",
                        reason: e.to_string(),
                    })?);
                }
            }
            Kind::Spm => {
                scores = file
                    .get_array("tokenizer.ggml.scores")?
                    .iter()
                    .map(|v| v.as_f64().unwrap_or(0.0) as f32)
                    .collect();
                if scores.len() != n {
                    return Err(TokenizerError::Invalid {
                        key: "tokenizer.ggml.scores",
                        reason: format!("{} scores for {n} tokens", scores.len()),
                    });
                }
            }
        }

        let unmap = char_to_byte();
        let mut byte_tokens = [None; 256];
        let mut bytes = Vec::with_capacity(n);
        for (i, t) in tokens.iter().enumerate() {
            let b = if types[i] == TYPE_CONTROL || types[i] == TYPE_USER_DEFINED {
                t.as_bytes().to_vec()
            } else if kind == Kind::Spm && types[i] == TYPE_BYTE {
                let v = t
                    .strip_prefix("<0x")
                    .and_then(|s| s.strip_suffix('>'))
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match v {
                    Some(v) => {
                        byte_tokens[v as usize] = Some(i as u32);
                        vec![v]
                    }
                    None => t.as_bytes().to_vec(),
                }
            } else if kind == Kind::Spm {
                t.replace('\u{2581}', " ").into_bytes()
            } else {
                t.chars().map(|c| unmap.get(&c).copied().unwrap_or(b'?')).collect()
            };
            bytes.push(b);
        }
        if kind == Kind::Gpt2 {
            let map = byte_to_char();
            for b in 0..256 {
                byte_tokens[b] = ids.get(&map[b].to_string()).copied();
            }
        }

        let mut specials: Vec<(String, u32, bool)> = tokens
            .iter()
            .enumerate()
            .filter(|&(i, t)| (types[i] == TYPE_CONTROL || types[i] == TYPE_USER_DEFINED) && !t.is_empty())
            .map(|(i, t)| (t.clone(), i as u32, types[i] == TYPE_CONTROL))
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));

        let bos = opt_id(file, "tokenizer.ggml.bos_token_id", n);
        let eos = opt_id(file, "tokenizer.ggml.eos_token_id", n);
        let mut eog: Vec<u32> = eos.into_iter().collect();
        eog.extend(opt_id(file, "tokenizer.ggml.eot_token_id", n));
        eog.extend(opt_id(file, "tokenizer.ggml.eom_token_id", n));
        for name in ["<|eot_id|>", "<|im_end|>", "<|end|>", "<|endoftext|>", "<end_of_turn>", "<|eom_id|>", "</s>"] {
            if let Some(&id) = ids.get(name) {
                if types[id as usize] == TYPE_CONTROL && !eog.contains(&id) {
                    eog.push(id);
                }
            }
        }
        let add_bos = match file.get("tokenizer.ggml.add_bos_token") {
            Some(MetaValue::Bool(b)) => *b,
            _ => kind == Kind::Spm,
        };
        let add_space_prefix = match file.get("tokenizer.ggml.add_space_prefix") {
            Some(MetaValue::Bool(b)) => *b,
            _ => kind == Kind::Spm,
        };
        Ok(Self {
            kind,
            tokens,
            bytes,
            ids,
            merges,
            scores,
            pre,
            specials,
            byte_tokens,
            bos,
            eos,
            eog,
            add_bos,
            add_space_prefix,
        })
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the model expects a BOS token before a prompt.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// The beginning-of-sequence token.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// The end-of-sequence token.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Whether a token ends generation (EOS, end-of-turn and the like).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    /// The text of a token as stored in the vocabulary.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The id of a token by its vocabulary text.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.ids.get(text).copied()
    }

    /// The bytes a token stands for (control tokens give their text).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.bytes.get(id as usize).map_or(&[], Vec::as_slice)
    }

    /// Token ids of `text`; never adds BOS. With `parse_special`, control-token
    /// text (like `<|im_start|>`) becomes that token.
    pub fn encode(&self, text: &str, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::new();
        let mut rest = text;
        let mut first = true;
        while !rest.is_empty() {
            let (plain, special) = self.next_special(rest, parse_special);
            if !plain.is_empty() {
                self.encode_plain(plain, first, &mut out);
            }
            first = false;
            match special {
                Some((len, id)) => {
                    out.push(id);
                    rest = &rest[plain.len() + len..];
                }
                None => break,
            }
        }
        out
    }

    /// Splits off the text before the earliest special token, and that token's length and id.
    fn next_special<'t>(&self, text: &'t str, parse_special: bool) -> (&'t str, Option<(usize, u32)>) {
        let mut best: Option<(usize, usize, u32)> = None;
        for (s, id, control) in &self.specials {
            if *control && !parse_special {
                continue;
            }
            if let Some(pos) = text.find(s.as_str()) {
                // Earliest position wins; at equal positions the longer (sorted first) wins.
                if best.is_none_or(|(p, _, _)| pos < p) {
                    best = Some((pos, s.len(), *id));
                }
            }
        }
        match best {
            Some((pos, len, id)) => (&text[..pos], Some((len, id))),
            None => (text, None),
        }
    }

    fn encode_plain(&self, text: &str, at_start: bool, out: &mut Vec<u32>) {
        match self.kind {
            Kind::Gpt2 => {
                let mut pieces = vec![text];
                for re in &self.pre {
                    pieces = pieces.into_iter().flat_map(|p| split_keep(re, p)).collect();
                }
                let map = byte_to_char();
                for piece in pieces {
                    let mapped: Vec<String> = piece.bytes().map(|b| map[b as usize].to_string()).collect();
                    self.bpe_gpt2(mapped, out);
                }
            }
            Kind::Spm => {
                let mut s = String::with_capacity(text.len() + 3);
                if at_start && self.add_space_prefix {
                    s.push('\u{2581}');
                }
                s.push_str(&text.replace(' ', "\u{2581}"));
                self.bpe_spm(&s, out);
            }
        }
    }

    /// Applies merges by rank until none applies, then maps symbols to ids.
    fn bpe_gpt2(&self, mut symbols: Vec<String>, out: &mut Vec<u32>) {
        if symbols.len() > 1 && !self.ids.contains_key(&symbols.concat()) {
            loop {
                let best = symbols
                    .windows(2)
                    .enumerate()
                    .filter_map(|(i, w)| self.merges.get(&(w[0].clone(), w[1].clone())).map(|&r| (r, i)))
                    .min();
                let Some((_, i)) = best else { break };
                let right = symbols.remove(i + 1);
                symbols[i].push_str(&right);
            }
        } else if symbols.len() > 1 {
            symbols = vec![symbols.concat()];
        }
        let unmap = char_to_byte();
        for s in symbols {
            match self.ids.get(&s) {
                Some(&id) => out.push(id),
                None => {
                    // Not in the vocabulary: one token per byte.
                    for c in s.chars() {
                        if let Some(id) = unmap.get(&c).and_then(|&b| self.byte_tokens[b as usize]) {
                            out.push(id);
                        }
                    }
                }
            }
        }
    }

    /// SentencePiece BPE: merge the adjacent pair whose concatenation has the best score.
    fn bpe_spm(&self, text: &str, out: &mut Vec<u32>) {
        let mut symbols: Vec<String> = text.chars().map(String::from).collect();
        loop {
            let mut best: Option<(f32, usize)> = None;
            for i in 0..symbols.len().saturating_sub(1) {
                let merged = format!("{}{}", symbols[i], symbols[i + 1]);
                if let Some(&id) = self.ids.get(&merged) {
                    let score = self.scores[id as usize];
                    if best.is_none_or(|(s, _)| score > s) {
                        best = Some((score, i));
                    }
                }
            }
            let Some((_, i)) = best else { break };
            let right = symbols.remove(i + 1);
            symbols[i].push_str(&right);
        }
        for s in symbols {
            match self.ids.get(&s) {
                Some(&id) => out.push(id),
                None => {
                    for b in s.bytes() {
                        if let Some(id) = self.byte_tokens[b as usize] {
                            out.push(id);
                        }
                    }
                }
            }
        }
    }

    /// Text of a token sequence; invalid UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids.iter().flat_map(|&id| self.token_bytes(id).iter().copied()).collect();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        match self.kind {
            Kind::Spm if self.add_space_prefix => text.strip_prefix(' ').map(str::to_string).unwrap_or(text),
            _ => text,
        }
    }
}

/// Splits `text` into the matches of `re` and the text between them, keeping both.
fn split_keep<'t>(re: &Regex, text: &'t str) -> Vec<&'t str> {
    let mut out = Vec::new();
    let mut last = 0;
    for m in re.find_iter(text) {
        // A regex runtime error (backtrack limit) keeps the rest whole.
        let Ok(m) = m else { break };
        if m.start() > last {
            out.push(&text[last..m.start()]);
        }
        if m.end() > m.start() {
            out.push(m.as_str());
        }
        last = m.end();
    }
    if last < text.len() {
        out.push(&text[last..]);
    }
    out
}

/// Turns a stream of token ids into text, holding back incomplete UTF-8 sequences.
#[derive(Debug, Default, Clone)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// Adds a token; returns the text that became complete.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        self.pending.extend_from_slice(tokenizer.token_bytes(id));
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(s) => s.len(),
            Err(e) => match e.error_len() {
                // Invalid bytes (not merely incomplete): emit them lossily now.
                Some(_) => self.pending.len(),
                None => e.valid_up_to(),
            },
        };
        let out = String::from_utf8_lossy(&self.pending[..valid]).into_owned();
        self.pending.drain(..valid);
        out
    }

    /// Whatever is still held back, lossily.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn tokenizer() -> &'static Tokenizer {
        static TOK: std::sync::OnceLock<Tokenizer> = std::sync::OnceLock::new();
        TOK.get_or_init(|| {
            let file = GgufFile::open(crate::paths::test_model_path()).expect("model");
            Tokenizer::from_gguf(&file).expect("tokenizer")
        })
    }

    fn ids(v: &Value) -> Vec<u32> {
        v.as_array()
            .expect("ids")
            .iter()
            .map(|x| x.as_u64().expect("id") as u32)
            .collect()
    }

    #[test]
    fn matches_llamacpp_on_reference_strings() {
        let tok = tokenizer();
        let reference: Value = serde_json::from_str(crate::paths::reference_json()).expect("json");
        for case in reference["tokenize"].as_array().expect("cases") {
            let text = case["text"].as_str().expect("text");
            assert_eq!(tok.encode(text, true), ids(&case["ids"]), "{text:?}");
            assert_eq!(
                tok.encode(text, false),
                ids(&case["ids_parse_special_false"]),
                "{text:?} without special parsing"
            );
            if !text.contains("<|") {
                assert_eq!(tok.decode(&tok.encode(text, true)), text);
            }
        }
        for case in reference["chat"].as_array().expect("chats") {
            let text = case["templated_prompt"].as_str().expect("prompt");
            assert_eq!(tok.encode(text, true), ids(&case["prompt_ids"]));
            // llama.cpp's text leaves out the end-of-generation token.
            let completion: Vec<u32> = ids(&case["completion_ids"]).into_iter().filter(|&t| !tok.is_eog(t)).collect();
            assert_eq!(tok.decode(&completion), case["completion_text"].as_str().expect("text"));
        }
    }

    #[test]
    fn end_of_generation_tokens() {
        let tok = tokenizer();
        assert!(tok.is_eog(tok.token_id("<|im_end|>").expect("im_end")));
        assert!(tok.is_eog(tok.token_id("<|endoftext|>").expect("endoftext")));
        assert!(!tok.is_eog(tok.token_id("<|im_start|>").expect("im_start")));
        assert!(!tok.add_bos());
    }

    #[test]
    fn stream_decoder_holds_back_partial_characters() {
        let tok = tokenizer();
        let text = "naïve café – “quotes” 日本語 🙂 done";
        let ids = tok.encode(text, false);
        let mut d = StreamDecoder::default();
        let mut out = String::new();
        for &id in &ids {
            let piece = d.push(tok, id);
            assert!(!piece.contains('\u{FFFD}'), "no broken characters in {piece:?}");
            out.push_str(&piece);
        }
        out.push_str(&d.finish());
        assert_eq!(out, text);
    }

    proptest::proptest! {
        #[test]
        fn round_trips_arbitrary_text(s in "\\PC{0,40}") {
            let tok = tokenizer();
            proptest::prop_assume!(!s.contains("<|") && !s.contains('<'));
            proptest::prop_assert_eq!(tok.decode(&tok.encode(&s, true)), s);
        }
    }

    #[test]
    fn unknown_pre_tokenizer_is_named() {
        use crate::gguf::tests::write_gguf;
        let s = |v: &str| MetaValue::String(v.into());
        let bytes = write_gguf(
            &[
                ("tokenizer.ggml.model", s("gpt2")),
                ("tokenizer.ggml.pre", s("mystery")),
                ("tokenizer.ggml.tokens", MetaValue::Array(vec![s("a"), s("b"), s("ab")])),
                ("tokenizer.ggml.merges", MetaValue::Array(vec![s("a b")])),
            ],
            &[],
        );
        let path = std::env::temp_dir().join(format!("tandem-tok-{}.gguf", std::process::id()));
        std::fs::write(&path, bytes).expect("write");
        let file = GgufFile::open(&path).expect("open");
        let err = Tokenizer::from_gguf(&file).expect_err("unknown pre");
        std::fs::remove_file(&path).ok();
        assert!(err.to_string().contains("mystery"), "{err}");
    }
}
