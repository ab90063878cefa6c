//! The HTTP routes (tokio + axum): `POST /v1/completions` (JSON or server-sent events),
//! `GET /v1/models`, `GET /health`, `GET /metrics`; errors in OpenAI's shape; graceful shutdown.

use super::api::{self, ApiError, Prompt, Text};
use super::engine::{Event, Job, Refused};
use super::policy::{Caller, Grant};
use super::State;
use crate::error::Context;

type Result<T, E = crate::error::Error> = std::result::Result<T, E>;
use crate::generate::SamplingConfig;
use axum::body::Body;
use axum::extract::State as Shared;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::UnboundedReceiver;

type St = Arc<State>;

/// Serve until `stop` fires (or SIGTERM/SIGINT with `signals`), then drain: new requests get
/// 503, running ones finish within the drain time, and what is left is cancelled.
pub async fn serve(
    listener: std::net::TcpListener,
    state: St,
    stop: tokio::sync::oneshot::Receiver<()>,
    signals: bool,
) -> Result<()> {
    let listener =
        tokio::net::TcpListener::from_std(listener).context("cannot serve on the socket")?;
    let app = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async { error(ApiError::new(404, "no such route")) })
        .method_not_allowed_fallback(|| async {
            error(ApiError::new(405, "method not allowed on this route"))
        })
        .with_state(state.clone());
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = go_rx.await;
    });
    let mut server = tokio::spawn(async move { server.await });
    tokio::select! {
        r = &mut server => {
            state.engine.cancel_all();
            let s = state.clone();
            let _ = tokio::task::spawn_blocking(move || s.engine.join()).await;
            return match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => crate::bail!("the server failed: {e}"),
                Err(e) => crate::bail!("the server failed: {e}"),
            };
        }
        _ = wait_for_stop(stop, signals) => {}
    }
    state.draining.store(true, Relaxed);
    state.engine.close();
    let _ = go_tx.send(());
    let in_flight = state.engine.in_flight();
    if in_flight > 0 {
        crate::note!(
            "flexrun serve: draining {in_flight} request(s) (at most {} s)",
            state.cfg.drain.as_secs()
        );
    }
    if tokio::time::timeout(state.cfg.drain, &mut server)
        .await
        .is_err()
    {
        state.engine.cancel_all();
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut server).await;
    }
    let s = state.clone();
    let _ = tokio::task::spawn_blocking(move || s.engine.join()).await;
    Ok(())
}

async fn wait_for_stop(stop: tokio::sync::oneshot::Receiver<()>, signals: bool) {
    if !signals {
        let _ = stop.await;
        return;
    }
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = stop => {}
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn error(e: ApiError) -> Response {
    let code = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (code, axum::Json(e.body())).into_response()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The caller's grant under the policy (`None`: no policy, every expert).
fn authorize<'a>(st: &'a State, headers: &HeaderMap) -> Result<Option<&'a Grant>, ApiError> {
    let Some(p) = &st.served.policy else {
        return Ok(None);
    };
    let auth = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
    match p.caller(auth) {
        Some(Caller::Key(g) | Caller::Anonymous(g)) => Ok(Some(g)),
        None if auth.is_none() => Err(ApiError::new(
            401,
            "an API key is required (Authorization: Bearer KEY)",
        )),
        None => Err(ApiError::new(401, "the API key is not valid")),
    }
}

async fn health(Shared(st): Shared<St>) -> Response {
    if st.draining.load(Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "draining"})),
        )
            .into_response();
    }
    axum::Json(json!({"status": "ok"})).into_response()
}

async fn models(Shared(st): Shared<St>, headers: HeaderMap) -> Response {
    let grant = match authorize(&st, &headers) {
        Ok(g) => g,
        Err(e) => return error(e),
    };
    let experts: Vec<&String> = st
        .served
        .experts
        .iter()
        .enumerate()
        .filter(|(i, _)| grant.is_none_or(|g| g.allowed[*i]))
        .map(|(_, n)| n)
        .collect();
    axum::Json(json!({"object": "list", "data": [{
        "id": st.cfg.model_id, "object": "model", "created": 0, "owned_by": "flexrun",
        "experts": experts,
        "max_model_len": st.served.model.cfg.max_position_embeddings,
    }]}))
    .into_response()
}

