//! The crate's error type. Every variant says what failed (the driver call, the NVRTC step, the
//! request value), so the CLI and the server can print it as-is.

use std::fmt;

#[derive(Debug)]
pub enum Error {
    /// No usable CUDA device: built without the `cuda` feature, no driver, no device, no NVRTC.
    Unavailable(String),
    /// A CUDA driver call failed (the message names the call).
    Driver(String),
    /// NVRTC failed (the message holds its log).
    Nvrtc(String),
    /// The model or the plan asks for something this backend does not do.
    Unsupported(String),
    /// A request value is out of range (token id, context, batch size, sampling value).
    InvalidInput(String),
    /// Loading the weights failed.
    Core(bitnet_core::Error),
    /// A broken invariant of this crate.
    Internal(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Unavailable(m) => write!(f, "CUDA unavailable: {m}"),
            Error::Driver(m) => write!(f, "CUDA driver: {m}"),
            Error::Nvrtc(m) => write!(f, "NVRTC: {m}"),
            Error::Unsupported(m) => write!(f, "not supported by the CUDA backend: {m}"),
            Error::InvalidInput(m) => write!(f, "invalid input: {m}"),
            Error::Core(e) => write!(f, "{e}"),
            Error::Internal(m) => write!(f, "bitnet-cuda internal error: {m}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Core(e) => Some(e),
            _ => None,
        }
    }
}

impl From<bitnet_core::Error> for Error {
    fn from(e: bitnet_core::Error) -> Self {
        Error::Core(e)
    }
}

impl Error {
    pub(crate) fn input(m: impl Into<String>) -> Self {
        Error::InvalidInput(m.into())
    }
}
