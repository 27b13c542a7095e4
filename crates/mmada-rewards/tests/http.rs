//! HTTP reward against a loopback server: batching, retries on 5xx, `null` entries, errors.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use mmada_rewards::{RewardError, RewardInput, RewardRegistry, RewardSpec};

/// Serves `replies` in order (status, body), one per connection; returns the URL and the
/// received request bodies count.
fn serve(replies: Vec<(u16, String)>) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/score", listener.local_addr().unwrap());
    let seen = Arc::new(AtomicUsize::new(0));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for (status, body) in replies {
            let Ok((stream, _)) = listener.accept() else {
                return;
            };
            let mut reader = BufReader::new(stream);
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line == "\r\n" || line.is_empty() {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
            }
            let mut req = vec![0u8; len];
            reader.read_exact(&mut req).unwrap();
            let v: serde_json::Value = serde_json::from_slice(&req).unwrap();
            assert!(v["items"].is_array());
            seen2.fetch_add(1, Ordering::SeqCst);
            let mut stream = reader.into_inner();
            write!(
                stream,
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
        }
    });
    (url, seen)
}

fn spec(url: &str) -> RewardSpec {
    let mut s = RewardSpec::new("http");
    s.name = Some("clip".into());
    s.weight = Some(0.1);
    s.params.insert("url".into(), url.into());
    s.params.insert("backoff_ms".into(), 10.into());
    s.params.insert("timeout_s".into(), 5.0.into());
    s
}

fn batch(n: usize) -> Vec<RewardInput> {
    (0..n)
        .map(|i| RewardInput {
            completion: format!("c{i}"),
            ..Default::default()
        })
        .collect()
}

#[test]
fn retries_then_scores_with_nulls() {
    let (url, seen) = serve(vec![
        (503, "{}".into()),
        (200, r#"{"rewards": [0.5, null, 2.0]}"#.into()),
    ]);
    let set = RewardRegistry::with_builtins()
        .build("reward_funcs", &[spec(&url)])
        .unwrap();
    let b = set.score(&batch(3)).unwrap();
    assert_eq!(b.per_reward[0], vec![Some(0.5), None, Some(2.0)]);
    assert_eq!(b.total, vec![0.05, 0.0, 0.2]);
    assert_eq!(seen.load(Ordering::SeqCst), 2);
}

#[test]
fn wrong_length_reply_fails_without_retry() {
    let (url, seen) = serve(vec![(200, r#"{"rewards": [1.0]}"#.into())]);
    let set = RewardRegistry::with_builtins()
        .build("reward_funcs", &[spec(&url)])
        .unwrap();
    let e = set.score(&batch(2)).unwrap_err();
    assert!(
        matches!(&e, RewardError::Http { attempts: 1, message, .. } if message.contains("1 rewards for 2 items")),
        "{e}"
    );
    assert_eq!(seen.load(Ordering::SeqCst), 1);
}

#[test]
fn unreachable_server_gives_up_after_retries() {
    // Bind then drop: the port refuses connections.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let set = RewardRegistry::with_builtins()
        .build(
            "reward_funcs",
            &[spec(&format!("http://127.0.0.1:{port}/x"))],
        )
        .unwrap();
    let e = set.score(&batch(1)).unwrap_err();
    assert!(matches!(e, RewardError::Http { attempts: 3, .. }), "{e}");
    let mut bad = spec("ftp://x");
    bad.params.remove("backoff_ms");
    let e = RewardRegistry::with_builtins()
        .build("reward_funcs", &[bad])
        .unwrap_err()
        .to_string();
    assert!(e.contains("reward_funcs[0].params.url"), "{e}");
}

/// Images reach the server as base64 PNG with their prompts: a one-connection server decodes
/// each item's `image.png_base64` (as `scripts/reward_server.py` does with PIL) and replies
/// with the mean red channel / 255 — the reward the trainer gets back equals that of the
/// pixels it sent; an item without an image arrives without the key and scores `null`.
#[test]
fn images_are_sent_as_base64_png_with_their_prompts() {
    use base64::Engine as _;
    use mmada_rewards::RewardImage;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/clip", listener.local_addr().unwrap());
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream);
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
        }
        let mut req = vec![0u8; len];
        reader.read_exact(&mut req).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&req).unwrap();
        let mut prompts = vec![];
        let rewards: Vec<serde_json::Value> = v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|it| {
                prompts.push(it["prompt"].as_str().unwrap().to_string());
                let Some(img) = it.get("image") else {
                    return serde_json::Value::Null;
                };
                let png = base64::engine::general_purpose::STANDARD
                    .decode(img["png_base64"].as_str().unwrap())
                    .unwrap();
                let rgb = image::load_from_memory(&png).unwrap().to_rgb8();
                assert_eq!(
                    (rgb.width() as u64, rgb.height() as u64),
                    (
                        img["width"].as_u64().unwrap(),
                        img["height"].as_u64().unwrap()
                    )
                );
                let red: f64 = rgb.pixels().map(|p| f64::from(p[0])).sum::<f64>()
                    / f64::from(rgb.width() * rgb.height());
                serde_json::json!(red / 255.0)
            })
            .collect();
        let body = serde_json::json!({ "rewards": rewards }).to_string();
        let mut stream = reader.into_inner();
        write!(
            stream,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        prompts
    });
    let set = RewardRegistry::with_builtins()
        .build("reward_funcs", &[spec(&url)])
        .unwrap();
    // a 3×2 image: red 255 on the left column, 0 elsewhere → mean red 85
    let mut rgb = vec![];
    for _y in 0..2 {
        for x in 0..3 {
            rgb.extend([if x == 0 { 255 } else { 0 }, 40, 90]);
        }
    }
    let items = vec![
        RewardInput {
            prompt: "a red bar".into(),
            image: Some(RewardImage::new(3, 2, rgb).unwrap()),
            ..Default::default()
        },
        RewardInput {
            prompt: "no picture".into(),
            ..Default::default()
        },
    ];
    let b = set.score(&items).unwrap();
    assert_eq!(b.per_reward[0][1], None);
    assert!((b.per_reward[0][0].unwrap() - 85.0 / 255.0).abs() < 1e-6);
    assert_eq!(server.join().unwrap(), vec!["a red bar", "no picture"]);
}
