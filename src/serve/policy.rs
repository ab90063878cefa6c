//! Access control: which experts each API key may use (`--policy FILE`).
//!
//! ```json
//! {
//!   "default": ["public"],
//!   "keys": [
//!     {"key": "sk-acme-...", "experts": ["public", "news", "code"]},
//!     {"key": "sk-ops-...",  "experts": "*", "metrics": true}
//!   ]
//! }
//! ```
//!
//! `default` is what a request without a key may use (absent: such requests get 401). `"*"`
//! means every expert of the served model. `metrics: true` lets a key read `/metrics` (with a
//! policy, nobody else may: the metrics name every expert). Keys are compared in constant time
//! against every configured key, and never printed: [`Policy`]'s `Debug` shows none.

use crate::ensure;
use crate::error::{Context, Result};
use serde::Deserialize;
use std::path::Path;

/// The shortest key accepted: a guessable key protects nothing.
const MIN_KEY_LEN: usize = 16;
/// The longest key accepted (and the longest bearer token compared).
pub const MAX_KEY_LEN: usize = 256;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    default: Option<Experts>,
    keys: Vec<KeyEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    key: String,
    experts: Experts,
    #[serde(default)]
    metrics: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Experts {
    All(String),
    List(Vec<String>),
}

/// One key's rights, resolved against the served model's experts.
#[derive(Clone, PartialEq, Eq)]
pub struct Grant {
    /// `allowed[e]`: may use expert `e` of the served model.
    pub allowed: Vec<bool>,
    pub metrics: bool,
}

/// A loaded policy. `Debug` never shows a key.
pub struct Policy {
    keys: Vec<(Vec<u8>, Grant)>,
    default: Option<Grant>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Policy {{ {} keys, default: {} }}",
            self.keys.len(),
            self.default.is_some()
        )
    }
}

/// Who a request is, as far as the policy can tell.
pub enum Caller<'a> {
    Anonymous(&'a Grant),
    Key(&'a Grant),
}

impl Policy {
    /// Read `path` and resolve its expert names against `experts` (the served model's names; a
    /// dense model has none, and a policy may then only say `"*"` or `[]`).
    pub fn load(path: &Path, experts: &[String]) -> Result<Policy> {
        let text = crate::fsutil::read_text(path, "policy", crate::fsutil::MAX_JSON_BYTES)?;
        let file: File = serde_json::from_str(&text)
            .with_context(|| format!("policy {} is not valid", path.display()))?;
        let resolve = |x: &Experts, who: &str| -> Result<Vec<bool>> {
            Ok(match x {
                Experts::All(s) => {
                    ensure!(
                        s == "*",
                        "policy {}: {who}: experts must be \"*\" or a list of names",
                        path.display()
                    );
                    vec![true; experts.len()]
                }
                Experts::List(names) => {
                    let mut a = vec![false; experts.len()];
                    for n in names {
                        let i = experts.iter().position(|e| e == n).with_context(|| {
                            format!(
                                "policy {}: {who}: no expert '{n}' in the served model",
                                path.display()
                            )
                        })?;
                        a[i] = true;
                    }
                    a
                }
            })
        };
        let mut keys = Vec::with_capacity(file.keys.len());
        for (i, k) in file.keys.iter().enumerate() {
            let who = format!("key #{}", i + 1);
            ensure!(
                (MIN_KEY_LEN..=MAX_KEY_LEN).contains(&k.key.len())
                    && k.key.bytes().all(|b| b.is_ascii_graphic()),
                "policy {}: {who} must be {MIN_KEY_LEN} to {MAX_KEY_LEN} printable ASCII characters without spaces",
                path.display()
            );
            ensure!(
                !keys
                    .iter()
                    .any(|(x, _): &(Vec<u8>, Grant)| x == k.key.as_bytes()),
                "policy {}: {who} repeats an earlier key",
                path.display()
            );
            let grant = Grant {
                allowed: resolve(&k.experts, &who)?,
                metrics: k.metrics,
            };
            keys.push((k.key.as_bytes().to_vec(), grant));
        }
        let default = match &file.default {
            Some(x) => Some(Grant {
                allowed: resolve(x, "default")?,
                metrics: false,
            }),
            None => None,
        };
        Ok(Policy { keys, default })
    }

    /// The caller of a request with this `Authorization` header value (`None`: no header).
    /// Every configured key is compared, each in time that depends only on lengths.
    pub fn caller(&self, authorization: Option<&[u8]>) -> Option<Caller<'_>> {
        let Some(h) = authorization else {
            return self.default.as_ref().map(Caller::Anonymous);
        };
        let token = h.strip_prefix(b"Bearer ")?;
        if token.len() > MAX_KEY_LEN {
            return None;
        }
        let mut found: Option<usize> = None;
        for (i, (k, _)) in self.keys.iter().enumerate() {
            if ct_eq(k, token) {
                found = Some(i);
            }
        }
        found.map(|i| Caller::Key(&self.keys[i].1))
    }
}

