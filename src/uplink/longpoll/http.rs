//! The brain's long-poll endpoints (protocol §10) as typed calls: the
//! connect probe, the upload of signed frames and the command poll. Every
//! request carries the bearer token (a sensitive header, never logged) and
//! the session nonce; the brain's HTTP errors become [`UplinkError`]s that
//! say what to change.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use reqwest::StatusCode;

use crate::config::UplinkSettings;
use crate::uplink::error::UplinkError;

/// The header that names the session (its value is the `session_id` of
/// every signature, both ways).
pub(crate) const SESSION_HEADER: &str = "X-Z4J-Session-Nonce";
/// Runtime features, for the brain's view of the agent.
const RUNTIME_FEATURES_HEADER: &str = "X-Z4J-Runtime-Features";
/// Engines whose retries run by reference, stated on each claiming poll.
const RETRY_CONTRACTS_HEADER: &str = "X-Z4J-Retry-Contracts";
/// Time allowed for TCP and TLS.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for the connect probe, which the brain answers at once.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes read of an answer: a command poll returns at most 50 frames
/// of at most 1 MiB.
const MAX_ANSWER_BYTES: usize = 64 << 20;

/// The agent and project the brain signs for, from the probe's headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BrainIds {
    pub agent_id: String,
    pub project_id: String,
    /// The brain's clock from the answer's `Date` header (to the second).
    pub date: Option<time::OffsetDateTime>,
}

/// The brain's answer to an upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Upload {
    /// HTTP 200: frames stored (or dropped for good) and frames to send
    /// again, with the brain's `error_code` and first errors.
    Answered {
        accepted: u64,
        rejected: u64,
        error_code: Option<String>,
        errors: Vec<String>,
    },
    /// HTTP 413 (the body was larger than the brain or a proxy takes) or
    /// 422 (the brain refused the body's shape: a frame over its 1 MiB, or
    /// not UTF-8): sending the same body again cannot help.
    Refused { status: u16 },
}

/// One long-poll session's HTTP client: its nonce and token are in every
/// request.
pub(crate) struct LongPollClient {
    http: reqwest::Client,
    events_url: String,
    commands_url: String,
}