async fn metrics(Shared(st): Shared<St>, headers: HeaderMap) -> Response {
    if st.served.policy.is_some() {
        match authorize(&st, &headers) {
            Err(e) => return error(e),
            Ok(Some(g)) if !g.metrics => {
                return error(ApiError::new(403, "this key may not read the metrics"))
            }
            _ => {}
        }
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.engine.metrics.render(&st.served.experts),
    )
        .into_response()
}

async fn completions(Shared(st): Shared<St>, headers: HeaderMap, body: Body) -> Response {
    let arrived = Instant::now();
    let r = match prepare(&st, &headers, body).await {
        Ok(p) => run(st.clone(), p, arrived).await,
        Err(e) => Err(e),
    };
    match r {
        Ok(resp) => resp,
        Err(e) => {
            st.engine.metrics.status(e.status);
            error(e)
        }
    }
}

/// A checked request, ready for the engine.
struct Prepared {
    req: api::Request,
    prompt: Vec<u32>,
    sampling: SamplingConfig,
    allowed: Option<Vec<bool>>,
    active: Vec<String>,
}

async fn prepare(st: &St, headers: &HeaderMap, body: Body) -> Result<Prepared, ApiError> {
    if st.draining.load(Relaxed) {
        return Err(ApiError::new(503, "the server is shutting down"));
    }
    let grant = authorize(st, headers)?;
    let body = axum::body::to_bytes(body, st.max_body).await.map_err(|_| {
        ApiError::new(
            413,
            format!("the request body is larger than {} bytes", st.max_body),
        )
    })?;
    let req = api::parse(&body)?;
    if let Some(m) = &req.model {
        if m != &st.cfg.model_id {
            return Err(ApiError::new(
                404,
                format!(
                    "the model '{m}' is not served here (this server serves '{}')",
                    st.cfg.model_id
                ),
            ));
        }
    }
    let (allowed, active) = select(st, grant, &req)?;
    let cfg = &st.served.model.cfg;
    let prompt: Vec<u32> = match &req.prompt {
        Prompt::Ids(ids) => {
            if let Some(&bad) = ids.iter().find(|&&i| i >= cfg.vocab_size as u64) {
                return Err(ApiError::bad(
                    "prompt",
                    format!(
                        "token id {bad} is out of range (the vocabulary has {} tokens)",
                        cfg.vocab_size
                    ),
                ));
            }
            ids.iter().map(|&i| i as u32).collect()
        }
        Prompt::Text(s) => {
            let Some(tok) = st.served.tokenizer.clone() else {
                return Err(ApiError::bad(
                    "prompt",
                    "this model has no tokenizer: send token ids",
                ));
            };
            let s = s.clone();
            tokio::task::spawn_blocking(move || tok.encode(&s))
                .await
                .map_err(|_| ApiError::new(500, "tokenization failed"))?
                .map_err(|e| ApiError::bad("prompt", e.to_string()))?
        }
    };
    if prompt.is_empty() {
        return Err(ApiError::bad("prompt", "the prompt is empty"));
    }
    if req.max_tokens == 0 {
        return Err(ApiError::bad("max_tokens", "max_tokens must be at least 1"));
    }
    let ctx = cfg.max_position_embeddings as u64;
    if prompt.len() as u64 >= ctx {
        return Err(ApiError::bad(
            "prompt",
            format!(
                "the prompt has {} tokens: the context holds {ctx}, and one must be generated",
                prompt.len()
            ),
        ));
    }
    if (prompt.len() as u64).saturating_add(req.max_tokens) > ctx {
        return Err(ApiError::bad(
            "max_tokens",
            format!(
                "the prompt ({} tokens) + max_tokens ({}) exceed the context of {ctx} tokens: max_tokens may be at most {}",
                prompt.len(),
                req.max_tokens,
                ctx - prompt.len() as u64
            ),
        ));
    }
    if !req.stop.is_empty() && st.served.tokenizer.is_none() {
        return Err(ApiError::bad(
            "stop",
            "this model has no tokenizer: stop strings cannot be matched",
        ));
    }
    let sampling = SamplingConfig {
        temperature: req.temperature as f32,
        top_k: req.top_k.min(u32::MAX as u64) as usize,
        top_p: req.top_p as f32,
        seed: req.seed.unwrap_or_else(rand::random),
        max_new_tokens: req.max_tokens as usize,
        stop_token: cfg.eos_id(),
    };
    sampling.check().map_err(|e| {
        let p = if e.to_string().starts_with("temperature") {
            "temperature"
        } else {
            "top_p"
        };
        ApiError::bad(p, e.to_string())
    })?;
    Ok(Prepared {
        req,
        prompt,
        sampling,
        allowed,
        active,
    })
}

