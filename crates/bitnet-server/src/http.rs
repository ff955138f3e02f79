//! The HTTP side: routes, handlers, SSE streaming, the API key check, request logging and the
//! JSON error fallbacks.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bitnet_core::json_mode::{JsonSpec, JsonVocab, Shape};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::api::{self, GenRequest, Kind};
use crate::error::{from_status, ApiError};
use crate::scheduler::{Event, FailKind, Finish, Job, SubmitError};
use crate::text::{logprobs_json, Assembler, LpEntry};
use crate::{tools, AppState};

type St = State<Arc<AppState>>;

/// Marks a response whose request is logged later (by the generation itself).
#[derive(Clone, Copy)]
struct DeferredLog;

pub fn router(st: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model_one))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route_layer(middleware::from_fn_with_state(st.clone(), auth));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async { from_status(StatusCode::NOT_FOUND, "") })
        .layer(DefaultBodyLimit::max(st.body_limit))
        .layer(middleware::from_fn_with_state(st.clone(), observe))
        .with_state(st)
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// `2025-01-02T03:04:05Z`, without a date crate.
fn utc_now() -> String {
    let t = now_secs() as i64;
    let (days, secs) = (t.div_euclid(86400), t.rem_euclid(86400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs % 3600 / 60, secs % 60)
}

const KNOWN_PATHS: [&str; 5] = ["/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"];

/// Counts and logs every request; turns bare error statuses (from extractors, the router) into
/// OpenAI-style JSON errors.
async fn observe(State(st): St, req: Request, next: Next) -> Response {
    let t0 = Instant::now();
    let method = req.method().clone();
    let raw_path = req.uri().path().to_string();
    let path = if raw_path.starts_with("/v1/models/") {
        "/v1/models/{id}"
    } else {
        KNOWN_PATHS.iter().copied().find(|p| *p == raw_path).unwrap_or("other")
    };
    let mut resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if (status.is_client_error() || status.is_server_error()) && !is_json {
        let body = std::mem::replace(resp.body_mut(), Body::empty());
        let detail = axum::body::to_bytes(body, 64 * 1024)
            .await
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let keep: Vec<_> = [header::RETRY_AFTER, header::ALLOW]
            .into_iter()
            .filter_map(|h| resp.headers().get(&h).cloned().map(|v| (h, v)))
            .collect();
        resp = from_status(status, &detail).into_response();
        for (h, v) in keep {
            resp.headers_mut().insert(h, v);
        }
    }
    st.metrics.http_request(path, status.as_u16());
    if st.log && resp.extensions().get::<DeferredLog>().is_none() {
        eprintln!("{} {method} {raw_path} {} {:.1}ms", utc_now(), status.as_u16(), t0.elapsed().as_secs_f64() * 1e3);
    }
    resp
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `Authorization: Bearer <key>` on /v1 routes when the server has a key.
async fn auth(State(st): St, req: Request, next: Next) -> Response {
    if let Some(key) = &st.api_key {
        let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(|s| s.trim());
        let token =
            given.and_then(|s| s.strip_prefix("Bearer ").or_else(|| s.strip_prefix("bearer "))).map(|s| s.trim());
        let ok = token.is_some_and(|t| ct_eq(t.as_bytes(), key.as_bytes()));
        if !ok {
            let msg = if given.is_none() {
                "You didn't provide an API key. Provide it in the Authorization header: 'Authorization: Bearer YOUR_KEY'."
            } else {
                "Incorrect API key provided."
            };
            return ApiError::new(StatusCode::UNAUTHORIZED, "invalid_request_error", msg)
                .with_code("invalid_api_key")
                .into_response();
        }
    }
    next.run(req).await
}

async fn health(State(st): St) -> Response {
    let ok = !st.shutting_down.load(Ordering::SeqCst) && st.sched.is_alive();
    let m = &st.metrics;
    let body = json!({
        "status": if ok { "ok" } else { "unavailable" },
        "model": st.model_id,
        "running": m.running.load(Ordering::Relaxed),
        "waiting": m.queue_depth.load(Ordering::Relaxed),
        "kv_blocks_used": m.kv_blocks_used.load(Ordering::Relaxed),
        "kv_blocks_total": m.kv_blocks_total.load(Ordering::Relaxed),
    });
    let code = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(body)).into_response()
}

async fn metrics(State(st): St) -> Response {
    let mut r = st.metrics.render().into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    r
}

fn model_card(st: &AppState) -> Value {
    json!({
        "id": st.model_id,
        "object": "model",
        "created": st.created,
        "owned_by": "bitnet-rs",
        "max_model_len": st.ctx,
    })
}

async fn models(State(st): St) -> Response {
    Json(json!({"object": "list", "data": [model_card(&st)]})).into_response()
}

async fn model_one(State(st): St, Path(id): Path<String>) -> Response {
    if id == st.model_id {
        Json(model_card(&st)).into_response()
    } else {
        ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("The model `{id}` does not exist."))
            .with_param("model")
            .with_code("model_not_found")
            .into_response()
    }
}

