//! `mmada-infer serve`: an OpenAI-compatible HTTP server over the same generation layer as
//! `generate`, and the web demo page at `/`.
//!
//! * `POST /v1/chat/completions`, `POST /v1/completions`: OpenAI request / response shapes,
//!   `stream: true` as server-sent events (a chunk whenever the answer's decoded prefix grows,
//!   and with `mmada_canvas: true` one per denoising step with the tokens it committed);
//!   sampler settings as extra body fields ([`api::SamplerExtras`]); `image_url` parts (data
//!   URLs) for image understanding.
//! * `POST /v1/images/generations`: text-to-image, base64 PNGs (`stream: true` extension: one
//!   event per MaskGIT step).
//! * `GET /v1/models`, `GET /health`, `GET /` (the page, embedded in the binary).
//!
//! One worker thread owns the model ([`worker::Worker`]) and takes jobs from a bounded queue
//! (`--max-queue`; a full queue answers 429); text jobs with equal greedy settings are decoded
//! in one batch (`--max-batch`). Every bad request gets an OpenAI-style JSON error with a 4xx
//! status ([`api::ApiError`]). The server binds to 127.0.0.1 unless `--host` says otherwise;
//! with `--api-key` the `/v1` routes need `Authorization: Bearer KEY`.

pub mod api;
pub mod worker;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use burn::tensor::backend::Backend;
use futures_util::Stream;
use mmada_data::{ChatTemplate, Message, Role, TextTokenizer};
use mmada_sampler::{GenerateConfig, SamplerSection};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use self::api::{
    ApiError, ChatRequest, CompletionRequest, Content, ImageRequest, Part, PromptInput,
    SamplerExtras, parse_body,
};
use self::worker::{ImageEvent, ImageJob, ImageSettings, Job, TextEvent, TextJob, Worker};
use crate::engine::{Engine, chat_ids};
use crate::image::T2iKnobs;

/// The page at `/`.
const PAGE: &str = include_str!("page.html");

/// `serve` options (besides the model and sampling options of `generate`).
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to bind; 127.0.0.1 keeps the server on this machine (0.0.0.0 opens it to
    /// the network: set --api-key then).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0 = any free port; the address is printed on stdout).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on the /v1 routes.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Model name of the API (`model` field, /v1/models) [default: the checkpoint folder's
    /// name].
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Requests waiting for the model at most; more are answered 429.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Text requests with equal greedy settings decoded together at most.
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// Largest request body in MiB (images are sent inline).
    #[arg(long, default_value_t = 16)]
    pub max_body_mib: usize,
    /// MAGVIT-v2 folder or Hugging Face repo id for image understanding and generation
    /// (e.g. showlab/magvitv2); without it the image features answer 400.
    #[arg(long)]
    pub vq_checkpoint: Option<String>,
    /// Image side in pixels: default t2i size and mmu preprocessing size.
    #[arg(long, default_value_t = 512)]
    pub resolution: u32,
    /// t2i text length `P` (MMaDA-8B: 512).
    #[arg(long, default_value_t = 512)]
    pub t2i_text_len: usize,
    /// Default t2i MaskGIT steps [default: 18].
    #[arg(long)]
    pub timesteps: Option<usize>,
    /// Default t2i guidance scale [default: 0].
    #[arg(long)]
    pub guidance_scale: Option<f64>,
}

/// What the handlers share.
struct AppState {
    model_name: String,
    api_key: Option<String>,
    tok: TextTokenizer,
    template: Option<ChatTemplate>,
    max_seq: usize,
    sample_vocab: usize,
    defaults: SamplerSection,
    seed: u64,
    images: Result<ImageSettings, String>,
    jobs: mpsc::Sender<Job>,
    created: u64,
    next_id: AtomicU64,
    started: Instant,
    /// Generations stopped because every client of the batch went away (`/health`).
    cancelled: Arc<AtomicU64>,
}

type Shared = Arc<AppState>;

