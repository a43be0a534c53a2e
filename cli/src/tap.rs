//! `trellisctl tap SERVICE`: finds the service's proxies in the control plane's
//! registry, reads each one's admin `GET /tap` (newline-delimited JSON, one line per
//! request it finished) and prints the lines merged as they come, until `--max`
//! requests, `--duration` or Ctrl-C. Lines go to stdout as they arrive; what happens
//! to the streams themselves (a proxy that cannot be reached, one that fell behind)
//! goes to stderr.

use std::{io::Write, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::{net::TcpStream, sync::mpsc, task::JoinSet, time::Instant};

use crate::{
    api::Api,
    args::{TapArgs, TapFormat},
    commands::Outcome,
    error::CliError,
    views,
};

/// A sidecar's line is one request; anything this long without a newline is not.
const MAX_LINE_BYTES: usize = 1 << 20;
/// Lines read ahead of the printer, from all proxies together.
const QUEUE: usize = 256;

/// One proxy to tap, from `GET /v1/proxies`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tapped {
    pub instance: String,
    /// `None` when the proxy did not tell the control plane (an older sidecar).
    pub admin: Option<String>,
}

/// What one proxy's tap says.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// A request, parsed for the table and as sent for `-o json`.
    Request { line: Value, raw: String },
    /// The proxy dropped this many requests because the tap read too slowly.
    Skipped(u64),
}

/// What the readers tell the printer.
#[derive(Debug)]
enum Event {
    Connected,
    Message {
        instance: String,
        message: Message,
    },
    /// A line that was not what a sidecar sends; the stream goes on.
    Garbled {
        instance: String,
        reason: String,
    },
    Failed {
        instance: String,
        reason: String,
    },
    Ended {
        instance: String,
    },
}