/// POST /tokenize: `{"count", "max_model_len", "tokens"}` (vLLM's form).
async fn tokenize(State(st): St, body: Result<Bytes, BytesRejection>) -> Response {
    match parse_off_thread(&st, body, api::parse_tokenize).await {
        Ok(ids) => Json(json!({"count": ids.len(), "max_model_len": st.ctx, "tokens": ids})).into_response(),
        Err(e) => e.into_response(),
    }
}

/// POST /detokenize: `{"prompt": text}` (vLLM's form).
async fn detokenize(State(st): St, body: Result<Bytes, BytesRejection>) -> Response {
    match parse_off_thread(&st, body, api::parse_detokenize).await {
        Ok(text) => Json(json!({"prompt": text})).into_response(),
        Err(e) => e.into_response(),
    }
}

fn body_or_error(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|r| from_status(r.status(), &r.body_text()))
}

/// Parsing includes the chat template and the tokenizer: a long prompt takes a while, so it runs
/// on the blocking pool, not on the threads that stream tokens.
async fn parse_off_thread<T: Send + 'static>(
    st: &Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
    parse: fn(&AppState, &[u8]) -> Result<T, ApiError>,
) -> Result<T, ApiError> {
    let b = body_or_error(body)?;
    let st = st.clone();
    tokio::task::spawn_blocking(move || parse(&st, &b))
        .await
        .unwrap_or_else(|e| Err(ApiError::server(format!("request parsing failed: {e}"))))
}

async fn chat(State(st): St, body: Result<Bytes, BytesRejection>) -> Response {
    let t0 = Instant::now();
    let r = parse_off_thread(&st, body, api::parse_chat).await;
    match r {
        Ok(req) => generate(st, req, t0, "/v1/chat/completions").await,
        Err(e) => e.into_response(),
    }
}

async fn completions(State(st): St, body: Result<Bytes, BytesRejection>) -> Response {
    let t0 = Instant::now();
    let r = parse_off_thread(&st, body, api::parse_completion).await;
    match r {
        Ok(req) => generate(st, req, t0, "/v1/completions").await,
        Err(e) => e.into_response(),
    }
}

/// The log line of one generation, printed when it is dropped (also when the client went away
/// and the handler was dropped).
struct ReqLog {
    st: Arc<AppState>,
    path: &'static str,
    id: String,
    stream: bool,
    prompt: usize,
    completion: usize,
    finish: Option<&'static str>,
    status: u16,
    t0: Instant,
    ttft: Option<Duration>,
    armed: bool,
}

impl Drop for ReqLog {
    fn drop(&mut self) {
        if !self.armed || !self.st.log {
            return;
        }
        let ttft = self.ttft.map(|d| format!("{:.1}ms", d.as_secs_f64() * 1e3)).unwrap_or_else(|| "-".into());
        eprintln!(
            "{} POST {} {} id={} stream={} prompt_tokens={} completion_tokens={} finish={} ttft={ttft} total={:.1}ms",
            utc_now(),
            self.path,
            self.status,
            self.id,
            self.stream,
            self.prompt,
            self.completion,
            self.finish.unwrap_or("cancelled"),
            self.t0.elapsed().as_secs_f64() * 1e3
        );
    }
}

fn fail_error(kind: FailKind, msg: String) -> ApiError {
    match kind {
        FailKind::Shutdown => ApiError::unavailable(msg),
        FailKind::Internal => ApiError::server(msg),
    }
}