/// What the worker reports once the model is loaded.
struct Ready {
    tok: TextTokenizer,
    template: Option<ChatTemplate>,
    max_seq: usize,
    sample_vocab: usize,
    images: Result<ImageSettings, String>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Loads the model on a worker thread, binds, and serves until killed.
pub fn serve<B: Backend>(
    device: &B::Device,
    load: impl FnOnce(&B::Device) -> Result<Engine<B>> + Send + 'static,
    defaults: SamplerSection,
    seed: u64,
    model_name: String,
    args: ServeArgs,
) -> Result<()> {
    anyhow::ensure!(args.max_queue > 0, "--max-queue must be > 0");
    anyhow::ensure!(args.max_batch > 0, "--max-batch must be > 0");
    // the server's default settings must be valid on their own
    let (jobs, rx) = mpsc::channel::<Job>(args.max_queue);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<Ready>>();
    let device = device.clone();
    let wargs = args.clone();
    let cancelled = Arc::new(AtomicU64::new(0));
    let worker_cancelled = cancelled.clone();
    std::thread::Builder::new()
        .name("mmada-model".into())
        .spawn(move || {
            let engine = match load(&device) {
                Ok(e) => e,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let knobs = T2iKnobs {
                timesteps: wargs.timesteps,
                guidance_scale: wargs.guidance_scale,
                ..Default::default()
            };
            let settings = ImageSettings {
                resolution: wargs.resolution,
                text_len: wargs.t2i_text_len,
                knobs,
            };
            let coder = match &wargs.vq_checkpoint {
                None => Err("this server has no image tokenizer: start it with \
                     --vq-checkpoint DIR|REPO (e.g. showlab/magvitv2) for images"
                    .to_string()),
                Some(spec) => mmada_vq::VqCoder::<B>::load(spec, &device)
                    .map_err(|e| format!("the image tokenizer {spec} did not load: {e}")),
            };
            let images = match &coder {
                Ok(c) => crate::image::t2i_setup(
                    &engine,
                    c,
                    settings.resolution,
                    settings.text_len,
                    &settings.knobs,
                )
                .map(|_| settings.clone())
                .map_err(|e| format!("images are off: {e:#}")),
                Err(e) => Err(e.clone()),
            };
            if let Err(e) = &images {
                tracing::warn!("{e}");
            }
            let ready = Ready {
                tok: engine.tok.clone(),
                template: engine.template.clone(),
                max_seq: engine.cfg.max_sequence_length,
                sample_vocab: engine.tok.len().min(engine.cfg.embedding_size),
                images: images.clone(),
            };
            let _ = ready_tx.send(Ok(ready));
            Worker {
                engine,
                coder,
                images: settings,
                max_batch: wargs.max_batch,
                cancelled: worker_cancelled,
            }
            .run(rx);
        })
        .context("starting the model thread")?;
    let ready = ready_rx
        .recv()
        .context("the model thread ended before loading")??;
    // the server's default settings must be valid on their own
    defaults
        .to_config(ready.tok.layout(), ready.sample_vocab)
        .context("sampling settings of the server")?;
    let state = Arc::new(AppState {
        model_name,
        api_key: args.api_key.clone(),
        tok: ready.tok,
        template: ready.template,
        max_seq: ready.max_seq,
        sample_vocab: ready.sample_vocab,
        defaults,
        seed,
        images: ready.images,
        jobs,
        created: now(),
        next_id: AtomicU64::new(1),
        started: Instant::now(),
        cancelled,
    });
    let app = router(state, args.max_body_mib << 20);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("binding {}:{}", args.host, args.port))?;
        let addr: SocketAddr = listener.local_addr()?;
        println!("listening on http://{addr}");
        use std::io::Write;
        std::io::stdout().flush()?;
        tracing::info!(%addr, auth = args.api_key.is_some(), "serving");
        axum::serve(listener, app).await.context("serving")
    })
}

fn router(state: Shared, max_body: usize) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/images/generations", post(images))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/health", get(health))
        .merge(v1)
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                message: "no such route: see /v1/chat/completions, /v1/completions, \
                          /v1/images/generations, /v1/models, /health"
                    .into(),
                kind: "invalid_request_error",
                param: None,
                code: Some("not_found"),
            }
        })
        .method_not_allowed_fallback(|| async {
            ApiError {
                status: StatusCode::METHOD_NOT_ALLOWED,
                message: "method not allowed on this route".into(),
                kind: "invalid_request_error",
                param: None,
                code: None,
            }
        })
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

async fn auth(State(s): State<Shared>, req: Request, next: Next) -> Response {
    if let Some(key) = &s.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if given != Some(key.as_str()) {
            return ApiError {
                status: StatusCode::UNAUTHORIZED,
                message: match given {
                    None => "missing API key: send `Authorization: Bearer KEY`".into(),
                    Some(_) => "incorrect API key".into(),
                },
                kind: "authentication_error",
                param: None,
                code: Some("invalid_api_key"),
            }
            .into_response();
        }
    }
    next.run(req).await
}