impl LongPollClient {
    /// A client for the session named `nonce`. Reads the trust store and
    /// CA file off the runtime.
    pub(crate) async fn new(
        settings: &UplinkSettings,
        nonce: &str,
        runtime_features: &str,
    ) -> Result<Self, UplinkError> {
        let mut headers = HeaderMap::new();
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", settings.token.expose()))
            .map_err(|_| UplinkError::TokenNotHeaderSafe)?;
        auth.set_sensitive(true);
        headers.insert(AUTHORIZATION, auth);
        headers.insert(
            SESSION_HEADER,
            HeaderValue::from_str(nonce).expect("a nonce is URL-safe base64"),
        );
        headers.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("z4j-agentd/", env!("CARGO_PKG_VERSION"))),
        );
        // The brain records what a connect probe states; the doctor states
        // nothing, so it leaves the agent's record alone.
        if !runtime_features.is_empty() {
            if let Ok(v) = HeaderValue::from_str(runtime_features) {
                headers.insert(RUNTIME_FEATURES_HEADER, v);
            }
        }
        // The client asks for the process's rustls provider even for plain
        // http://; the daemon's is ring, as for the WebSocket.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(CONNECT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .http1_only()
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(50));
        if settings.endpoint.tls {
            let ca_file = settings.ca_file.clone();
            let cfg = tokio::task::spawn_blocking(move || {
                crate::uplink::connect::tls_config(ca_file.as_deref())
            })
            .await
            .map_err(|e| format!("building the TLS configuration failed: {e}"))
            .and_then(|r| r)
            .map_err(UplinkError::TlsConfig)?;
            builder = builder.tls_backend_preconfigured(cfg);
        }
        let http = builder.build().map_err(|e| {
            UplinkError::TlsConfig(format!("building the HTTPS client failed: {e}"))
        })?;
        let base = &settings.endpoint.base_url;
        Ok(LongPollClient {
            http,
            events_url: format!("{base}/api/v1/agent/events"),
            commands_url: format!("{base}/api/v1/agent/commands"),
        })
    }

    /// The connect probe: a command poll that claims nothing. Its answer
    /// names the agent and project every frame is signed for.
    pub(crate) async fn probe(&self) -> Result<BrainIds, UplinkError> {
        const WHAT: &str = "connect probe";
        let sent = self
            .http
            .get(format!("{}?wait=0&max_frames=0", self.commands_url))
            .timeout(PROBE_TIMEOUT)
            .send()
            .await;
        let answer = self.answered(WHAT, &self.commands_url, sent).await?;
        let header = |name: &str| {
            answer
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| {
                    !v.is_empty() && v.len() <= 64 && v.chars().all(|c| c.is_ascii_graphic())
                })
                .map(str::to_string)
        };
        match (header("x-z4j-agent-id"), header("x-z4j-project-id")) {
            (Some(agent_id), Some(project_id)) => Ok(BrainIds {
                agent_id,
                project_id,
                date: answer
                    .headers()
                    .get(reqwest::header::DATE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(http_date),
            }),
            _ => Err(UplinkError::LongPollAnswer {
                what: WHAT,
                why: "the answer names no agent (X-Z4J-Agent-Id and X-Z4J-Project-Id): the brain is older than 1.7, which long-poll needs".into(),
            }),
        }
    }

    /// Posts `body` (`{"frames": [...]}`) to the events endpoint.
    pub(crate) async fn upload(
        &self,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Upload, UplinkError> {
        const WHAT: &str = "upload";
        let sent = self
            .http
            .post(&self.events_url)
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .timeout(timeout)
            .send()
            .await;
        let sent = match sent {
            Ok(r) if matches!(r.status().as_u16(), 413 | 422) => {
                return Ok(Upload::Refused {
                    status: r.status().as_u16(),
                })
            }
            other => other,
        };
        let answer = self.answered(WHAT, &self.events_url, sent).await?;
        let v = read_json(WHAT, answer).await?;
        let count = |k: &str| v.get(k).and_then(serde_json::Value::as_u64);
        let (Some(accepted), Some(rejected)) = (count("accepted"), count("rejected")) else {
            return Err(UplinkError::LongPollAnswer {
                what: WHAT,
                why: "the answer has no accepted and rejected counts".into(),
            });
        };
        let errors = v
            .get("errors")
            .and_then(serde_json::Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(serde_json::Value::as_str)
                    .take(10)
                    .map(|e| e.chars().take(300).collect())
                    .collect()
            })
            .unwrap_or_default();
        let error_code = v
            .get("error_code")
            .and_then(serde_json::Value::as_str)
            .map(|c| c.chars().take(80).collect());
        Ok(Upload::Answered {
            accepted,
            rejected,
            error_code,
            errors,
        })
    }

    /// Waits up to `wait` at the brain for commands (at most `max`) and
    /// returns their signed frames, unverified.
    pub(crate) async fn poll(
        &self,
        wait: Duration,
        max: usize,
        retry_contracts: &str,
    ) -> Result<Vec<String>, UplinkError> {
        const WHAT: &str = "command poll";
        let mut request = self
            .http
            .get(format!(
                "{}?wait={}&max_frames={max}",
                self.commands_url,
                wait.as_secs()
            ))
            .timeout(wait + Duration::from_secs(15));
        if let Ok(v) = HeaderValue::from_str(retry_contracts) {
            request = request.header(RETRY_CONTRACTS_HEADER, v);
        }
        let answer = self
            .answered(WHAT, &self.commands_url, request.send().await)
            .await?;
        let v = read_json(WHAT, answer).await?;
        let Some(frames) = v.get("frames").and_then(serde_json::Value::as_array) else {
            return Err(UplinkError::LongPollAnswer {
                what: WHAT,
                why: "the answer has no frames list".into(),
            });
        };
        frames
            .iter()
            .map(|f| {
                f.as_str()
                    .map(str::to_string)
                    .ok_or(UplinkError::LongPollAnswer {
                        what: WHAT,
                        why: "a frame in the answer is not a string".into(),
                    })
            })
            .collect()
    }

    /// The answer when it is a 200; the failure otherwise.
    async fn answered(
        &self,
        what: &'static str,
        url: &str,
        sent: reqwest::Result<reqwest::Response>,
    ) -> Result<reqwest::Response, UplinkError> {
        let answer = sent.map_err(|e| UplinkError::LongPollRequest {
            what,
            url: url.to_string(),
            error: error_chain(&e),
        })?;
        let status = answer.status();
        if status == StatusCode::OK {
            return Ok(answer);
        }
        let retry_after = answer
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|s| Duration::from_secs(s.min(60)));
        // The brain's error bodies say `{"error": "<code>", ...}`.
        let code = read_json(what, answer).await.ok().and_then(|v| {
            v.get("error")
                .and_then(serde_json::Value::as_str)
                .map(|c| c.chars().take(80).collect())
        });
        Err(UplinkError::LongPollStatus {
            what,
            url: url.to_string(),
            status: status.as_u16(),
            code,
            retry_after,
        })
    }
}

/// An HTTP `Date` (`Sun, 06 Dec 2026 10:00:00 GMT`).
fn http_date(v: &str) -> Option<time::OffsetDateTime> {
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    time::PrimitiveDateTime::parse(v.trim(), format)
        .ok()
        .map(time::PrimitiveDateTime::assume_utc)
}

/// The answer's body as JSON, read up to [`MAX_ANSWER_BYTES`].
async fn read_json(
    what: &'static str,
    mut answer: reqwest::Response,
) -> Result<serde_json::Value, UplinkError> {
    let mut body = Vec::new();
    loop {
        let chunk = answer
            .chunk()
            .await
            .map_err(|e| UplinkError::LongPollAnswer {
                what,
                why: format!("reading the answer failed: {}", error_chain(&e)),
            })?;
        let Some(chunk) = chunk else { break };
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(UplinkError::LongPollAnswer {
                what,
                why: format!("the answer is larger than {MAX_ANSWER_BYTES} bytes"),
            });
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|e| UplinkError::LongPollAnswer {
        what,
        why: format!("the answer is not JSON: {e}"),
    })
}

/// An error and its causes, as one line (reqwest's own text stops at the
/// first level, which hides a TLS or connection failure's reason).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_brains_date_header_is_read() {
        let d = http_date("Mon, 07 Dec 2026 11:39:08 GMT").unwrap();
        assert_eq!(d, time::macros::datetime!(2026-12-07 11:39:08 UTC));
        assert_eq!(http_date("yesterday"), None);
    }

    #[test]
    fn an_error_chain_names_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("error sending request")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        assert_eq!(
            error_chain(&Outer(io)),
            "error sending request: connection refused"
        );
    }
}
