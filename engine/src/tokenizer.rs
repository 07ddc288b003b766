//! Tokenizer built from a GGUF file's `tokenizer.ggml.*` metadata, matching llama.cpp.
//!
//! Two vocabulary kinds are supported, as llama.cpp names them:
//!
//! * `gpt2`: byte-level BPE. Text is split into words by the pre-tokenizer
//!   regexes that llama.cpp picks for `tokenizer.ggml.pre` (applied in turn,
//!   each splitting the pieces the previous one left, matches and the gaps
//!   between them alike), every byte of a word becomes the GPT-2
//!   byte-to-unicode character, and adjacent symbols are merged lowest
//!   `tokenizer.ggml.merges` rank first (leftmost first on ties).
//! * `llama`: SentencePiece-style BPE. Spaces become `▁` (with one prepended
//!   when `add_space_prefix` is set, at the start and after every special
//!   token), adjacent symbols are merged highest `tokenizer.ggml.scores`
//!   first, and characters outside the vocabulary fall back to `<0xNN>` byte
//!   tokens.
//!
//! Before either runs, special tokens are cut out of the text literally, the
//! longest first: CONTROL and UNKNOWN tokens only when `parse_special` is set,
//! USER_DEFINED tokens always (as llama.cpp and HF tokenizers do).

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

use fancy_regex::Regex;

use crate::gguf::{GgufError, GgufFile, MetaValue};

/// Errors from building a tokenizer out of GGUF metadata.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A required key is missing or has the wrong type.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// `tokenizer.ggml.model` names a vocabulary kind this engine does not implement.
    #[error("unsupported tokenizer model '{0}' (tokenizer.ggml.model); supported: gpt2, llama")]
    UnknownModel(String),
    /// `tokenizer.ggml.pre` names a pre-tokenizer this engine does not know.
    #[error("unknown pre-tokenizer type '{0}' (tokenizer.ggml.pre)")]
    UnknownPre(String),
    /// A metadata value is present but unusable.
    #[error("invalid metadata {key}: {reason}")]
    BadMetadata {
        /// The offending key.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A pre-tokenizer regex failed to compile.
    #[error("cannot compile pre-tokenizer regex {pattern:?}: {source}")]
    Regex {
        /// The pattern.
        pattern: &'static str,
        /// The compiler's complaint.
        source: Box<fancy_regex::Error>,
    },
}

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_SCORES: &str = "tokenizer.ggml.scores";
const KEY_TYPES: &str = "tokenizer.ggml.token_type";
const KEY_MERGES: &str = "tokenizer.ggml.merges";

// Token attributes, from `tokenizer.ggml.token_type` (llama.cpp's LLAMA_TOKEN_TYPE_*).
const ATTR_UNDEFINED: u8 = 0;
const ATTR_NORMAL: u8 = 1 << 0;
const ATTR_UNKNOWN: u8 = 1 << 1;
const ATTR_CONTROL: u8 = 1 << 2;
const ATTR_USER_DEFINED: u8 = 1 << 3;
const ATTR_UNUSED: u8 = 1 << 4;
const ATTR_BYTE: u8 = 1 << 5;

fn attr_from_type(t: i64) -> u8 {
    match t {
        1 => ATTR_NORMAL,
        2 => ATTR_UNKNOWN,
        3 => ATTR_CONTROL,
        4 => ATTR_USER_DEFINED,
        5 => ATTR_UNUSED,
        6 => ATTR_BYTE,
        _ => ATTR_UNDEFINED,
    }
}

/// The vocabulary kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerModel {
    /// Byte-level BPE (`tokenizer.ggml.model = "gpt2"`).
    Bpe,
    /// SentencePiece-style BPE with scores and byte fallback (`"llama"`).
    Spm,
}

// ---------------------------------------------------------------------------
// Pre-tokenizer regexes, as llama.cpp's llm_tokenizer_bpe chooses them.
//
// llama.cpp's patterns end in `\s+(?!\S)` (and often `|\s+`). A lookahead
// would force fancy-regex onto its slow backtracking engine, so the patterns
// here end in plain `\s+` and `WsRule` restores the lookahead's effect: a
// whitespace run of two or more characters that the `\s+` branch matched and
// that is followed by more text gives up its last character, which then
// starts the next piece (e.g. " world" after "  "). This is also how
// llama.cpp's hand-written GPT-2 and Llama-3 splitters behave. The tekken and
// gpt-4o patterns' `(?=[\p{L}])([^a-z])` lookaheads are written as the
// equivalent class intersections.

/// How a pattern's final `\s+` stands in for llama.cpp's `\s+(?!\S)`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum WsRule {
    /// The pattern has no `\s+(?!\S)`.
    None,
    /// Any all-whitespace match comes from `\s+`.
    Lookahead,
    /// The pattern also has `\s*[\r\n]+` before `\s+`, so an all-whitespace
    /// match ending in a newline comes from that branch and is kept whole.
    LookaheadAfterNewlines,
}

const RE_GPT2: (&str, WsRule) = (
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+",
    WsRule::Lookahead,
);
const RE_LLAMA3: (&str, WsRule) = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+",
    WsRule::LookaheadAfterNewlines,
);
const RE_QWEN2: (&str, WsRule) = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+",
    WsRule::LookaheadAfterNewlines,
);
const RE_QWEN35: (&str, WsRule) = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+",
    WsRule::LookaheadAfterNewlines,
);
const RE_TEKKEN: (&str, WsRule) = (
    r"[^\r\n\p{L}\p{N}]?[\p{L}&&[^a-z]]*[\p{L}&&[^A-Z]]+|[^\r\n\p{L}\p{N}]?[\p{L}&&[^a-z]]+[\p{L}&&[^A-Z]]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+",
    WsRule::LookaheadAfterNewlines,
);
const RE_GPT4O: (&str, WsRule) = (
    r"[^\r\n\p{L}\p{N}]?[\p{L}&&[^a-z]]*[\p{L}&&[^A-Z]]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?[\p{L}&&[^a-z]]+[\p{L}&&[^A-Z]]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+",
    WsRule::LookaheadAfterNewlines,
);
const RE_BLOOM: (&str, WsRule) = (r" ?[^(\s|.,!?…。，、।۔،)]+", WsRule::None);
const RE_DIGIT: (&str, WsRule) = (r"\p{N}", WsRule::None);

/// How one `tokenizer.ggml.pre` value configures the BPE tokenizer.
struct PreConfig {
    regexes: &'static [(&'static str, WsRule)],
    /// Look a whole word up in the vocabulary before merging (llama3, tekken).
    ignore_merges: bool,
    /// llama.cpp's default for `add_bos` when the GGUF does not say.
    add_bos: bool,
    /// The pre-tokenizer disables BOS outright (chatglm).
    no_bos: bool,
}

impl PreConfig {
    const fn new(regexes: &'static [(&'static str, WsRule)]) -> Self {
        Self {
            regexes,
            ignore_merges: false,
            add_bos: false,
            no_bos: false,
        }
    }
}

