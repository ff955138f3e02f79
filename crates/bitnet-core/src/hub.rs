//! Resolving a `--model` spec to local files: a local directory, a local `.gguf` file, or a
//! Hugging Face repository fetched into the standard Hugging Face cache.
//!
//! Spec syntax (after the caller has handled `random:...` specs):
//! - an existing directory: a model directory (config.json, safetensors, tokenizer files);
//! - an existing file ending in `.gguf`: a GGUF model;
//! - `owner/name`: a safetensors model repository on the hub (config.json, the weights as
//!   `model.safetensors` or `model.safetensors.index.json` plus every shard it lists, and when
//!   the repository has them `generation_config.json`, `tokenizer.json`,
//!   `tokenizer_config.json`), resolved to its snapshot folder in the cache;
//! - `owner/name:path/in/repo.gguf`: one GGUF file of a repository, e.g.
//!   `microsoft/bitnet-b1.58-2B-4T-gguf:ggml-model-i2_s.gguf`.
//!
//! The cache is the one `huggingface_hub` (Python) and `hf-hub` share:
//! `<cache>/models--owner--name/{refs/<revision>, snapshots/<commit>/<file>, blobs/, .no_exist/}`.
//! A repository whose files are all in the cache is resolved without touching the network (a
//! moved branch is not noticed: pass a commit as the revision, or clear the cache, to
//! update). Otherwise one listing request (with a 20 s limit) says which files exist, and the
//! missing ones are downloaded; optional files the repository lacks get `huggingface_hub`'s
//! `.no_exist` markers so the next run needs no request. If the hub cannot be reached but the
//! cache holds everything needed to run, the cache is used. With offline mode on
//! (`HF_HUB_OFFLINE=1`) the network is never used.
//!
//! Tokens: `HF_TOKEN` / the token file, sent by hf-hub as a bearer header. hf-hub 0.4 itself
//! reads only the token file beside the cache and offers no connect/read timeouts for
//! downloads (ureq's defaults: 30 s to connect, no read limit).

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::api::RepoInfo;
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};

/// The default hub address.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// Time allowed for the first request to the hub (the repository listing), so that an
/// unreachable hub fails in bounded time. File downloads themselves have no overall limit.
const INFO_TIMEOUT: Duration = Duration::from_secs(20);

const CONFIG: &str = "config.json";
const SAFETENSORS: &str = "model.safetensors";
const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";
/// Fetched when the repository has them; a model runs without them (or fails later naming them).
const OPTIONAL_FILES: [&str; 3] = ["generation_config.json", "tokenizer.json", "tokenizer_config.json"];

/// Where a model's files are on the local disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelLocation {
    /// A directory with config.json, safetensors weights and tokenizer files (for a hub
    /// repository: its snapshot folder in the cache).
    Dir(PathBuf),
    /// A single GGUF file.
    GgufFile(PathBuf),
}

impl ModelLocation {
    /// The directory or file path.
    pub fn path(&self) -> &Path {
        match self {
            ModelLocation::Dir(p) | ModelLocation::GgufFile(p) => p,
        }
    }
}

/// How to reach the hub and where its cache is. [`HubOptions::from_env`] reads the usual
/// environment variables; tests and embedders can fill the fields directly instead.
/// `Debug` prints the token as `<redacted>`.
#[derive(Clone, Default)]
pub struct HubOptions {
    /// Show progress bars (indicatif, on stderr) while downloading.
    pub progress: bool,
    /// Branch, tag or commit hash; `None` means `main`.
    pub revision: Option<String>,
    /// The hub cache folder (the one holding `models--owner--name`). `None`: the standard
    /// location from the environment (see [`default_cache_dir`]).
    pub cache_dir: Option<PathBuf>,
    /// Hub address; `None` means [`DEFAULT_ENDPOINT`].
    pub endpoint: Option<String>,
    /// Never use the network: everything must already be in the cache.
    pub offline: bool,
    /// Access token for private or gated repositories. `None`: hf-hub's own lookup (the
    /// `token` file beside the cache folder).
    pub token: Option<String>,
}

