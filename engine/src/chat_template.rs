//! Chat templates: the Jinja template in `tokenizer.chat_template`, rendered
//! with minijinja the way Hugging Face renders it (trimmed blocks, Python
//! string methods, `raise_exception`), so prompts match llama.cpp's token for
//! token.

use minijinja::{Environment, Error, ErrorKind, context};
use serde::{Deserialize, Serialize};

use crate::gguf::GgufFile;

/// Errors from loading or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error("the model has no chat template (tokenizer.chat_template)")]
    Missing,
    #[error("chat template: {0}")]
    Render(String),
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A model's chat template.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// The template stored in a GGUF file, with the vocabulary's BOS/EOS text.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ChatTemplateError> {
        let source = file
            .get_str("tokenizer.chat_template")
            .map_err(|_| ChatTemplateError::Missing)?
            .to_string();
        let token = |key: &str| -> String {
            let tokens = file.get_array("tokenizer.ggml.tokens").ok();
            file.get_u64(key)
                .ok()
                .and_then(|id| tokens.and_then(|t| t.get(id as usize)))
                .and_then(|v| match v {
                    crate::gguf::MetaValue::String(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default()
        };
        let t = Self {
            bos_token: token("tokenizer.ggml.bos_token_id"),
            eos_token: token("tokenizer.ggml.eos_token_id"),
            source,
        };
        // Fail at load, not at the first request, if the template does not parse.
        t.environment()
            .template_from_str(&t.source)
            .map_err(|e| ChatTemplateError::Render(e.to_string()))?;
        Ok(t)
    }

    /// A template from source text (for models whose file lacks one).
    pub fn from_source(source: impl Into<String>, bos_token: &str, eos_token: &str) -> Self {
        Self {
            source: source.into(),
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        }
    }

    fn environment(&self) -> Environment<'_> {
        let mut env = Environment::new();
        match minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
        {
            Ok(syntax) => env.set_syntax(syntax),
            Err(e) => tracing::warn!("chat template whitespace settings: {e}"),
        }
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |format: String| -> String { strftime_now(&format) });
        env
    }

    /// Renders a conversation; `add_generation_prompt` opens the assistant's turn.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, ChatTemplateError> {
        let env = self.environment();
        let tmpl = env
            .template_from_str(&self.source)
            .map_err(|e| ChatTemplateError::Render(e.to_string()))?;
        tmpl.render(context! {
            messages => minijinja::value::Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| ChatTemplateError::Render(e.to_string()))
    }
}

/// Today's date for templates that print it (`%d %b %Y` and `%Y-%m-%d` are understood).
fn strftime_now(format: &str) -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    format
        .replace("%d", &format!("{day:02}"))
        .replace("%b", MONTHS[(month - 1) as usize])
        .replace("%m", &format!("{month:02}"))
        .replace("%Y", &year.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn renders_llamacpp_prompts() {
        let file = GgufFile::open(crate::paths::test_model_path()).expect("model");
        let t = ChatTemplate::from_gguf(&file).expect("template");
        let reference: Value = serde_json::from_str(crate::paths::reference_json()).expect("json");
        for case in reference["chat"].as_array().expect("cases") {
            let msg = ChatMessage {
                role: "user".into(),
                content: case["user"].as_str().expect("user").into(),
            };
            let out = t.render(&[msg], true).expect("render");
            assert_eq!(out, case["templated_prompt"].as_str().expect("prompt"));
        }
    }

    #[test]
    fn python_methods_and_exceptions_work() {
        let t = ChatTemplate::from_source(
            "{% if messages[0]['role'] == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}\
             {{ bos_token }}{{ messages[0]['content'].strip().upper() }}",
            "<s>",
            "</s>",
        );
        let m = |role: &str| ChatMessage {
            role: role.into(),
            content: "  hi ".into(),
        };
        assert_eq!(t.render(&[m("user")], false).expect("render"), "<s>HI");
        let err = t.render(&[m("bad")], false).expect_err("raises");
        assert!(err.to_string().contains("no bad roles"), "{err}");
    }

    #[test]
    fn dates_format() {
        let d = strftime_now("%Y-%m-%d");
        assert_eq!(d.len(), 10);
        assert!(d.starts_with("20"));
    }
}
