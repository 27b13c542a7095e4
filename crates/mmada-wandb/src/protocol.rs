//! Request shapes of the wandb protocol (see `shared/docs/wandb-protocol.md`).

use serde_json::{Map, Value, json};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `Viewer`: who owns the key, and the default entity.
pub(crate) const VIEWER_QUERY: &str =
    "query Viewer { viewer { id entity username email flags teams { edges { node { name } } } } }";

/// `UpsertBucket`: create or update a run (text as the SDK sends it).
pub(crate) const UPSERT_BUCKET_QUERY: &str = "
mutation UpsertBucket ($id: String, $name: String, $project: String, $entity: String, $groupName: String, $description: String, $displayName: String, $notes: String, $commit: String, $config: JSONString, $host: String, $debug: Boolean, $program: String, $repo: String, $jobType: String, $state: String, $sweep: String, $tags: [String!], $summaryMetrics: JSONString) {
	upsertBucket(input: {id:$id,name:$name,groupName:$groupName,modelName:$project,entityName:$entity,description:$description,displayName:$displayName,notes:$notes,config:$config,commit:$commit,host:$host,debug:$debug,jobProgram:$program,jobRepo:$repo,jobType:$jobType,state:$state,sweep:$sweep,tags:$tags,summaryMetrics:$summaryMetrics}) {
		bucket {
			id
			name
			displayName
			description
			config
			sweepName
			project {
				id
				name
				entity {
					id
					name
				}
			}
			historyLineCount
		}
		inserted
	}
}
";

/// File names inside the file_stream body.
pub(crate) const HISTORY_FILE: &str = "wandb-history.jsonl";
/// The summary file (always offset 0, one line).
pub(crate) const SUMMARY_FILE: &str = "wandb-summary.json";
/// Console lines.
pub(crate) const OUTPUT_FILE: &str = "output.log";

/// Encodes a run config the way the SDK does: a JSON **string** of `{"key": {"value": v}}` for
/// each top-level key (nested objects stay nested inside `value`), plus the reserved
/// `_wandb: {"value": {"t": {}}}` entry that lets the Python SDK treat the run as resumable.
/// A non-object config is stored under the key `config`.
pub fn encode_config(config: &Value) -> String {
    let mut out = Map::new();
    match config {
        Value::Object(m) => {
            for (k, v) in m {
                if k == "_wandb" {
                    continue;
                }
                out.insert(k.clone(), json!({ "value": v }));
            }
        }
        Value::Null => {}
        other => {
            out.insert("config".into(), json!({ "value": other }));
        }
    }
    out.insert(
        "_wandb".into(),
        json!({ "value": { "t": {}, "m": [], "cli_version": concat!("mmada-wandb ", env!("CARGO_PKG_VERSION")) } }),
    );
    Value::Object(out).to_string()
}

/// Run metadata needed to create or resume the run on the server.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct RunMeta {
    pub run_id: String,
    pub project: String,
    pub entity: Option<String>,
    pub display_name: Option<String>,
    pub tags: Vec<String>,
    pub notes: Option<String>,
    pub group: Option<String>,
    pub job_type: Option<String>,
    /// The resolved recipe (plain JSON; encoded with [`encode_config`] when sent).
    pub config: Value,
    /// `bucket.id` from an earlier UpsertBucket reply, sent as `id` when resuming.
    pub storage_id: Option<String>,
}

impl RunMeta {
    /// The `variables` of the first UpsertBucket of a run (create or resume).
    pub(crate) fn upsert_variables(&self) -> Value {
        json!({
            "id": self.storage_id,
            "name": self.run_id,
            "project": self.project,
            "entity": self.entity,
            "groupName": self.group,
            "description": null,
            "displayName": self.display_name,
            "notes": self.notes,
            "commit": null,
            "config": encode_config(&self.config),
            "host": hostname(),
            "debug": null,
            "program": std::env::args().next(),
            "repo": null,
            "jobType": self.job_type,
            "state": null,
            "sweep": null,
            "tags": if self.tags.is_empty() && self.storage_id.is_none() { Value::Null } else { json!(self.tags) },
            "summaryMetrics": null,
        })
    }
}

/// What the client keeps from an UpsertBucket reply.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Bucket {
    pub storage_id: String,
    pub entity: String,
    pub project: String,
}

pub(crate) fn parse_bucket(data: &Value) -> Option<Bucket> {
    let b = data.pointer("/upsertBucket/bucket")?;
    Some(Bucket {
        storage_id: b.get("id")?.as_str()?.to_string(),
        project: b.pointer("/project/name")?.as_str()?.to_string(),
        entity: b.pointer("/project/entity/name")?.as_str()?.to_string(),
    })
}

/// The host name, for UpsertBucket's `host` (best effort, no libc).
pub(crate) fn hostname() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        })
}

/// Seconds since the Unix epoch, as a float (`_timestamp`).
pub(crate) fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64()
}

/// A small xorshift PRNG seeded from the std hasher's random keys, the time and the process id
/// (for run ids and retry jitter; not for anything secret).
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or(Duration::ZERO)
                .as_nanos(),
        );
        h.write_u32(std::process::id());
        Rng(h.finish() | 1)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in [0, 1).
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A new run id as the SDK makes them: 8 characters of `[a-z0-9]`.
pub fn generate_run_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = Rng::new();
    (0..8)
        .map(|_| ALPHABET[(rng.next_u64() % ALPHABET.len() as u64) as usize] as char)
        .collect()
}