/// Maps a `tokenizer.ggml.pre` value to its configuration, following llama.cpp's
/// `llama_vocab::impl::load`; `None` for names it does not know or we do not support.
fn pre_config(pre: &str) -> Option<PreConfig> {
    const DEFAULT: &[(&str, WsRule)] = &[
        (r"[\p{P}\$\+<=>\^~\|]+", WsRule::None),
        RE_GPT2,
        (r"\p{N}+", WsRule::None),
        (r"[0-9][0-9][0-9]", WsRule::None),
    ];
    const FALCON: &[(&str, WsRule)] = &[
        (r"[\p{P}\$\+<=>\^~\|`]+", WsRule::None),
        RE_GPT2,
        (r"[0-9][0-9][0-9]", WsRule::None),
    ];
    const STARCODER: &[(&str, WsRule)] = &[RE_DIGIT, RE_GPT2];
    Some(match pre {
        "" | "default" => PreConfig::new(DEFAULT),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" => PreConfig {
            ignore_merges: true,
            add_bos: true,
            ..PreConfig::new(&[RE_LLAMA3])
        },
        "dbrx" | "smaug-bpe" => PreConfig::new(&[RE_LLAMA3]),
        "glm4" | "chatglm-bpe" => PreConfig {
            no_bos: true,
            ..PreConfig::new(&[RE_LLAMA3])
        },
        "falcon" => PreConfig::new(FALCON),
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de"
        | "a.x-4.0" | "mellum" | "modern-bert" | "jina-v1-en" | "jina-v2-code" | "roberta-bpe"
        | "mpt" | "olmo" | "jais" | "trillion" | "granite-docling" | "exaone4" => {
            PreConfig::new(&[RE_GPT2])
        }
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b"
        | "mellum2" => PreConfig::new(STARCODER),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" | "stablelm2" | "hunyuan"
        | "solar-open" => PreConfig::new(&[RE_QWEN2]),
        "qwen35" => PreConfig::new(&[RE_QWEN35]),
        "tekken" => PreConfig {
            ignore_merges: true,
            add_bos: true,
            ..PreConfig::new(&[RE_TEKKEN])
        },
        "gpt-4o" | "llama4" | "kanana2" | "talkie" => PreConfig::new(&[RE_GPT4O]),
        "poro-chat" | "bloom" | "gpt3-finnish" => PreConfig::new(&[RE_BLOOM]),
        _ => return None,
    })
}

// ---------------------------------------------------------------------------
// GPT-2 byte-to-unicode map.

/// The character GPT-2's byte-level BPE uses for each byte.
fn byte_chars() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        let cp = if printable {
            b
        } else {
            n += 1;
            255 + n
        };
        out[b as usize] = char::from_u32(cp).unwrap_or('\0');
    }
    out
}

/// The byte a GPT-2 byte-level character stands for, if it is one.
fn char_to_byte(c: char, table: &[char; 256]) -> Option<u8> {
    let cp = c as u32;
    if cp < 0x100 && table[cp as usize] == c {
        return Some(cp as u8);
    }
    if (0x100..0x144).contains(&cp) {
        // The 68 remapped bytes, in increasing byte order.
        return table.iter().position(|&t| t == c).map(|b| b as u8);
    }
    None
}

// ---------------------------------------------------------------------------
// A small hasher for the (left, right) merge-pair keys.

#[derive(Default)]
struct PairHasher(u64);

impl Hasher for PairHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        // splitmix64 finalizer.
        let mut z = n.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        self.0 = z ^ (z >> 31);
    }
}

type PairMap = HashMap<u64, (u32, u32), BuildHasherDefault<PairHasher>>;

fn pair_key(left: u32, right: u32) -> u64 {
    (u64::from(left) << 32) | u64::from(right)
}

// ---------------------------------------------------------------------------

/// Marks a symbol whose byte has no token in the vocabulary.
const NO_TOKEN: u32 = u32::MAX;

struct BpeState {
    regexes: Vec<(Regex, WsRule)>,
    /// (left id, right id) -> (rank, merged id).
    merges: PairMap,
    /// The token for each byte's byte-level character, or `NO_TOKEN`.
    byte_tokens: [u32; 256],
    byte_chars: [char; 256],
    ignore_merges: bool,
}

enum Kind {
    Bpe(Box<BpeState>),
    Spm,
}

struct TokenData {
    text: Box<str>,
    score: f32,
    attr: u8,
}

/// A tokenizer loaded from GGUF metadata; cheap to share between threads.
pub struct Tokenizer {
    kind: Kind,
    tokens: Vec<TokenData>,
    token_to_id: HashMap<Box<str>, u32>,
    /// What each token stands for, concatenated; token `i` is `piece_data[piece_ends[i-1]..piece_ends[i]]`.
    piece_data: Vec<u8>,
    piece_ends: Vec<u32>,
    /// Tokens cut out of text before BPE, longest text first.
    special_tokens: Vec<u32>,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    unk: Option<u32>,
    eog: Vec<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("model", &self.model())
            .field("vocab_size", &self.tokens.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eog", &self.eog)
            .field("add_bos", &self.add_bos)
            .finish()
    }
}

/// Everything about the vocabulary that does not need the merges: shared by
/// the tokenizer and by the chat template, which only wants the BOS/EOS text.
struct VocabInfo {
    model: TokenizerModel,
    pre: Option<PreConfig>,
    tokens: Vec<TokenData>,
    token_to_id: HashMap<Box<str>, u32>,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    unk: Option<u32>,
    eog: Vec<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
}

fn opt_bool(gguf: &GgufFile, key: &'static str) -> Result<Option<bool>, TokenizerError> {
    match gguf.get(key) {
        None => Ok(None),
        Some(MetaValue::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(TokenizerError::BadMetadata {
            key,
            reason: format!("expected a bool, found {v:?}"),
        }),
    }
}

fn opt_id(gguf: &GgufFile, key: &str) -> Option<u64> {
    gguf.get(key).and_then(MetaValue::as_u64)
}

/// Token texts llama.cpp recognises as end-of-turn when `eot_token_id` is absent.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
const EOM_TEXTS: &[&str] = &["<|eom_id|>"];
const FIM_PRE_TEXTS: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
];
const FIM_SUF_TEXTS: &[&str] = &[
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
];
const FIM_MID_TEXTS: &[&str] = &[
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
];
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_TEXTS: &[&str] = &[
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];
/// Token texts llama.cpp always treats as end-of-generation.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