/// The request's experts: the key's (or all), narrowed by `experts` or `exclude`. With a
/// policy, a name the key may not use and a name the model does not have get the same 403, so
/// that no request learns which experts other keys have.
fn select(
    st: &State,
    grant: Option<&Grant>,
    req: &api::Request,
) -> Result<(Option<Vec<bool>>, Vec<String>), ApiError> {
    let names = &st.served.experts;
    if names.is_empty() {
        if req.experts.is_some() || !req.exclude.is_empty() {
            return Err(ApiError::bad(
                "experts",
                "this model is dense: it has no experts to select",
            ));
        }
        return Ok((None, vec![]));
    }
    let base = grant.map_or_else(|| vec![true; names.len()], |g| g.allowed.clone());
    let find = |n: &str, param: &'static str| -> Result<usize, ApiError> {
        match names.iter().position(|x| x == n) {
            Some(i) if base[i] => Ok(i),
            _ if grant.is_some() => Err(ApiError {
                status: 403,
                message: format!("the expert '{n}' is not available to this key"),
                param: Some(param),
            }),
            _ => Err(ApiError::bad(
                param,
                format!("no expert '{n}' (experts: {})", names.join(", ")),
            )),
        }
    };
    let mask = match &req.experts {
        Some(list) => {
            let mut m = vec![false; names.len()];
            for n in list {
                m[find(n, "experts")?] = true;
            }
            m
        }
        None => {
            let mut m = base.clone();
            for n in &req.exclude {
                m[find(n, "exclude")?] = false;
            }
            m
        }
    };
    if !mask.iter().any(|&x| x) {
        return Err(ApiError::bad("experts", "the selection leaves no expert"));
    }
    let active = names
        .iter()
        .zip(&mask)
        .filter(|(_, &m)| m)
        .map(|(n, _)| n.clone())
        .collect();
    let all = mask.iter().all(|&x| x);
    Ok(((!all).then_some(mask), active))
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

async fn run(st: St, p: Prepared, arrived: Instant) -> Result<Response, ApiError> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let prompt_tokens = p.prompt.len();
    let prompt_ids = p.req.return_token_ids.then(|| p.prompt.clone());
    st.engine
        .submit(Job {
            prompt: p.prompt,
            sampling: p.sampling,
            allowed: p.allowed,
            events: tx,
        })
        .map_err(|r| match r {
            Refused::Full => ApiError::new(429, "the server is at capacity: retry later"),
            Refused::ShuttingDown => ApiError::new(503, "the server is shutting down"),
        })?;
    let id = format!(
        "cmpl-{:x}{:08x}",
        NEXT_ID.fetch_add(1, Relaxed),
        rand::random::<u32>()
    );
    let head = Head {
        id,
        created: now(),
        model: st.cfg.model_id.clone(),
        experts: p.active,
        prompt_tokens,
        prompt_ids,
        token_ids: p.req.return_token_ids,
    };
    let text = Text::new(st.served.tokenizer.clone(), p.req.stop.clone());
    if p.req.stream {
        st.engine.metrics.status(200);
        return Ok(stream(st, head, text, rx, arrived));
    }
    let (text, finish) = collect(&st, text, rx, arrived).await?;
    st.engine.metrics.status(200);
    let mut choice = json!({"index": 0, "text": text.0, "logprobs": null, "finish_reason": finish});
    if head.token_ids {
        choice["token_ids"] = json!(text.1);
    }
    let mut body = head.object(vec![choice]);
    body["usage"] = head.usage(text.1.len());
    Ok(axum::Json(body).into_response())
}

/// What every response (and every streamed chunk) carries.
struct Head {
    id: String,
    created: u64,
    model: String,
    experts: Vec<String>,
    prompt_tokens: usize,
    prompt_ids: Option<Vec<u32>>,
    token_ids: bool,
}

