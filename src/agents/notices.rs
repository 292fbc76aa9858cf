//! Everything an agent says that is not a model's answer: the notices sent as `m.notice`
//! replies when it is busy, does not know the sender, cannot read the message, could not
//! answer or was stopped, and the line that ends a stopped answer. One place, so the
//! wording stays consistent and each notice names the thing (agent, model, image) and what
//! the person can do next. A failed model call is told by its status and a short
//! [`cause`], never in the provider's words: those stay in the log.

use std::fmt::Display;
use std::time::Duration;

use crate::config::{AgentConfig, ModelRef};
use crate::llm::{Failure, LlmError};

/// The agent's session queue is full; the message was not queued.
pub fn busy(agent: &AgentConfig) -> String {
    format!(
        "⏳ {} is busy: {} messages here are already waiting for an answer. Please send this again in a little while.",
        agent.display_name(),
        agent.queue_limit
    )
}

/// An unknown DM sender's pairing code, and how an admin approves it.
pub fn pairing_code(code: &str, ttl: Duration) -> String {
    format!(
        "🔐 I don't know you yet, so I can't answer. Your pairing code is {code}. \
         Ask an admin of this agentbus to approve it with: agentbus pairing approve {code} \
         (the code expires in {ttl}).",
        ttl = humantime::format_duration(ttl),
    )
}

/// A sender asked for more answers than `routing.limits.per_sender` allows.
pub fn sender_limited(answers: u32, per: Duration, retry_after: Duration) -> String {
    format!(
        "🚦 You have asked agents for {answers} answers in {per} (routing.limits.per_sender), so this message was not answered. You can ask again in {wait}.",
        per = humantime::format_duration(per),
        wait = humantime::format_duration(retry_after),
    )
}

/// A room had more answers than `routing.limits.per_room` allows.
pub fn room_limited(answers: u32, per: Duration, retry_after: Duration) -> String {
    format!(
        "🚦 Agents have given this room {answers} answers in {per} (routing.limits.per_room), so this message was not answered. Ask again in {wait}.",
        per = humantime::format_duration(per),
        wait = humantime::format_duration(retry_after),
    )
}

/// The reason given when an agent declines an invite (shown to the inviter).
pub fn invite_declined(reason: &str) -> String {
    format!(
        "agentbus declined: {reason}. An admin can pair you (DM an agent to get a code) or list you in allow_from."
    )
}

/// An end-to-end encrypted message, which agents cannot read.
pub fn encrypted() -> &'static str {
    "🔒 This message is end-to-end encrypted and agents cannot read it. \
     Please talk to agents in an unencrypted room (in Element: start the chat with encryption turned off)."
}

/// `!reset` forgot the session's `lines` remembered messages.
pub fn reset_done(agent: &AgentConfig, lines: usize) -> String {
    format!(
        "🧹 {} has forgotten this conversation ({lines} messages); the next message starts afresh.",
        agent.display_name()
    )
}

/// `!reset` failed: the store could not clear the session.
pub fn reset_failed(agent: &AgentConfig) -> String {
    format!(
        "⚠️ {} could not forget this conversation: the store failed.",
        agent.display_name()
    )
}

/// An image reached an agent whose model reads text only, with no `image_model` set.
pub fn text_only_model(agent: &AgentConfig, model: &ModelRef) -> String {
    format!(
        "🖼️ {}'s model ({model}) reads text only, so it cannot see images. Describe the picture in words, or set image_model for this agent to a model with input: [text, image].",
        agent.display_name(),
    )
}

/// An image larger than the agent passes to a model.
pub fn image_too_big(agent: &AgentConfig, name: &str, max_bytes: usize) -> String {
    format!(
        "🖼️ The image {name} is larger than the {} MB {} can look at.",
        max_bytes / (1024 * 1024),
        agent.display_name()
    )
}

/// The agent could not download an image from the homeserver.
pub fn image_download_failed(agent: &AgentConfig, name: &str, error: &dyn Display) -> String {
    format!(
        "🖼️ {} could not download the image {name}: {error}",
        agent.display_name()
    )
}

/// No model of the agent's chain answered the turn: each model tried with the short
/// [`cause`] of its failure (the provider's own words stay in the log).
pub fn no_model_answered(agent: &AgentConfig, failure: &Failure) -> String {
    if !failure.attempts.is_empty()
        && failure
            .attempts
            .iter()
            .all(|a| matches!(a.error, LlmError::WarmingUp))
    {
        return format!(
            "⏳ {}'s model is still warming up (the local model server is starting). Please try again in a minute.",
            agent.display_name()
        );
    }
    if failure.attempts.is_empty() {
        return format!(
            "⚠️ {} could not answer: no model of its chain has a configured provider.",
            agent.display_name()
        );
    }
    let causes: Vec<String> = failure
        .attempts
        .iter()
        .map(|a| format!("{}: {}", a.model, cause(&a.error)))
        .collect();
    format!(
        "⚠️ {} could not answer: {}.",
        agent.display_name(),
        causes.join("; then ")
    )
}