impl VocabInfo {
    fn load(gguf: &GgufFile) -> Result<Self, TokenizerError> {
        let model_name = gguf.get_str(KEY_MODEL)?;
        let pre_name = match gguf.get(KEY_PRE) {
            None => "",
            Some(_) => gguf.get_str(KEY_PRE)?,
        };
        let (model, pre) = match model_name {
            "gpt2" => {
                let pre = pre_config(pre_name)
                    .ok_or_else(|| TokenizerError::UnknownPre(pre_name.to_string()))?;
                (TokenizerModel::Bpe, Some(pre))
            }
            "llama" => (TokenizerModel::Spm, None),
            other => return Err(TokenizerError::UnknownModel(other.to_string())),
        };

        let raw_tokens = gguf.get_array(KEY_TOKENS)?;
        let n = raw_tokens.len();
        if n == 0 || n > u32::MAX as usize / 2 {
            return Err(TokenizerError::BadMetadata {
                key: KEY_TOKENS,
                reason: format!("{n} tokens"),
            });
        }
        let scores = match gguf.get(KEY_SCORES) {
            None => None,
            Some(_) => Some(gguf.get_array(KEY_SCORES)?),
        };
        let types = match gguf.get(KEY_TYPES) {
            None => None,
            Some(_) => Some(gguf.get_array(KEY_TYPES)?),
        };
        for (key, arr) in [(KEY_SCORES, scores), (KEY_TYPES, types)] {
            if let Some(arr) = arr
                && arr.len() < n
            {
                return Err(TokenizerError::BadMetadata {
                    key,
                    reason: format!("{} entries for {n} tokens", arr.len()),
                });
            }
        }

        let mut tokens = Vec::with_capacity(n);
        let mut token_to_id = HashMap::with_capacity(n);
        for (i, v) in raw_tokens.iter().enumerate() {
            let MetaValue::String(s) = v else {
                return Err(TokenizerError::BadMetadata {
                    key: KEY_TOKENS,
                    reason: format!("entry {i} is not a string"),
                });
            };
            let text: Box<str> = if s.is_empty() {
                format!("[EMPTY_{i}]").into()
            } else {
                s.as_str().into()
            };
            // A duplicate (possible after lossy UTF-8 decoding) keeps the first id.
            token_to_id.entry(text.clone()).or_insert(i as u32);
            let score = match scores {
                Some(a) => a[i].as_f64().ok_or_else(|| TokenizerError::BadMetadata {
                    key: KEY_SCORES,
                    reason: format!("entry {i} is not a number"),
                })? as f32,
                None => 0.0,
            };
            let attr = match types {
                Some(a) => {
                    attr_from_type(a[i].as_i64().ok_or_else(|| TokenizerError::BadMetadata {
                        key: KEY_TYPES,
                        reason: format!("entry {i} is not an integer"),
                    })?)
                }
                None => ATTR_NORMAL,
            };
            tokens.push(TokenData { text, score, attr });
        }

        // Special ids: llama.cpp's per-model defaults, then the metadata.
        let in_range = |id: u64| (id < n as u64).then_some(id as u32);
        let (mut bos, mut eos, mut unk) = match model {
            TokenizerModel::Spm => (in_range(1), in_range(2), in_range(0)),
            TokenizerModel::Bpe => (in_range(11), in_range(11), None),
        };
        if pre.as_ref().is_some_and(|p| p.no_bos) {
            bos = None;
        }
        let meta_id = |key: &str, slot: &mut Option<u32>| {
            if let Some(id) = opt_id(gguf, key).and_then(in_range) {
                *slot = Some(id);
            }
        };
        meta_id("tokenizer.ggml.bos_token_id", &mut bos);
        meta_id("tokenizer.ggml.eos_token_id", &mut eos);
        meta_id("tokenizer.ggml.unknown_token_id", &mut unk);
        let mut eot = None;
        let mut eom = None;
        let mut fim = [None; 6];
        meta_id("tokenizer.ggml.eot_token_id", &mut eot);
        meta_id("tokenizer.ggml.eom_token_id", &mut eom);
        let fim_keys = [
            (
                "tokenizer.ggml.fim_pre_token_id",
                "tokenizer.ggml.prefix_token_id",
            ),
            (
                "tokenizer.ggml.fim_suf_token_id",
                "tokenizer.ggml.suffix_token_id",
            ),
            (
                "tokenizer.ggml.fim_mid_token_id",
                "tokenizer.ggml.middle_token_id",
            ),
            ("tokenizer.ggml.fim_pad_token_id", ""),
            ("tokenizer.ggml.fim_rep_token_id", ""),
            ("tokenizer.ggml.fim_sep_token_id", ""),
        ];
        for (slot, (key, old_key)) in fim.iter_mut().zip(fim_keys) {
            meta_id(key, slot);
            if !old_key.is_empty() {
                meta_id(old_key, slot);
            }
        }

        // Find unset special tokens by their text, marking them CONTROL as llama.cpp does.
        // llama.cpp walks a hash map here, so with several candidates its choice is
        // arbitrary; we take the lowest id.
        let mut detect = |slot: &mut Option<u32>, texts: &[&str]| {
            if slot.is_some() {
                return;
            }
            let found = texts
                .iter()
                .filter_map(|t| token_to_id.get(*t).copied())
                .min();
            if let Some(id) = found {
                *slot = Some(id);
                tokens[id as usize].attr |= ATTR_CONTROL;
            }
        };
        detect(&mut eot, EOT_TEXTS);
        detect(&mut eom, EOM_TEXTS);
        let fim_texts = [
            FIM_PRE_TEXTS,
            FIM_SUF_TEXTS,
            FIM_MID_TEXTS,
            FIM_PAD_TEXTS,
            FIM_REP_TEXTS,
            FIM_SEP_TEXTS,
        ];
        for (slot, texts) in fim.iter_mut().zip(fim_texts) {
            detect(slot, texts);
        }

        // End-of-generation set.
        let mut eog: Vec<u32> = fim[3..].iter().flatten().copied().collect();
        for t in EOG_TEXTS {
            if let Some(&id) = token_to_id.get(*t) {
                eog.push(id);
                tokens[id as usize].attr |= ATTR_CONTROL;
            }
        }
        // gpt-oss: these render and match like user-defined tokens.
        for t in ["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"] {
            if let Some(&id) = token_to_id.get(t) {
                tokens[id as usize].attr = ATTR_USER_DEFINED;
            }
        }
        eog.extend([eos, eot, eom].into_iter().flatten());
        eog.sort_unstable();
        eog.dedup();
        fn has(tokens: &[TokenData], eog: &[u32], text: &str) -> bool {
            eog.iter().any(|&id| &*tokens[id as usize].text == text)
        }
        // o200k_harmony / solar-open: "<|end|>" ends a message, not the generation.
        let harmony = has(&tokens, &eog, "<|return|>") && has(&tokens, &eog, "<|call|>");
        let solar = has(&tokens, &eog, "<|calls|>") && has(&tokens, &eog, "<|flush|>");
        if (harmony || solar)
            && let Some(&end) = token_to_id.get("<|end|>")
            && eog.contains(&end)
        {
            eog.retain(|&id| id != end);
            tokens[end as usize].attr = ATTR_USER_DEFINED;
        }
        // gemma4 / paddleocr: "</s>" is not end-of-generation next to "<|tool_response>".
        if has(&tokens, &eog, "<|tool_response>")
            && let Some(&s) = token_to_id.get("</s>")
            && eog.contains(&s)
        {
            eog.retain(|&id| id != s);
            tokens[s as usize].attr = ATTR_NORMAL;
        }

        let (default_bos, default_space) = match (model, &pre) {
            (TokenizerModel::Spm, _) => (true, true),
            (TokenizerModel::Bpe, Some(p)) => (p.add_bos, false),
            (TokenizerModel::Bpe, None) => (false, false),
        };
        let add_space_prefix =
            opt_bool(gguf, "tokenizer.ggml.add_space_prefix")?.unwrap_or(default_space);
        let add_bos = opt_bool(gguf, "tokenizer.ggml.add_bos_token")?.unwrap_or(default_bos);
        let add_eos = opt_bool(gguf, "tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        if add_bos && bos.is_none() {
            return Err(TokenizerError::BadMetadata {
                key: "tokenizer.ggml.add_bos_token",
                reason: "true, but tokenizer.ggml.bos_token_id is not set".into(),
            });
        }
        if add_eos && eos.is_none() {
            return Err(TokenizerError::BadMetadata {
                key: "tokenizer.ggml.add_eos_token",
                reason: "true, but tokenizer.ggml.eos_token_id is not set".into(),
            });
        }

        Ok(Self {
            model,
            pre,
            tokens,
            token_to_id,
            bos,
            eos,
            eot,
            unk,
            eog,
            add_bos,
            add_eos,
            add_space_prefix,
        })
    }
}

/// The bytes a token stands for, as llama.cpp's `token_to_piece(special = true)` gives them.
fn piece_of(model: TokenizerModel, tok: &TokenData, chars: &[char; 256], out: &mut Vec<u8>) {
    let attr = tok.attr;
    if attr & (ATTR_CONTROL | ATTR_UNKNOWN | ATTR_USER_DEFINED) != 0 {
        out.extend_from_slice(tok.text.as_bytes());
    } else if attr & ATTR_NORMAL != 0 {
        match model {
            TokenizerModel::Spm => {
                for c in tok.text.chars() {
                    if c == '\u{2581}' {
                        out.push(b' ');
                    } else {
                        let mut buf = [0u8; 4];
                        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                    }
                }
            }
            TokenizerModel::Bpe => {
                for c in tok.text.chars() {
                    match char_to_byte(c, chars) {
                        Some(b) => out.push(b),
                        // Not a byte-level character: keep it as UTF-8.
                        None => {
                            let mut buf = [0u8; 4];
                            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                        }
                    }
                }
            }
        }
    } else if attr & ATTR_BYTE != 0
        && let Some(b) = tok
            .text
            .get(3..5)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
    {
        out.push(b);
    }
    // UNUSED and UNDEFINED tokens render as nothing, as in llama.cpp.
}

