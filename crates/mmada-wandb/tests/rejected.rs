//! A 4xx other than 429 is not retried; the error is logged once, clearly, without the key; the
//! rows go to the spool.

mod common;

use common::*;
use mmada_wandb::{RunInit, WandbConfig, WandbRun, sync};
use std::io::Write;
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn forbidden_is_not_retried_logged_once_and_spooled() {
    let buf = Buf::default();
    let b2 = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || b2.clone())
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let server = FakeServer::start_with(Faults {
        always_file_stream: Some(403),
        ..Faults::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = WandbConfig {
        run_id: Some("forbid01".into()),
        entity: Some("probe-entity".into()),
        ..fast_config("p")
    };
    let mut run = WandbRun::start(
        &cfg,
        dir.path(),
        RunInit {
            endpoint: Some(endpoint(&server.url())),
            ..RunInit::default()
        },
    )
    .unwrap();
    for i in 0..5 {
        run.log(i, &[("loss", 1.0)]);
    }
    std::thread::sleep(std::time::Duration::from_millis(400));
    for i in 5..10 {
        run.log(i, &[("loss", 1.0)]);
    }
    let report = run.finish(0);
    assert!(!report.delivered);
    let fs = server
        .requests()
        .iter()
        .filter(|r| r.is_file_stream())
        .count();
    assert_eq!(fs, 1, "403 is not retried and nothing more is sent");
    assert_eq!(
        spooled_lines(dir.path(), "forbid01"),
        (0..10).collect::<Vec<u64>>()
    );

    let log = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    eprintln!("{log}");
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "logged once: {errors:?}");
    assert!(errors[0].contains("403") && errors[0].contains("file_stream"));
    assert!(errors[0].contains("wandb-sync"));
    assert!(!log.contains(KEY), "key in the log");
    assert!(!log.contains("Basic "), "auth header in the log");
    assert_key_absent(dir.path());

    // After fixing the cause, sync delivers.
    server.set_faults(Faults::default());
    let rep = sync(dir.path(), &endpoint(&server.url()), &fast_sync()).unwrap();
    assert_eq!(rep.runs[0].rows_sent, 10);
    assert_eq!(server.exitcode("forbid01"), Some(0));
}
