//! The OpenAI completions API as flexrun serves it: request parsing and checking, errors in
//! OpenAI's shape, and the text of a completion (incremental decoding and stop strings).
//!
//! Fields: `prompt` (a string, token ids, or a list of one of those), `max_tokens` (default 16),
//! `temperature` (default 1), `top_p`, `top_k` (0: off), `seed`, `stop` (a string or up to four),
//! `stream`, `n` (1), `model` (the served model's id, optional). FlexOlmo's fields, named as the
//! CLI flags are: `experts` (use only these) or `exclude` (drop these), and `return_token_ids`.
//! Fields that would change the result and are not implemented (`n` > 1, `best_of` > 1,
//! `echo`, `logprobs`, `suffix`, penalties, `logit_bias`) are refused rather than ignored;
//! others (`user`, `stream_options`, ...) are accepted and ignored.

use crate::data::tokenizer::Tokenizer;
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// An error as an HTTP status and OpenAI's error object.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub param: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
        }
    }

    pub fn bad(param: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            message: message.into(),
            param: Some(param),
        }
    }

    pub fn body(&self) -> Value {
        let kind = match self.status {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        };
        json!({"error": {"message": self.message, "type": kind, "param": self.param, "code": null}})
    }
}

/// The prompt as sent.
#[derive(Debug, PartialEq)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u64>),
}

/// A parsed completion request (types checked; values checked against the model later).
#[derive(Debug)]
pub struct Request {
    pub model: Option<String>,
    pub prompt: Prompt,
    pub max_tokens: u64,
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: u64,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub experts: Option<Vec<String>>,
    pub exclude: Vec<String>,
    pub return_token_ids: bool,
}

/// Parse a request body. Every error names the field at fault.
pub fn parse(body: &[u8]) -> Result<Request, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::new(400, format!("the body is not valid JSON: {e}")))?;
    let Value::Object(o) = v else {
        return Err(ApiError::new(400, "the body must be a JSON object"));
    };
    let uint = |k: &'static str, default: u64| -> Result<u64, ApiError> {
        match o.get(k) {
            None | Some(Value::Null) => Ok(default),
            Some(x) => x
                .as_u64()
                .ok_or_else(|| ApiError::bad(k, format!("{k} must be a non-negative integer"))),
        }
    };
    let num = |k: &'static str, default: f64| -> Result<f64, ApiError> {
        match o.get(k) {
            None | Some(Value::Null) => Ok(default),
            Some(x) => x
                .as_f64()
                .ok_or_else(|| ApiError::bad(k, format!("{k} must be a number"))),
        }
    };
    let boolean = |k: &'static str| -> Result<bool, ApiError> {
        match o.get(k) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(ApiError::bad(k, format!("{k} must be true or false"))),
        }
    };
    let names = |k: &'static str| -> Result<Option<Vec<String>>, ApiError> {
        match o.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .map(Some)
                .ok_or_else(|| ApiError::bad(k, format!("{k} must be a list of expert names"))),
            Some(_) => Err(ApiError::bad(
                k,
                format!("{k} must be a list of expert names"),
            )),
        }
    };
    unsupported(&o)?;
    let model = match o.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(ApiError::bad("model", "model must be a string")),
    };
    let prompt = parse_prompt(o.get("prompt"))?;
    let stop = match o.get("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::bad("stop", "stop must be a string or a list of strings"))?,
        Some(_) => {
            return Err(ApiError::bad(
                "stop",
                "stop must be a string or a list of strings",
            ))
        }
    };
    if stop.len() > 4 || stop.iter().any(|s| s.is_empty() || s.len() > 256) {
        return Err(ApiError::bad(
            "stop",
            "stop takes up to 4 non-empty strings of up to 256 bytes",
        ));
    }
    let experts = names("experts")?;
    let exclude = names("exclude")?.unwrap_or_default();
    if experts.is_some() && !exclude.is_empty() {
        return Err(ApiError::bad(
            "experts",
            "give experts or exclude, not both",
        ));
    }
    Ok(Request {
        model,
        prompt,
        max_tokens: uint("max_tokens", 16)?,
        temperature: num("temperature", 1.0)?,
        top_p: num("top_p", 1.0)?,
        top_k: uint("top_k", 0)?,
        seed: match o.get("seed") {
            None | Some(Value::Null) => None,
            Some(x) => Some(x.as_u64().ok_or_else(|| {
                ApiError::bad("seed", "seed must be an integer from 0 to 2^64 - 1")
            })?),
        },
        stop,
        stream: boolean("stream")?,
        experts,
        exclude,
        return_token_ids: boolean("return_token_ids")?,
    })
}

/// Settings the server does not implement are refused unless they are at their defaults.
fn unsupported(o: &Map<String, Value>) -> Result<(), ApiError> {
    let default = |k: &str, ok: &dyn Fn(&Value) -> bool| match o.get(k) {
        None | Some(Value::Null) => true,
        Some(v) => ok(v),
    };
    let one = |v: &Value| v.as_u64() == Some(1);
    let zero = |v: &Value| v.as_f64() == Some(0.0);
    for (k, ok) in [
        ("n", &one as &dyn Fn(&Value) -> bool),
        ("best_of", &one),
        ("echo", &|v: &Value| v == &Value::Bool(false)),
        ("suffix", &|_: &Value| false),
        ("logprobs", &|_: &Value| false),
        ("presence_penalty", &zero),
        ("frequency_penalty", &zero),
        ("logit_bias", &|v: &Value| {
            v.as_object().is_some_and(|m| m.is_empty())
        }),
    ] {
        if !default(k, ok) {
            let k: &'static str = k;
            return Err(ApiError::bad(
                k,
                format!("{k} is not supported by this server"),
            ));
        }
    }
    Ok(())
}