/// BOS/EOS text and whether the tokenizer adds them, for chat templates.
pub(crate) struct TemplateTokens {
    pub(crate) bos_token: String,
    pub(crate) eos_token: String,
    pub(crate) add_bos: bool,
    pub(crate) add_eos: bool,
}

/// Reads what a chat template needs from the vocabulary, without building merges.
pub(crate) fn template_tokens(gguf: &GgufFile) -> Result<TemplateTokens, TokenizerError> {
    let info = VocabInfo::load(gguf)?;
    let chars = byte_chars();
    let text = |id: Option<u32>| {
        id.map(|id| {
            let mut out = Vec::new();
            piece_of(info.model, &info.tokens[id as usize], &chars, &mut out);
            String::from_utf8_lossy(&out).into_owned()
        })
        .unwrap_or_default()
    };
    Ok(TemplateTokens {
        bos_token: text(info.bos),
        eos_token: text(info.eos),
        add_bos: info.add_bos,
        add_eos: info.add_eos,
    })
}

/// One symbol of a word being merged.
#[derive(Clone, Copy)]
struct BpeSym {
    id: u32,
    prev: u32,
    next: u32,
    alive: bool,
}

/// A possible merge: (rank, left position, right position, left id, right id).
type MergeCandidate = (u32, u32, u32, u32, u32);

/// Buffers reused across the words of one `encode` call.
#[derive(Default)]
struct BpeScratch {
    syms: Vec<BpeSym>,
    heap: BinaryHeap<Reverse<MergeCandidate>>,
}

/// A piece of input: raw text, or a special token cut out of it.
enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

impl Tokenizer {
    /// Builds the tokenizer from a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, TokenizerError> {
        let info = VocabInfo::load(gguf)?;
        let chars = byte_chars();

