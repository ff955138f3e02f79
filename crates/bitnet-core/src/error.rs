//! One error type for the whole library. Every variant names what is at fault (a file, a tensor,
//! a field, a request value) so the CLI and the server can print it as-is.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be opened or read.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file was read but its contents are wrong (truncated, bad magic, wrong dtype/shape, missing tensor).
    #[error("{}: {msg}", path.display())]
    Format { path: PathBuf, msg: String },
    /// config.json / generation_config.json / GGUF metadata describes something we cannot run.
    #[error("config: {0}")]
    Config(String),
    /// A request or command-line value is out of range (token id, prompt length, sampling value).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// Downloading from / resolving in the Hugging Face hub failed.
    #[error("hub: {0}")]
    Hub(String),
    /// The tokenizer could not be built or failed to encode/decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template failed to parse or render.
    #[error("chat template: {0}")]
    Template(String),
    /// A compute backend (the GPU) failed or is unavailable.
    #[error("{0}")]
    Backend(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format { path: path.into(), msg: msg.into() }
    }
    pub fn config(msg: impl Into<String>) -> Self {
        Error::Config(msg.into())
    }
    pub fn input(msg: impl Into<String>) -> Self {
        Error::InvalidInput(msg.into())
    }
}