/// The answer broke off before any text arrived.
pub fn broke_off(agent: &AgentConfig, error: &LlmError) -> String {
    format!(
        "⚠️ {} could not answer: {}.",
        agent.display_name(),
        cause(error)
    )
}

/// The model answered with nothing.
pub fn empty_answer(agent: &AgentConfig) -> String {
    format!(
        "⚠️ {} could not answer: the model gave an empty answer.",
        agent.display_name()
    )
}

/// The answer broke off after part of it was posted.
pub fn cut_off(agent: &AgentConfig, error: &LlmError) -> String {
    format!(
        "⚠️ {}'s answer was cut off: {}.",
        agent.display_name(),
        cause(error)
    )
}

/// What a failed model call says in a room: the HTTP status and a short cause, never the
/// provider's error body (it can quote the request, the key or internals; the log keeps it,
/// redacted).
pub fn cause(error: &LlmError) -> String {
    match error {
        LlmError::Timeout(wait) => format!(
            "the model did not answer within {}",
            humantime::format_duration(*wait)
        ),
        LlmError::Stalled(wait) => format!(
            "the model stopped sending for {} in the middle of its answer",
            humantime::format_duration(*wait)
        ),
        LlmError::Http {
            status, message, ..
        } => {
            let code = http::StatusCode::from_u16(*status).ok();
            let status_line = match code.and_then(|c| c.canonical_reason()) {
                Some(reason) => format!("{status} {reason}"),
                None => status.to_string(),
            };
            format!(
                "the model provider answered {status_line} ({})",
                http_cause(*status, message)
            )
        }
        LlmError::Network(_) => "the model provider could not be reached".to_owned(),
        LlmError::BadResponse(_) => {
            "the model provider sent an answer agentbus could not read".to_owned()
        }
        LlmError::WarmingUp => "the model is still warming up".to_owned(),
    }
}

/// A few words for what a refusal with `status` means, from the status and from whether
/// the provider's `message` says the conversation was too long (the one cause a person can
/// act on that the status does not tell). `message` is only looked at, never quoted.
fn http_cause(status: u16, message: &str) -> &'static str {
    if status == 413 || says_too_long(message) {
        return "refused: the conversation is too long for the model";
    }
    match status {
        401 => "refused: the API key was not accepted",
        403 => "refused: not allowed",
        404 => "the model or its endpoint was not found",
        408 | 504 => "timed out",
        429 => "rate limited; try again in a little while",
        529 => "overloaded; try again in a little while",
        500..=599 => "the provider failed",
        _ => "refused the request",
    }
}

/// Whether a provider's error text says the input did not fit the model's context.
fn says_too_long(message: &str) -> bool {
    let message = message.to_lowercase();
    [
        "context length",
        "context_length",
        "context window",
        "maximum context",
        "prompt is too long",
        "too many tokens",
        "input is too long",
        "exceeds the context",
    ]
    .iter()
    .any(|phrase| message.contains(phrase))
}

/// The last line of an answer that was stopped (cancelled) while it streamed.
pub fn stopped_mid_answer(agent: &AgentConfig) -> String {
    format!(
        "⏹️ {} was stopped before finishing this answer.",
        agent.display_name()
    )
}

