//! Chat templates: render a conversation to the model's prompt text with the Jinja template
//! from `tokenizer_config.json` (`chat_template`) or `chat_template.jinja`, through minijinja
//! set up like Hugging Face's renderer (trim_blocks, lstrip_blocks, Python string methods,
//! `raise_exception`, `tojson`, `strftime_now`).

use std::path::Path;

use minijinja::{Environment, Error as JinjaError, ErrorKind};
use serde_json::Value;

use crate::error::{EngineError, Result};

pub use kiln_job::spec::ChatMessage;

/// A compiled chat template plus the special-token strings it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

const TEMPLATE_NAME: &str = "chat";

impl ChatTemplate {
    /// Load the template of a model directory: `chat_template.jinja` if present, otherwise
    /// `chat_template` from `tokenizer_config.json`.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg_text = std::fs::read_to_string(&cfg_path)
            .map_err(|e| EngineError::io("reading", &cfg_path, e))?;
        let jinja = dir.join("chat_template.jinja");
        let over = if jinja.exists() {
            Some(
                std::fs::read_to_string(&jinja)
                    .map_err(|e| EngineError::io("reading", &jinja, e))?,
            )
        } else {
            None
        };
        Self::from_tokenizer_config(&cfg_text, over)
            .map_err(|e| EngineError::ChatTemplate(format!("{}: {e}", cfg_path.display())))
    }

    /// Build from the text of `tokenizer_config.json`; `template_override` (the contents of
    /// `chat_template.jinja`) wins over the config's `chat_template`.
    pub fn from_tokenizer_config(
        config_json: &str,
        template_override: Option<String>,
    ) -> Result<Self> {
        let v: Value = serde_json::from_str(config_json).map_err(|e| {
            EngineError::ChatTemplate(format!("tokenizer_config.json is not valid JSON: {e}"))
        })?;
        let source = match template_override {
            Some(s) => s,
            None => match v.get("chat_template") {
                Some(Value::String(s)) => s.clone(),
                // A list of named templates: take "default".
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template").and_then(Value::as_str))
                    .ok_or_else(|| EngineError::ChatTemplate("no template named \"default\" in chat_template".into()))?
                    .to_string(),
                _ => {
                    return Err(EngineError::ChatTemplate(
                        "tokenizer_config.json has no chat_template (and there is no chat_template.jinja); this model cannot render chat messages — pass a plain prompt instead".into(),
                    ))
                }
            },
        };
        let special = |key: &str| -> String {
            match v.get(key) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Object(o)) => o
                    .get("content")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                _ => String::new(),
            }
        };
        Self::from_source(source, special("bos_token"), special("eos_token"))
    }

    /// Compile a template from its source.
    pub fn from_source(source: String, bos_token: String, eos_token: String) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, JinjaError> {
                Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", |fmt: String| -> String {
            strftime_now(&fmt)
        });
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|e| EngineError::ChatTemplate(format!("cannot compile: {e}")))?;
        Ok(ChatTemplate {
            env,
            bos_token,
            eos_token,
        })
    }

    /// The EOS token string from `tokenizer_config.json`, if set.
    pub fn eos_token(&self) -> Option<&str> {
        Some(self.eos_token.as_str()).filter(|s| !s.is_empty())
    }

    /// The text that closes an assistant turn after its content (`<|im_end|>\n` for ChatML):
    /// what the rendering of `history + [user, assistant]` adds after the assistant's content.
    pub fn assistant_closing(&self, history: &[ChatMessage], user: &ChatMessage) -> Result<String> {
        const SENTINEL: &str = "\u{1}KILN_SENTINEL\u{1}";
        let mut all = history.to_vec();
        all.push(user.clone());
        all.push(ChatMessage::assistant(SENTINEL));
        let text = self.render(&all, false)?;
        let at = text.rfind(SENTINEL).ok_or_else(|| {
            EngineError::ChatTemplate("the template drops the assistant's message".into())
        })?;
        Ok(text[at + SENTINEL.len()..].to_string())
    }

    /// Render `messages`; `add_generation_prompt` appends the assistant turn's opening.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .expect("added at construction");
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| EngineError::ChatTemplate(format!("cannot render: {e}")))
    }

    /// The text a new user turn adds to a conversation `history` whose last assistant turn
    /// is closed: the rendering of `history + [user]` with the generation prompt, minus the
    /// rendering of `history`. Errors if the template does not render conversations as
    /// prefixes of each other (then sessions cannot forward only the new turn).
    pub fn delta(&self, history: &[ChatMessage], user: &ChatMessage) -> Result<String> {
        let before = if history.is_empty() {
            String::new()
        } else {
            self.render(history, false)?
        };
        let mut all = history.to_vec();
        all.push(user.clone());
        let after = self.render(&all, true)?;
        after.strip_prefix(before.as_str()).map(str::to_string).ok_or_else(|| {
            EngineError::ChatTemplate(
                "the template does not render the conversation as a prefix of its continuation, so a session cannot forward only the new turn".into(),
            )
        })
    }
}

/// `strftime_now(fmt)` for templates (Llama 3 writes today's date): UTC, supporting
/// `%Y %m %d %e %b %B %H %M %S %%`.
fn strftime_now(fmt: &str) -> String {
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
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out += &y.to_string(),
            Some('m') => out += &format!("{m:02}"),
            Some('d') => out += &format!("{d:02}"),
            Some('e') => out += &d.to_string(),
            Some('b') => out += &MONTHS[(m - 1) as usize][..3],
            Some('B') => out += MONTHS[(m - 1) as usize],
            Some('H') => out += &format!("{:02}", rem / 3600),
            Some('M') => out += &format!("{:02}", rem % 3600 / 60),
            Some('S') => out += &format!("{:02}", rem % 60),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Qwen2.5's template (abridged to the no-tools branch, verbatim otherwise).
    const QWEN25: &str = r#"{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- else %}
    {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"#;

    #[test]
    fn renders_the_qwen_template_like_transformers() {
        let t =
            ChatTemplate::from_source(QWEN25.into(), String::new(), "<|im_end|>".into()).unwrap();
        let out = t.render(&[ChatMessage::user("Hi")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let hist = [ChatMessage::user("Hi"), ChatMessage::assistant("Hello")];
        let d = t.delta(&hist, &ChatMessage::user("Again")).unwrap();
        assert_eq!(
            d,
            "<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_methods_tojson_and_raise_exception_work() {
        let src = "{% if messages[0].content.startswith('x') %}{{ raise_exception('no x') }}{% endif %}{{ messages[0].content.strip() | tojson }}{{ strftime_now('%Y') | length }}";
        let t = ChatTemplate::from_source(src.into(), String::new(), String::new()).unwrap();
        assert_eq!(
            t.render(&[ChatMessage::user(" a ")], false).unwrap(),
            "\"a\"4"
        );
        let err = t
            .render(&[ChatMessage::user("xa")], false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no x"), "{err}");
    }

    #[test]
    fn missing_template_says_so() {
        let err = ChatTemplate::from_tokenizer_config("{}", None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no chat_template"), "{err}");
    }
}
