//! One error type for the whole crate: a single human-readable line.
//!
//! Every failure a user can cause (missing or corrupt files, shape mismatches, bad ids, impossible
//! configs) becomes an `Error` whose message is printed by the CLI as one line with a non-zero exit.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

pub type Result<T> = std::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl Error {
    pub fn msg(m: impl fmt::Display) -> Self {
        Error(m.to_string())
    }
}

/// `bail!("fmt", args)` returns early with an [`Error`].
#[macro_export]
macro_rules! bail {
    ($($t:tt)*) => { return Err($crate::error::Error(format!($($t)*))) };
}

/// `ensure!(cond, "fmt", args)` bails when `cond` is false.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($t:tt)*) => { if !$cond { $crate::bail!($($t)*); } };
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error(e.to_string())
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error(format!("invalid JSON: {e}"))
    }
}

impl From<safetensors::SafeTensorError> for Error {
    fn from(e: safetensors::SafeTensorError) -> Self {
        Error(format!("invalid safetensors data: {e}"))
    }
}

/// Attach context to any error: `file.read().context(format!("reading {path}"))?`.
pub trait Context<T> {
    fn context(self, msg: impl fmt::Display) -> Result<T>;
    fn with_context<M: fmt::Display>(self, f: impl FnOnce() -> M) -> Result<T>;
}

impl<T, E: fmt::Display> Context<T> for std::result::Result<T, E> {
    fn context(self, msg: impl fmt::Display) -> Result<T> {
        self.map_err(|e| Error(format!("{msg}: {e}")))
    }
    fn with_context<M: fmt::Display>(self, f: impl FnOnce() -> M) -> Result<T> {
        self.map_err(|e| Error(format!("{}: {e}", f())))
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, msg: impl fmt::Display) -> Result<T> {
        self.ok_or_else(|| Error(msg.to_string()))
    }
    fn with_context<M: fmt::Display>(self, f: impl FnOnce() -> M) -> Result<T> {
        self.ok_or_else(|| Error(f().to_string()))
    }
}

/// `note!("fmt", args)` writes one line to stderr, ignoring a stderr that cannot be written
/// (`eprintln!` would panic there).
#[macro_export]
macro_rules! note {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}
