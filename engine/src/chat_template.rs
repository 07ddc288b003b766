//! Chat templates: the Jinja template in `tokenizer.chat_template`, rendered with minijinja.
//!
//! The environment is set up the way HF `transformers` and llama.cpp render
//! templates: `trim_blocks` and `lstrip_blocks` on, Python string methods
//! (`.strip()`, `.startswith()`, ...) through minijinja-contrib's pycompat,
//! and the `raise_exception` and `strftime_now` functions. The variables are
//! `messages`, `add_generation_prompt`, `bos_token` and `eos_token`.
//!
//! As llama.cpp does, a rendered prompt that starts with the BOS text loses it
//! when the tokenizer adds BOS itself, and one that ends with the EOS text loses
//! it when the tokenizer adds EOS, so those tokens are not doubled.

use minijinja::syntax::SyntaxConfig;
use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::gguf::{GgufError, GgufFile};
use crate::tokenizer::{Tokenizer, TokenizerError};

/// The GGUF key holding the template source.
pub const CHAT_TEMPLATE_KEY: &str = "tokenizer.chat_template";

const TEMPLATE_NAME: &str = "chat_template";

/// Errors from loading or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    /// The model has no `tokenizer.chat_template`.
    #[error("model has no chat template (missing metadata key {CHAT_TEMPLATE_KEY})")]
    Missing,
    /// The template key exists but is not a string.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// The vocabulary needed for `bos_token`/`eos_token` could not be read.
    #[error("cannot read the vocabulary for the chat template: {0}")]
    Tokenizer(#[from] TokenizerError),
    /// The template does not parse.
    #[error("chat template does not parse: {0:#}")]
    Syntax(#[source] Error),
    /// Rendering failed, including a `raise_exception` from the template.
    #[error("chat template failed to render: {0:#}")]
    Render(#[source] Error),
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with this role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// What the template sees as `bos_token`/`eos_token`, and whether the tokenizer adds them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TemplateSpecials {
    /// Text of the BOS token (empty if the vocabulary has none).
    pub bos_token: String,
    /// Text of the EOS token (empty if the vocabulary has none).
    pub eos_token: String,
    /// The tokenizer prepends BOS, so a leading BOS text is stripped from the rendering.
    pub add_bos: bool,
    /// The tokenizer appends EOS, so a trailing EOS text is stripped from the rendering.
    pub add_eos: bool,
}

impl TemplateSpecials {
    /// The BOS/EOS text and flags of a tokenizer.
    pub fn from_tokenizer(tok: &Tokenizer) -> Self {
        let text = |id: Option<u32>| {
            id.map(|id| String::from_utf8_lossy(tok.token_bytes(id)).into_owned())
                .unwrap_or_default()
        };
        Self {
            bos_token: text(tok.bos()),
            eos_token: text(tok.eos()),
            add_bos: tok.add_bos(),
            add_eos: tok.add_eos(),
        }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    specials: TemplateSpecials,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .field("specials", &self.specials)
            .finish()
    }
}

impl ChatTemplate {
    /// Loads the template from `tokenizer.chat_template`, with BOS/EOS from the vocabulary.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, ChatTemplateError> {
        if gguf.get(CHAT_TEMPLATE_KEY).is_none() {
            return Err(ChatTemplateError::Missing);
        }
        let source = gguf.get_str(CHAT_TEMPLATE_KEY)?.to_string();
        let t = crate::tokenizer::template_tokens(gguf)?;
        Self::new(
            source,
            TemplateSpecials {
                bos_token: t.bos_token,
                eos_token: t.eos_token,
                add_bos: t.add_bos,
                add_eos: t.add_eos,
            },
        )
    }

    /// Compiles a template from its source.
    pub fn new(
        source: impl Into<String>,
        specials: TemplateSpecials,
    ) -> Result<Self, ChatTemplateError> {
        let source = source.into();
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(ChatTemplateError::Syntax)?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(ChatTemplateError::Syntax)?;
        Ok(Self {
            env,
            source,
            specials,
        })
    }

    /// The template source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The BOS/EOS settings the template renders with.
    pub fn specials(&self) -> &TemplateSpecials {
        &self.specials
    }

    /// Renders a conversation into a prompt, optionally opening the assistant's turn.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(ChatTemplateError::Render)?;
        let out = tmpl
            .render(minijinja::context! {
                messages => minijinja::value::Serde(messages),
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.specials.bos_token,
                eos_token => &self.specials.eos_token,
            })
            .map_err(ChatTemplateError::Render)?;
        let mut s = out.as_str();
        let (bos, eos) = (&self.specials.bos_token, &self.specials.eos_token);
        if self.specials.add_bos && !bos.is_empty() {
            s = s.strip_prefix(bos.as_str()).unwrap_or(s);
        }
        if self.specials.add_eos && !eos.is_empty() {
            s = s.strip_suffix(eos.as_str()).unwrap_or(s);
        }
        Ok(if s.len() == out.len() {
            out
        } else {
            s.to_string()
        })
    }
}