async fn health(State(s): State<Shared>) -> impl IntoResponse {
    axum::Json(json!({
        "status": "ok",
        "model": s.model_name,
        "queued": s.jobs.max_capacity() - s.jobs.capacity(),
        "max_queue": s.jobs.max_capacity(),
        "images": s.images.is_ok(),
        "cancelled": s.cancelled.load(Ordering::Relaxed),
        "uptime_s": s.started.elapsed().as_secs_f64(),
    }))
}

fn model_card(s: &AppState) -> Value {
    json!({"id": s.model_name, "object": "model", "created": s.created, "owned_by": "mmada-rs"})
}

async fn models(State(s): State<Shared>) -> impl IntoResponse {
    axum::Json(json!({"object": "list", "data": [model_card(&s)]}))
}

async fn model(
    State(s): State<Shared>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    check_model(&s, Some(&id))?;
    Ok(axum::Json(model_card(&s)))
}

fn check_model(s: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if m != s.model_name => Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "the model `{m}` does not exist: this server serves `{}`",
                s.model_name
            ),
            kind: "invalid_request_error",
            param: Some("model"),
            code: Some("model_not_found"),
        }),
        _ => Ok(()),
    }
}

fn body_of(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| ApiError {
        status: e.status(),
        message: format!("reading the request body: {}", e.body_text()),
        kind: "invalid_request_error",
        param: None,
        code: None,
    })
}

fn submit(s: &AppState, job: Job) -> Result<(), ApiError> {
    s.jobs.try_send(job).map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!(
                "the server is busy: {} requests are waiting; retry later",
                s.jobs.max_capacity()
            ),
            kind: "rate_limit_error",
            param: None,
            code: Some("rate_limit_exceeded"),
        },
        mpsc::error::TrySendError::Closed(_) => {
            ApiError::internal("the model thread has stopped").code("server_error")
        }
    })
}

/// A text request resolved into prompt ids and sampler settings.
struct TextPlan {
    prompt: Vec<u32>,
    image: Option<mmada_vq::RgbImage>,
    config: GenerateConfig,
    seed: u64,
    max_tokens: Option<usize>,
}

impl AppState {
    fn id(&self, prefix: &str) -> String {
        format!("{prefix}-{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// The sampler settings of a request over the server's: `max_tokens` (when
    /// `gen_length` is not given) sets `gen_length` to whole blocks and, when `steps` is not
    /// given either, keeps the default steps-per-token ratio.
    fn config(
        &self,
        extras: &SamplerExtras,
        temperature: Option<f64>,
        max_tokens: Option<usize>,
    ) -> Result<GenerateConfig, ApiError> {
        let mut section = extras.section(temperature).or(self.defaults.clone());
        let bad = |e: mmada_sampler::SamplerError| ApiError::bad_request(format!("{e}"));
        let base = section
            .to_config(self.tok.layout(), self.sample_vocab)
            .map_err(bad)?;
        if let Some(m) = max_tokens
            && extras.gen_length.is_none()
        {
            if m == 0 {
                return Err(ApiError::bad_request("max_tokens must be > 0").param("max_tokens"));
            }
            let bl = base.block_length;
            let g = m.div_ceil(bl) * bl;
            section.gen_length = Some(g);
            if extras.steps.is_none() {
                let nb = g / bl;
                let s = (g * base.steps).div_ceil(base.gen_length).max(nb);
                section.steps = Some(s.div_ceil(nb) * nb);
            }
            return section
                .to_config(self.tok.layout(), self.sample_vocab)
                .map_err(bad);
        }
        Ok(base)
    }

    fn check_length(&self, prompt: usize, gen_length: usize) -> Result<(), ApiError> {
        if prompt + gen_length > self.max_seq {
            return Err(ApiError::bad_request(format!(
                "this model's maximum context length is {} tokens; the prompt has {prompt} \
                 tokens and {gen_length} are to be generated",
                self.max_seq
            ))
            .param("messages")
            .code("context_length_exceeded"));
        }
        Ok(())
    }

    fn chat_plan(&self, req: &ChatRequest) -> Result<TextPlan, ApiError> {
        check_model(self, req.model.as_deref())?;
        check_n(req.n, req.stream)?;
        if req.messages.is_empty() {
            return Err(ApiError::bad_request("messages must not be empty").param("messages"));
        }
        let mut messages = Vec::with_capacity(req.messages.len());
        let mut image = None;
        for (i, m) in req.messages.iter().enumerate() {
            let role = match m.role.as_str() {
                "system" | "developer" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                other => {
                    return Err(ApiError::bad_request(format!(
                        "messages[{i}].role `{other}`: expected system, user or assistant"
                    ))
                    .param("messages"));
                }
            };
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match p {
                            Part::Text { text: t } => text.push_str(t),
                            Part::ImageUrl { image_url } => {
                                if image.is_some() {
                                    return Err(ApiError::bad_request(
                                        "one image per request is supported",
                                    )
                                    .param("messages"));
                                }
                                image = Some(decode_data_url(&image_url.url)?);
                            }
                        }
                    }
                    text
                }
            };
            messages.push(Message { role, content });
        }
        if image.is_some()
            && let Err(e) = &self.images
        {
            return Err(ApiError::bad_request(e.clone()).param("messages"));
        }
        let prompt = chat_ids(&self.tok, self.template.as_ref(), &messages)
            .map_err(|e| ApiError::bad_request(format!("tokenizing the messages: {e:#}")))?;
        let max_tokens = req.max_completion_tokens.or(req.max_tokens);
        let config = self.config(&req.sampler, req.temperature, max_tokens)?;
        let image_tokens = match (&image, &self.images) {
            (Some(_), Ok(s)) => ((s.resolution / 16) as usize).pow(2) + 3,
            _ => 0,
        };
        self.check_length(prompt.len() + image_tokens, config.gen_length)?;
        Ok(TextPlan {
            prompt,
            image,
            config,
            seed: req.seed.unwrap_or(self.seed),
            max_tokens,
        })
    }
}

