//! The Discovery stream: say who we are and where peers reach us, report the app's
//! health, and apply each pushed config — compiled here, on the control task, then
//! swapped in whole — answering ACK, or NACK while keeping the last good one. When the
//! stream ends or fails it is reopened with jittered backoff; the proxy serves on
//! with what it has meanwhile.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::{
    net::TcpStream,
    sync::{mpsc, watch},
    time::{Instant, MissedTickBehavior},
};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use trellis_api::{
    MAX_MESSAGE_BYTES,
    config::ProxyConfig,
    discovery::v1::{
        Ack, ConfigPush, Heartbeat, Hello, Nack, SubscribeRequest,
        discovery_client::DiscoveryClient, subscribe_request::Kind,
    },
};
use trellis_ca::{Credentials, SpiffeId};

use super::{Backoff, CALL_TIMEOUT, ControlError, ControlPlaneAddr, connect};
use crate::{outbound::destinations::Destinations, telemetry};

const RECONNECT_BASE: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// How often the app is probed at most; a change is reported at once.
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Messages to the control plane waiting to be sent; more means it stopped reading.
const OUTBOX: usize = 32;

/// What the Hello says, but for health.
#[derive(Debug)]
pub(crate) struct HelloInfo {
    pub(crate) service: String,
    pub(crate) namespace: String,
    pub(crate) instance: String,
    pub(crate) labels: std::collections::BTreeMap<String, String>,
    /// Where peers reach this proxy; none for a gateway, which peers never call.
    pub(crate) advertise: Option<SocketAddr>,
    /// Its admin server, where `trellisctl tap` reads.
    pub(crate) admin: Option<SocketAddr>,
}

#[derive(Debug)]
pub(crate) struct Subscriber {
    pub(crate) addr: ControlPlaneAddr,
    pub(crate) creds: Credentials,
    pub(crate) server_id: SpiffeId,
    pub(crate) hello: HelloInfo,
    pub(crate) heartbeat_interval: Duration,
    pub(crate) destinations: Arc<ArcSwap<Destinations>>,
    pub(crate) config_ready: Arc<AtomicBool>,
    /// The stream's channel while it is open, for the reporter.
    pub(crate) channel: watch::Sender<Option<Channel>>,
}

/// How a stream ended without an error.
enum Ended {
    Shutdown,
    ByServer,
}

// === impl Subscriber ===