        let kind = match info.model {
            TokenizerModel::Spm => Kind::Spm,
            TokenizerModel::Bpe => {
                let pre = info
                    .pre
                    .as_ref()
                    .ok_or(TokenizerError::UnknownPre(String::new()))?;
                let regexes = pre
                    .regexes
                    .iter()
                    .map(|&(pattern, rule)| {
                        Regex::new(pattern).map(|re| (re, rule)).map_err(|e| {
                            TokenizerError::Regex {
                                pattern,
                                source: Box::new(e),
                            }
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let mut byte_tokens = [NO_TOKEN; 256];
                for (b, slot) in byte_tokens.iter_mut().enumerate() {
                    let mut buf = [0u8; 4];
                    if let Some(&id) = info.token_to_id.get(&*chars[b].encode_utf8(&mut buf)) {
                        *slot = id;
                    }
                }
                let raw_merges = gguf.get_array(KEY_MERGES)?;
                let mut merges =
                    PairMap::with_capacity_and_hasher(raw_merges.len(), Default::default());
                let mut joined = String::new();
                for (rank, v) in raw_merges.iter().enumerate() {
                    let MetaValue::String(m) = v else {
                        return Err(TokenizerError::BadMetadata {
                            key: KEY_MERGES,
                            reason: format!("entry {rank} is not a string"),
                        });
                    };
                    // Split at the first space after the first byte, as llama.cpp does.
                    let Some(pos) = m.bytes().skip(1).position(|b| b == b' ').map(|p| p + 1) else {
                        continue;
                    };
                    let (left, right) = (&m[..pos], &m[pos + 1..]);
                    joined.clear();
                    joined.push_str(left);
                    joined.push_str(right);
                    // Merges whose parts or result are not tokens cannot produce a
                    // token, so they are left out.
                    if let (Some(&l), Some(&r), Some(&j)) = (
                        info.token_to_id.get(left),
                        info.token_to_id.get(right),
                        info.token_to_id.get(joined.as_str()),
                    ) {
                        merges.entry(pair_key(l, r)).or_insert((rank as u32, j));
                    }
                }
                Kind::Bpe(Box::new(BpeState {
                    regexes,
                    merges,
                    byte_tokens,
                    byte_chars: chars,
                    ignore_merges: pre.ignore_merges,
                }))
            }
        };

        let mut piece_data = Vec::new();
        let mut piece_ends = Vec::with_capacity(info.tokens.len());
        for tok in &info.tokens {
            piece_of(info.model, tok, &chars, &mut piece_data);
            let end = u32::try_from(piece_data.len()).map_err(|_| TokenizerError::BadMetadata {
                key: KEY_TOKENS,
                reason: "vocabulary text exceeds 4 GiB".into(),
            })?;
            piece_ends.push(end);
        }

        let mut special_tokens: Vec<u32> = (0..info.tokens.len() as u32)
            .filter(|&id| {
                info.tokens[id as usize].attr & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN)
                    != 0
            })
            .collect();
        special_tokens.sort_by_key(|&id| (Reverse(info.tokens[id as usize].text.len()), id));

        Ok(Self {
            kind,
            tokens: info.tokens,
            token_to_id: info.token_to_id,
            piece_data,
            piece_ends,
            special_tokens,
            bos: info.bos,
            eos: info.eos,
            eot: info.eot,
            unk: info.unk,
            eog: info.eog,
            add_bos: info.add_bos,
            add_eos: info.add_eos,
            add_space_prefix: info.add_space_prefix,
        })
    }

    /// The vocabulary kind.
    pub fn model(&self) -> TokenizerModel {
        match self.kind {
            Kind::Bpe(_) => TokenizerModel::Bpe,
            Kind::Spm => TokenizerModel::Spm,
        }
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// Whether a BOS token should be put in front of a prompt (llama.cpp's `add_bos`).
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether an EOS token should be appended to a prompt (llama.cpp's `add_eos`).
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    /// The beginning-of-sequence token.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// The end-of-sequence token.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// The end-of-turn token (from metadata or found by its text, e.g. `<|im_end|>`).
    pub fn eot(&self) -> Option<u32> {
        self.eot
    }

    /// The unknown token.
    pub fn unk(&self) -> Option<u32> {
        self.unk
    }

    /// Whether generating this token ends generation (EOS, EOT, and llama.cpp's other EOG tokens).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// All end-of-generation tokens, ascending.
    pub fn eog_tokens(&self) -> &[u32] {
        &self.eog
    }

    /// Whether the token is a control token (matched only with `parse_special`).
    pub fn is_control(&self, id: u32) -> bool {
        self.tokens
            .get(id as usize)
            .is_some_and(|t| t.attr & ATTR_CONTROL != 0)
    }

    /// The token's vocabulary text (byte-level or `▁`-escaped, as stored), if the id exists.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(|t| &*t.text)
    }

    /// The token with exactly this vocabulary text.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }

    /// The raw bytes the token stands for; control tokens give their text, unknown ids nothing.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        let i = id as usize;
        let Some(&end) = self.piece_ends.get(i) else {
            return &[];
        };
        let start = if i == 0 { 0 } else { self.piece_ends[i - 1] };
        &self.piece_data[start as usize..end as usize]
    }

    /// Detokenizes, lossily turning invalid UTF-8 into U+FFFD; special tokens give their text.
    ///
    /// As llama.cpp's `detokenize` does, a vocabulary with `add_space_prefix` drops
    /// one leading space from the first token. The tokenizer's
    /// `clean_up_tokenization_spaces` pass is not applied.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut d = StreamDecoder::new();
        let mut out = String::new();
        for &id in ids {
            out.push_str(&d.push(self, id));
        }
        out.push_str(&d.finish());
        out
    }

    /// Tokenizes `text`; special-token text is matched only if `parse_special`. Never adds BOS/EOS.
    pub fn encode(&self, text: &str, parse_special: bool) -> Vec<u32> {
        let fragments = self.partition(text, parse_special);
        let mut out = Vec::with_capacity(text.len() / 3 + 4);
        match &self.kind {
            Kind::Bpe(bpe) => {
                let mut words = Vec::new();
                let mut scratch = BpeScratch::default();
                for frag in fragments {
                    match frag {
                        Fragment::Token(id) => out.push(id),
                        Fragment::Text(t) => {
                            words.clear();
                            split_words(&bpe.regexes, t, &mut words);
                            for w in &words {
                                self.bpe_word(bpe, w, &mut scratch, &mut out);
                            }
                        }
                    }
                }
            }
            Kind::Spm => {
                let mut prev_special = true;
                let mut buf = String::new();
                for frag in fragments {
                    match frag {
                        Fragment::Token(id) => {
                            out.push(id);
                            prev_special = true;
                        }
                        Fragment::Text(t) => {
                            buf.clear();
                            if self.add_space_prefix && prev_special {
                                buf.push('\u{2581}');
                            }
                            for c in t.chars() {
                                buf.push(if c == ' ' { '\u{2581}' } else { c });
                            }
                            self.spm_text(&buf, &mut out);
                            prev_special = false;
                        }
                    }
                }
            }
        }
        out
    }

    /// Cuts special tokens out of `text`, longest token text first, as llama.cpp's
    /// `tokenizer_st_partition` does.
    fn partition<'a>(&self, text: &'a str, parse_special: bool) -> Vec<Fragment<'a>> {
        let mut frags = Vec::new();
        if text.is_empty() {
            return frags;
        }
        frags.push(Fragment::Text(text));
        let mut next = Vec::new();
        for &id in &self.special_tokens {
            let tok = &self.tokens[id as usize];
            if !parse_special && tok.attr & (ATTR_CONTROL | ATTR_UNKNOWN) != 0 {
                continue;
            }
            let needle = &*tok.text;
            let mut found = false;
            next.clear();
            for frag in &frags {
                match *frag {
                    Fragment::Token(t) => next.push(Fragment::Token(t)),
                    Fragment::Text(mut rest) => {
                        while let Some(p) = rest.find(needle) {
                            found = true;
                            if p > 0 {
                                next.push(Fragment::Text(&rest[..p]));
                            }
                            next.push(Fragment::Token(id));
                            rest = &rest[p + needle.len()..];
                        }
                        if !rest.is_empty() {
                            next.push(Fragment::Text(rest));
                        }
                    }
                }
            }
            if found {
                std::mem::swap(&mut frags, &mut next);
            }
        }
        frags
    }

    /// Byte-level BPE on one pre-tokenized word.
    fn bpe_word(&self, bpe: &BpeState, word: &str, scratch: &mut BpeScratch, out: &mut Vec<u32>) {
        let bytes = word.as_bytes();
        if bpe.ignore_merges {
            let encoded: String = bytes.iter().map(|&b| bpe.byte_chars[b as usize]).collect();
            if let Some(&id) = self.token_to_id.get(encoded.as_str()) {
                out.push(id);
                return;
            }
        }
        if let [b] = bytes {
            let id = bpe.byte_tokens[*b as usize];
            if id != NO_TOKEN {
                out.push(id);
            }
            return;
        }

        const NONE: u32 = u32::MAX;
        let n = bytes.len();
        let BpeScratch { syms, heap } = scratch;
        syms.clear();
        heap.clear();
        syms.extend(bytes.iter().enumerate().map(|(i, &b)| BpeSym {
            id: bpe.byte_tokens[b as usize],
            prev: if i == 0 { NONE } else { i as u32 - 1 },
            next: if i + 1 == n { NONE } else { i as u32 + 1 },
            alive: true,
        }));

        // Min-heap on (rank, left position); the ids detect stale entries.
        let push = |heap: &mut BinaryHeap<_>, syms: &[BpeSym], left: u32, right: u32| {
            if left == NONE || right == NONE {
                return;
            }
            let (l, r) = (syms[left as usize].id, syms[right as usize].id);
            if l == NO_TOKEN || r == NO_TOKEN {
                return;
            }
            if let Some(&(rank, _)) = bpe.merges.get(&pair_key(l, r)) {
                heap.push(Reverse((rank, left, right, l, r)));
            }
        };
        for i in 1..n as u32 {
            push(heap, syms, i - 1, i);
        }
        while let Some(Reverse((_, left, right, l, r))) = heap.pop() {
            let (ls, rs) = (syms[left as usize], syms[right as usize]);
            if !ls.alive || !rs.alive || ls.next != right || ls.id != l || rs.id != r {
                continue;
            }
            let Some(&(_, merged)) = bpe.merges.get(&pair_key(l, r)) else {
                continue;
            };
            syms[left as usize].id = merged;
            syms[left as usize].next = rs.next;
            syms[right as usize].alive = false;
            if rs.next != NONE {
                syms[rs.next as usize].prev = left;
            }
            push(heap, syms, ls.prev, left);
            push(heap, syms, left, rs.next);
        }

        let mut i = 0u32;
        while i != NONE {
            let s = syms[i as usize];
            if s.id != NO_TOKEN {
                out.push(s.id);
            }
            i = s.next;
        }
    }

    /// SentencePiece-style BPE on `▁`-escaped text, as llama.cpp's SPM tokenizer does.
    fn spm_text(&self, text: &str, out: &mut Vec<u32>) {
        #[derive(Clone, Copy)]
        struct Sym {
            start: usize,
            len: usize,
            prev: usize,
            next: usize,
        }
        /// Highest score first, then leftmost.
        struct Bigram {
            score: f32,
            left: usize,
            right: usize,
            size: usize,
        }
        impl PartialEq for Bigram {
            fn eq(&self, other: &Self) -> bool {
                self.cmp(other) == Ordering::Equal
            }
        }
        impl Eq for Bigram {}
        impl PartialOrd for Bigram {
            fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
                Some(self.cmp(other))
            }
        }
        impl Ord for Bigram {
            fn cmp(&self, other: &Self) -> Ordering {
                self.score
                    .total_cmp(&other.score)
                    .then(other.left.cmp(&self.left))
            }
        }
        const NONE: usize = usize::MAX;

        let mut syms: Vec<Sym> = Vec::with_capacity(text.len());
        for (start, c) in text.char_indices() {
            let idx = syms.len();
            syms.push(Sym {
                start,
                len: c.len_utf8(),
                prev: if idx == 0 { NONE } else { idx - 1 },
                next: if start + c.len_utf8() == text.len() {
                    NONE
                } else {
                    idx + 1
                },
            });
        }
        if syms.is_empty() {
            return;
        }
        let mut heap = BinaryHeap::new();
        let try_add = |heap: &mut BinaryHeap<Bigram>, syms: &[Sym], left: usize, right: usize| {
            if left == NONE || right == NONE {
                return;
            }
            let (l, r) = (syms[left], syms[right]);
            let piece = &text[l.start..l.start + l.len + r.len];
            if let Some(&id) = self.token_to_id.get(piece) {
                heap.push(Bigram {
                    score: self.tokens[id as usize].score,
                    left,
                    right,
                    size: piece.len(),
                });
            }
        };
        for i in 1..syms.len() {
            try_add(&mut heap, &syms, i - 1, i);
        }
        while let Some(b) = heap.pop() {
            let (l, r) = (syms[b.left], syms[b.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != b.size {
                continue;
            }
            syms[b.left].len += r.len;
            syms[b.right].len = 0;
            syms[b.left].next = r.next;
            if r.next != NONE {
                syms[r.next].prev = b.left;
            }
            try_add(&mut heap, &syms, l.prev, b.left);
            try_add(&mut heap, &syms, b.left, r.next);
        }

        let mut i = 0;
        while i != NONE {
            let s = syms[i];
            let piece = &text[s.start..s.start + s.len];
            match self.token_to_id.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for &b in piece.as_bytes() {
                        if let Some(id) = self.byte_token(b) {
                            out.push(id);
                        }
                    }
                }
            }
            i = s.next;
        }
    }

    /// The SPM byte-fallback token for one byte: `<0xNN>`, else the byte as text, else UNK.
    fn byte_token(&self, b: u8) -> Option<u32> {
        let hex = format!("<0x{b:02X}>");
        if let Some(&id) = self.token_to_id.get(hex.as_str()) {
            return Some(id);
        }
        if b < 0x80
            && let Some(&id) = self.token_to_id.get(&*char::from(b).to_string())
        {
            return Some(id);
        }
        self.unk
    }
}