/// Most choices per request (`n`).
const MAX_N: usize = 8;

/// `n` in `1..=MAX_N`; streaming takes `n = 1`.
fn check_n(n: Option<usize>, stream: bool) -> Result<usize, ApiError> {
    let n = n.unwrap_or(1);
    if n == 0 || n > MAX_N {
        return Err(ApiError::bad_request(format!("n must be in 1..={MAX_N}")).param("n"));
    }
    if stream && n > 1 {
        return Err(ApiError::bad_request("stream: true takes n = 1").param("n"));
    }
    Ok(n)
}

fn decode_data_url(url: &str) -> Result<mmada_vq::RgbImage, ApiError> {
    let bad = |m: String| {
        ApiError::bad_request(m)
            .param("messages")
            .code("invalid_image")
    };
    let Some(rest) = url.strip_prefix("data:") else {
        return Err(bad(
            "image_url must be a data URL (data:image/png;base64,…): this server fetches nothing"
                .into(),
        ));
    };
    let Some((meta, data)) = rest.split_once(',') else {
        return Err(bad(
            "image_url: a data URL needs a `,` before the data".into()
        ));
    };
    if !meta.ends_with(";base64") {
        return Err(bad("image_url: only base64 data URLs are supported".into()));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| bad(format!("image_url: the base64 data does not decode: {e}")))?;
    mmada_data::image::decode_image(&bytes).map_err(|e| {
        bad(format!(
            "image_url: not a readable image (jpeg, png, webp): {e}"
        ))
    })
}

/// A finished answer.
struct Answer {
    text: String,
    finish_reason: &'static str,
    prompt_tokens: usize,
    completion_tokens: usize,
    extra: Value,
}

fn answer_of(s: &AppState, done: worker::TextDone, max_tokens: Option<usize>) -> Answer {
    let g = done.generation;
    let (ids, cut) = match max_tokens {
        Some(m) if g.ids.len() > m => (&g.ids[..m], true),
        _ => (&g.ids[..], false),
    };
    let ids_cut: Vec<u32> = ids
        .iter()
        .copied()
        .take_while(|t| {
            let l = s.tok.layout();
            *t != l.eos_id && *t != l.eot_id
        })
        .collect();
    let text = if cut {
        decode(&s.tok, &ids_cut).trim().to_string()
    } else {
        g.text.clone()
    };
    Answer {
        finish_reason: if g.terminated && !cut {
            "stop"
        } else {
            "length"
        },
        completion_tokens: ids_cut.len(),
        prompt_tokens: done.prompt_tokens,
        text,
        extra: json!({
            "nfe": g.nfe,
            "seconds": g.seconds,
            "batch": g.batch,
            "tokens_per_forward": g.tokens_per_forward,
        }),
    }
}