pub async fn run(
    api: &Api,
    args: TapArgs,
    timeout: Duration,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<Outcome, CliError> {
    let TapArgs {
        service,
        namespace,
        max,
        duration,
        output,
    } = args;
    let answer = api.get("/v1/proxies").await?;
    let listed = answer
        .get("items")
        .and_then(Value::as_array)
        .ok_or_else(|| CliError::Answer {
            addr: api.addr().to_string(),
            request: "GET /v1/proxies".into(),
            reason: "no \"items\" list in the answer".into(),
        })?;
    let proxies = proxies_of(listed, &namespace, &service);
    if proxies.is_empty() {
        return Err(CliError::Tap(format!(
            "no proxy of service {service:?} in namespace {namespace:?} is connected to the \
             control plane (trellisctl get proxies -A lists those that are)"
        )));
    }
    let names: Vec<&str> = proxies.iter().map(|p| p.instance.as_str()).collect();
    let _ = writeln!(
        err,
        "tapping {} of {namespace}/{service}: {}; Ctrl-C stops",
        plural(proxies.len(), "proxy", "proxies"),
        names.join(", ")
    );
    let _ = err.flush();

    let (events, mut incoming) = mpsc::channel(QUEUE);
    // Dropped on return, which ends every reader.
    let mut readers = JoinSet::new();
    for proxy in &proxies {
        readers.spawn(follow(proxy.clone(), timeout, events.clone()));
    }
    drop(events);

    if output == TapFormat::Table {
        let _ = writeln!(out, "{}", views::tap_header());
        let _ = out.flush();
    }
    let deadline = duration.map(|d| Instant::now() + d);
    let ctrl_c = async {
        // Without a handler (it could not be installed) only --max and --duration stop.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::pin!(ctrl_c);
    let (mut printed, mut failed, mut connected) = (0u64, 0usize, 0usize);
    loop {
        let event = tokio::select! {
            () = &mut ctrl_c => break,
            () = until(deadline) => break,
            event = incoming.recv() => event,
        };
        let Some(event) = event else {
            // Every stream is over: the proxies went away.
            break;
        };
        match event {
            Event::Connected => connected += 1,
            Event::Message {
                instance,
                message: Message::Request { line, raw },
            } => {
                let text = match output {
                    TapFormat::Table => views::tap_line(&line, &instance),
                    TapFormat::Json => json_line(&raw, &instance),
                };
                // A closed pipe (`trellisctl tap web | head -3`) ends the tap quietly.
                if writeln!(out, "{text}").and_then(|()| out.flush()).is_err() {
                    break;
                }
                printed += 1;
                if max.is_some_and(|max| printed >= max) {
                    break;
                }
            }
            Event::Message {
                instance,
                message: Message::Skipped(skipped),
            } => {
                let _ = writeln!(
                    err,
                    "proxy {instance}: this tap fell behind and {} not shown",
                    plural(skipped, "request was", "requests were")
                );
            }
            Event::Garbled { instance, reason } => {
                let _ = writeln!(err, "proxy {instance}: {reason}");
            }
            Event::Failed { instance, reason } => {
                failed += 1;
                let _ = writeln!(err, "cannot tap proxy {instance}: {reason}");
                if failed == proxies.len() {
                    return Err(CliError::Tap(format!(
                        "could not tap any proxy of service {service:?} in namespace \
                         {namespace:?} (each is named above)"
                    )));
                }
            }
            Event::Ended { instance } => {
                let _ = writeln!(err, "proxy {instance} ended its tap (it is shutting down?)");
            }
        }
    }
    let _ = err.flush();
    readers.abort_all();
    summary(connected, printed, err);
    Ok(Outcome {
        ok: true,
        ..Outcome::default()
    })
}

/// One closing line on stderr, so a quiet run is not mistaken for a stuck one.
fn summary(connected: usize, printed: u64, err: &mut dyn Write) {
    let _ = writeln!(
        err,
        "{} shown from {} tapped",
        plural(printed, "request", "requests"),
        plural(connected, "proxy", "proxies")
    );
    let _ = err.flush();
}

fn plural<N: std::fmt::Display + PartialEq + From<u8>>(n: N, one: &str, many: &str) -> String {
    if n == N::from(1) {
        format!("{n} {one}")
    } else {
        format!("{n} {many}")
    }
}

async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The proxies of `service` in `namespace`, as the registry lists them.
pub fn proxies_of(items: &[Value], namespace: &str, service: &str) -> Vec<Tapped> {
    items
        .iter()
        .filter(|item| {
            item.get("namespace").and_then(Value::as_str) == Some(namespace)
                && item.get("service").and_then(Value::as_str) == Some(service)
        })
        .map(|item| Tapped {
            instance: views::text(item, "/instance"),
            admin: item
                .get("admin")
                .and_then(Value::as_str)
                .filter(|a| !a.is_empty())
                .map(str::to_string),
        })
        .collect()
}

/// A sidecar's JSON line (an object, as `parse` checked) with the proxy it came from
/// added last, as `-o json` prints it: the sidecar's field order is kept.
pub fn json_line(raw: &str, instance: &str) -> String {
    let proxy = Value::String(instance.to_string());
    let object = raw.trim_end();
    let fields = object.strip_suffix('}').unwrap_or(object).trim_end();
    let comma = if fields.ends_with('{') { "" } else { "," };
    format!("{fields}{comma}\"proxy\":{proxy}}}")
}

/// Reads one proxy's tap until it ends or fails, and says which.
async fn follow(proxy: Tapped, timeout: Duration, events: mpsc::Sender<Event>) {
    let Tapped { instance, admin } = proxy;
    let last = match admin {
        None => Event::Failed {
            instance,
            reason: "it did not tell the control plane its admin address (a trellis-proxy \
                     older than this trellisctl?)"
                .into(),
        },
        Some(admin) => match read(&instance, &admin, timeout, &events).await {
            Ok(()) => Event::Ended { instance },
            Err(reason) => Event::Failed {
                instance,
                reason: format!("admin server {admin}: {reason}"),
            },
        },
    };
    let _ = events.send(last).await;
}

async fn read(
    instance: &str,
    admin: &str,
    timeout: Duration,
    events: &mpsc::Sender<Event>,
) -> Result<(), String> {
    let addr: SocketAddr = admin.parse().map_err(|e| format!("not an ip:port ({e})"))?;
    let opened = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let request = Request::get("/tap")
            .header(header::HOST, admin)
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())
    };
    let response = tokio::time::timeout(timeout, opened)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))??;
    let status = response.status();
    if status != StatusCode::OK {
        let body = Limited::new(response.into_body(), 4096)
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_string())
            .unwrap_or_default();
        return Err(format!("GET /tap answered {status}: {body}"));
    }
    events.send(Event::Connected).await.map_err(|_| "stopped")?;
    let mut body = response.into_body();
    let mut lines = Lines::default();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("reading the stream: {e}"))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        for line in lines.push(&data)? {
            let event = match parse(&line) {
                Ok(message) => Event::Message {
                    instance: instance.to_string(),
                    message,
                },
                Err(reason) => Event::Garbled {
                    instance: instance.to_string(),
                    reason,
                },
            };
            events.send(event).await.map_err(|_| "stopped")?;
        }
    }
    Ok(())
}