/// Splits `text` by each regex in turn; matches and the gaps between them both
/// become pieces, and each regex sees one piece at a time (llama.cpp's
/// `unicode_regex_split`).
fn split_words<'a>(regexes: &[(Regex, WsRule)], text: &'a str, out: &mut Vec<&'a str>) {
    out.push(text);
    let mut next = Vec::new();
    for (re, rule) in regexes {
        next.clear();
        for &piece in out.iter() {
            let mut last = 0;
            let mut pos = 0;
            // A search error (a backtracking limit) leaves the rest of the piece whole.
            while let Ok(Some(m)) = re.find_from_pos(piece, pos) {
                let (start, mut end) = (m.start(), m.end());
                if end == start {
                    // No pattern here matches empty; step over it regardless.
                    pos = piece[start..]
                        .chars()
                        .next()
                        .map_or(piece.len() + 1, |c| start + c.len_utf8());
                    if pos > piece.len() {
                        break;
                    }
                    continue;
                }
                if *rule != WsRule::None && end < piece.len() {
                    end = lookahead_end(&piece[start..end], *rule).map_or(end, |n| start + n);
                }
                if start > last {
                    next.push(&piece[last..start]);
                }
                next.push(&piece[start..end]);
                last = end;
                pos = end;
            }
            if last < piece.len() {
                next.push(&piece[last..]);
            }
        }
        std::mem::swap(out, &mut next);
    }
}

/// For a match followed by more text: if it is a whitespace run from the
/// pattern's `\s+` branch and longer than one character, the length that
/// `\s+(?!\S)` would have matched instead (all but the last character).
fn lookahead_end(m: &str, rule: WsRule) -> Option<usize> {
    let mut chars = m.char_indices().rev();
    let (last_at, last) = chars.next()?;
    chars.next()?;
    if rule == WsRule::LookaheadAfterNewlines && (last == '\r' || last == '\n') {
        return None;
    }
    m.chars().all(char::is_whitespace).then_some(last_at)
}

/// Turns a stream of tokens into text, holding back incomplete UTF-8 sequences
/// until the bytes that complete them arrive.
#[derive(Debug, Default, Clone)]
pub struct StreamDecoder {
    pending: Vec<u8>,
    started: bool,
}

impl StreamDecoder {
    /// A decoder at the start of a text.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token; returns the text it completes (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        let mut bytes = tok.token_bytes(id);
        if !self.started {
            self.started = true;
            if tok.add_space_prefix
                && let [b' ', rest @ ..] = bytes
            {
                bytes = rest;
            }
        }
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        let mut consumed = 0;
        loop {
            match std::str::from_utf8(&self.pending[consumed..]) {
                Ok(s) => {
                    out.push_str(s);
                    consumed = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = consumed + e.valid_up_to();
                    out.push_str(&String::from_utf8_lossy(&self.pending[consumed..valid]));
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            consumed = valid + bad;
                        }
                        None => {
                            consumed = valid;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..consumed);
        out
    }

    /// Ends the stream; bytes of an unfinished character come out as U+FFFD.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::gguf::tests::write_gguf;
    use serde_json::Value;
    use std::sync::OnceLock;

    fn model_tokenizer() -> &'static Tokenizer {
        static TOK: OnceLock<Tokenizer> = OnceLock::new();
        TOK.get_or_init(|| {
            let gguf = GgufFile::open(crate::paths::test_model_path()).expect("test setup");
            Tokenizer::from_gguf(&gguf).expect("test setup")
        })
    }

    fn reference() -> Value {
        serde_json::from_str(crate::paths::reference_json()).expect("test setup")
    }

    fn ids(v: &Value) -> Vec<u32> {
        v.as_array()
            .expect("test setup")
            .iter()
            .map(|x| x.as_u64().expect("test setup") as u32)
            .collect()
    }

    /// Writes GGUF bytes to a fresh temp file and opens it.
    pub(crate) fn open_bytes(bytes: &[u8]) -> GgufFile {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!("tandem-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("test setup");
        let path = dir.join(format!("{}.gguf", N.fetch_add(1, Ordering::Relaxed)));
        std::fs::write(&path, bytes).expect("test setup");
        let f = GgufFile::open(&path).expect("test setup");
        std::fs::remove_file(&path).expect("test setup");
        f
    }

    fn strs(items: &[&str]) -> MetaValue {
        MetaValue::Array(
            items
                .iter()
                .map(|s| MetaValue::String(s.to_string()))
                .collect(),
        )
    }

    #[test]
    fn shareable_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Tokenizer>();
        assert_send_sync::<StreamDecoder>();
    }

    #[test]
    fn smollm_metadata() {
        let tok = model_tokenizer();
        assert_eq!(tok.model(), TokenizerModel::Bpe);
        assert_eq!(tok.vocab_size(), 49152);
        assert!(!tok.add_bos());
        assert_eq!(tok.bos(), Some(1));
        assert_eq!(tok.eos(), Some(2));
        assert_eq!(tok.token_id("<|im_start|>"), Some(1));
        // <|endoftext|>, <|im_end|>, and <reponame> (llama.cpp's FIM repo token).
        assert_eq!(tok.eog_tokens(), &[0, 2, 4]);
        assert!(tok.is_eog(2) && tok.is_eog(0) && !tok.is_eog(1));
        assert_eq!(tok.token_bytes(1), b"<|im_start|>");
        assert_eq!(tok.token_bytes(905), b" world");
        assert_eq!(tok.token_bytes(198), b"\n");
        assert_eq!(tok.token_bytes(u32::MAX), b"");
    }

    #[test]
    fn tokenize_matches_llamacpp() {
        let tok = model_tokenizer();
        let r = reference();
        let cases = r["tokenize"].as_array().expect("test setup");
        assert!(!cases.is_empty());
        for case in cases {
            let text = case["text"].as_str().expect("test setup");
            assert_eq!(tok.encode(text, true), ids(&case["ids"]), "{text:?}");
            assert_eq!(
                tok.encode(text, false),
                ids(&case["ids_parse_special_false"]),
                "{text:?} without special parsing"
            );
            // Pieces, where the reference gives them as text, are the token bytes.
            for (id, piece) in ids(&case["ids"])
                .iter()
                .zip(case["pieces"].as_array().expect("test setup"))
            {
                match piece {
                    Value::String(s) => assert_eq!(tok.token_bytes(*id), s.as_bytes()),
                    Value::Array(b) => {
                        let b: Vec<u8> = b
                            .iter()
                            .map(|x| x.as_u64().expect("test setup") as u8)
                            .collect();
                        assert_eq!(tok.token_bytes(*id), &b[..]);
                    }
                    _ => panic!("odd piece {piece:?}"),
                }
            }
            assert_eq!(tok.decode(&ids(&case["ids"])), text);
            assert_eq!(tok.decode(&ids(&case["ids_parse_special_false"])), text);
        }
    }