impl std::fmt::Debug for HubOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubOptions")
            .field("progress", &self.progress)
            .field("revision", &self.revision)
            .field("cache_dir", &self.cache_dir)
            .field("endpoint", &self.endpoint)
            .field("offline", &self.offline)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl HubOptions {
    /// Options from the environment, with the meanings `huggingface_hub` gives them:
    /// `HF_HUB_CACHE` / `HF_HOME` / `XDG_CACHE_HOME` (cache folder), `HF_ENDPOINT`,
    /// `HF_HUB_OFFLINE` (`1`, `true`, `yes`, `on`), `HF_TOKEN` (else `HUGGING_FACE_HUB_TOKEN`,
    /// else the file at `HF_TOKEN_PATH` or `$HF_HOME/token`). No progress bars, revision `main`.
    pub fn from_env() -> Self {
        let offline = env("HF_HUB_OFFLINE").is_some_and(|v| is_truthy(&v));
        HubOptions {
            progress: false,
            revision: None,
            cache_dir: default_cache_dir(),
            endpoint: env("HF_ENDPOINT"),
            offline,
            token: env_token(),
        }
    }

    /// Sets [`HubOptions::progress`].
    pub fn with_progress(mut self, progress: bool) -> Self {
        self.progress = progress;
        self
    }

    /// Sets [`HubOptions::revision`].
    pub fn with_revision(mut self, revision: Option<String>) -> Self {
        self.revision = revision;
        self
    }
}

/// A non-empty environment variable.
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn is_truthy(v: &str) -> bool {
    matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
}

fn home_dir() -> Option<PathBuf> {
    env("HOME").or_else(|| env("USERPROFILE")).map(PathBuf::from)
}

/// `$HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
fn hf_home() -> Option<PathBuf> {
    if let Some(h) = env("HF_HOME") {
        return Some(PathBuf::from(h));
    }
    if let Some(x) = env("XDG_CACHE_HOME") {
        return Some(PathBuf::from(x).join("huggingface"));
    }
    home_dir().map(|h| h.join(".cache").join("huggingface"))
}

/// The hub cache folder from the environment, as `huggingface_hub` computes it:
/// `$HF_HUB_CACHE` (or the older `$HUGGINGFACE_HUB_CACHE`), else `<HF home>/hub` where the HF
/// home is `$HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
/// `None` when no home directory is known.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(c) = env("HF_HUB_CACHE").or_else(|| env("HUGGINGFACE_HUB_CACHE")) {
        return Some(PathBuf::from(c));
    }
    hf_home().map(|h| h.join("hub"))
}

fn env_token() -> Option<String> {
    if let Some(t) = env("HF_TOKEN").or_else(|| env("HUGGING_FACE_HUB_TOKEN")) {
        return Some(t.trim().to_string());
    }
    let path = env("HF_TOKEN_PATH").map(PathBuf::from).or_else(|| hf_home().map(|h| h.join("token")))?;
    let t = std::fs::read_to_string(path).ok()?;
    let t = t.trim();
    (!t.is_empty()).then(|| t.to_string())
}

/// A parsed hub spec: `owner/name` or `owner/name:file.gguf`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoSpec {
    /// `owner/name`.
    pub repo_id: String,
    /// The GGUF file inside the repository, when the spec names one.
    pub gguf_file: Option<String>,
}

