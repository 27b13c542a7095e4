//! `mmada-infer serve` on tiny random checkpoints, bound to port 0: the OpenAI shapes of every
//! endpoint, streaming, greedy answers equal to `mmada-infer generate`, the JSON 4xx of each
//! bad request, 429 from a full queue, 50 concurrent requests, and images (t2i, mmu) with the
//! tiny MAGVIT-v2 fixture.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{TOK_LEN, run};
use serde_json::{Value, json};

/// A running server, killed on drop.
struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts `mmada-infer serve --checkpoint CKPT --port 0 --served-model-name tiny ARGS…`
    /// and waits for its `listening on http://ADDR` line.
    fn start(ckpt: &Path, args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mmada-infer"))
            .args(["serve", "--checkpoint", ckpt.to_str().unwrap()])
            .args(["--port", "0", "--served-model-name", "tiny"])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Server { child, url: addr }
    }

    fn client() -> reqwest::blocking::Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(600))
            .build()
            .unwrap()
    }

    /// `POST path` with a JSON body: (status, JSON body).
    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_raw(path, body.to_string().into_bytes(), None)
    }

    fn post_raw(&self, path: &str, body: Vec<u8>, key: Option<&str>) -> (u16, Value) {
        let mut r = Self::client()
            .post(format!("{}{path}", self.url))
            .header("content-type", "application/json")
            .body(body);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        let r = r.send().unwrap();
        let status = r.status().as_u16();
        let text = r.text().unwrap();
        let v = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("status {status}: body is not JSON ({e}): {text}"));
        (status, v)
    }

    fn get(&self, path: &str) -> (u16, String) {
        let r = Self::client()
            .get(format!("{}{path}", self.url))
            .send()
            .unwrap();
        (r.status().as_u16(), r.text().unwrap())
    }

    /// `POST path` with `stream: true`: the `data:` payloads in order.
    fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let r = Self::client()
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let ct = r.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ct.starts_with("text/event-stream"), "{ct}");
        BufReader::new(r)
            .lines()
            .map(Result::unwrap)
            .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
            .collect()
    }
}

/// Sampler settings of the text tests: 32 positions, 2 blocks, 16 steps.
fn settings() -> Value {
    json!({"gen_length": 32, "block_length": 16, "steps": 16})
}

fn chat_body(prompt: &str) -> Value {
    let mut b = json!({"model": "tiny", "messages": [{"role": "user", "content": prompt}]});
    merge(&mut b, &settings());
    b
}

fn merge(a: &mut Value, b: &Value) {
    for (k, v) in b.as_object().unwrap() {
        a[k] = v.clone();
    }
}