/// Exponential backoff with jitter: `base · 2^(attempt-1) · (1 + U[0, 0.25))`, capped at `max`.
pub(crate) fn backoff(attempt: u32, base: Duration, max: Duration, rng: &mut Rng) -> Duration {
    let exp = base.as_secs_f64() * 2f64.powi(attempt.saturating_sub(1).min(30) as i32);
    let with_jitter = exp.min(max.as_secs_f64()) * (1.0 + 0.25 * rng.next_f64());
    Duration::from_secs_f64(with_jitter.min(max.as_secs_f64() * 1.25))
}

/// Parses a `Retry-After` header: delay seconds, or an IMF-fixdate
/// (`Sun, 06 Nov 1994 08:49:37 GMT`). Capped at 10 minutes.
pub(crate) fn parse_retry_after(v: &str, now_unix: f64) -> Option<Duration> {
    let v = v.trim();
    let cap = 600.0;
    if let Ok(s) = v.parse::<f64>() {
        return (s.is_finite() && s >= 0.0).then(|| Duration::from_secs_f64(s.min(cap)));
    }
    let t = parse_http_date(v)?;
    Some(Duration::from_secs_f64((t - now_unix).clamp(0.0, cap)))
}

fn parse_http_date(v: &str) -> Option<f64> {
    // "Sun, 06 Nov 1994 08:49:37 GMT"
    let parts: Vec<&str> = v.split_whitespace().collect();
    if parts.len() != 6 || parts[5] != "GMT" {
        return None;
    }
    let day: i64 = parts[1].parse().ok()?;
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| *m == parts[2])? as i64
        + 1;
    let year: i64 = parts[3].parse().ok()?;
    let hms: Vec<i64> = parts[4]
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    // plausible ranges only: a hostile header must not overflow the arithmetic below (found
    // by the property tests)
    if hms.len() != 3
        || !(1..=9999).contains(&year)
        || !(1..=31).contains(&day)
        || !(0..=23).contains(&hms[0])
        || !(0..=59).contains(&hms[1])
        || !(0..=60).contains(&hms[2])
    {
        return None;
    }
    let days = days_from_civil(year, month, day);
    Some((days * 86400 + hms[0] * 3600 + hms[1] * 60 + hms[2]) as f64)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// `output.log` line prefix: UTC `%Y-%m-%dT%H:%M:%S.%f`.
pub(crate) fn console_timestamp(unix: f64) -> String {
    let secs = unix.floor() as i64;
    let micros = ((unix - secs as f64) * 1e6).round().min(999_999.0) as i64;
    let (y, m, d) = civil_from_days(secs.div_euclid(86400));
    let sod = secs.rem_euclid(86400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60
    )
}

/// Converts a metric value to JSON; non-finite floats become `null` (JSON has no NaN).
pub(crate) fn metric_value(v: f64) -> Value {
    serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_encoding_wraps_values_in_a_string() {
        let c = json!({"lr": 3e-4, "model": {"d_model": 512, "layers": 6}, "note": null});
        let s = encode_config(&c);
        let v: Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["lr"], json!({"value": 3e-4}));
        assert_eq!(v["model"], json!({"value": {"d_model": 512, "layers": 6}}));
        assert_eq!(v["note"], json!({"value": null}));
        assert!(v["_wandb"]["value"]["t"].is_object());
    }

    #[test]
    fn backoff_doubles_with_bounded_jitter() {
        let mut rng = Rng::new();
        let base = Duration::from_secs(2);
        let max = Duration::from_secs(60);
        for a in 1..=8u32 {
            let d = backoff(a, base, max, &mut rng).as_secs_f64();
            let expect = (2.0 * 2f64.powi(a as i32 - 1)).min(60.0);
            assert!(d >= expect && d < expect * 1.25 + 1e-9, "attempt {a}: {d}");
        }
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        assert_eq!(parse_retry_after("3", 0.0), Some(Duration::from_secs(3)));
        let t = parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(t, 784111777.0);
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:47 GMT", 784111777.0),
            Some(Duration::from_secs(10))
        );
        assert_eq!(parse_retry_after("soon", 0.0), None);
    }

    #[test]
    fn console_time_format() {
        assert_eq!(
            console_timestamp(784111777.25),
            "1994-11-06T08:49:37.250000"
        );
    }

    #[test]
    fn run_ids() {
        let a = generate_run_id();
        assert_eq!(a.len(), 8);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        );
    }
}

#[cfg(test)]
mod props {
    //! Server replies: `Retry-After` headers and GraphQL bucket replies of any shape never
    //! panic (`PROPTEST_CASES=10000` for the long run).
    use super::*;
    use proptest::prelude::*;

    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            "[a-z]{0,5}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("upsertBucket".to_string()),
                        Just("bucket".to_string()),
                        Just("id".to_string()),
                        Just("project".to_string()),
                        Just("name".to_string()),
                        Just("entity".to_string()),
                        "[a-z]{1,3}",
                    ],
                    inner,
                    0..4
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(512)
        ))]

        #[test]
        fn retry_after_never_panics(
            v in any::<String>(),
            d in "(Mon|Sun), [0-9-]{1,20} (Nov|Jan|Xyz) [0-9-]{1,20} [0-9:-]{1,20} GMT",
            now in prop_oneof![0f64..4e9, Just(f64::MAX)],
        ) {
            for h in [v.as_str(), d.as_str()] {
                if let Some(t) = parse_retry_after(h, now) {
                    prop_assert!(t <= Duration::from_secs(600));
                }
            }
        }

        #[test]
        fn bucket_reply_never_panics(v in json()) {
            if let Some(b) = parse_bucket(&v) {
                prop_assert_eq!(Some(b.storage_id.as_str()), v.pointer("/upsertBucket/bucket/id").and_then(Value::as_str));
            }
        }
    }
}
