//! `generation_config.json`: the model author's default decoding settings, with Hugging Face
//! field names verbatim. Every field is optional; an absent field means "use the default"
//! (see [`crate::sampler::SamplingParams::from_generation_config`] for how the defaults of
//! transformers' `GenerationConfig` are applied). Unknown fields are ignored.

use std::path::Path;

use serde::{Deserialize, Deserializer};

use crate::error::{Error, Result};

/// The file name looked up by [`GenerationConfig::from_model_dir`].
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";

/// `generation_config.json`, HF field names verbatim; every field is optional.
///
/// Token ids are read leniently: a negative id (some files write `-1` for "none") or `null`
/// reads as absent. `eos_token_id` may be one integer or a list of integers in the file; both
/// read as a list.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct GenerationConfig {
    /// Id of the beginning-of-sequence token.
    #[serde(default, deserialize_with = "de_token_id")]
    pub bos_token_id: Option<u32>,
    /// Ids that end generation (`eos_token_id`: an integer or a list of integers).
    #[serde(default, deserialize_with = "de_token_ids")]
    pub eos_token_id: Option<Vec<u32>>,
    /// Id of the padding token.
    #[serde(default, deserialize_with = "de_token_id")]
    pub pad_token_id: Option<u32>,
    /// `false` (transformers' default): greedy decoding; `true`: sample.
    #[serde(default)]
    pub do_sample: Option<bool>,
    /// Softmax temperature (transformers' default 1.0).
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Keep the `top_k` most likely tokens (transformers' default 50; 0 disables).
    #[serde(default)]
    pub top_k: Option<usize>,
    /// Nucleus sampling mass (transformers' default 1.0 = off).
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Minimum probability relative to the most likely token (transformers' default: off).
    #[serde(default)]
    pub min_p: Option<f32>,
    /// Repetition penalty (transformers' default 1.0 = off).
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    /// Maximum total length, prompt included.
    #[serde(default)]
    pub max_length: Option<usize>,
    /// Maximum number of generated tokens (takes precedence over `max_length` in transformers).
    #[serde(default)]
    pub max_new_tokens: Option<usize>,
}

impl GenerationConfig {
    /// Reads and parses a `generation_config.json` file.
    ///
    /// A read failure gives [`Error::Io`]; malformed JSON or a field of the wrong type gives
    /// [`Error::Format`] naming the file and serde's message (with line and column).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text).map_err(|e| Error::format(path, format!("invalid generation config: {e}")))
    }

    /// Parses the JSON text of a `generation_config.json`.
    pub fn from_json_str(text: &str) -> std::result::Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// Reads `<dir>/generation_config.json` if it exists: `Ok(None)` when the model directory
    /// has no such file, an error when it exists but cannot be read or parsed.
    pub fn from_model_dir(dir: impl AsRef<Path>) -> Result<Option<Self>> {
        let path = dir.as_ref().join(GENERATION_CONFIG_FILE);
        match std::fs::metadata(&path) {
            Ok(_) => Self::from_file(&path).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    /// The end-of-sequence ids (empty when the file names none).
    pub fn eos_token_ids(&self) -> &[u32] {
        self.eos_token_id.as_deref().unwrap_or(&[])
    }
}

/// One JSON token id: a non-negative integer, a negative integer or `null` (both "none").
fn id_from_value(v: &serde_json::Value) -> std::result::Result<Option<u32>, String> {
    match v {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                u32::try_from(u).map(Some).map_err(|_| format!("token id {u} does not fit in 32 bits"))
            } else if n.as_i64().is_some() {
                // Negative: used by some files to mean "no such token".
                Ok(None)
            } else {
                Err(format!("token id must be an integer, found {n}"))
            }
        }
        other => Err(format!("token id must be an integer, found {other}")),
    }
}

pub(crate) fn de_token_id<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<u32>, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    id_from_value(&v).map_err(serde::de::Error::custom)
}

pub(crate) fn de_token_ids<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<Vec<u32>>, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    match &v {
        serde_json::Value::Array(items) => {
            let mut ids = Vec::with_capacity(items.len());
            for item in items {
                if let Some(id) = id_from_value(item).map_err(serde::de::Error::custom)? {
                    ids.push(id);
                }
            }
            Ok(Some(ids))
        }
        other => Ok(id_from_value(other).map_err(serde::de::Error::custom)?.map(|id| vec![id])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_2b4t_generation_config() {
        let text = r#"{
            "_from_model_config": true,
            "bos_token_id": 128000,
            "do_sample": true,
            "eos_token_id": [128001, 128009],
            "max_length": 4096,
            "temperature": 0.6,
            "top_p": 0.9,
            "transformers_version": "4.51.0"
        }"#;
        let g = GenerationConfig::from_json_str(text).unwrap();
        assert_eq!(g.bos_token_id, Some(128000));
        assert_eq!(g.eos_token_ids(), &[128001, 128009]);
        assert_eq!(g.do_sample, Some(true));
        assert_eq!(g.temperature, Some(0.6));
        assert_eq!(g.top_p, Some(0.9));
        assert_eq!(g.top_k, None);
        assert_eq!(g.max_length, Some(4096));
        assert_eq!(g.pad_token_id, None);
    }

    #[test]
    fn eos_single_int_null_and_negative() {
        let g = GenerationConfig::from_json_str(r#"{"eos_token_id": 2, "pad_token_id": -1, "bos_token_id": null}"#)
            .unwrap();
        assert_eq!(g.eos_token_id, Some(vec![2]));
        assert_eq!(g.pad_token_id, None);
        assert_eq!(g.bos_token_id, None);
        let g = GenerationConfig::from_json_str("{}").unwrap();
        assert_eq!(g, GenerationConfig::default());
        assert!(g.eos_token_ids().is_empty());
    }

    #[test]
    fn wrong_types_are_errors() {
        assert!(GenerationConfig::from_json_str(r#"{"eos_token_id": "x"}"#).is_err());
        assert!(GenerationConfig::from_json_str(r#"{"eos_token_id": [1.5]}"#).is_err());
        assert!(GenerationConfig::from_json_str(r#"{"top_k": "50"}"#).is_err());
    }

    #[test]
    fn files_and_dirs() {
        let dir = std::env::temp_dir().join(format!("bitnet-genconf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(GENERATION_CONFIG_FILE);
        let _ = std::fs::remove_file(&path);
        assert!(GenerationConfig::from_model_dir(&dir).unwrap().is_none());

        std::fs::write(&path, r#"{"do_sample": false, "max_new_tokens": 7}"#).unwrap();
        let g = GenerationConfig::from_model_dir(&dir).unwrap().unwrap();
        assert_eq!(g.do_sample, Some(false));
        assert_eq!(g.max_new_tokens, Some(7));

        std::fs::write(&path, r#"{"do_sample": false,"#).unwrap();
        let err = GenerationConfig::from_file(&path).unwrap_err();
        assert!(matches!(err, Error::Format { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("generation_config.json"), "{msg}");
        assert!(msg.contains("line 1"), "{msg}");

        let missing = GenerationConfig::from_file(dir.join("nope.json")).unwrap_err();
        assert!(matches!(missing, Error::Io { .. }), "{missing:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