fn error_of(status: u16, v: &Value, want_status: u16, want: &str) {
    assert_eq!(status, want_status, "{v}");
    let e = &v["error"];
    assert!(e["message"].is_string(), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(
        e["message"].as_str().unwrap().contains(want) || e["code"] == want,
        "expected `{want}` in {v}"
    );
}

/// Exit status (issue 21): `mmada-infer` keeps the default signal disposition, so SIGTERM
/// ends a running server at once and the shell or scheduler sees "killed by signal 15"
/// (`$?` = 143), never a 0 that would read as finished; an error exits 1.
#[cfg(unix)]
#[test]
fn sigterm_ends_the_server_by_the_signal_and_errors_exit_one() {
    use std::os::unix::process::ExitStatusExt;
    let (_tmp, ckpt) = common::checkpoint(10);
    let mut server = Server::start(&ckpt, &[]);
    let pid = server.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "still running 10 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        (status.code(), status.signal()),
        (None, Some(15)),
        "{status:?}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_mmada-infer"))
        .args([
            "generate",
            "--checkpoint",
            "/nonexistent/model",
            "--prompt",
            "hi",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

#[test]
fn endpoints_answer_in_openai_shapes() {
    let (_tmp, ckpt) = common::checkpoint(11);
    let s = Server::start(&ckpt, &[]);
    let (st, health) = s.get("/health");
    assert_eq!(st, 200);
    let health: Value = serde_json::from_str(&health).unwrap();
    assert_eq!(
        (health["status"].as_str(), health["model"].as_str()),
        (Some("ok"), Some("tiny"))
    );
    assert_eq!(health["images"], false);
    let (st, models) = s.get("/v1/models");
    assert_eq!(st, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "tiny");
    assert_eq!(models["data"][0]["object"], "model");
    let (st, page) = s.get("/");
    assert_eq!(st, 200);
    assert!(page.contains("<html") && page.contains("/v1/chat/completions"));

    let (st, c) = s.post("/v1/chat/completions", &chat_body("Hello!"));
    assert_eq!(st, 200, "{c}");
    assert_eq!(c["object"], "chat.completion");
    assert_eq!(c["model"], "tiny");
    assert!(c["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert!(c["created"].as_u64().unwrap() > 1_600_000_000);
    let ch = &c["choices"][0];
    assert_eq!(ch["index"], 0);
    assert_eq!(ch["message"]["role"], "assistant");
    assert!(ch["message"]["content"].is_string());
    assert!(["stop", "length"].contains(&ch["finish_reason"].as_str().unwrap()));
    let u = &c["usage"];
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );
    assert!(u["completion_tokens"].as_u64().unwrap() <= 32);
    assert_eq!(c["mmada"]["nfe"], 16);

    let mut body = json!({"model": "tiny", "prompt": "2 + 3 ="});
    merge(&mut body, &settings());
    let (st, c) = s.post("/v1/completions", &body);
    assert_eq!(st, 200, "{c}");
    assert_eq!(c["object"], "text_completion");
    assert!(c["choices"][0]["text"].is_string());
    // several prompts: one choice each, decoded as one batch
    body["prompt"] = json!(["a", "bc", "def"]);
    let (st, c) = s.post("/v1/completions", &body);
    assert_eq!(st, 200, "{c}");
    assert_eq!(c["choices"].as_array().unwrap().len(), 3);
    assert_eq!(c["choices"][2]["index"], 2);

    // max_tokens: whole blocks are generated, the answer is cut at max_tokens
    let mut body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
                          "block_length": 4, "logits_eos_inf": true});
    let (st, c) = s.post("/v1/chat/completions", &body);
    assert_eq!(st, 200, "{c}");
    let n = c["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(n <= 5, "{c}");
    if n < 5 {
        // a shorter answer ended on its own
        assert_eq!(c["choices"][0]["finish_reason"], "stop", "{c}");
    }
    assert_eq!(
        c["mmada"]["nfe"], 8,
        "gen_length 8 = 2 blocks of 4, one step per token"
    );
    body["max_tokens"] = json!(0);
    let (st, c) = s.post("/v1/chat/completions", &body);
    error_of(st, &c, 400, "max_tokens");
}

/// The answer of `mmada-infer generate` for the same prompt and settings.
fn generate_cli(ckpt: &Path, prompt: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "generate",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--prompt",
        prompt,
        "--gen-length",
        "32",
        "--block-length",
        "16",
        "--steps",
        "16",
    ];
    args.extend_from_slice(extra);
    let r = run(&args);
    assert!(r.ok, "{}", r.stderr);
    r.stdout.strip_suffix('\n').unwrap_or(&r.stdout).to_string()
}

#[test]
fn greedy_answers_equal_generate_and_streams_concatenate_to_them() {
    let (_tmp, ckpt) = common::checkpoint(12);
    let s = Server::start(&ckpt, &[]);
    let mut nonempty = 0;
    for prompt in ["What is 2 + 3?", "Tell me a story", "x"] {
        let want = generate_cli(&ckpt, prompt, &[]);
        let (st, c) = s.post("/v1/chat/completions", &chat_body(prompt));
        assert_eq!(st, 200, "{c}");
        let got = c["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(got, want, "prompt {prompt:?}");
        nonempty += usize::from(!got.is_empty());

        // streamed: deltas concatenate to the same answer, one canvas chunk per step
        let mut body = chat_body(prompt);
        body["stream"] = json!(true);
        body["mmada_canvas"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let events = s.stream("/v1/chat/completions", &body);
        assert_eq!(events.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        assert!(
            chunks
                .iter()
                .all(|c| c["object"] == "chat.completion.chunk")
        );
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, want, "streamed {prompt:?}");
        let steps: Vec<u64> = chunks
            .iter()
            .filter_map(|c| c["mmada"]["step"].as_u64())
            .collect();
        assert_eq!(steps, (0..16).collect::<Vec<u64>>());
        // every generated position is committed exactly once over the steps
        let committed: usize = chunks
            .iter()
            .filter_map(|c| c["mmada"]["tokens"].as_array())
            .map(Vec::len)
            .sum();
        assert_eq!(committed, 32);
        let finish: Vec<&Value> = chunks
            .iter()
            .filter(|c| !c["choices"][0]["finish_reason"].is_null())
            .collect();
        assert_eq!(finish.len(), 1);
        assert_eq!(
            finish[0]["choices"][0]["finish_reason"],
            c["choices"][0]["finish_reason"]
        );
        let last = chunks.last().unwrap();
        assert_eq!(last["choices"].as_array().unwrap().len(), 0);
        assert_eq!(last["usage"], c["usage"]);
    }
    assert!(
        nonempty > 0,
        "every answer was empty: the comparison says little"
    );

    // raw completions = generate --template none
    let want = generate_cli(&ckpt, "2 + 3 =", &["--template", "none"]);
    let mut body = json!({"prompt": "2 + 3 ="});
    merge(&mut body, &settings());
    let (st, c) = s.post("/v1/completions", &body);
    assert_eq!(st, 200, "{c}");
    assert_eq!(c["choices"][0]["text"], want);
    body["stream"] = json!(true);
    let events = s.stream("/v1/completions", &body);
    let text: String = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, want);

    // the sampler extras reach the sampler: threshold decoding takes fewer steps
    let mut body = chat_body("What is 2 + 3?");
    body["threshold"] = json!(0.0);
    body["cache"] = json!("prefix");
    let (st, c) = s.post("/v1/chat/completions", &body);
    assert_eq!(st, 200, "{c}");
    assert_eq!(
        c["mmada"]["nfe"], 2,
        "threshold 0 commits a whole block per step: {c}"
    );
}

#[test]
fn bad_requests_get_openai_json_errors() {
    let (_tmp, ckpt) = common::checkpoint(13);
    let s = Server::start(&ckpt, &["--api-key", "sekrit"]);
    let key = Some("sekrit");
    let post = |path: &str, body: Value| s.post_raw(path, body.to_string().into_bytes(), key);
    // authentication
    let (st, v) = s.post_raw(
        "/v1/chat/completions",
        chat_body("hi").to_string().into(),
        None,
    );
    error_of(st, &v, 401, "invalid_api_key");
    let (st, v) = s.post_raw(
        "/v1/chat/completions",
        chat_body("hi").to_string().into(),
        Some("wrong"),
    );
    error_of(st, &v, 401, "incorrect API key");
    // the key works; /health and the page need none
    let (st, v) = post("/v1/chat/completions", chat_body("hi"));
    assert_eq!(st, 200, "{v}");
    assert_eq!(s.get("/health").0, 200);
    assert_eq!(s.get("/").0, 200);
    // malformed JSON, a wrong shape
    let (st, v) = s.post_raw("/v1/chat/completions", b"{\"messages\": [".to_vec(), key);
    error_of(st, &v, 400, "not valid JSON");
    let (st, v) = post("/v1/chat/completions", json!({"messages": "hello"}));
    error_of(st, &v, 400, "invalid request");
    let (st, v) = post("/v1/chat/completions", json!({"messages": []}));
    error_of(st, &v, 400, "must not be empty");
    let (st, v) = post(
        "/v1/chat/completions",
        json!({"messages": [{"role": "wizard", "content": "hi"}]}),
    );
    error_of(st, &v, 400, "wizard");
    // unknown model
    let mut b = chat_body("hi");
    b["model"] = json!("gpt-9");
    let (st, v) = post("/v1/chat/completions", b);
    error_of(st, &v, 404, "model_not_found");
    let (st, v) = post("/v1/completions", json!({"model": "gpt-9", "prompt": "a"}));
    error_of(st, &v, 404, "model_not_found");
    // over-long prompt (max_sequence_length 1024)
    let (st, v) = post("/v1/chat/completions", chat_body(&"a".repeat(1100)));
    error_of(st, &v, 400, "context_length_exceeded");
    let mut b = json!({"prompt": "a".repeat(1000)});
    merge(&mut b, &settings());
    let (st, v) = post("/v1/completions", b);
    error_of(st, &v, 400, "context_length_exceeded");
    // undecodable image (and the image features are off without --vq-checkpoint)
    let img = |url: &str| {
        json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": url}}]}]})
    };
    let (st, v) = post("/v1/chat/completions", img("data:image/png;base64,!!!"));
    error_of(st, &v, 400, "invalid_image");
    let (st, v) = post(
        "/v1/chat/completions",
        img("data:image/png;base64,aGVsbG8="),
    );
    error_of(st, &v, 400, "not a readable image");
    let (st, v) = post("/v1/chat/completions", img("https://example.com/cat.png"));
    error_of(st, &v, 400, "fetches nothing");
    let png = {
        let mut buf = std::io::Cursor::new(Vec::new());
        image::RgbImage::from_pixel(8, 8, image::Rgb([1, 2, 3]))
            .write_to(&mut buf, image::ImageFormat::Png)
            .unwrap();
        base64::engine::general_purpose::STANDARD.encode(buf.into_inner())
    };
    let (st, v) = post(
        "/v1/chat/completions",
        img(&format!("data:image/png;base64,{png}")),
    );
    error_of(st, &v, 400, "--vq-checkpoint");
    let (st, v) = post("/v1/images/generations", json!({"prompt": "a cat"}));
    error_of(st, &v, 400, "--vq-checkpoint");
    // invalid sampler settings
    let mut b = chat_body("hi");
    b["steps"] = json!(3);
    let (st, v) = post("/v1/chat/completions", b);
    error_of(st, &v, 400, "steps");
    let mut b = chat_body("hi");
    b["cache"] = json!("sometimes");
    let (st, v) = post("/v1/chat/completions", b);
    error_of(st, &v, 400, "sometimes");
    let mut b = chat_body("hi");
    b["n"] = json!(12);
    let (st, v) = post("/v1/chat/completions", b);
    error_of(st, &v, 400, "n must be in 1..=8");
    // unknown route, wrong method
    let (st, v) = post("/v1/embeddings", json!({}));
    error_of(st, &v, 404, "no such route");
    let r = Server::client()
        .get(format!("{}/v1/chat/completions", s.url))
        .bearer_auth("sekrit")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    let v: Value = r.json().unwrap();
    assert!(v["error"]["message"].is_string());
    // the server is still fine
    let (st, v) = post("/v1/chat/completions", chat_body("still there?"));
    assert_eq!(st, 200, "{v}");
}

#[test]
fn a_full_queue_answers_429() {
    let (_tmp, ckpt) = common::checkpoint(14);
    let s = Server::start(&ckpt, &["--max-queue", "1", "--max-batch", "1"]);
    let body = json!({"messages": [{"role": "user", "content": "slow"}],
                      "gen_length": 256, "block_length": 256, "steps": 256});
    let statuses: Vec<(u16, Value)> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..6)
            .map(|_| sc.spawn(|| s.post("/v1/chat/completions", &body)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = statuses.iter().filter(|(st, _)| *st == 200).count();
    let busy: Vec<&Value> = statuses
        .iter()
        .filter(|(st, _)| *st == 429)
        .map(|(_, v)| v)
        .collect();
    assert_eq!(ok + busy.len(), 6, "{statuses:?}");
    assert!(ok >= 1 && !busy.is_empty(), "{statuses:?}");
    assert_eq!(busy[0]["error"]["code"], "rate_limit_exceeded");
}

/// A streaming client that goes away mid-generation stops the decoding (`/health` counts it)
/// and the server goes on serving; `n` gives that many choices (seed + i each), and `n` out
/// of range or with `stream` is a 400.
#[test]
fn disconnects_cancel_and_n_gives_choices() {
    let (_tmp, ckpt) = common::checkpoint(16);
    let s = Server::start(&ckpt, &["--max-batch", "1"]);
    let health = || -> Value { serde_json::from_str(&s.get("/health").1).unwrap() };
    assert_eq!(health()["cancelled"], 0);
    // 960 one-token steps: seconds of work; the client reads one chunk and hangs up
    let body = json!({"messages": [{"role": "user", "content": "long"}], "stream": true,
                      "mmada_canvas": true,
                      "gen_length": 960, "block_length": 960, "steps": 960});
    {
        let r = Server::client()
            .post(format!("{}/v1/chat/completions", s.url))
            .json(&body)
            .send()
            .unwrap();
        let mut lines = BufReader::new(r).lines();
        let first = lines.next().unwrap().unwrap();
        assert!(first.starts_with("data: "), "{first}");
    }
    let t0 = std::time::Instant::now();
    while health()["cancelled"] == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the generation was not cancelled"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(health()["cancelled"], 1);

    // n choices: sampled ones differ by seed, greedy ones are equal
    let mut b = chat_body("Hi");
    merge(&mut b, &json!({"n": 3, "temperature": 1.0, "seed": 5}));
    let (st, v) = s.post("/v1/chat/completions", &b);
    assert_eq!(st, 200, "{v}");
    let texts: Vec<&str> = v["choices"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, c)| {
            assert_eq!(c["index"], i);
            c["message"]["content"].as_str().unwrap()
        })
        .collect();
    assert_eq!(texts.len(), 3);
    // choice 1 is the single answer of seed 6
    let mut one = chat_body("Hi");
    merge(&mut one, &json!({"temperature": 1.0, "seed": 6}));
    let (_, single) = s.post("/v1/chat/completions", &one);
    assert_eq!(single["choices"][0]["message"]["content"], texts[1]);
    let mut g = chat_body("Hi");
    merge(&mut g, &json!({"n": 2}));
    let (_, v) = s.post("/v1/chat/completions", &g);
    assert_eq!(
        v["choices"][0]["message"]["content"],
        v["choices"][1]["message"]["content"]
    );
    for (extra, want) in [
        (json!({"n": 9}), "n must be in 1..=8"),
        (json!({"n": 0}), "n must be in 1..=8"),
        (json!({"n": 2, "stream": true}), "stream: true takes n = 1"),
    ] {
        let mut b = chat_body("Hi");
        merge(&mut b, &extra);
        let (st, v) = s.post("/v1/chat/completions", &b);
        error_of(st, &v, 400, want);
    }
}

#[test]
fn fifty_concurrent_requests_complete() {
    let (_tmp, ckpt) = common::checkpoint(15);
    let s = Server::start(&ckpt, &[]);
    let t0 = Instant::now();
    let mut lat: Vec<(f64, u16, Value)> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..50)
            .map(|i| {
                let s = &s;
                sc.spawn(move || {
                    let t = Instant::now();
                    let (st, v) = if i % 5 == 4 {
                        let mut b = json!({"prompt": format!("request {i}"), "stream": false});
                        merge(&mut b, &settings());
                        s.post("/v1/completions", &b)
                    } else {
                        s.post("/v1/chat/completions", &chat_body(&format!("request {i}")))
                    };
                    (t.elapsed().as_secs_f64(), st, v)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let wall = t0.elapsed().as_secs_f64();
    for (_, st, v) in &lat {
        assert_eq!(*st, 200, "{v}");
        assert!(v["choices"][0].is_object(), "{v}");
    }
    let batched = lat
        .iter()
        .filter(|(_, _, v)| {
            v["mmada"]["batch"]
                .as_u64()
                .or(v["mmada"][0]["batch"].as_u64())
                > Some(1)
        })
        .count();
    assert!(batched > 0, "no request shared a batch");
    lat.sort_by(|a, b| a.0.total_cmp(&b.0));
    let p = |q: f64| lat[((lat.len() as f64 * q).ceil() as usize).clamp(1, lat.len()) - 1].0;
    eprintln!(
        "50 concurrent requests: wall {wall:.2} s, p50 {:.3} s, p99 {:.3} s, {batched} batched",
        p(0.50),
        p(0.99)
    );
}

fn vq_dir() -> PathBuf {
    match std::env::var_os("MMADA_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"),
    }
    .join("magvitv2/weights")
}

/// A tiny checkpoint whose head holds the MAGVIT-v2 codebook (ids `TOK_LEN..TOK_LEN+8192`).
fn mmada_checkpoint(dir: &Path, seed: u64) {
    let mut cfg = common::tiny_config();
    cfg.vocab_size = TOK_LEN + 8192;
    cfg.embedding_size = TOK_LEN + 8192;
    cfg.codebook_size = Some(8192);
    let model = mmada_model::init::init_model::<mmada_model::backend::Cpu>(
        &cfg,
        seed,
        &Default::default(),
        mmada_model::FloatDType::F32,
    );
    mmada_model::save_checkpoint(
        &model,
        &cfg,
        dir,
        &mmada_model::SaveOptions {
            dtype: mmada_model::DiskDtype::F32,
            ..Default::default()
        },
    )
    .unwrap();
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_string(&common::tokenizer_json(0, false)).unwrap(),
    )
    .unwrap();
}

#[test]
fn images_generate_and_are_understood() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("model");
    mmada_checkpoint(&ckpt, 16);
    let vq = vq_dir();
    let vqs = vq.to_str().unwrap();
    let s = Server::start(
        &ckpt,
        &[
            "--vq-checkpoint",
            vqs,
            "--resolution",
            "32",
            "--t2i-text-len",
            "16",
            "--template",
            "mmada",
        ],
    );
    let data = t2i_equals_generate(&s, tmp.path(), &ckpt, vqs);
    t2i_streams_steps_then_the_image(&s, &data);
    bad_image_requests_are_400(&s);
    mmu_equals_generate(&s, tmp.path(), &ckpt, vqs);
}

/// Text-to-image: b64 PNGs of the requested size, equal to `generate --mode t2i`; returns
/// the response's `data` entries.
fn t2i_equals_generate(s: &Server, tmp: &Path, ckpt: &Path, vqs: &str) -> Vec<Value> {
    let (st, v) = s.post(
        "/v1/images/generations",
        &json!({"model": "tiny", "prompt": "a red square", "n": 2, "size": "32x32",
                "timesteps": 4, "seed": 3}),
    );
    assert_eq!(st, 200, "{v}");
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    let pngs: Vec<image::RgbImage> = data
        .iter()
        .map(|d| {
            let b = base64::engine::general_purpose::STANDARD
                .decode(d["b64_json"].as_str().unwrap())
                .unwrap();
            image::load_from_memory(&b).unwrap().to_rgb8()
        })
        .collect();
    assert_eq!(pngs[0].dimensions(), (32, 32));
    let out = tmp.join("t2i");
    let r = run(&[
        "generate",
        "--mode",
        "t2i",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--vq-checkpoint",
        vqs,
        "--resolution",
        "32",
        "--t2i-text-len",
        "16",
        "--timesteps",
        "4",
        "--seed",
        "3",
        "--prompt",
        "a red square",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(r.ok, "{}", r.stderr);
    let cli = image::open(out.join("0000.png")).unwrap().to_rgb8();
    assert_eq!(cli, pngs[0], "the server's image = generate --mode t2i");
    data.clone()
}

/// Streamed: one event per MaskGIT step with more committed slots each time, then the image
/// (the one of the unstreamed request, `data`).
fn t2i_streams_steps_then_the_image(s: &Server, data: &[Value]) {
    let events = s.stream(
        "/v1/images/generations",
        &json!({"prompt": "a red square", "size": "32x32", "timesteps": 4, "seed": 3,
                "stream": true, "preview_every": 2}),
    );
    assert_eq!(events.last().unwrap(), "[DONE]");
    let ev: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let steps: Vec<&Value> = ev.iter().filter(|e| e["type"] == "step").collect();
    assert_eq!(steps.len(), 4);
    assert_eq!(steps[0]["grid"], json!([2, 2]));
    let known = |e: &Value| {
        e["committed"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c.as_i64() != Some(-1))
            .count()
    };
    assert!(known(steps[0]) <= known(steps[3]));
    assert!(steps[0]["preview"].is_string() && steps[1]["preview"].is_null());
    let img = ev.iter().find(|e| e["type"] == "image").unwrap();
    assert_eq!(img["b64_json"], data[0]["b64_json"]);
    assert_eq!(ev.last().unwrap()["type"], "done");
}

fn bad_image_requests_are_400(s: &Server) {
    let (st, v) = s.post(
        "/v1/images/generations",
        &json!({"prompt": "x", "size": "30x30"}),
    );
    error_of(st, &v, 400, "size");
    let (st, v) = s.post(
        "/v1/images/generations",
        &json!({"prompt": "x", "response_format": "url"}),
    );
    error_of(st, &v, 400, "b64_json");
    let (st, v) = s.post("/v1/images/generations", &json!({"prompt": "a".repeat(40)}));
    error_of(st, &v, 400, "context_length_exceeded");
}

/// Image understanding: a data-URL image part = `generate --mode mmu --image`; the image block
/// counts in the prompt tokens.
fn mmu_equals_generate(s: &Server, tmp: &Path, ckpt: &Path, vqs: &str) {
    let png_path = tmp.join("a.png");
    image::RgbImage::from_fn(48, 40, |x, y| {
        image::Rgb([
            (x * 5 % 256) as u8,
            (y * 6 % 256) as u8,
            (x * y % 256) as u8,
        ])
    })
    .save(&png_path)
    .unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&png_path).unwrap());
    let mut body = json!({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{b64}")}},
        {"type": "text", "text": "What is this?"}]}]});
    merge(&mut body, &settings());
    let (st, v) = s.post("/v1/chat/completions", &body);
    assert_eq!(st, 200, "{v}");
    let want = {
        let r = run(&[
            "generate",
            "--mode",
            "mmu",
            "--image",
            png_path.to_str().unwrap(),
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--vq-checkpoint",
            vqs,
            "--resolution",
            "32",
            "--template",
            "mmada",
            "--prompt",
            "What is this?",
            "--gen-length",
            "32",
            "--block-length",
            "16",
            "--steps",
            "16",
        ]);
        assert!(r.ok, "{}", r.stderr);
        r.stdout.strip_suffix('\n').unwrap().to_string()
    };
    assert_eq!(v["choices"][0]["message"]["content"], want.as_str());
    // the image block counts in the prompt: 4 codes + 3 markers
    let (st, plain) = s.post("/v1/chat/completions", &{
        let mut b = json!({"messages": [{"role": "user", "content": "What is this?"}]});
        merge(&mut b, &settings());
        b
    });
    assert_eq!(st, 200);
    assert_eq!(
        v["usage"]["prompt_tokens"].as_u64().unwrap(),
        plain["usage"]["prompt_tokens"].as_u64().unwrap() + 2 + 4 + 1,
        "{v} {plain}"
    );
}