fn parse_prompt(v: Option<&Value>) -> Result<Prompt, ApiError> {
    let bad = || ApiError::bad("prompt", "prompt must be a string or a list of token ids");
    match v {
        None | Some(Value::Null) => Err(ApiError::bad("prompt", "prompt is required")),
        Some(Value::String(s)) => Ok(Prompt::Text(s.clone())),
        Some(Value::Array(a)) => {
            if a.iter().all(Value::is_number) {
                return a
                    .iter()
                    .map(|x| {
                        x.as_u64().ok_or_else(|| {
                            ApiError::bad("prompt", "a token id must be a non-negative integer")
                        })
                    })
                    .collect::<Result<_, _>>()
                    .map(Prompt::Ids);
            }
            match a.as_slice() {
                [one @ (Value::String(_) | Value::Array(_))] => parse_prompt(Some(one)),
                [_, _, ..] if a.iter().all(|x| x.is_string() || x.is_array()) => Err(
                    ApiError::bad("prompt", "one prompt per request (send several requests)"),
                ),
                _ => Err(bad()),
            }
        }
        Some(_) => Err(bad()),
    }
}

/// The text of a completion as its tokens arrive: what may be shown so far (complete characters,
/// and never the start of a stop string), and where a stop string ends it.
pub struct Text {
    tok: Option<Arc<Tokenizer>>,
    stops: Vec<String>,
    pub ids: Vec<u32>,
    full: String,
    shown: usize,
    /// Set when a stop string was found: the completion ends before it.
    pub stopped: bool,
}

impl Text {
    pub fn new(tok: Option<Arc<Tokenizer>>, stops: Vec<String>) -> Self {
        Text {
            tok,
            stops,
            ids: Vec::new(),
            full: String::new(),
            shown: 0,
            stopped: false,
        }
    }

    /// Add a token; returns the text newly shown (possibly empty).
    pub fn push(&mut self, id: u32) -> String {
        self.ids.push(id);
        let Some(tok) = &self.tok else {
            return String::new();
        };
        let Ok(text) = tok.decode(&self.ids) else {
            return String::new();
        };
        if text.ends_with('\u{FFFD}') || !text.is_char_boundary(self.shown.min(text.len())) {
            return String::new(); // an incomplete character: wait for the next token
        }
        self.full = text;
        // A complete stop string ends the completion before it.
        let from = self.shown.saturating_sub(256);
        let from = (0..=from)
            .rev()
            .find(|&i| self.full.is_char_boundary(i))
            .unwrap_or(0);
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.full[from..].find(s.as_str()).map(|p| from + p))
            .min();
        let end = match hit {
            Some(p) => {
                self.stopped = true;
                p.max(self.shown)
            }
            None => {
                // Hold back a suffix that may begin a stop string.
                let hold = self
                    .stops
                    .iter()
                    .flat_map(|s| {
                        s.char_indices()
                            .skip(1)
                            .map(|(i, _)| i)
                            .filter(|&i| self.full.ends_with(&s[..i]))
                    })
                    .max()
                    .unwrap_or(0);
                self.full.len() - hold
            }
        };
        let out = self.full.get(self.shown..end).unwrap_or("").to_string();
        self.shown = self.shown.max(end);
        out
    }

    /// What is held back at the end (a partial stop string that never completed).
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        let out = self.full.get(self.shown..).unwrap_or("").to_string();
        self.shown = self.full.len();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_with_openai_defaults_and_name_the_bad_field() {
        let r =
            parse(br#"{"prompt": "hi", "user": "x", "stream_options": {"include_usage": true}}"#)
                .unwrap();
        assert_eq!(r.prompt, Prompt::Text("hi".into()));
        assert_eq!(
            (r.max_tokens, r.temperature, r.top_p, r.stream),
            (16, 1.0, 1.0, false)
        );
        let r = parse(br#"{"prompt": [[1, 2, 3]], "stop": "\n", "exclude": ["news"]}"#).unwrap();
        assert_eq!(r.prompt, Prompt::Ids(vec![1, 2, 3]));
        assert_eq!(
            (r.stop, r.exclude),
            (vec!["\n".to_string()], vec!["news".to_string()])
        );
        for (body, param) in [
            (&br#"{"prompt": 3}"#[..], Some("prompt")),
            (br#"{"prompt": [1, -2]}"#, Some("prompt")),
            (br#"{"prompt": ["a", "b"]}"#, Some("prompt")),
            (br#"{}"#, Some("prompt")),
            (br#"{"prompt": "a", "max_tokens": "9"}"#, Some("max_tokens")),
            (br#"{"prompt": "a", "max_tokens": 1.5}"#, Some("max_tokens")),
            (
                br#"{"prompt": "a", "temperature": "hot"}"#,
                Some("temperature"),
            ),
            (br#"{"prompt": "a", "stream": 1}"#, Some("stream")),
            (br#"{"prompt": "a", "n": 2}"#, Some("n")),
            (br#"{"prompt": "a", "logprobs": 3}"#, Some("logprobs")),
            (br#"{"prompt": "a", "echo": true}"#, Some("echo")),
            (br#"{"prompt": "a", "stop": ["", "x"]}"#, Some("stop")),
            (
                br#"{"prompt": "a", "experts": ["x"], "exclude": ["y"]}"#,
                Some("experts"),
            ),
            (br#"{"prompt": "a", "exclude": "news"}"#, Some("exclude")),
            (br#"{"prompt": "a", "seed": -1}"#, Some("seed")),
            (br#"[1]"#, None),
            (br#"{"prompt": "a""#, None),
        ] {
            let e = parse(body).unwrap_err();
            assert_eq!(
                (e.status, e.param),
                (400, param),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