impl Head {
    fn object(&self, choices: Vec<Value>) -> Value {
        let mut v = json!({
            "id": self.id, "object": "text_completion", "created": self.created,
            "model": self.model, "choices": choices, "experts": self.experts,
        });
        if let Some(p) = &self.prompt_ids {
            v["prompt_token_ids"] = json!(p);
        }
        v
    }

    fn usage(&self, completion: usize) -> Value {
        json!({"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
               "total_tokens": self.prompt_tokens + completion})
    }
}

fn finish_reason(stopped: bool) -> &'static str {
    if stopped {
        "stop"
    } else {
        "length"
    }
}

/// Wait for a whole completion: `((text, token ids), finish reason)`.
async fn collect(
    st: &State,
    mut text: Text,
    mut rx: UnboundedReceiver<Event>,
    arrived: Instant,
) -> Result<((String, Vec<u32>), &'static str), ApiError> {
    let mut out = String::new();
    let mut first = true;
    let finish = loop {
        let ev = rx.recv().await;
        if first {
            first = false;
            st.engine
                .metrics
                .time_to_first_token(arrived.elapsed().as_secs_f64());
        }
        match ev {
            Some(Event::Token(t)) => {
                out += &text.push(t);
                if text.stopped {
                    break "stop";
                }
            }
            Some(Event::Done { stopped }) => {
                out += &text.finish();
                break finish_reason(stopped);
            }
            Some(Event::Failed(m)) => {
                return Err(ApiError::new(500, format!("generation failed: {m}")))
            }
            None => return Err(ApiError::new(500, "generation failed: the engine stopped")),
        }
    };
    Ok(((out, std::mem::take(&mut text.ids)), finish))
}

/// A streamed completion: one event per token, a last chunk with the finish reason and the
/// usage, then `[DONE]`. Dropping the stream (the client went away) frees the sequence.
fn stream(
    st: St,
    head: Head,
    text: Text,
    rx: UnboundedReceiver<Event>,
    arrived: Instant,
) -> Response {
    struct S {
        st: St,
        head: Head,
        text: Text,
        rx: UnboundedReceiver<Event>,
        arrived: Option<Instant>,
        state: u8, // 0: streaming, 1: [DONE] next, 2: ended
    }
    let s = S {
        st,
        head,
        text,
        rx,
        arrived: Some(arrived),
        state: 0,
    };
    let events = futures_util::stream::unfold(s, |mut s| async move {
        let data = |v: Value| Ok::<_, Infallible>(SseEvent::default().data(v.to_string()));
        match s.state {
            1 => {
                s.state = 2;
                return Some((Ok(SseEvent::default().data("[DONE]")), s));
            }
            2 => return None,
            _ => {}
        }
        let ev = s.rx.recv().await;
        if let Some(t0) = s.arrived.take() {
            s.st.engine
                .metrics
                .time_to_first_token(t0.elapsed().as_secs_f64());
        }
        let chunk = |s: &S, text: String, ids: &[u32], finish: Option<&str>| {
            let mut c =
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish});
            if s.head.token_ids {
                c["token_ids"] = json!(ids);
            }
            let mut v = s.head.object(vec![c]);
            if finish.is_some() {
                v["usage"] = s.head.usage(s.text.ids.len());
            }
            v
        };
        let v = match ev {
            Some(Event::Token(t)) => {
                let delta = s.text.push(t);
                if s.text.stopped {
                    s.state = 1;
                    chunk(&s, delta, &[t], Some("stop"))
                } else {
                    chunk(&s, delta, &[t], None)
                }
            }
            Some(Event::Done { stopped }) => {
                s.state = 1;
                let rest = s.text.finish();
                chunk(&s, rest, &[], Some(finish_reason(stopped)))
            }
            Some(Event::Failed(m)) => {
                s.state = 1;
                ApiError::new(500, format!("generation failed: {m}")).body()
            }
            None => {
                s.state = 1;
                ApiError::new(500, "generation failed: the engine stopped").body()
            }
        };
        if s.state == 1 {
            // Dropping the receiver frees the sequence in the engine (a stop string may end it
            // before the model does).
            s.rx.close();
        }
        Some((data(v), s))
    });
    Sse::new(events).into_response()
}