    #[test]
    fn chat_prompts_tokenize_like_llamacpp() {
        let tok = model_tokenizer();
        let r = reference();
        for case in r["chat"].as_array().expect("test setup") {
            let prompt = case["templated_prompt"].as_str().expect("test setup");
            let mut got = Vec::new();
            // llama.cpp adds BOS only when the vocabulary says so; this one does not,
            // and the leading 1 in prompt_ids is the template's own <|im_start|>.
            if tok.add_bos() {
                got.extend(tok.bos());
            }
            got.extend(tok.encode(prompt, true));
            assert_eq!(got, ids(&case["prompt_ids"]));
            assert_eq!(tok.decode(&got), prompt);
        }
    }

    #[test]
    fn stream_decoder_matches_decode_on_multibyte_text() {
        let tok = model_tokenizer();
        for text in [
            "naïve café – “quotes” 日本語 🙂",
            "🙂🙃👍🏽 emoji 🇫🇷 flags",
            "中文测试：你好，世界！한국어 テキスト",
            "plain ascii",
        ] {
            let ids = tok.encode(text, true);
            let mut d = StreamDecoder::new();
            let mut streamed = String::new();
            for &id in &ids {
                let part = d.push(tok, id);
                assert!(!part.contains('\u{FFFD}'), "{text:?}: partial char leaked");
                streamed.push_str(&part);
            }
            streamed.push_str(&d.finish());
            assert_eq!(streamed, tok.decode(&ids));
            assert_eq!(streamed, text);
        }
        // Invalid or truncated sequences come out as U+FFFD, as decode gives them.
        let e_acute_lead = tok.token_id("Ã").expect("test setup"); // byte 0xC3
        let ids = [
            e_acute_lead,
            tok.token_id("a").expect("test setup"),
            e_acute_lead,
        ];
        let mut d = StreamDecoder::new();
        let mut s = String::new();
        for id in ids {
            s.push_str(&d.push(tok, id));
        }
        s.push_str(&d.finish());
        assert_eq!(s, "\u{FFFD}a\u{FFFD}");
        assert_eq!(s, tok.decode(&ids));
    }

    #[test]
    fn special_tokens_need_parse_special() {
        let tok = model_tokenizer();
        let with = tok.encode("a<|im_end|>b<|endoftext|>", true);
        assert!(with.contains(&2) && with.contains(&0));
        let without = tok.encode("a<|im_end|>b<|endoftext|>", false);
        assert!(!without.contains(&2) && !without.contains(&0));
        assert!(tok.encode("", true).is_empty());
    }

    /// Whether every byte of `c` has a byte-level token (SmolLM2 lacks a few, e.g.
    /// 0x04 and the 0xF1/0xF2 lead bytes of planes 4 to 11; like llama.cpp, such
    /// bytes are dropped, so text holding them cannot round-trip).
    fn encodable(tok: &Tokenizer, c: char) -> bool {
        let Kind::Bpe(bpe) = &tok.kind else {
            return true;
        };
        let mut buf = [0u8; 4];
        c.encode_utf8(&mut buf)
            .bytes()
            .all(|b| bpe.byte_tokens[b as usize] != NO_TOKEN)
    }