/// A run was stopped (cancelled) before any of its answer was posted.
pub fn stopped_before_answer(agent: &AgentConfig) -> String {
    format!(
        "⏹️ {} was stopped before answering this.",
        agent.display_name()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent() -> AgentConfig {
        let config = crate::config::Config::parse(
            r#"
homeserver: { url: "http://127.0.0.1:1", server_name: example.org }
appservice: { as_token: a, hs_token: h }
providers: { echo: { api: echo } }
agents: [ { id: damon, display_name: Damon, provider: echo, queue_limit: 3 } ]
"#,
        )
        .expect("config");
        config.agents[0].clone()
    }

    #[test]
    fn busy_names_the_agent_and_how_many_wait() {
        let text = busy(&agent());
        assert!(text.contains("Damon is busy: 3 messages"), "{text}");
        assert!(text.contains("send this again"), "{text}");
    }

    #[test]
    fn the_pairing_prompt_gives_the_code_the_command_and_the_expiry() {
        let text = pairing_code("ABCD-EFGH", Duration::from_secs(3600));
        assert!(text.contains("Your pairing code is ABCD-EFGH."), "{text}");
        assert!(
            text.contains("agentbus pairing approve ABCD-EFGH"),
            "{text}"
        );
        assert!(text.contains("expires in 1h"), "{text}");
    }

    #[test]
    fn the_encrypted_notice_says_what_to_do() {
        assert!(encrypted().contains("end-to-end encrypted"));
        assert!(encrypted().contains("encryption turned off"));
    }

    #[test]
    fn failure_notices_name_the_agent_and_the_cause() {
        let agent = agent();
        assert_eq!(
            cut_off(&agent, &LlmError::WarmingUp),
            "⚠️ Damon's answer was cut off: the model is still warming up."
        );
        assert_eq!(
            empty_answer(&agent),
            "⚠️ Damon could not answer: the model gave an empty answer."
        );
        assert_eq!(
            stopped_mid_answer(&agent),
            "⏹️ Damon was stopped before finishing this answer."
        );
        assert_eq!(
            stopped_before_answer(&agent),
            "⏹️ Damon was stopped before answering this."
        );
        assert!(
            reset_done(&agent, 4).contains("Damon has forgotten this conversation (4 messages)")
        );
        assert!(
            image_too_big(&agent, "cat.png", 10 * 1024 * 1024)
                .contains("cat.png is larger than the 10 MB Damon")
        );
    }

    fn http(status: u16, message: &str) -> LlmError {
        LlmError::Http {
            status,
            message: message.to_owned(),
            retry_after: None,
        }
    }

    fn failed(attempts: &[(&str, LlmError)]) -> Failure {
        Failure {
            attempts: attempts
                .iter()
                .map(|(model, error)| crate::llm::Attempt {
                    model: ModelRef::parse(model).unwrap(),
                    error: error.clone(),
                })
                .collect(),
        }
    }

    #[test]
    fn a_refusal_says_its_status_and_cause_but_not_the_providers_words() {
        let agent = agent();
        let failure = failed(&[(
            "openai/gpt",
            http(
                401,
                "Incorrect API key provided: SK-LIVE-0123. You can find your key at …",
            ),
        )]);
        assert_eq!(
            no_model_answered(&agent, &failure),
            "⚠️ Damon could not answer: openai/gpt: the model provider answered 401 Unauthorized (refused: the API key was not accepted)."
        );
    }

    #[test]
    fn each_model_of_the_chain_gets_its_cause() {
        let failure = failed(&[
            ("main/big", http(429, "slow down, org-123")),
            (
                "backup/small",
                LlmError::Network("tcp connect error 10.0.0.7:443".into()),
            ),
        ]);
        assert_eq!(
            no_model_answered(&agent(), &failure),
            "⚠️ Damon could not answer: main/big: the model provider answered 429 Too Many Requests \
             (rate limited; try again in a little while); then backup/small: the model provider could not be reached."
        );
        assert_eq!(
            no_model_answered(&agent(), &failed(&[])),
            "⚠️ Damon could not answer: no model of its chain has a configured provider."
        );
    }

    #[test]
    fn a_context_overflow_is_named_whatever_the_status() {
        let error = http(
            400,
            "This model's maximum context length is 4096 tokens. However, you requested 60233 tokens.",
        );
        assert_eq!(
            cause(&error),
            "the model provider answered 400 Bad Request (refused: the conversation is too long for the model)"
        );
        assert_eq!(
            cause(&http(413, "")),
            "the model provider answered 413 Payload Too Large (refused: the conversation is too long for the model)"
        );
    }

    #[test]
    fn timeouts_and_unreadable_answers_say_so_without_detail() {
        let agent = agent();
        assert_eq!(
            broke_off(&agent, &LlmError::Timeout(Duration::from_secs(30))),
            "⚠️ Damon could not answer: the model did not answer within 30s."
        );
        assert_eq!(
            cut_off(&agent, &LlmError::Stalled(Duration::from_secs(90))),
            "⚠️ Damon's answer was cut off: the model stopped sending for 1m 30s in the middle of its answer."
        );
        assert_eq!(
            cause(&LlmError::BadResponse(
                "a stream chunk is not the JSON we expect (secret)".into()
            )),
            "the model provider sent an answer agentbus could not read"
        );
        assert_eq!(
            cause(&http(529, "Overloaded")),
            "the model provider answered 529 (overloaded; try again in a little while)"
        );
    }
}