fn decode(tok: &TextTokenizer, ids: &[u32]) -> String {
    tok.inner().decode(ids, true).unwrap_or_default()
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion,
           "total_tokens": prompt + completion})
}

/// Waits for a text job's answer (non-streaming).
async fn wait_text(
    mut rx: mpsc::UnboundedReceiver<TextEvent>,
) -> Result<worker::TextDone, ApiError> {
    while let Some(e) = rx.recv().await {
        if let TextEvent::Done(r) = e {
            return r;
        }
    }
    Err(ApiError::internal("the model thread dropped the request"))
}

async fn chat(
    State(s): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_of(body)?;
    let req: ChatRequest = parse_body(&body)?;
    let plan = s.chat_plan(&req)?;
    let n = check_n(req.n, req.stream)?;
    let watch = req.stream;
    let max_tokens = plan.max_tokens;
    let gen_length = plan.config.gen_length;
    let prompt_len = plan.prompt.len();
    // choice i samples with seed + i (greedy choices are equal)
    let mut rxs = Vec::with_capacity(n);
    for i in 0..n {
        let (tx, rx) = mpsc::unbounded_channel();
        submit(
            &s,
            Job::Text(TextJob {
                prompt: plan.prompt.clone(),
                image: plan.image.clone(),
                config: plan.config.clone(),
                seed: plan.seed.wrapping_add(i as u64),
                watch,
                tx,
            }),
        )?;
        rxs.push(rx);
    }
    let id = s.id("chatcmpl");
    if req.stream {
        let rx = rxs.remove(0);
        let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
        return Ok(stream_text(
            s.clone(),
            rx,
            StreamKind::Chat,
            id,
            max_tokens,
            gen_length,
            prompt_len,
            req.mmada_canvas,
            include_usage,
        )
        .into_response());
    }
    let mut choices = Vec::with_capacity(n);
    let (mut pt, mut ct) = (0, 0);
    let mut extra = Vec::with_capacity(n);
    for (i, rx) in rxs.into_iter().enumerate() {
        let a = answer_of(&s, wait_text(rx).await?, max_tokens);
        // the prompt is counted once, as OpenAI does for n > 1
        pt = a.prompt_tokens;
        ct += a.completion_tokens;
        choices.push(json!({
            "index": i,
            "message": {"role": "assistant", "content": a.text},
            "logprobs": null,
            "finish_reason": a.finish_reason,
        }));
        extra.push(a.extra);
    }
    Ok(axum::Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": now(),
        "model": s.model_name,
        "choices": choices,
        "usage": usage(pt, ct),
        "mmada": if n == 1 { extra.remove(0) } else { Value::Array(extra) },
    }))
    .into_response())
}