/// Cuts a byte stream into lines, however the chunks fall.
#[derive(Debug, Default)]
pub struct Lines {
    pending: Vec<u8>,
}

impl Lines {
    /// The lines `chunk` completes, without their newline.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<Vec<u8>>, String> {
        self.pending.extend_from_slice(chunk);
        let mut lines = Vec::new();
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = self.pending.drain(..=end).collect();
            line.pop();
            if !line.is_empty() {
                lines.push(line);
            }
        }
        if self.pending.len() > MAX_LINE_BYTES {
            return Err(format!(
                "sent more than {MAX_LINE_BYTES} bytes without a newline; that is not a tap"
            ));
        }
        Ok(lines)
    }
}

/// One line of a sidecar's tap.
pub fn parse(line: &[u8]) -> Result<Message, String> {
    let shown = || String::from_utf8_lossy(&line[..line.len().min(80)]).into_owned();
    let value: Value = serde_json::from_slice(line)
        .map_err(|e| format!("a tap line is not JSON ({e}): {:?}", shown()))?;
    if !value.is_object() {
        return Err(format!("a tap line is not a JSON object: {:?}", shown()));
    }
    match value.get("skipped").and_then(Value::as_u64) {
        Some(skipped) => Ok(Message::Skipped(skipped)),
        None => Ok(Message::Request {
            line: value,
            raw: String::from_utf8_lossy(line).into_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn lines_are_cut_wherever_the_chunks_fall() {
        let mut lines = Lines::default();
        assert_eq!(
            lines.push(b"{\"a\":1}\n{\"b\"").unwrap(),
            [b"{\"a\":1}".to_vec()]
        );
        assert_eq!(lines.push(b":2}").unwrap(), Vec::<Vec<u8>>::new());
        assert_eq!(
            lines.push(b"\n\n{\"c\":3}\n").unwrap(),
            [b"{\"b\":2}".to_vec(), b"{\"c\":3}".to_vec()]
        );
        let endless = vec![b'x'; MAX_LINE_BYTES + 1];
        assert!(
            lines
                .push(&endless)
                .unwrap_err()
                .contains("without a newline")
        );
    }

    #[test]
    fn a_skip_notice_is_told_from_a_request() {
        assert_eq!(parse(b"{\"skipped\":6}"), Ok(Message::Skipped(6)));
        assert_eq!(
            parse(b"{\"path\":\"/pay\",\"status\":200}"),
            Ok(Message::Request {
                line: json!({"path": "/pay", "status": 200}),
                raw: "{\"path\":\"/pay\",\"status\":200}".into()
            })
        );
        assert!(parse(b"<html>").unwrap_err().contains("not JSON"));
        assert!(parse(b"[1]").unwrap_err().contains("not a JSON object"));
    }

    #[test]
    fn proxies_are_those_of_the_service_in_the_namespace() {
        let items = [
            json!({"namespace": "shop", "service": "payment", "instance": "payment-1",
                   "admin": "127.0.0.1:15020"}),
            json!({"namespace": "shop", "service": "payment", "instance": "payment-2",
                   "admin": null}),
            json!({"namespace": "other", "service": "payment", "instance": "payment-3",
                   "admin": "127.0.0.1:15021"}),
            json!({"namespace": "shop", "service": "order", "instance": "order-1",
                   "admin": "127.0.0.1:15022"}),
        ];
        assert_eq!(
            proxies_of(&items, "shop", "payment"),
            [
                Tapped {
                    instance: "payment-1".into(),
                    admin: Some("127.0.0.1:15020".into())
                },
                Tapped {
                    instance: "payment-2".into(),
                    admin: None
                },
            ]
        );
        assert!(proxies_of(&items, "default", "payment").is_empty());
    }

    #[test]
    fn json_lines_say_which_proxy_saw_the_request() {
        let line = json_line("{\"status\":200,\"path\":\"/pay\"} ", "payment-\"1");
        assert_eq!(
            line,
            "{\"status\":200,\"path\":\"/pay\",\"proxy\":\"payment-\\\"1\"}"
        );
        assert_eq!(json_line("{ }", "p"), "{\"proxy\":\"p\"}");
        assert_eq!(plural(1u64, "request", "requests"), "1 request");
        assert_eq!(plural(2usize, "proxy", "proxies"), "2 proxies");
    }
}
