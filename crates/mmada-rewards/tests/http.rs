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