fn finish_str(f: Finish) -> &'static str {
    match f {
        Finish::Stop => "stop",
        Finish::Length => "length",
    }
}

async fn generate(st: Arc<AppState>, req: GenRequest, t0: Instant, path: &'static str) -> Response {
    if st.shutting_down.load(Ordering::SeqCst) {
        return ApiError::unavailable("The server is shutting down.").into_response();
    }
    let n = st.next_id.fetch_add(1, Ordering::Relaxed);
    let id = match req.kind {
        Kind::Chat => format!("chatcmpl-{n}"),
        Kind::Completion => format!("cmpl-{n}"),
    };
    // One sequence per choice, choice i of a prompt drawing from seed + i. Each prompt's first
    // choice is submitted at once (several prompts prefill together), its others once it has
    // computed the prompt, so that they take it from the prefix cache. If a later one is
    // refused, dropping the receivers taken so far cancels those sequences. Nothing is sent
    // before every choice's first event: an error before any token is a proper HTTP error.
    let n_choices = req.n;
    let mut firsts = Vec::with_capacity(req.prompts.len());
    for p in 0..req.prompts.len() {
        match submit_choice(&st, &req, p, 0) {
            Ok(rx) => firsts.push(rx),
            Err(e) => return e.into_response(),
        }
    }
    let mut slots: Vec<Option<(Event, mpsc::UnboundedReceiver<Event>)>> =
        (0..req.prompts.len() * n_choices).map(|_| None).collect();
    let mut later = Vec::with_capacity(slots.len());
    for (p, mut rx) in firsts.into_iter().enumerate() {
        match first_event(&mut rx).await {
            Ok(first) => slots[p * n_choices] = Some((first, rx)),
            Err(e) => return e.into_response(),
        }
        for i in 1..n_choices {
            match submit_choice(&st, &req, p, i) {
                Ok(rx) => later.push((p * n_choices + i, rx)),
                Err(e) => return e.into_response(),
            }
        }
    }
    for (k, mut rx) in later {
        match first_event(&mut rx).await {
            Ok(first) => slots[k] = Some((first, rx)),
            Err(e) => return e.into_response(),
        }
    }
    let runs: Vec<ChoiceRun> = slots
        .into_iter()
        .enumerate()
        .filter_map(|(index, slot)| {
            let (first, rx) = slot?;
            let asm = Assembler::new(st.engine.clone(), req.stop.clone(), req.return_token_ids);
            Some(ChoiceRun { index, prompt: index / n_choices, first, rx, asm })
        })
        .collect();
    let mut log = ReqLog {
        st: st.clone(),
        path,
        id: id.clone(),
        stream: req.stream,
        prompt: req.prompt_tokens(),
        completion: 0,
        finish: None,
        status: 200,
        t0,
        ttft: None,
        armed: true,
    };
    log.ttft = Some(t0.elapsed());
    let mut resp = if req.stream {
        let (otx, orx) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
        tokio::spawn(stream_task(st.clone(), req, id, runs, log, otx));
        Sse::new(ReceiverStream::new(orx)).into_response()
    } else {
        collect(st.clone(), req, id, runs, log).await
    };
    resp.extensions_mut().insert(DeferredLog);
    resp
}

/// Submits choice `i` of prompt `p` (drawing from seed + i); a refusal is the error to send.
fn submit_choice(
    st: &AppState,
    req: &GenRequest,
    p: usize,
    i: usize,
) -> Result<mpsc::UnboundedReceiver<Event>, ApiError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut params = req.params;
    params.seed = params.seed.wrapping_add(i as u64);
    let prompt = &req.prompts[p];
    let job = Job {
        prompt: prompt.ids.clone(),
        max_new: prompt.max_new,
        params,
        ignore_eos: req.ignore_eos,
        logprobs: req.logprobs,
        prompt_logprobs: req.prompt_logprobs,
        logit_bias: req.logit_bias.clone(),
        stop_token_ids: req.stop_token_ids.clone(),
        min_tokens: req.min_tokens,
        json: if req.json { st.json_vocab().map(|vocab| constraint(&st, &req, vocab)) } else { None },
        t_submit: Instant::now(),
        events: tx,
        fail_after: req.fail_after,
    };
    match st.sched.submit(job) {
        Ok(()) => Ok(rx),
        Err(SubmitError::QueueFull) => {
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                format!(
                    "The server is at capacity ({} requests already waiting). Please retry after a short wait.",
                    st.sched.pending()
                ),
            )
            .with_code("rate_limit_exceeded");
            e.retry_after = Some(st.retry_after_s);
            Err(e)
        }
        Err(SubmitError::Stopped) => Err(ApiError::unavailable("The scheduler is not running.")),
    }
}