/// Parses `owner/name` or `owner/name:path/in/repo.gguf`, checking the shape Hugging Face
/// accepts for repository ids (letters, digits, `-`, `_`, `.`; no `--` or `..`; neither part
/// starting or ending with `-` or `.`; at most 96 characters).
pub fn parse_repo_spec(spec: &str) -> Result<RepoSpec> {
    let bad = |why: &str| {
        Error::input(format!(
            "model `{spec}` is not a local path and not a Hugging Face repo id ({why}); \
             expected an existing directory or .gguf file, `owner/name`, or \
             `owner/name:file.gguf`"
        ))
    };
    let (repo_id, file) = match spec.split_once(':') {
        Some((r, f)) => (r, Some(f)),
        None => (spec, None),
    };
    if repo_id.len() > 96 {
        return Err(bad("repo id longer than 96 characters"));
    }
    let Some((owner, name)) = repo_id.split_once('/') else {
        return Err(bad("no `/` between owner and name"));
    };
    for part in [owner, name] {
        if part.is_empty() {
            return Err(bad("empty owner or name"));
        }
        if !part.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
            return Err(bad("repo ids use only letters, digits, `-`, `_` and `.`"));
        }
        if part.starts_with(['-', '.']) || part.ends_with(['-', '.']) || part.contains("--") || part.contains("..") {
            return Err(bad("owner and name cannot start or end with `-` or `.`, or contain `--` or `..`"));
        }
    }
    let gguf_file = match file {
        None => None,
        Some(f) => {
            if !is_safe_relative(f) {
                return Err(bad("the file after `:` must be a relative path inside the repo"));
            }
            if !f.to_ascii_lowercase().ends_with(".gguf") {
                return Err(bad("the file after `:` must be a .gguf file"));
            }
            Some(f.to_string())
        }
    };
    Ok(RepoSpec { repo_id: repo_id.to_string(), gguf_file })
}

