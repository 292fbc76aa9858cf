//! `GET /metrics`: the Prometheus exposition of every metric agentbus records, through the
//! `metrics` facade and `metrics-exporter-prometheus`.
//!
//! Each module records its own metrics with the facade's macros (`metrics::counter!` …),
//! so none of them depends on `ops`; this module installs the recorder once per process
//! and renders it, adding the gauges read at scrape time from the journal. The names:
//!
//! | metric | type | labels | recorded by |
//! |---|---|---|---|
//! | `agentbus_transactions_total` | counter | `outcome` = accepted, duplicate, refused | appservice |
//! | `agentbus_events_received_total` | counter | | appservice |
//! | `agentbus_journal_pending` | gauge | | here, at scrape |
//! | `agentbus_journal_oldest_pending_age_seconds` | gauge | | here, at scrape |
//! | `agentbus_events_journaled_total`, `agentbus_events_finished_total` | counter | | here, at scrape |
//! | `agentbus_routing_decisions_total` | counter | `strategy` | inbox |
//! | `agentbus_llm_requests_total` | counter | `provider`, `model` | llm |
//! | `agentbus_llm_errors_total` | counter | `provider`, `model`, `kind` | llm |
//! | `agentbus_llm_request_duration_seconds` | histogram | `provider`, `model` | llm |
//! | `agentbus_llm_tokens_total` | counter | `provider`, `model`, `direction` = input, output | llm |
//! | `agentbus_answer_duration_seconds` | histogram | `agent` | agents |
//! | `agentbus_answer_overhead_seconds` | histogram | `agent` | agents: the run's time minus its model time |
//! | `agentbus_active_sessions` | gauge | | here, at scrape: session lanes holding work |
//! | `agentbus_answers_queued` | gauge | | here, at scrape: jobs waiting for their lane |
//! | `agentbus_matrix_requests_total` | counter | `kind` = the endpoint, e.g. `send_message_event` | matrix |
//! | `agentbus_matrix_request_errors_total` | counter | `kind`, `error` = errcode, status or `network` | matrix |
//! | `agentbus_team_tasks_total` | counter | `mode`, `outcome` | collab |
//! | `agentbus_monitor_up` | gauge | `check` | ops::monitor: 1 when its last probe passed, else 0 |
//! | `agentbus_monitor_checks_total` | counter | `check`, `result` = up, down | ops::monitor |
//! | `agentbus_monitor_alerts_total` | counter | `check` | ops::monitor: alerts posted |

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::agents::AgentRuntime;
use crate::store::JournalStore;
use crate::store::feed::Backlog;

/// Histogram buckets in seconds: from a millisecond (agentbus's own overhead) to ten
/// minutes (a long model answer).
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];

/// How often histograms are drained into their buckets between scrapes.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process's recorder (once; later calls return the same handle). `None`
/// when another recorder was installed first, e.g. by an embedding program: then the
/// metrics go to it and `/metrics` shows only the scrape-time gauges.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .expect("the bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            match metrics::set_global_recorder(recorder) {
                Ok(()) => {
                    describe();
                    Some(handle)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "another metrics recorder is installed; /metrics shows only the journal gauges");
                    None
                }
            }
        })
        .as_ref()
}

/// Drains histograms every few seconds until `shutdown`, so memory stays bounded however
/// rarely `/metrics` is scraped.
pub async fn upkeep(shutdown: CancellationToken) {
    let Some(handle) = install() else { return };
    let mut every = tokio::time::interval(UPKEEP_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => handle.run_upkeep(),
        }
    }
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "agentbus_transactions_total",
        "Appservice transactions from the homeserver, by outcome."
    );
    describe_counter!(
        "agentbus_events_received_total",
        "Events in accepted (new) transactions."
    );
    describe_counter!(
        "agentbus_routing_decisions_total",
        "Agents chosen to answer, by the routing strategy that chose them (none: nobody)."
    );
    describe_counter!(
        "agentbus_llm_requests_total",
        "Model requests started, by provider and model."
    );
    describe_counter!(
        "agentbus_llm_errors_total",
        "Model requests that failed, by provider, model and kind of error."
    );
    describe_histogram!(
        "agentbus_llm_request_duration_seconds",
        Unit::Seconds,
        "From a model request to the end of its answer's stream."
    );
    describe_counter!(
        "agentbus_llm_tokens_total",
        "Tokens the providers reported, by provider, model and direction."
    );
    describe_histogram!(
        "agentbus_answer_duration_seconds",
        Unit::Seconds,
        "One agent run, from its start to its last edit, by agent."
    );
    describe_histogram!(
        "agentbus_answer_overhead_seconds",
        Unit::Seconds,
        "agentbus's own time per answer: the run's duration minus the time spent in model streams."
    );
    describe_counter!(
        "agentbus_matrix_requests_total",
        "Requests agentbus made to the homeserver, by endpoint."
    );
    describe_counter!(
        "agentbus_matrix_request_errors_total",
        "Those requests that failed, by endpoint and error."
    );
    describe_counter!(
        "agentbus_team_tasks_total",
        "Team tasks that ended, by mode and outcome."
    );
    describe_gauge!(
        "agentbus_monitor_up",
        "1 when the health check's last probe passed, 0 when it failed, by check."
    );
    describe_counter!(
        "agentbus_monitor_checks_total",
        "Health check probes, by check and result."
    );
    describe_counter!(
        "agentbus_monitor_alerts_total",
        "Alerts posted to the alert room, by check."
    );
}