/// Equality of two byte strings in time that depends only on their lengths (no early exit).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len().max(b.len());
    let mut diff = (a.len() ^ b.len()) as u64;
    for i in 0..n {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= u64::from(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        ["public", "news", "code"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    fn load(text: &str) -> Result<Policy> {
        let d = std::env::temp_dir().join(format!("flexrun-policy-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join(format!("{}.json", crate::hash::fnv1a(text.as_bytes())));
        std::fs::write(&p, text).unwrap();
        Policy::load(&p, &names())
    }

    #[test]
    fn keys_map_to_their_experts_and_nothing_else() {
        let p = load(
            r#"{"default": ["public"], "keys": [
                {"key": "aaaaaaaaaaaaaaaa-news", "experts": ["public", "news"]},
                {"key": "bbbbbbbbbbbbbbbb-all", "experts": "*", "metrics": true}]}"#,
        )
        .unwrap();
        let g = |h: Option<&str>| match p.caller(h.map(str::as_bytes)) {
            Some(Caller::Key(g)) => Some(("key", g.allowed.clone(), g.metrics)),
            Some(Caller::Anonymous(g)) => Some(("anon", g.allowed.clone(), g.metrics)),
            None => None,
        };
        assert_eq!(g(None), Some(("anon", vec![true, false, false], false)));
        assert_eq!(
            g(Some("Bearer aaaaaaaaaaaaaaaa-news")),
            Some(("key", vec![true, true, false], false))
        );
        assert_eq!(
            g(Some("Bearer bbbbbbbbbbbbbbbb-all")),
            Some(("key", vec![true, true, true], true))
        );
        for bad in [
            "Bearer aaaaaaaaaaaaaaaa-new",
            "Bearer aaaaaaaaaaaaaaaa-newss",
            "aaaaaaaaaaaaaaaa-news",
            "Bearer ",
            "Basic aaaaaaaaaaaaaaaa-news",
        ] {
            assert!(g(Some(bad)).is_none(), "{bad}");
        }
        assert!(!format!("{p:?}").contains("aaaa"), "Debug shows no key");
    }

    #[test]
    fn bad_policies_are_refused_with_one_line() {
        for (text, want) in [
            (
                r#"{"keys": [{"key": "short", "experts": "*"}]}"#,
                "printable ASCII",
            ),
            (
                r#"{"keys": [{"key": "aaaaaaaaaaaaaaaaaa", "experts": ["sports"]}]}"#,
                "no expert 'sports'",
            ),
            (
                r#"{"keys": [{"key": "aaaaaaaaaaaaaaaaaa", "experts": "all"}]}"#,
                "\"*\"",
            ),
            (
                r#"{"keys": [{"key": "aaaaaaaaaaaaaaaaaa", "experts": "*"}, {"key": "aaaaaaaaaaaaaaaaaa", "experts": []}]}"#,
                "repeats",
            ),
            (r#"{"keys": [], "admins": []}"#, "not valid"),
            ("not json", "not valid"),
        ] {
            let e = load(text).unwrap_err().to_string();
            assert!(e.contains(want) && !e.contains('\n'), "{text}: {e}");
            assert!(
                !e.contains("aaaaaaaaaaaaaaaaaa"),
                "an error never shows a key: {e}"
            );
        }
        // No default: anonymous requests have no caller.
        let p = load(r#"{"keys": [{"key": "aaaaaaaaaaaaaaaaaa", "experts": "*"}]}"#).unwrap();
        assert!(p.caller(None).is_none());
    }

    #[test]
    fn constant_time_equality_is_equality() {
        for (a, b) in [
            ("", ""),
            ("a", ""),
            ("abc", "abc"),
            ("abc", "abd"),
            ("ab", "abc"),
        ] {
            assert_eq!(ct_eq(a.as_bytes(), b.as_bytes()), a == b, "{a} {b}");
        }
    }
}