/// A relative `/`-separated path with no empty, `.` or `..` component and no backslash.
fn is_safe_relative(p: &str) -> bool {
    !p.is_empty()
        && !p.contains('\\')
        && !p.contains(':')
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

/// Resolves a `--model` spec (see the module documentation) to local files, downloading a hub
/// repository into the cache when needed. `random:` specs are the caller's business.
///
/// Errors: an existing path that is neither a directory nor a `.gguf` file, or a spec that is
/// no repo id, gives [`Error::InvalidInput`]; everything about the hub (unreachable, not
/// found, access denied, missing files in offline mode) gives [`Error::Hub`] naming the
/// repository and, where it applies, the file.
pub fn resolve_model(spec: &str, opts: &HubOptions) -> Result<ModelLocation> {
    let path = Path::new(spec);
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => return Ok(ModelLocation::Dir(path.to_path_buf())),
        Ok(_) => {
            let is_gguf = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
            if is_gguf {
                return Ok(ModelLocation::GgufFile(path.to_path_buf()));
            }
            return Err(Error::input(format!(
                "model `{spec}` is a file but not a .gguf file; pass a model directory \
                 (config.json + safetensors) or a .gguf file"
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        // A path through a file (`file.txt/x`): not a local path either.
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {}
        Err(e) => return Err(Error::io(path, e)),
    }
    let repo_spec = parse_repo_spec(spec)?;
    resolve_repo(&repo_spec, opts)
}

/// Resolves an already-parsed hub spec: the cache first, then (unless offline) the hub.
pub fn resolve_repo(spec: &RepoSpec, opts: &HubOptions) -> Result<ModelLocation> {
    let revision = opts.revision.as_deref().unwrap_or("main");
    if revision.is_empty() || !is_safe_relative(revision) {
        return Err(Error::input(format!("revision `{revision}` is not a valid branch, tag or commit")));
    }
    let cache_dir = match &opts.cache_dir {
        Some(d) => d.clone(),
        None => default_cache_dir().ok_or_else(|| {
            Error::Hub("cannot find the Hugging Face cache folder: set HF_HOME or HF_HUB_CACHE".into())
        })?,
    };
    let repo = Repo::with_revision(spec.repo_id.clone(), RepoType::Model, revision.to_string());
    let ctx = Ctx { spec, revision, repo_dir: cache_dir.join(repo.folder_name()) };

    // 1. The cache. `usable`: the snapshot has everything needed to run, though an optional
    // file was never checked upstream; used when the hub cannot be reached.
    let mut usable = None;
    if let Some((commit, snapshot)) = ctx.cached_snapshot() {
        match ctx.check_cached(&commit, &snapshot, !opts.offline)? {
            None => return Ok(ctx.location(&snapshot)),
            Some(missing) if opts.offline => return Err(ctx.offline_error(&missing)),
            Some(_) => {
                if ctx.check_cached(&commit, &snapshot, false)?.is_none() {
                    usable = Some(snapshot);
                }
            }
        }
    } else if opts.offline {
        return Err(ctx.offline_error(match &spec.gguf_file {
            Some(f) => f,
            None => CONFIG,
        }));
    }

    // 2. The hub.
    let endpoint = opts.endpoint.as_deref().unwrap_or(DEFAULT_ENDPOINT).trim_end_matches('/').to_string();
    let mut builder = ApiBuilder::from_cache(Cache::new(cache_dir.clone()))
        .with_endpoint(endpoint.clone())
        .with_progress(opts.progress);
    if let Some(t) = &opts.token {
        builder = builder.with_token(Some(t.clone()));
    }
    let api = builder.build().map_err(|e| Error::Hub(format!("cannot set up the hub client: {e}")))?;
    let api_repo = api.repo(repo.clone());
    let info = match ctx.repo_info(&api_repo, &endpoint) {
        Ok(info) => info,
        // Like huggingface_hub: when the hub cannot be reached, use what the cache has.
        Err(InfoError::Unreachable(e)) => match &usable {
            Some(snapshot) => return Ok(ctx.location(snapshot)),
            None => return Err(e),
        },
        Err(InfoError::Other(e)) => return Err(e),
    };
    ctx.download(&api_repo, &info, &Cache::new(cache_dir).repo(repo))
}

/// Why the repository listing failed: no answer at all, or an answer that is an error.
enum InfoError {
    Unreachable(Error),
    Other(Error),
}

struct Ctx<'a> {
    spec: &'a RepoSpec,
    revision: &'a str,
    repo_dir: PathBuf,
}

fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The shard files listed by a `model.safetensors.index.json`, sorted and deduplicated.
fn index_shards(index_path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(index_path, format!("invalid safetensors index: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::format(index_path, "no `weight_map` object"))?;
    let mut shards = BTreeSet::new();
    for (tensor, file) in map {
        let file =
            file.as_str().ok_or_else(|| Error::format(index_path, format!("weight_map[{tensor}] is not a string")))?;
        if !is_safe_relative(file) {
            return Err(Error::format(
                index_path,
                format!("weight_map[{tensor}] = `{file}` is not a relative file name"),
            ));
        }
        shards.insert(file.to_string());
    }
    if shards.is_empty() {
        return Err(Error::format(index_path, "empty `weight_map`"));
    }
    Ok(shards.into_iter().collect())
}

impl Ctx<'_> {
    fn location(&self, snapshot: &Path) -> ModelLocation {
        match &self.spec.gguf_file {
            Some(f) => ModelLocation::GgufFile(snapshot.join(f)),
            None => ModelLocation::Dir(snapshot.to_path_buf()),
        }
    }

    fn what(&self) -> String {
        format!("{} (revision {})", self.spec.repo_id, self.revision)
    }

    fn offline_error(&self, file: &str) -> Error {
        Error::Hub(format!(
            "offline mode is on (HF_HUB_OFFLINE): `{file}` of {} is not in the cache at {}",
            self.what(),
            self.repo_dir.display()
        ))
    }

    /// The commit and snapshot folder the revision points to in the cache, if any.
    fn cached_snapshot(&self) -> Option<(String, PathBuf)> {
        let snapshots = self.repo_dir.join("snapshots");
        let ref_path = self.repo_dir.join("refs").join(self.revision);
        if let Ok(commit) = std::fs::read_to_string(ref_path) {
            let commit = commit.trim();
            if !commit.is_empty() && is_safe_relative(commit) && !commit.contains('/') {
                let dir = snapshots.join(commit);
                if dir.is_dir() {
                    return Some((commit.to_string(), dir));
                }
            }
        }
        if is_commit_hash(self.revision) {
            let dir = snapshots.join(self.revision);
            if dir.is_dir() {
                return Some((self.revision.to_string(), dir));
            }
        }
        None
    }

    fn no_exist_marker(&self, commit: &str, file: &str) -> PathBuf {
        self.repo_dir.join(".no_exist").join(commit).join(file)
    }

    /// `None` when the snapshot has everything; otherwise the first missing file. With
    /// `want_optional`, an optional file must be present or known to be absent upstream
    /// (`.no_exist` marker) for the snapshot to count as complete.
    fn check_cached(&self, commit: &str, snapshot: &Path, want_optional: bool) -> Result<Option<String>> {
        if let Some(f) = &self.spec.gguf_file {
            return Ok((!snapshot.join(f).exists()).then(|| f.clone()));
        }
        if !snapshot.join(CONFIG).exists() {
            return Ok(Some(CONFIG.to_string()));
        }
        let index = snapshot.join(SAFETENSORS_INDEX);
        if index.exists() {
            for shard in index_shards(&index)? {
                if !snapshot.join(&shard).exists() {
                    return Ok(Some(shard));
                }
            }
        } else if !snapshot.join(SAFETENSORS).exists() {
            return Ok(Some(format!("{SAFETENSORS} (or {SAFETENSORS_INDEX})")));
        }
        if want_optional {
            for f in OPTIONAL_FILES {
                if !snapshot.join(f).exists() && !self.no_exist_marker(commit, f).exists() {
                    return Ok(Some(f.to_string()));
                }
            }
        }
        Ok(None)
    }

    /// The repository listing (files and commit), with a bounded wait.
    fn repo_info(&self, api_repo: &ApiRepo, endpoint: &str) -> std::result::Result<RepoInfo, InfoError> {
        let resp = match api_repo.info_request().timeout(INFO_TIMEOUT).call() {
            Ok(r) => r,
            Err(e) => {
                let msg = e.to_string();
                let status = e.into_response().map(|r| r.status());
                return Err(match status {
                    Some(401 | 403 | 404) => InfoError::Other(Error::Hub(format!(
                        "repository {} not found, or private/gated (set HF_TOKEN and accept \
                         its license on the hub): {msg}",
                        self.what()
                    ))),
                    Some(_) => InfoError::Other(Error::Hub(format!("hub error for {}: {msg}", self.what()))),
                    None => InfoError::Unreachable(Error::Hub(format!(
                        "cannot reach the Hugging Face hub at {endpoint} for {}: {msg} \
                         (set HF_HUB_OFFLINE=1 to use only the local cache)",
                        self.what()
                    ))),
                });
            }
        };
        resp.into_json::<RepoInfo>().map_err(|e| {
            InfoError::Other(Error::Hub(format!("unexpected repository listing for {}: {e}", self.what())))
        })
    }

    fn download_error(&self, file: &str, e: ApiError) -> Error {
        let text = e.to_string();
        let hint = if text.contains("status code 401") || text.contains("status code 403") {
            " (private or gated: set HF_TOKEN and accept the license on the hub)"
        } else {
            ""
        };
        Error::Hub(format!("downloading `{file}` of {}: {e}{hint}", self.what()))
    }

    /// Fetches what the cache lacks and returns the snapshot's location.
    fn download(&self, api_repo: &ApiRepo, info: &RepoInfo, cache_repo: &hf_hub::CacheRepo) -> Result<ModelLocation> {
        let commit = info.sha.trim();
        if commit.is_empty() || commit.contains('/') || !is_safe_relative(commit) {
            return Err(Error::Hub(format!("the hub gave an invalid commit `{commit}` for {}", self.what())));
        }
        let snapshot = self.repo_dir.join("snapshots").join(commit);
        let files: HashSet<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
        let ggufs = || {
            let mut g: Vec<&str> =
                files.iter().copied().filter(|f| f.to_ascii_lowercase().ends_with(".gguf")).collect();
            g.sort_unstable();
            g.join(", ")
        };
        let fetch = |file: &str| -> Result<()> {
            let want = snapshot.join(file);
            if want.exists() {
                return Ok(());
            }
            let got = api_repo.download(file).map_err(|e| self.download_error(file, e))?;
            if got != want {
                return Err(Error::Hub(format!(
                    "{} changed while downloading `{file}` (expected commit {commit}); retry",
                    self.what()
                )));
            }
            Ok(())
        };

        if let Some(f) = &self.spec.gguf_file {
            if !files.contains(f.as_str()) {
                return Err(Error::Hub(format!("{} has no file `{f}`; its GGUF files: [{}]", self.what(), ggufs())));
            }
            fetch(f)?;
        } else {
            if !files.contains(CONFIG) {
                let g = ggufs();
                let hint = if g.is_empty() {
                    String::new()
                } else {
                    format!("; it has GGUF files [{g}]: use `{}:<file>.gguf`", self.spec.repo_id)
                };
                return Err(Error::Hub(format!("{} has no {CONFIG}{hint}", self.what())));
            }
            fetch(CONFIG)?;
            for f in OPTIONAL_FILES {
                if files.contains(f) {
                    fetch(f)?;
                } else {
                    // Remember that the file does not exist upstream (huggingface_hub's
                    // marker), so the next run can trust the cache without the network.
                    let marker = self.no_exist_marker(commit, f);
                    if let Some(parent) = marker.parent() {
                        let _ = std::fs::create_dir_all(parent);
                    }
                    let _ = std::fs::write(marker, b"");
                }
            }
            if files.contains(SAFETENSORS_INDEX) {
                fetch(SAFETENSORS_INDEX)?;
                for shard in index_shards(&snapshot.join(SAFETENSORS_INDEX))? {
                    if !files.contains(shard.as_str()) {
                        return Err(Error::Hub(format!(
                            "{} lists shard `{shard}` in {SAFETENSORS_INDEX} but has no such file",
                            self.what()
                        )));
                    }
                    fetch(&shard)?;
                }
            } else if files.contains(SAFETENSORS) {
                fetch(SAFETENSORS)?;
            } else {
                let g = ggufs();
                let hint = if g.is_empty() {
                    String::new()
                } else {
                    format!("; it has GGUF files [{g}]: use `{}:<file>.gguf`", self.spec.repo_id)
                };
                return Err(Error::Hub(format!(
                    "{} has neither {SAFETENSORS} nor {SAFETENSORS_INDEX}{hint}",
                    self.what()
                )));
            }
        }
        // Point the revision at this commit even when nothing had to be downloaded.
        cache_repo.create_ref(commit).map_err(|e| Error::io(self.repo_dir.join("refs").join(self.revision), e))?;
        Ok(self.location(&snapshot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_specs() {
        let s = parse_repo_spec("microsoft/bitnet-b1.58-2B-4T").unwrap();
        assert_eq!(s.repo_id, "microsoft/bitnet-b1.58-2B-4T");
        assert_eq!(s.gguf_file, None);
        let s = parse_repo_spec("microsoft/bitnet-b1.58-2B-4T-gguf:ggml-model-i2_s.gguf").unwrap();
        assert_eq!(s.repo_id, "microsoft/bitnet-b1.58-2B-4T-gguf");
        assert_eq!(s.gguf_file.as_deref(), Some("ggml-model-i2_s.gguf"));
        let s = parse_repo_spec("a/b:sub/dir/x.GGUF").unwrap();
        assert_eq!(s.gguf_file.as_deref(), Some("sub/dir/x.GGUF"));

        for bad in [
            "",
            "gpt2",
            "a/b/c",
            "/abs/path",
            "./rel",
            "a//b",
            "a/b:",
            "a/b:x.bin",
            "a/b:../x.gguf",
            "a/b:/x.gguf",
            "-a/b",
            "a/b.",
            "a--x/b",
            "a/b..c",
            "a b/c",
            "a/b:c:d.gguf",
        ] {
            let err = parse_repo_spec(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidInput(_)), "{bad}: {err:?}");
            assert!(err.to_string().contains("not a local path and not a Hugging Face repo id"), "{err}");
        }
        let long = format!("a/{}", "b".repeat(96));
        assert!(parse_repo_spec(&long).is_err());
    }

    #[test]
    fn truthy_values() {
        for v in ["1", "true", "TRUE", "yes", "On"] {
            assert!(is_truthy(v), "{v}");
        }
        for v in ["0", "false", "no", "", "2"] {
            assert!(!is_truthy(v), "{v}");
        }
    }
}