/// What `/metrics` reads at scrape time.
pub struct Scrape {
    pub backlog: Arc<Backlog>,
    pub journal: Arc<dyn JournalStore>,
    pub runtime: Arc<AgentRuntime>,
}

/// `GET /metrics`.
pub async fn metrics(State(scrape): State<Arc<Scrape>>) -> impl IntoResponse {
    let mut text = install().map(PrometheusHandle::render).unwrap_or_default();
    let oldest_age = match scrape.journal.oldest_pending_ts().await {
        Ok(Some(at)) => crate::unix_ms().saturating_sub(at) as f64 / 1000.0,
        Ok(None) => 0.0,
        Err(e) => {
            tracing::warn!(error = %e, "could not read the journal's oldest pending event");
            f64::NAN
        }
    };
    let backlog = &scrape.backlog;
    push_metric(
        &mut text,
        "agentbus_journal_pending",
        "gauge",
        "Journaled events not finished yet.",
        backlog.pending() as f64,
    );
    push_metric(
        &mut text,
        "agentbus_journal_oldest_pending_age_seconds",
        "gauge",
        "Age of the oldest journaled event not finished yet (0 when none).",
        oldest_age,
    );
    push_metric(
        &mut text,
        "agentbus_events_journaled_total",
        "counter",
        "Events journaled from transactions since start.",
        backlog.journaled_total() as f64,
    );
    push_metric(
        &mut text,
        "agentbus_events_finished_total",
        "counter",
        "Events finished (answered or nothing to answer) since start.",
        backlog.finished_total() as f64,
    );
    push_metric(
        &mut text,
        "agentbus_active_sessions",
        "gauge",
        "Session lanes with an answer running or waiting.",
        scrape.runtime.active_sessions() as f64,
    );
    push_metric(
        &mut text,
        "agentbus_answers_queued",
        "gauge",
        "Answers waiting for their session lane.",
        scrape.runtime.queued() as f64,
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

fn push_metric(text: &mut String, name: &str, kind: &str, help: &str, value: f64) {
    use std::fmt::Write as _;
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    let _ = write!(
        text,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_metrics_render_in_prometheus_text() {
        let handle = install().expect("the first recorder of the test process");
        metrics::counter!("agentbus_transactions_total", "outcome" => "accepted").increment(2);
        metrics::histogram!("agentbus_answer_overhead_seconds", "agent" => "unit").record(0.003);
        handle.run_upkeep();
        let text = handle.render();
        assert!(
            text.contains("agentbus_transactions_total{outcome=\"accepted\"}"),
            "{text}"
        );
        assert!(
            text.contains("agentbus_answer_overhead_seconds_bucket{agent=\"unit\",le=\"0.005\"}"),
            "histograms get the seconds buckets: {text}"
        );
    }

    #[test]
    fn scrape_time_gauges_follow_the_exposition_format() {
        let mut text = String::from("x 1");
        push_metric(
            &mut text,
            "agentbus_journal_pending",
            "gauge",
            "Pending.",
            3.0,
        );
        assert_eq!(
            text,
            "x 1\n# HELP agentbus_journal_pending Pending.\n# TYPE agentbus_journal_pending gauge\nagentbus_journal_pending 3\n"
        );
    }
}