/// A choice's first event (its prompt computed), or the error that came instead.
async fn first_event(rx: &mut mpsc::UnboundedReceiver<Event>) -> Result<Event, ApiError> {
    match rx.recv().await {
        Some(Event::Error(kind, msg)) => Err(fail_error(kind, msg)),
        None => Err(ApiError::server("The scheduler dropped the request.")),
        Some(ev) => Ok(ev),
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// The `object` of a streamed chunk.
fn chunk_object(kind: Kind) -> &'static str {
    match kind {
        Kind::Chat => "chat.completion.chunk",
        Kind::Completion => "text_completion",
    }
}

/// One choice being generated: its index, its prompt's, its first event (already received),
/// the rest of its events, and its text.
struct ChoiceRun {
    index: usize,
    prompt: usize,
    first: Event,
    rx: mpsc::UnboundedReceiver<Event>,
    asm: Assembler,
}

/// How a streamed choice ended.
enum Ended {
    Finished(&'static str),
    /// an error event was sent (its HTTP status, for the log)
    Failed(u16),
    /// the client went away
    Gone,
}

/// A constrained request's shape: a regex, a schema, or any JSON object; end tokens are allowed
/// where a regex may end (unless `ignore_eos`).
fn constraint(st: &AppState, req: &GenRequest, vocab: Arc<JsonVocab>) -> JsonSpec {
    let shape = match (&req.regex, &req.schema) {
        (Some(p), _) => Shape::Regex(p.clone()),
        (None, Some(s)) => Shape::Schema(s.clone()),
        (None, None) => Shape::Object,
    };
    let eos = if req.ignore_eos { Vec::new() } else { st.engine.eos_ids.clone() };
    JsonSpec { vocab, shape, eos }
}

/// Non-streamed answer: waits for every choice's whole generation.
async fn collect(st: Arc<AppState>, req: GenRequest, id: String, runs: Vec<ChoiceRun>, mut log: ReqLog) -> Response {
    let mut choices = Vec::with_capacity(runs.len());
    let mut completion = 0;
    for run in runs {
        match collect_choice(&req, run).await {
            Ok((choice, n, finish)) => {
                completion += n;
                log.finish.get_or_insert(finish);
                choices.push(choice);
            }
            Err(e) => {
                // the other choices' receivers are dropped with `runs`: their sequences stop
                log.status = e.status.as_u16();
                log.finish = Some("error");
                return e.into_response();
            }
        }
    }
    log.completion = completion;
    let object = match req.kind {
        Kind::Chat => "chat.completion",
        Kind::Completion => "text_completion",
    };
    Json(json!({
        "id": id,
        "object": object,
        "created": now_secs(),
        "model": st.model_id,
        "choices": choices,
        "usage": usage(req.prompt_tokens(), completion),
        "system_fingerprint": null,
    }))
    .into_response()
}

/// One choice of a non-streamed answer: the choice object, its completion tokens, its finish
/// reason.
async fn collect_choice(req: &GenRequest, run: ChoiceRun) -> Result<(Value, usize, &'static str), ApiError> {
    let ChoiceRun { index, prompt, first, mut rx, mut asm } = run;
    let prompt = &req.prompts[prompt];
    // `echo`: the prompt's text first
    let mut text = prompt.echo.clone().unwrap_or_default();
    let mut next = Some(first);
    let finish = loop {
        let ev = match next.take() {
            Some(e) => Some(e),
            None => rx.recv().await,
        };
        match ev {
            Some(Event::Prompt(lps)) => asm.push_prompt(&prompt.ids, &lps),
            Some(Event::Token(t, lp)) => {
                let (piece, stopped) =
                    asm.push(t, lp.as_deref()).map_err(|e| ApiError::server(format!("detokenizing: {e}")))?;
                text.push_str(&piece);
                if stopped {
                    break "stop";
                }
            }
            Some(Event::Done(f)) => {
                text.push_str(&asm.finish().map_err(|e| ApiError::server(format!("detokenizing: {e}")))?);
                break finish_str(f);
            }
            Some(Event::Error(kind, msg)) => return Err(fail_error(kind, msg)),
            None => return Err(ApiError::server("The scheduler dropped the request.")),
        }
    };
    // A stop string may end the text before the sequence ends: dropping the receiver stops it.
    drop(rx);
    let logprobs = match req.logprobs {
        Some(_) => logprobs_json(req.kind == Kind::Chat, &asm.take_logprobs()),
        None => Value::Null,
    };
    let mut finish = finish;
    let mut choice = match req.kind {
        Kind::Chat => {
            let mut message = json!({"role": "assistant", "content": text});
            // a reply in the tool format (finished by itself) as a call or an answer
            if let Some((fields, f)) = req.tools.then(|| tools::reply(&text)).flatten() {
                for (k, v) in fields.as_object().into_iter().flatten() {
                    message[k] = v.clone();
                }
                finish = f;
            }
            json!({"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish})
        }
        Kind::Completion => {
            json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish})
        }
    };
    if asm.keeps_ids() {
        choice["token_ids"] = json!(asm.take_ids());
    }
    Ok((choice, asm.n_tokens, finish))
}

/// Streamed answer: every choice streams its own chunks (OpenAI's format, `index` telling them
/// apart) as its tokens come; then the usage chunk when asked, and `[DONE]`.
async fn stream_task(
    st: Arc<AppState>,
    req: GenRequest,
    id: String,
    runs: Vec<ChoiceRun>,
    mut log: ReqLog,
    out: mpsc::Sender<Result<SseEvent, Infallible>>,
) {
    let created = now_secs();
    let req = Arc::new(req);
    let object = chunk_object(req.kind);
    let tasks: Vec<_> = runs
        .into_iter()
        .map(|run| {
            let (st, req, id, out) = (st.clone(), req.clone(), id.clone(), out.clone());
            tokio::spawn(async move {
                let mut n = 0;
                let end = stream_choice(&st, &req, &id, created, run, &out, &mut n).await;
                (end, n)
            })
        })
        .collect();
    let (mut completion, mut finish, mut failed, mut gone) = (0, None, None, false);
    for t in tasks {
        match t.await {
            Ok((end, n)) => {
                completion += n;
                match end {
                    Ended::Finished(f) => {
                        finish.get_or_insert(f);
                    }
                    Ended::Failed(status) => failed = Some(status),
                    Ended::Gone => gone = true,
                }
            }
            Err(_) => failed = Some(500),
        }
    }
    log.completion = completion;
    if let Some(status) = failed {
        log.status = status;
        log.finish = Some("error");
        return;
    }
    if gone {
        return; // logged as cancelled
    }
    log.finish = finish;
    if req.include_usage {
        let u = json!({
            "id": id,
            "object": object,
            "created": created,
            "model": st.model_id,
            "system_fingerprint": null,
            "choices": [],
            "usage": usage(req.prompt_tokens(), completion),
        });
        let _ = out.send(Ok(SseEvent::default().data(u.to_string()))).await;
    }
    let _ = out.send(Ok(SseEvent::default().data("[DONE]"))).await;
}

/// One choice of a streamed answer: its chunks, up to and including the one with its finish
/// reason; `completion` follows its token count.
async fn stream_choice(
    st: &AppState,
    req: &GenRequest,
    id: &str,
    created: u64,
    run: ChoiceRun,
    out: &mpsc::Sender<Result<SseEvent, Infallible>>,
    completion: &mut usize,
) -> Ended {
    let ChoiceRun { index, prompt, first, mut rx, mut asm } = run;
    let prompt = &req.prompts[prompt];
    let object = chunk_object(req.kind);
    let chunk = |choice: Value| -> SseEvent {
        let mut c = json!({
            "id": id,
            "object": object,
            "created": created,
            "model": st.model_id,
            "system_fingerprint": null,
            "choices": [choice],
        });
        if req.include_usage {
            c["usage"] = Value::Null;
        }
        SseEvent::default().data(c.to_string())
    };
    let piece_choice = |text: &str, ids: Option<Vec<u32>>, lps: Option<Vec<LpEntry>>, finish: Option<&str>| -> Value {
        let logprobs = lps.map_or(Value::Null, |e| logprobs_json(req.kind == Kind::Chat, &e));
        let mut c = match req.kind {
            Kind::Chat => {
                let delta = match (finish, text.is_empty()) {
                    (Some(_), true) => json!({}),
                    _ => json!({"content": text}),
                };
                json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
            Kind::Completion => {
                json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish})
            }
        };
        if let Some(ids) = ids {
            c["token_ids"] = json!(ids);
        }
        c
    };
    let fail = |e: ApiError| async move {
        let status = e.status.as_u16();
        let _ = out.send(Ok(SseEvent::default().data(e.sse_data()))).await;
        Ended::Failed(status)
    };
    let keep_ids = asm.keeps_ids();
    let mut echo = prompt.echo.clone().filter(|e| !e.is_empty());
    // tools: the reply is parsed as it comes and sent as a call (name, then arguments) or an
    // answer (its text)
    let mut held = req.tools.then(String::new);
    let mut reply = tools::ReplyStream::default();
    if req.kind == Kind::Chat {
        let c = json!({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null});
        if out.send(Ok(chunk(c))).await.is_err() {
            return Ended::Gone;
        }
    }
    let mut next = Some(first);
    let finish = loop {
        let ev = match next.take() {
            Some(e) => Some(e),
            None => rx.recv().await,
        };
        let (mut text, mut fin) = match ev {
            Some(Event::Prompt(lps)) => {
                asm.push_prompt(&prompt.ids, &lps);
                (String::new(), None)
            }
            Some(Event::Token(t, lp)) => match asm.push(t, lp.as_deref()) {
                Ok((piece, stopped)) => (piece, stopped.then_some("stop")),
                Err(e) => return fail(ApiError::server(format!("detokenizing: {e}"))).await,
            },
            Some(Event::Done(f)) => match asm.finish() {
                Ok(t) => (t, Some(finish_str(f))),
                Err(e) => return fail(ApiError::server(format!("detokenizing: {e}"))).await,
            },
            Some(Event::Error(kind, msg)) => {
                *completion = asm.n_tokens;
                return fail(fail_error(kind, msg)).await;
            }
            None => return fail(ApiError::server("The scheduler dropped the request.")).await,
        };
        *completion = asm.n_tokens;
        if let Some(e) = echo.take() {
            // `echo`: the prompt's text leads the first chunk
            text.insert_str(0, &e);
        }
        if let Some(h) = held.as_mut() {
            h.push_str(&text);
            text.clear();
            let complete = fin.is_some() && tools::reply(h).is_some();
            for d in reply.update(h) {
                let delta = match d {
                    tools::Delta::Call { id, name } => json!({"tool_calls": [{"index": 0, "id": id, "type": "function",
                        "function": {"name": name, "arguments": ""}}]}),
                    tools::Delta::Args(a) => json!({"tool_calls": [{"index": 0, "function": {"arguments": a}}]}),
                    tools::Delta::Content(c) => json!({"content": c}),
                };
                let c = json!({"index": index, "delta": delta, "logprobs": null, "finish_reason": null});
                if out.send(Ok(chunk(c))).await.is_err() {
                    return Ended::Gone;
                }
            }
            if fin.is_some() {
                if complete {
                    fin = Some(if reply.is_call() { "tool_calls" } else { "stop" });
                } else if !tools::reply_started(h) {
                    // cut short before the reply's kind was known: the text as it is
                    text = std::mem::take(h);
                }
            }
        }
        let ids = keep_ids.then(|| asm.take_ids()).filter(|v| !v.is_empty());
        // a token's log-probabilities go out with the next chunk, even if its text is held back
        let lps = req.logprobs.map(|_| asm.take_logprobs()).filter(|v| !v.is_empty());
        if (!text.is_empty() || ids.is_some() || lps.is_some())
            && out.send(Ok(chunk(piece_choice(&text, ids, lps, None)))).await.is_err()
        {
            return Ended::Gone; // the client went away: dropping rx stops the sequence
        }
        if let Some(f) = fin {
            break f;
        }
    };
    drop(rx);
    if out.send(Ok(chunk(piece_choice("", None, None, Some(finish))))).await.is_err() {
        return Ended::Gone;
    }
    Ended::Finished(finish)
}