impl Subscriber {
    /// Subscribes once the first certificate is in (`issued`), and stays subscribed
    /// until `shutdown`.
    pub(crate) async fn run(
        self,
        mut issued: watch::Receiver<bool>,
        mut health: watch::Receiver<bool>,
        shutdown: CancellationToken,
    ) {
        metrics::gauge!(telemetry::CONTROL_PLANE_CONNECTED).set(0.0);
        tokio::select! {
            () = shutdown.cancelled() => return,
            waited = issued.wait_for(|issued| *issued) => {
                if waited.is_err() {
                    return;
                }
            }
        }
        let mut backoff = Backoff::new(RECONNECT_BASE, RECONNECT_MAX);
        loop {
            let mut pushed = false;
            let result = self.subscribe(&mut health, &shutdown, &mut pushed).await;
            self.channel.send_replace(None);
            metrics::gauge!(telemetry::CONTROL_PLANE_CONNECTED).set(0.0);
            // A stream that delivered a config was healthy: start the backoff over.
            if pushed {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            match result {
                Ok(Ended::Shutdown) => return,
                Ok(Ended::ByServer) => {
                    tracing::info!(reconnect_in = ?delay, "the control plane ended the stream");
                }
                Err(error) => {
                    tracing::warn!(%error, reconnect_in = ?delay, "control plane stream failed; serving with the last config");
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn subscribe(
        &self,
        health: &mut watch::Receiver<bool>,
        shutdown: &CancellationToken,
        pushed: &mut bool,
    ) -> Result<Ended, ControlError> {
        let rpc = "Discovery.Subscribe";
        let channel = tokio::select! {
            () = shutdown.cancelled() => return Ok(Ended::Shutdown),
            channel = connect(&self.addr, &self.creds, &self.server_id) => channel?,
        };
        let mut client =
            DiscoveryClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES);
        let (outbox, rx) = mpsc::channel(OUTBOX);
        let healthy = *health.borrow_and_update();
        send(&outbox, Kind::Hello(self.hello(healthy)))?;
        let opened = tokio::select! {
            () = shutdown.cancelled() => return Ok(Ended::Shutdown),
            opened = tokio::time::timeout(CALL_TIMEOUT, client.subscribe(ReceiverStream::new(rx))) => opened,
        };
        let mut pushes = opened
            .map_err(|_| ControlError::Timeout(rpc))?
            .map_err(|status| ControlError::status(rpc, status))?
            .into_inner();
        metrics::gauge!(telemetry::CONTROL_PLANE_CONNECTED).set(1.0);
        self.channel.send_replace(Some(channel));
        tracing::info!(
            control_plane = %self.addr,
            instance = self.hello.instance,
            advertise = self.hello.advertise.map(tracing::field::display),
            healthy,
            "subscribed to the control plane"
        );
        let mut pieces = Pieces::default();
        let period = self.heartbeat_interval;
        let mut heartbeat = tokio::time::interval_at(Instant::now() + period, period);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // Dropping the stream tells the control plane to withdraw us.
                () = shutdown.cancelled() => return Ok(Ended::Shutdown),
                push = pushes.next() => match push {
                    Some(Ok(push)) => {
                        if let Some((version, json)) = pieces.add(push) {
                            *pushed = true;
                            let answer = match json {
                                Some(json) => self.apply(version, &json),
                                None => self.refuse(version, format!(
                                    "the config is larger than {MAX_MESSAGE_BYTES} bytes"
                                )),
                            };
                            send(&outbox, answer)?;
                        }
                    }
                    Some(Err(status)) => return Err(ControlError::status(rpc, status)),
                    None => return Ok(Ended::ByServer),
                },
                _ = heartbeat.tick() => {
                    let healthy = *health.borrow_and_update();
                    send(&outbox, Kind::Heartbeat(Heartbeat { healthy }))?;
                }
                () = changed(health) => {
                    let healthy = *health.borrow_and_update();
                    send(&outbox, Kind::Heartbeat(Heartbeat { healthy }))?;
                    heartbeat.reset();
                }
            }
        }
    }

    fn hello(&self, healthy: bool) -> Hello {
        let HelloInfo {
            service,
            namespace,
            instance,
            labels,
            advertise,
            admin,
        } = &self.hello;
        Hello {
            service: service.clone(),
            namespace: namespace.clone(),
            instance: instance.clone(),
            labels: labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            // Empty: the control plane makes this proxy nobody's endpoint.
            inbound_address: advertise.map(|a| a.to_string()).unwrap_or_default(),
            healthy,
            proxy_version: env!("CARGO_PKG_VERSION").to_string(),
            admin_address: admin.map(|a| a.to_string()).unwrap_or_default(),
        }
    }

    /// Decodes and compiles a pushed config and swaps it in; the answer says whether
    /// it is in force.
    fn apply(&self, version: String, config_json: &[u8]) -> Kind {
        let compiled = ProxyConfig::from_json(config_json)
            .map_err(|e| format!("decoding the config: {e}"))
            .and_then(|mut config| {
                // The push's version is the one ACKed, so it is the one shown.
                config.version.clone_from(&version);
                self.destinations
                    .load()
                    .compile_next(config, &self.creds)
                    .map_err(|e| e.to_string())
            });
        match compiled {
            Ok(destinations) => {
                self.destinations.store(Arc::new(destinations));
                self.config_ready.store(true, Ordering::Release);
                metrics::counter!(telemetry::CONFIG_UPDATES, "result" => "ack").increment(1);
                tracing::info!(version, "config applied");
                Kind::Ack(Ack { version })
            }
            Err(error) => self.refuse(version, error),
        }
    }

    fn refuse(&self, version: String, error: String) -> Kind {
        metrics::counter!(telemetry::CONFIG_UPDATES, "result" => "nack").increment(1);
        tracing::warn!(version, error, "config refused; keeping the last good one");
        Kind::Nack(Nack { version, error })
    }
}

/// Puts a config sent in pieces back together.
#[derive(Debug, Default)]
struct Pieces {
    version: String,
    json: Vec<u8>,
    /// This version outgrew the limit; its pieces are dropped until the last.
    oversized: bool,
}

impl Pieces {
    /// Adds one push; returns the whole config once its last piece is in. A piece of
    /// another version drops what was gathered: the control plane moved on.
    /// `None` in place of the config means it was too large to keep.
    fn add(&mut self, push: ConfigPush) -> Option<(String, Option<Vec<u8>>)> {
        let ConfigPush {
            version,
            config_json,
            more,
        } = push;
        if version != self.version {
            self.json.clear();
            self.oversized = false;
            self.version = version;
        }
        if self.json.len() + config_json.len() > MAX_MESSAGE_BYTES {
            self.json = Vec::new();
            self.oversized = true;
        }
        if !self.oversized {
            self.json.extend_from_slice(&config_json);
        }
        if more {
            return None;
        }
        let json = std::mem::take(&mut self.json);
        let whole = !std::mem::take(&mut self.oversized);
        Some((std::mem::take(&mut self.version), whole.then_some(json)))
    }
}

/// Queues a message for the stream. A full queue means the control plane stopped
/// reading; a closed one that the stream is gone. Either way: reconnect.
fn send(outbox: &mpsc::Sender<SubscribeRequest>, kind: Kind) -> Result<(), ControlError> {
    outbox
        .try_send(SubscribeRequest { kind: Some(kind) })
        .map_err(|e| {
            ControlError::Stream(match e {
                mpsc::error::TrySendError::Full(_) => "it stopped reading our messages".into(),
                mpsc::error::TrySendError::Closed(_) => "our side of the stream closed".into(),
            })
        })
}

/// Resolves when health changes; never, once the prober is gone.
async fn changed(health: &mut watch::Receiver<bool>) {
    if health.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Probes the local app: healthy while a TCP connect to it succeeds within a second.
/// Publishes only changes.
pub(crate) async fn probe_app(
    app_addr: SocketAddr,
    every: Duration,
    health: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let healthy = matches!(
            tokio::time::timeout(PROBE_TIMEOUT, TcpStream::connect(app_addr)).await,
            Ok(Ok(_))
        );
        health.send_if_modified(|current| {
            if *current == healthy {
                return false;
            }
            *current = healthy;
            tracing::info!(app = %app_addr, healthy, "the app's health changed");
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(version: &str, json: &str, more: bool) -> ConfigPush {
        ConfigPush {
            version: version.into(),
            config_json: json.as_bytes().to_vec().into(),
            more,
        }
    }

    #[test]
    fn pieces_make_one_config_and_a_newer_version_starts_over() {
        let mut pieces = Pieces::default();
        assert_eq!(pieces.add(piece("v1", "{\"a\":", true)), None);
        assert_eq!(
            pieces.add(piece("v1", "1}", false)),
            Some(("v1".into(), Some(b"{\"a\":1}".to_vec())))
        );
        // v2 is cut short by v3: only v3 comes out, whole.
        assert_eq!(pieces.add(piece("v2", "{\"b\":", true)), None);
        assert_eq!(pieces.add(piece("v3", "{\"c\":", true)), None);
        assert_eq!(
            pieces.add(piece("v3", "3}", false)),
            Some(("v3".into(), Some(b"{\"c\":3}".to_vec())))
        );
        assert_eq!(
            pieces.add(piece("v3", "{}", false)),
            Some(("v3".into(), Some(b"{}".to_vec())))
        );
    }
}
