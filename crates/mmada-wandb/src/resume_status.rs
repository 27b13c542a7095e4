//! `RunResumeStatus`: ask the server where an existing run stands, for a training run that resumes
//! without a saved [`WandbResumeState`] (a recipe that newly enables wandb, a lost
//! `trainer_state.json` field). See `shared/docs/wandb-protocol.md` §6 and the `resume_allow`
//! scenario of `shared/fixtures/wandb/sdk_capture.jsonl`.

use serde_json::{Map, Value, json};

use crate::protocol::Rng;
use crate::transport::{Transport, with_retries};
use crate::{Endpoint, WandbConfig, WandbError, WandbResumeState};

/// The query text as wandb-core sends it (`core/api/graphql/query_run_resume_status.graphql`).
pub(crate) const RUN_RESUME_STATUS_QUERY: &str = "
query RunResumeStatus ($project: String, $entity: String, $name: String!) {
	model(name: $project, entityName: $entity) {
		id
		name
		entity {
			id
			name
		}
		bucket(name: $name, missingOk: true) {
			id
			name
			summaryMetrics
			displayName
			logLineCount
			historyLineCount
			eventsLineCount
			historyTail
			eventsTail
			config
			tags
			notes
			wandbConfig(keys: [\"t\"])
		}
	}
}
";

/// Attempts of [`query_resume_status`] on 429/5xx/network errors.
const ATTEMPTS: u32 = 4;

/// Asks the server for the state of run `run_id` in `config.project` / `config.entity`
/// (`RunResumeStatus`) and turns it into the [`WandbResumeState`] a resumed trainer passes to
/// [`crate::WandbRun::start`]. `Ok(None)`: the server knows no such run (start a fresh one).
///
/// Offsets (protocol §6): the storage id is `bucket.id`; console lines continue at
/// `logLineCount`; the summary is `summaryMetrics`. History continues at `historyLineCount`,
/// except when `resume_step` (the trainer step of the checkpoint being resumed) is given and
/// `historyTail` holds rows with `_step > resume_step` (logged after that checkpoint by the
/// interrupted process): then history continues at the first of them, so the re-logged steps
/// overwrite those lines instead of duplicating them. When every tail row is newer than the
/// checkpoint, history continues at the first tail line (rows before the tail cannot be
/// inspected). The runtime continues from the newest kept tail row's `_runtime`, else from the
/// largest of `summaryMetrics._runtime` and `_wandb.runtime`.
///
/// Blocking: at most 4 attempts with exponential backoff (`retry_base_secs`, `retry_max_secs`),
/// each bounded by `request_timeout_secs`.
///
/// # Errors
/// [`WandbError::Rejected`] (4xx, GraphQL errors), [`WandbError::RetriesExhausted`] (server
/// errors, network), [`WandbError::Protocol`] (a reply without `model`), [`WandbError::Client`].
pub fn query_resume_status(
    endpoint: &Endpoint,
    config: &WandbConfig,
    run_id: &str,
    resume_step: Option<u64>,
) -> Result<Option<WandbResumeState>, WandbError> {
    let transport = Transport::new(endpoint, WandbConfig::secs(config.request_timeout_secs))?;
    let vars = json!({
        "project": config.project,
        "entity": config.entity,
        "name": run_id,
    });
    let mut rng = Rng::new();
    let data = with_retries(
        "RunResumeStatus",
        ATTEMPTS,
        WandbConfig::secs(config.retry_base_secs),
        WandbConfig::secs(config.retry_max_secs),
        &mut rng,
        || transport.graphql("RunResumeStatus", RUN_RESUME_STATUS_QUERY, vars.clone()),
    )?;
    parse_resume_status(&data, run_id, &config.project, resume_step)
}

/// A JSON value that the server may send either as a JSON string or already parsed.
fn json_field(v: &Value) -> Option<Value> {
    match v {
        Value::String(s) => serde_json::from_str(s).ok(),
        Value::Null => None,
        other => Some(other.clone()),
    }
}

fn as_u64(v: &Value) -> u64 {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or(0)
}

/// The `data` of a `RunResumeStatus` reply → resume state (see [`query_resume_status`]).
pub(crate) fn parse_resume_status(
    data: &Value,
    run_id: &str,
    project: &str,
    resume_step: Option<u64>,
) -> Result<Option<WandbResumeState>, WandbError> {
    let model = data.get("model").ok_or_else(|| WandbError::Protocol {
        op: "RunResumeStatus".into(),
        message: "reply lacks `model`".into(),
    })?;
    if model.is_null() {
        return Ok(None);
    }
    let bucket = &model["bucket"];
    if bucket.is_null() {
        return Ok(None);
    }
    let storage_id = bucket["id"].as_str().map(str::to_string);
    let history_count = as_u64(&bucket["historyLineCount"]);
    let tail: Vec<Value> = json_field(&bucket["historyTail"])
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|l| match l {
            Value::String(s) => serde_json::from_str(s).ok(),
            Value::Object(_) => Some(l.clone()),
            _ => None,
        })
        .collect();
    let summary: Map<String, Value> = json_field(&bucket["summaryMetrics"])
        .and_then(|v| v.as_object().cloned())
        .unwrap_or_default();
    let tail_len = (tail.len() as u64).min(history_count);
    let tail_start = history_count - tail_len;
    let newer = resume_step.and_then(|k| {
        tail.iter().position(|row| {
            row.get("_step")
                .and_then(Value::as_u64)
                .is_some_and(|s| s > k)
        })
    });
    let history_lines = match newer {
        Some(i) => tail_start + i as u64,
        None => history_count,
    };
    // Runtime: the newest kept tail row, else the summary's.
    let kept = (history_lines - tail_start) as usize;
    let runtime_kept = tail[..kept.min(tail.len())]
        .iter()
        .rev()
        .find_map(|r| r.get("_runtime").and_then(Value::as_f64));
    let runtime_summary = summary
        .get("_runtime")
        .and_then(Value::as_f64)
        .into_iter()
        .chain(
            summary
                .get("_wandb")
                .and_then(|w| w.get("runtime"))
                .and_then(Value::as_f64),
        )
        .fold(0.0f64, f64::max);
    let runtime_secs = match (newer, runtime_kept) {
        (Some(_), Some(r)) => r,
        _ => runtime_summary.max(runtime_kept.unwrap_or(0.0)),
    };
    Ok(Some(WandbResumeState {
        run_id: bucket["name"].as_str().unwrap_or(run_id).to_string(),
        storage_id,
        entity: model
            .pointer("/entity/name")
            .and_then(Value::as_str)
            .map(str::to_string),
        project: model["name"].as_str().unwrap_or(project).to_string(),
        history_lines,
        console_lines: as_u64(&bucket["logLineCount"]),
        runtime_secs,
        summary,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(lines: &[(u64, f64)], count: u64) -> Value {
        let tail: Vec<String> = lines
            .iter()
            .map(|(s, r)| json!({"_step": s, "_runtime": r, "loss": 1.0}).to_string())
            .collect();
        json!({"model": {"name": "p", "entity": {"name": "e"}, "bucket": {
            "id": "sid", "name": "run1", "historyLineCount": count, "logLineCount": 3,
            "historyTail": serde_json::to_string(&tail).unwrap(),
            "summaryMetrics": "{\"_runtime\": 9.5, \"_wandb\": {\"runtime\": 9}, \"loss\": 1.0}"
        }}})
    }

    #[test]
    fn offsets_from_count_tail_and_summary() {
        // The capture's shape (resume_allow): 5 lines, steps 0..4.
        let d = reply(&[(0, 0.1), (1, 0.4), (2, 0.7), (3, 1.0), (4, 1.5)], 5);
        let s = parse_resume_status(&d, "run1", "p", None).unwrap().unwrap();
        assert_eq!(
            (s.history_lines, s.console_lines, s.runtime_secs),
            (5, 3, 9.5)
        );
        assert_eq!(s.storage_id.as_deref(), Some("sid"));
        assert_eq!((s.entity.as_deref(), s.project.as_str()), (Some("e"), "p"));
        assert_eq!(s.summary["loss"], 1.0);
        // Resuming the step-2 checkpoint: rows of steps 3, 4 are overwritten.
        let s = parse_resume_status(&d, "run1", "p", Some(2))
            .unwrap()
            .unwrap();
        assert_eq!((s.history_lines, s.runtime_secs), (3, 0.7));
        // A tail of the last 2 of 12 lines (steps 10, 11): checkpoint 10 → line 11.
        let d = reply(&[(10, 5.0), (11, 6.0)], 12);
        let s = parse_resume_status(&d, "run1", "p", Some(10))
            .unwrap()
            .unwrap();
        assert_eq!(s.history_lines, 11);
        let s = parse_resume_status(&d, "run1", "p", Some(20))
            .unwrap()
            .unwrap();
        assert_eq!(s.history_lines, 12);
    }

    #[test]
    fn unknown_run_is_none_and_missing_model_an_error() {
        let d = json!({"model": {"name": "p", "bucket": null}});
        assert!(parse_resume_status(&d, "r", "p", None).unwrap().is_none());
        assert!(
            parse_resume_status(&json!({"model": null}), "r", "p", None)
                .unwrap()
                .is_none()
        );
        assert!(parse_resume_status(&json!({}), "r", "p", None).is_err());
    }
}