async fn completions(
    State(s): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_of(body)?;
    let req: CompletionRequest = parse_body(&body)?;
    check_model(&s, req.model.as_deref())?;
    let n = check_n(req.n, req.stream)?;
    let prompts = match &req.prompt {
        PromptInput::One(p) => vec![p.clone()],
        PromptInput::Many(v) => v.clone(),
    };
    if prompts.is_empty() {
        return Err(ApiError::bad_request("prompt must not be empty").param("prompt"));
    }
    if req.stream && prompts.len() != 1 {
        return Err(ApiError::bad_request("stream: true takes one prompt").param("prompt"));
    }
    let config = s.config(&req.sampler, req.temperature, req.max_tokens)?;
    let mut ids = Vec::with_capacity(prompts.len());
    for p in &prompts {
        let msg = [Message {
            role: Role::User,
            content: p.clone(),
        }];
        let v = chat_ids(&s.tok, None, &msg)
            .map_err(|e| ApiError::bad_request(format!("tokenizing the prompt: {e:#}")))?;
        s.check_length(v.len(), config.gen_length)
            .map_err(|e| e.param("prompt"))?;
        ids.push(v);
    }
    let seed = req.seed.unwrap_or(s.seed);
    let id = s.id("cmpl");
    // choices prompt-major, as OpenAI orders them: prompt p, sample i → index p·n + i (seed + i)
    let mut rxs = Vec::with_capacity(ids.len() * n);
    for p in ids {
        for i in 0..n {
            let (tx, rx) = mpsc::unbounded_channel();
            let prompt_len = p.len();
            submit(
                &s,
                Job::Text(TextJob {
                    prompt: p.clone(),
                    image: None,
                    config: config.clone(),
                    seed: seed.wrapping_add(i as u64),
                    watch: req.stream,
                    tx,
                }),
            )?;
            rxs.push((rx, prompt_len));
        }
    }
    if req.stream {
        let (rx, prompt_len) = rxs.remove(0);
        let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
        return Ok(stream_text(
            s.clone(),
            rx,
            StreamKind::Completion,
            id,
            req.max_tokens,
            config.gen_length,
            prompt_len,
            req.mmada_canvas,
            include_usage,
        )
        .into_response());
    }
    let mut choices = Vec::new();
    let (mut pt, mut ct) = (0, 0);
    let mut extra = Vec::new();
    for (i, (rx, _)) in rxs.into_iter().enumerate() {
        let a = answer_of(&s, wait_text(rx).await?, req.max_tokens);
        if i % n == 0 {
            pt += a.prompt_tokens; // each prompt once
        }
        ct += a.completion_tokens;
        choices.push(json!({
            "index": i, "text": a.text, "logprobs": null, "finish_reason": a.finish_reason,
        }));
        extra.push(a.extra);
    }
    Ok(axum::Json(json!({
        "id": id,
        "object": "text_completion",
        "created": now(),
        "model": s.model_name,
        "choices": choices,
        "usage": usage(pt, ct),
        "mmada": extra,
    }))
    .into_response())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum StreamKind {
    Chat,
    Completion,
}

fn sse_json(v: &Value) -> Event {
    Event::default().data(v.to_string())
}

/// Streams a text job: a chunk whenever the answer's stable prefix (the committed positions
/// before the first masked one, cut at EOS / EOT) decodes to more text, one per step with
/// `canvas` (the `mmada` field: the tokens this step committed), the final chunk with the
/// finish reason, optionally the usage, then `[DONE]`.
#[allow(clippy::too_many_arguments)]
fn stream_text(
    s: Shared,
    mut rx: mpsc::UnboundedReceiver<TextEvent>,
    kind: StreamKind,
    id: String,
    max_tokens: Option<usize>,
    gen_length: usize,
    prompt_len: usize,
    canvas: bool,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let (out, out_rx) = mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        let created = now();
        let chunk =
            |delta: Option<&str>, role: bool, finish: Option<&str>, extra: Option<Value>| {
                let mut v = match kind {
                    StreamKind::Chat => {
                        let mut d = serde_json::Map::new();
                        if role {
                            d.insert("role".into(), json!("assistant"));
                        }
                        if let Some(t) = delta {
                            d.insert("content".into(), json!(t));
                        }
                        json!({
                            "id": id, "object": "chat.completion.chunk", "created": created,
                            "model": s.model_name,
                            "choices": [{"index": 0, "delta": d, "logprobs": null,
                                         "finish_reason": finish}],
                        })
                    }
                    StreamKind::Completion => json!({
                        "id": id, "object": "text_completion", "created": created,
                        "model": s.model_name,
                        "choices": [{"index": 0, "text": delta.unwrap_or(""), "logprobs": null,
                                     "finish_reason": finish}],
                    }),
                };
                if let Some(x) = extra {
                    v["mmada"] = x;
                }
                sse_json(&v)
            };
        let start = canvas.then(|| json!({"gen_length": gen_length, "prompt_tokens": prompt_len}));
        let first = chunk(
            (kind == StreamKind::Chat).then_some(""),
            kind == StreamKind::Chat,
            None,
            start,
        );
        if out.send(first).await.is_err() {
            return;
        }
        let layout = *s.tok.layout();
        let limit = max_tokens.unwrap_or(usize::MAX);
        let mut sent = String::new();
        let mut seen_step = vec![-1i64; gen_length];
        while let Some(e) = rx.recv().await {
            match e {
                TextEvent::Step {
                    step,
                    block,
                    generated,
                    unmask,
                } => {
                    // the stable prefix: committed positions before the first mask
                    let mask = i64::from(layout.mask_id);
                    let ids: Vec<u32> = generated
                        .iter()
                        .take_while(|&&t| t != mask)
                        .map(|&t| t as u32)
                        .take_while(|&t| t != layout.eos_id && t != layout.eot_id)
                        .take(limit)
                        .collect();
                    let text = decode(&s.tok, &ids);
                    let text = text.trim();
                    let delta = text
                        .strip_prefix(sent.as_str())
                        .filter(|d| !d.is_empty())
                        .map(str::to_string);
                    let extra = canvas.then(|| {
                        let tokens: Vec<Value> = unmask
                            .iter()
                            .enumerate()
                            .filter(|&(p, &u)| u >= 0 && seen_step[p] < 0)
                            .map(|(p, &u)| {
                                let t = generated[p] as u32;
                                json!([p, s.tok.inner().decode(&[t], false).unwrap_or_default(), u])
                            })
                            .collect();
                        for (p, &u) in unmask.iter().enumerate() {
                            seen_step[p] = u;
                        }
                        json!({"step": step, "block": block, "tokens": tokens})
                    });
                    if let Some(d) = &delta {
                        sent.push_str(d);
                    }
                    if delta.is_some() || extra.is_some() {
                        let c = chunk(delta.as_deref(), false, None, extra);
                        if out.send(c).await.is_err() {
                            return;
                        }
                    }
                }
                TextEvent::Done(Err(e)) => {
                    let _ = out.send(sse_json(&e.body())).await;
                    break;
                }
                TextEvent::Done(Ok(done)) => {
                    let a = answer_of(&s, done, max_tokens);
                    let rest = a
                        .text
                        .strip_prefix(sent.as_str())
                        .filter(|d| !d.is_empty())
                        .map(str::to_string);
                    if let Some(r) = rest
                        && out.send(chunk(Some(&r), false, None, None)).await.is_err()
                    {
                        return;
                    }
                    let extra = canvas.then(|| a.extra.clone());
                    if out
                        .send(chunk(None, false, Some(a.finish_reason), extra))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    if include_usage {
                        let object = match kind {
                            StreamKind::Chat => "chat.completion.chunk",
                            StreamKind::Completion => "text_completion",
                        };
                        let u = json!({
                            "id": id, "object": object, "created": created,
                            "model": s.model_name, "choices": [],
                            "usage": usage(a.prompt_tokens, a.completion_tokens),
                        });
                        let _ = out.send(sse_json(&u)).await;
                    }
                    break;
                }
            }
        }
        let _ = out.send(Event::default().data("[DONE]")).await;
    });
    let stream = futures_util::stream::unfold(out_rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok(e), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

fn parse_size(size: Option<&str>, default: u32) -> Result<u32, ApiError> {
    let Some(sz) = size else {
        return Ok(default);
    };
    let bad = || {
        ApiError::bad_request(format!(
            "size `{sz}`: expected RxR, square, R a positive multiple of 16 (e.g. {default}x{default})"
        ))
        .param("size")
    };
    let (w, h) = sz.split_once('x').ok_or_else(bad)?;
    let (w, h): (u32, u32) = (w.parse().map_err(|_| bad())?, h.parse().map_err(|_| bad())?);
    if w != h || w == 0 || !w.is_multiple_of(16) || w > 2048 {
        return Err(bad());
    }
    Ok(w)
}

async fn images(
    State(s): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_of(body)?;
    let req: ImageRequest = parse_body(&body)?;
    check_model(&s, req.model.as_deref())?;
    let settings = s
        .images
        .as_ref()
        .map_err(|e| ApiError::bad_request(e.clone()))?;
    if let Some(f) = req.response_format.as_deref()
        && f != "b64_json"
    {
        return Err(ApiError::bad_request(format!(
            "response_format `{f}`: only b64_json (the server keeps no files)"
        ))
        .param("response_format"));
    }
    let n = req.n.unwrap_or(1);
    if n == 0 || n > 8 {
        return Err(ApiError::bad_request("n must be in 1..=8").param("n"));
    }
    let resolution = parse_size(req.size.as_deref(), settings.resolution)?;
    let knobs = T2iKnobs {
        timesteps: req.timesteps.or(settings.knobs.timesteps),
        guidance_scale: req.guidance_scale.or(settings.knobs.guidance_scale),
        temperature: req.temperature,
        noise_schedule: req.noise_schedule.clone(),
    };
    if let Some(ns) = &knobs.noise_schedule
        && mmada_diffusion::MaskSchedule::parse(ns).is_err()
    {
        return Err(ApiError::bad_request(format!(
            "noise_schedule `{ns}`: expected cosine, linear, powK (e.g. pow2) or sigmoid"
        ))
        .param("noise_schedule"));
    }
    let text_tokens = s.tok.encode(&req.prompt).map(|v| v.len()).unwrap_or(0);
    if text_tokens + 3 > settings.text_len {
        return Err(ApiError::bad_request(format!(
            "the prompt has {text_tokens} tokens; at most {} fit the t2i text length {}",
            settings.text_len.saturating_sub(3),
            settings.text_len
        ))
        .param("prompt")
        .code("context_length_exceeded"));
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    submit(
        &s,
        Job::Image(ImageJob {
            prompt: req.prompt.clone(),
            n,
            resolution,
            knobs,
            seed: req.seed.unwrap_or(s.seed),
            watch: req.stream,
            preview_every: req.preview_every,
            tx,
        }),
    )?;
    if !req.stream {
        let mut data = Vec::new();
        let mut nfe = 0;
        while let Some(e) = rx.recv().await {
            match e {
                ImageEvent::Step { .. } => {}
                ImageEvent::Image { b64, nfe: k, .. } => {
                    nfe += k;
                    data.push(json!({"b64_json": b64, "revised_prompt": req.prompt}));
                }
                ImageEvent::Done(r) => {
                    r?;
                    return Ok(axum::Json(json!({
                        "created": now(),
                        "data": data,
                        "mmada": {"nfe": nfe, "resolution": resolution},
                    }))
                    .into_response());
                }
            }
        }
        return Err(ApiError::internal("the model thread dropped the request"));
    }
    let (out, out_rx) = mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        while let Some(e) = rx.recv().await {
            let v = match e {
                ImageEvent::Step {
                    index,
                    step,
                    steps,
                    grid,
                    committed,
                    preview,
                } => json!({"type": "step", "index": index, "step": step, "steps": steps,
                            "grid": grid, "committed": committed, "preview": preview}),
                ImageEvent::Image { index, b64, nfe } => {
                    json!({"type": "image", "index": index, "b64_json": b64, "nfe": nfe})
                }
                ImageEvent::Done(Ok(())) => json!({"type": "done", "created": now()}),
                ImageEvent::Done(Err(e)) => e.body(),
            };
            if out.send(sse_json(&v)).await.is_err() {
                return;
            }
        }
        let _ = out.send(Event::default().data("[DONE]")).await;
    });
    let stream = futures_util::stream::unfold(out_rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_square_multiples_of_16() {
        assert_eq!(parse_size(None, 512).unwrap(), 512);
        assert_eq!(parse_size(Some("256x256"), 512).unwrap(), 256);
        for bad in ["256x128", "100x100", "x", "0x0", "abcxdef", "4096x4096"] {
            let e = parse_size(Some(bad), 512).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(e.param, Some("size"));
        }
    }

    #[test]
    fn data_urls_decode_or_say_why_not() {
        let img = mmada_vq::RgbImage::from_pixel(3, 2, image::Rgb([10, 20, 30]));
        let b64 = worker::png_b64(&img).unwrap();
        let got = decode_data_url(&format!("data:image/png;base64,{b64}")).unwrap();
        assert_eq!(got.dimensions(), (3, 2));
        assert_eq!(got.get_pixel(1, 1).0, [10, 20, 30]);
        for (url, says) in [
            ("https://example.com/a.png", "fetches nothing"),
            ("data:image/png;base64", "`,`"),
            ("data:image/png,abc", "base64 data URLs"),
            ("data:image/png;base64,@@@", "does not decode"),
            ("data:image/png;base64,aGVsbG8=", "not a readable image"),
        ] {
            let e = decode_data_url(url).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert!(e.message.contains(says), "{url}: {}", e.message);
            assert_eq!(e.body()["error"]["code"], "invalid_image");
        }
    }

    #[test]
    fn malformed_and_mistyped_bodies_are_400_with_a_message() {
        let e = parse_body::<ChatRequest>(b"{not json").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
        let e = parse_body::<ChatRequest>(b"[1, 2]").unwrap_err();
        assert!(e.message.contains("JSON object"), "{}", e.message);
        let e = parse_body::<ChatRequest>(br#"{"messages": "hi"}"#).unwrap_err();
        assert!(e.message.contains("invalid request"), "{}", e.message);
        let r: ChatRequest = parse_body(
            br#"{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}],
                 "steps": 8, "cfg": 1.5, "cache": "dual", "threshold": 0.9, "top_p": 1}"#,
        )
        .unwrap();
        assert_eq!(r.sampler.steps, Some(8));
        assert_eq!(r.sampler.cfg_scale, Some(1.5));
        assert_eq!(r.sampler.cache, Some(mmada_sampler::CacheMode::Dual));
        assert_eq!(r.sampler.threshold, Some(0.9));
    }
}