    #[test]
    fn bytes_without_tokens_are_dropped() {
        let tok = model_tokenizer();
        assert!(!encodable(tok, '\u{4}') && !encodable(tok, '\u{40000}'));
        let (a, b) = (
            tok.token_id("a").expect("test setup"),
            tok.token_id("b").expect("test setup"),
        );
        assert_eq!(tok.encode("a\u{4}b", false), vec![a, b]);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]
        #[test]
        fn decode_inverts_encode(
            raw in "\\PC{0,40}|[ \\t\\n\\r\\u{a0}\\u{3000}a-zA-Z0-9'.,!?()<>|]{0,60}|.{0,40}"
        ) {
            let tok = model_tokenizer();
            let s: String = raw.chars().filter(|&c| encodable(tok, c)).collect();
            let special = tok
                .special_tokens
                .iter()
                .any(|&id| s.contains(tok.token_text(id).unwrap_or("")));
            proptest::prop_assume!(!special);
            let ids = tok.encode(&s, true);
            proptest::prop_assert_eq!(tok.decode(&ids), s);
        }
    }

    fn tiny_bpe(pre: Option<&str>) -> Vec<(&'static str, MetaValue)> {
        let mut meta = vec![
            ("tokenizer.ggml.model", MetaValue::String("gpt2".into())),
            ("tokenizer.ggml.tokens", strs(&["a", "b", "ab", "Ġ", "Ġab"])),
            ("tokenizer.ggml.merges", strs(&["a b", "Ġ ab"])),
        ];
        if let Some(p) = pre {
            meta.push(("tokenizer.ggml.pre", MetaValue::String(p.into())));
        }
        meta
    }

    #[test]
    fn unknown_pre_is_named() {
        let f = open_bytes(&write_gguf(&tiny_bpe(Some("no-such-pre")), &[]));
        let err = Tokenizer::from_gguf(&f).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, TokenizerError::UnknownPre(_)), "{msg}");
        assert!(
            msg.contains("no-such-pre") && msg.contains("tokenizer.ggml.pre"),
            "{msg}"
        );
    }

    #[test]
    fn missing_keys_are_named() {
        for missing in [
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.merges",
            "tokenizer.ggml.model",
        ] {
            let meta: Vec<_> = tiny_bpe(Some("gpt-2"))
                .into_iter()
                .filter(|(k, _)| *k != missing)
                .collect();
            let f = open_bytes(&write_gguf(&meta, &[]));
            let msg = Tokenizer::from_gguf(&f).unwrap_err().to_string();
            assert!(msg.contains(missing), "{missing}: {msg}");
        }
        let mut meta = tiny_bpe(None);
        meta[0].1 = MetaValue::String("wordpiece".into());
        let f = open_bytes(&write_gguf(&meta, &[]));
        let msg = Tokenizer::from_gguf(&f).unwrap_err().to_string();
        assert!(
            msg.contains("wordpiece") && msg.contains("tokenizer.ggml.model"),
            "{msg}"
        );
    }

    #[test]
    fn tiny_bpe_merges_and_defaults() {
        // No `pre` key: llama.cpp falls back to its default pre-tokenizer.
        let f = open_bytes(&write_gguf(&tiny_bpe(None), &[]));
        let tok = Tokenizer::from_gguf(&f).expect("test setup");
        assert_eq!(tok.encode("ab ab", false), vec![2, 4]);
        assert_eq!(tok.encode("ba", false), vec![1, 0]);
        // Bytes without a token are dropped, as llama.cpp drops them.
        assert_eq!(tok.encode("abc", false), vec![2]);
        assert!(!tok.add_bos());
        // llama.cpp's BPE default BOS/EOS id is 11, out of range here.
        assert_eq!(tok.bos(), None);
        assert_eq!(tok.decode(&[4, 2]), " abab");
    }

    /// Compiled pre-tokenizer regexes, built once per test run.
    fn compiled(pre: &str) -> &'static [(Regex, WsRule)] {
        use std::collections::HashMap;
        use std::sync::Mutex;
        type Cache = Mutex<HashMap<String, &'static [(Regex, WsRule)]>>;
        static CACHE: OnceLock<Cache> = OnceLock::new();
        let mut cache = CACHE
            .get_or_init(Default::default)
            .lock()
            .expect("test setup");
        cache.entry(pre.to_string()).or_insert_with(|| {
            let regexes: Vec<(Regex, WsRule)> = pre_config(pre)
                .expect("test setup")
                .regexes
                .iter()
                .map(|&(p, r)| (Regex::new(p).expect("test setup"), r))
                .collect();
            Box::leak(regexes.into_boxed_slice())
        })
    }

    fn split(pre: &str, text: &str) -> Vec<String> {
        let mut out = Vec::new();
        split_words(compiled(pre), text, &mut out);
        out.into_iter().map(str::to_string).collect()
    }

    #[test]
    fn pre_tokenizer_splits() {
        assert_eq!(
            split("llama-bpe", "Hello  world's 12345\n\n x"),
            ["Hello", " ", " world", "'s", " ", "123", "45", "\n\n", " x"]
        );
        assert_eq!(
            split("qwen2", "I'M 2024 cats!!\n"),
            ["I", "'M", " ", "2", "0", "2", "4", " cats", "!!\n"]
        );
        assert_eq!(
            split("gpt-2", "it's  3.14\tok "),
            ["it", "'s", " ", " 3", ".", "14", "\t", "ok", " "]
        );
        assert_eq!(split("smollm", "ab12 3"), ["ab", "1", "2", " ", "3"]);
        assert_eq!(
            split("default", "a+b, 12345"),
            ["a", "+", "b", ",", " ", "123", "45"]
        );
        for pre in [
            "tekken",
            "gpt-4o",
            "qwen35",
            "falcon",
            "bloom",
            "chatglm-bpe",
        ] {
            assert_eq!(split(pre, "Hello World").concat(), "Hello World", "{pre}");
        }
    }

    /// llama.cpp's own patterns, lookaheads and all, for checking the rewrites.
    const ORIGINAL_PATTERNS: &[(&str, &str)] = &[
        (
            "gpt-2",
            r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
        ),
        (
            "llama3",
            r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ),
        (
            "qwen2",
            r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ),
        (
            "tekken",
            r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ),
        (
            "gpt-4o",
            r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ),
    ];

    /// Splits with a lookahead pattern the plain way: matches and gaps.
    fn split_original(pattern: &'static str, text: &str) -> Vec<String> {
        static CACHE: OnceLock<Vec<Regex>> = OnceLock::new();
        let all = CACHE.get_or_init(|| {
            ORIGINAL_PATTERNS
                .iter()
                .map(|(_, p)| Regex::new(p).expect("test setup"))
                .collect()
        });
        let i = ORIGINAL_PATTERNS
            .iter()
            .position(|(_, p)| *p == pattern)
            .expect("test setup");
        let re = &all[i];
        let mut out = Vec::new();
        let mut last = 0;
        for m in re.find_iter(text) {
            let m = m.expect("test setup");
            if m.start() > last {
                out.push(text[last..m.start()].to_string());
            }
            out.push(m.as_str().to_string());
            last = m.end();
        }
        if last < text.len() {
            out.push(text[last..].to_string());
        }
        out
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]
        #[test]
        fn rewritten_patterns_split_like_llamacpps(
            s in "[ \\t\\n\\r\\u{a0}\\u{3000}aAbZ1é日'.!/-]{0,24}|\\PC{0,12}"
        ) {
            for (pre, original) in ORIGINAL_PATTERNS {
                proptest::prop_assert_eq!(split(pre, &s), split_original(original, &s), "{}", pre);
            }
        }
    }

    /// A small SentencePiece vocabulary: <unk>, <s>, </s>, 256 byte tokens, then pieces.
    fn tiny_spm(extra: Vec<(&'static str, MetaValue)>) -> Tokenizer {
        let mut tokens = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
        let mut types = vec![2u32, 3, 3];
        let mut scores = vec![0.0f32, 0.0, 0.0];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
            scores.push(0.0);
        }
        let pieces: &[(&str, f32)] = &[
            ("▁", -1.0),
            ("h", -2.0),
            ("e", -2.0),
            ("l", -2.0),
            ("o", -2.0),
            ("w", -2.0),
            ("r", -2.0),
            ("d", -2.0),
            ("he", -3.0),
            ("ll", -3.0),
            ("llo", -4.0),
            ("hello", -5.0),
            ("▁hello", -6.0),
            ("▁w", -3.5),
            ("or", -3.5),
            ("▁wor", -4.5),
            ("ld", -3.6),
            ("▁world", -5.5),
            ("<tool>", 0.0),
        ];
        for (p, s) in pieces {
            tokens.push(p.to_string());
            types.push(if *p == "<tool>" { 4 } else { 1 });
            scores.push(*s);
        }
        let mut meta = vec![
            ("tokenizer.ggml.model", MetaValue::String("llama".into())),
            (
                "tokenizer.ggml.tokens",
                MetaValue::Array(tokens.into_iter().map(MetaValue::String).collect()),
            ),
            (
                "tokenizer.ggml.scores",
                MetaValue::Array(scores.into_iter().map(MetaValue::F32).collect()),
            ),
            (
                "tokenizer.ggml.token_type",
                MetaValue::Array(types.into_iter().map(MetaValue::U32).collect()),
            ),
        ];
        meta.extend(extra);
        Tokenizer::from_gguf(&open_bytes(&write_gguf(&meta, &[]))).expect("test setup")
    }

    #[test]
    fn spm_tokenizes_with_scores_prefix_and_byte_fallback() {
        let tok = tiny_spm(vec![]);
        assert_eq!(tok.model(), TokenizerModel::Spm);
        assert!(tok.add_bos());
        assert_eq!(
            (tok.bos(), tok.eos(), tok.unk()),
            (Some(1), Some(2), Some(0))
        );
        assert!(tok.is_eog(2));
        let id = |s: &str| tok.token_id(s).expect("test setup");
        assert_eq!(
            tok.encode("hello world", false),
            vec![id("▁hello"), id("▁world")]
        );
        // "é" is not a piece: its two UTF-8 bytes fall back to byte tokens.
        assert_eq!(
            tok.encode("hé", false),
            vec![id("▁"), id("h"), id("<0xC3>"), id("<0xA9>")]
        );
        // A space prefix is added again after each special token.
        assert_eq!(
            tok.encode("hello</s>hello", true),
            vec![id("▁hello"), 2, id("▁hello")]
        );
        // User-defined tokens are cut out even without parse_special; control ones are not.
        assert_eq!(
            tok.encode("hello<tool>", false),
            vec![id("▁hello"), id("<tool>")]
        );
        assert_eq!(tok.encode("<tool>", true), vec![id("<tool>")]);
        assert!(!tok.encode("</s>", false).contains(&2));
        // decode drops the prefix space of the first token, as llama.cpp does.
        for s in ["hello world", "hé wörld", "  two spaces"] {
            assert_eq!(tok.decode(&tok.encode(s, false)), s);
        }
        assert_eq!(tok.decode(&[1, id("▁hello")]), "<s> hello");
    }

    #[test]
    fn spm_metadata_overrides_defaults() {
        let tok = tiny_spm(vec![
            ("tokenizer.ggml.add_space_prefix", MetaValue::Bool(false)),
            ("tokenizer.ggml.add_bos_token", MetaValue::Bool(false)),
            ("tokenizer.ggml.eos_token_id", MetaValue::U32(1)),
        ]);
        assert!(!tok.add_bos());
        assert_eq!(tok.eos(), Some(1));
        let id = |s: &str| tok.token_id(s).expect("test setup");
        assert_eq!(tok.encode("hello", false), vec![id("hello")]);
        assert_eq!(tok.decode(&[id("▁hello")]), " hello");
    }

    #[test]
    fn byte_chars_are_gpt2s() {
        let t = byte_chars();
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[0xAD], 'Ń');
        for b in 0..=255u8 {
            assert_eq!(char_to_byte(t[b as usize], &t), Some(b));
        }
        assert_eq!(char_to_byte('日', &t), None);
    }
}