/// `raise_exception(message)`: aborts rendering with the template's message.
fn raise_exception(message: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the current UTC time, formatted like Python's `strftime`.
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    strftime(&format, secs)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];

/// Year, month (1-12) and day (1-31) of a day count since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Formats a Unix time (UTC) with the common `strftime` directives; unknown ones stay as written.
fn strftime(format: &str, unix_secs: i64) -> String {
    use std::fmt::Write;
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs / 3600, secs / 60 % 60, secs % 60);
    let weekday = (days + 4).rem_euclid(7) as usize;
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let before_month = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = before_month[month as usize - 1] + day + u32::from(leap && month > 2);
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
    let month_name = MONTHS[month as usize - 1];
    let weekday_name = WEEKDAYS[weekday];

    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(d) = chars.next() else {
            out.push('%');
            break;
        };
        // Writing to a String cannot fail.
        let _ = match d {
            'Y' => write!(out, "{year}"),
            'y' => write!(out, "{:02}", year.rem_euclid(100)),
            'm' => write!(out, "{month:02}"),
            'd' => write!(out, "{day:02}"),
            'e' => write!(out, "{day:2}"),
            '-' if matches!(chars.clone().next(), Some('d' | 'm' | 'H' | 'I' | 'j')) => {
                match chars.next() {
                    Some('d') => write!(out, "{day}"),
                    Some('m') => write!(out, "{month}"),
                    Some('H') => write!(out, "{hour}"),
                    Some('I') => write!(out, "{hour12}"),
                    _ => write!(out, "{yday}"),
                }
            }
            'H' => write!(out, "{hour:02}"),
            'I' => write!(out, "{hour12:02}"),
            'M' => write!(out, "{minute:02}"),
            'S' => write!(out, "{second:02}"),
            'p' => write!(out, "{}", if hour < 12 { "AM" } else { "PM" }),
            'B' => write!(out, "{month_name}"),
            'b' | 'h' => write!(out, "{}", &month_name[..3]),
            'A' => write!(out, "{weekday_name}"),
            'a' => write!(out, "{}", &weekday_name[..3]),
            'w' => write!(out, "{weekday}"),
            'j' => write!(out, "{yday:03}"),
            'F' => write!(out, "{year}-{month:02}-{day:02}"),
            'T' => write!(out, "{hour:02}:{minute:02}:{second:02}"),
            'D' => write!(out, "{month:02}/{day:02}/{:02}", year.rem_euclid(100)),
            'Z' => write!(out, "UTC"),
            'z' => write!(out, "+0000"),
            '%' => write!(out, "%"),
            other => write!(out, "%{other}"),
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::MetaValue;
    use crate::gguf::tests::write_gguf;
    use serde_json::Value;

    fn model_gguf() -> GgufFile {
        GgufFile::open(crate::paths::test_model_path()).expect("test setup")
    }

    #[test]
    fn renders_reference_prompts() {
        let gguf = model_gguf();
        let tmpl = ChatTemplate::from_gguf(&gguf).expect("test setup");
        let tok = Tokenizer::from_gguf(&gguf).expect("test setup");
        assert_eq!(tmpl.specials(), &TemplateSpecials::from_tokenizer(&tok));
        assert_eq!(tmpl.specials().bos_token, "<|im_start|>");
        assert_eq!(tmpl.specials().eos_token, "<|im_end|>");
        let r: Value = serde_json::from_str(crate::paths::reference_json()).expect("test setup");
        assert_eq!(
            tmpl.source(),
            r["props"]["chat_template"].as_str().expect("test setup")
        );
        let chats = r["chat"].as_array().expect("test setup");
        assert!(!chats.is_empty());
        for case in chats {
            let user = case["user"].as_str().expect("test setup");
            let prompt = tmpl
                .render(&[ChatMessage::new("user", user)], true)
                .expect("test setup");
            assert_eq!(
                prompt,
                case["templated_prompt"].as_str().expect("test setup")
            );
            let mut ids: Vec<u32> = tok
                .add_bos()
                .then(|| tok.bos())
                .flatten()
                .into_iter()
                .collect();
            ids.extend(tok.encode(&prompt, true));
            let want: Vec<u32> = case["prompt_ids"]
                .as_array()
                .expect("test setup")
                .iter()
                .map(|x| x.as_u64().expect("test setup") as u32)
                .collect();
            assert_eq!(ids, want, "{user}");
        }
        // Without the generation prompt, and with a system message of our own.
        let msgs = [
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi"),
            ChatMessage::new("assistant", "Hello!"),
        ];
        assert_eq!(
            tmpl.render(&msgs, false).expect("test setup"),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello!<|im_end|>\n"
        );
    }

    fn specials(add_bos: bool) -> TemplateSpecials {
        TemplateSpecials {
            bos_token: "<s>".into(),
            eos_token: "</s>".into(),
            add_bos,
            add_eos: false,
        }
    }

    #[test]
    fn shareable_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ChatTemplate>();
    }

    #[test]
    fn python_methods_blocks_and_bos() {
        let src = "{{ bos_token }}{% for m in messages %}\n  {% if m.role == 'user' %}\n[{{ m.content.strip().upper() }}]{{ eos_token }}\n  {% endif %}\n{% endfor %}";
        let msgs = [
            ChatMessage::new("user", "  hi  "),
            ChatMessage::new("x", "y"),
        ];
        // trim_blocks/lstrip_blocks remove the block lines' whitespace.
        let t = ChatTemplate::new(src, specials(false)).expect("test setup");
        assert_eq!(t.render(&msgs, false).expect("test setup"), "<s>[HI]</s>\n");
        // A tokenizer that adds BOS gets the template's BOS text stripped.
        let t = ChatTemplate::new(src, specials(true)).expect("test setup");
        assert_eq!(t.render(&msgs, false).expect("test setup"), "[HI]</s>\n");
    }

    #[test]
    fn raise_exception_and_strftime() {
        let t = ChatTemplate::new(
            "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok",
            specials(false),
        )
        .expect("test setup");
        let err = t
            .render(&[ChatMessage::new("assistant", "x")], true)
            .unwrap_err();
        assert!(matches!(err, ChatTemplateError::Render(_)));
        assert!(err.to_string().contains("first must be user"), "{err}");
        assert_eq!(
            t.render(&[ChatMessage::new("user", "x")], true)
                .expect("test setup"),
            "ok"
        );

        let t = ChatTemplate::new("{{ strftime_now('%Y') }}", specials(false)).expect("test setup");
        let year: i64 = t
            .render(&[], false)
            .expect("test setup")
            .parse()
            .expect("test setup");
        assert!(year >= 2024);
        assert_eq!(
            strftime(
                "%Y-%m-%d %H:%M:%S %a %A %b %B %j %p %I %-d %e %%",
                1_700_000_000
            ),
            "2023-11-14 22:13:20 Tue Tuesday Nov November 318 PM 10 14 14 %"
        );
        assert_eq!(strftime("%d %B %Y", 0), "01 January 1970");
        assert_eq!(strftime("%F %T", 951_782_400), "2000-02-29 00:00:00");
        assert_eq!(strftime("%Q", 0), "%Q");
    }

    #[test]
    fn syntax_errors_and_missing_template() {
        assert!(matches!(
            ChatTemplate::new("{% for %}", specials(false)),
            Err(ChatTemplateError::Syntax(_))
        ));
        let meta = [
            ("tokenizer.ggml.model", MetaValue::String("gpt2".into())),
            (
                "tokenizer.ggml.tokens",
                MetaValue::Array(vec![MetaValue::String("a".into())]),
            ),
        ];
        let bytes = write_gguf(&meta, &[]);
        let gguf = crate::tokenizer::tests::open_bytes(&bytes);
        let err = ChatTemplate::from_gguf(&gguf).unwrap_err();
        assert!(matches!(err, ChatTemplateError::Missing));
        assert!(err.to_string().contains(CHAT_TEMPLATE_KEY), "{err}");
    }
}
