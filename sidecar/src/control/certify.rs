//! The sidecar's certificate in control-plane mode. The key is generated in memory for
//! every request and never leaves the process; the control plane signs a CSR for the
//! id the join token names. A certificate is renewed at about 70% of its lifetime by
//! presenting it (mTLS, no other credential); when that fails the join token is tried
//! while it is unexpired. Failures are retried with jittered backoff, never later than
//! the current certificate's expiry, and the valid certificate stays in place.

use std::time::{Duration, SystemTime};

use rustls_pki_types::CertificateDer;
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;
use trellis_api::{
    MAX_MESSAGE_BYTES,
    identity::v1::{
        CertifyRequest, CertifyResponse, Credential, credential, identity_client::IdentityClient,
    },
};
use trellis_ca::{Credentials, SpiffeId, Svid, TrustBundle, WorkloadKey};

use super::{
    Backoff, CALL_TIMEOUT, ControlError, ControlPlaneAddr, JoinToken, SaTokenFile, connect,
};
use crate::telemetry;

/// Renew at this share of the remaining lifetime, +/- `RENEW_JITTER`, so a fleet
/// certified together does not come back together.
const RENEW_AT: f64 = 0.7;
const RENEW_JITTER: f64 = 0.05;
/// A floor against renewal storms with very short lifetimes.
const MIN_RENEW_DELAY: Duration = Duration::from_secs(1);
const RETRY_BASE: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// How long to wait before renewing a certificate that expires at `not_after`, asked at
/// `now`. The lifetime is counted from `now` (when it arrived), not from its notBefore,
/// which the CA backdates for clock skew. `unit` in `[0, 1)` places the jitter.
pub fn renewal_delay(now: SystemTime, not_after: SystemTime, unit: f64) -> Duration {
    let remaining = not_after.duration_since(now).unwrap_or_default();
    let share = RENEW_AT + RENEW_JITTER * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
    remaining.mul_f64(share).max(MIN_RENEW_DELAY.min(remaining))
}

/// How long to wait after a failure: the backoff's delay, but never past the expiry of
/// the certificate in use, so the last try before it lapses is not skipped. Once it has
/// lapsed, the backoff alone.
pub fn retry_delay(backoff: Duration, now: SystemTime, not_after: Option<SystemTime>) -> Duration {
    match not_after.and_then(|at| at.duration_since(now).ok()) {
        Some(remaining) if !remaining.is_zero() => backoff.min(remaining),
        _ => backoff,
    }
}

/// What proved the sidecar's identity for a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proof {
    /// The current SVID, presented in the TLS handshake.
    Svid,
    JoinToken,
    ServiceAccountToken,
}

impl Proof {
    fn as_str(self) -> &'static str {
        match self {
            Self::Svid => "svid",
            Self::JoinToken => "join-token",
            Self::ServiceAccountToken => "sa-token",
        }
    }
}

/// What buys a certificate when there is none to renew with.
#[derive(Debug, Clone)]
pub(crate) enum Bootstrap {
    /// Universal mode: read once at start.
    Join(JoinToken),
    /// Kubernetes: a projected ServiceAccount token, read again for every request.
    ServiceAccount(SaTokenFile),
}

impl Bootstrap {
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::Join(_) => Proof::JoinToken.as_str(),
            Self::ServiceAccount(_) => Proof::ServiceAccountToken.as_str(),
        }
    }

    /// The credential to send now, or why there is none.
    fn credential(&self, now: SystemTime) -> Result<(Proof, credential::Kind), ControlError> {
        match self {
            Self::Join(token) => {
                token.check_unexpired(now)?;
                Ok((
                    Proof::JoinToken,
                    credential::Kind::JoinToken(token.secret().to_string()),
                ))
            }
            Self::ServiceAccount(file) => {
                let token = file.current(now)?;
                Ok((
                    Proof::ServiceAccountToken,
                    credential::Kind::ServiceAccountToken(token.secret().to_string()),
                ))
            }
        }
    }
}

struct Issued {
    svid: Svid,
    bundle: Option<TrustBundle>,
    proof: Proof,
}

#[derive(Debug)]
pub(crate) struct Certifier {
    pub(crate) addr: ControlPlaneAddr,
    pub(crate) creds: Credentials,
    pub(crate) id: SpiffeId,
    pub(crate) server_id: SpiffeId,
    pub(crate) bootstrap: Bootstrap,
    /// Zero asks for the mesh default.
    pub(crate) cert_ttl: Duration,
}

// === impl Certifier ===

impl Certifier {
    /// Keeps a valid SVID in the credentials until `shutdown`. `issued` turns true
    /// with the first one.
    pub(crate) async fn run(self, issued: watch::Sender<bool>, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(RETRY_BASE, RETRY_MAX);
        let mut next = Instant::now();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep_until(next) => {}
            }
            let result = tokio::select! {
                () = shutdown.cancelled() => return,
                result = self.certify() => result,
            };
            let delay = match result {
                Ok(certificate) => {
                    backoff.reset();
                    let delay = renewal_delay(
                        SystemTime::now(),
                        certificate.svid.not_after(),
                        fastrand::f64(),
                    );
                    self.install(certificate, delay);
                    issued.send_replace(true);
                    delay
                }
                Err(error) => {
                    metrics::counter!(telemetry::CERT_RENEWALS, "result" => "failure").increment(1);
                    let current = self.creds.svid();
                    let delay = retry_delay(
                        backoff.next_delay(),
                        SystemTime::now(),
                        current.as_ref().map(|svid| svid.not_after()),
                    );
                    let state = match &current {
                        None => "no certificate yet",
                        Some(svid) if svid.not_after() <= SystemTime::now() => {
                            "the current certificate has expired"
                        }
                        Some(_) => "keeping the current certificate",
                    };
                    tracing::warn!(%error, retry_in = ?delay, state, "certificate request failed");
                    delay
                }
            };
            next = Instant::now() + delay;
        }
    }

    /// Renews with the current SVID while it is valid, else (or when that fails) asks
    /// with the join token while that is valid, or with the ServiceAccount token as
    /// the file holds it now.
    async fn certify(&self) -> Result<Issued, ControlError> {
        let now = SystemTime::now();
        let renewable = self.creds.svid().is_some_and(|svid| svid.not_after() > now);
        let renewal_error = if renewable {
            match self.request(Proof::Svid, None).await {
                Ok(issued) => return Ok(issued),
                Err(error) => Some(error),
            }
        } else {
            None
        };
        let (proof, kind) = match self.bootstrap.credential(SystemTime::now()) {
            Ok(credential) => credential,
            Err(error) => return Err(renewal_error.unwrap_or(error)),
        };
        if let Some(error) = renewal_error {
            tracing::info!(%error, via = proof.as_str(), "renewing with the current certificate failed; trying the bootstrap credential");
        }
        self.request(proof, Some(kind)).await
    }

    async fn request(
        &self,
        proof: Proof,
        kind: Option<credential::Kind>,
    ) -> Result<Issued, ControlError> {
        let key = WorkloadKey::generate().map_err(ControlError::Key)?;
        let csr = key.csr(&self.id).map_err(ControlError::Key)?;
        let (tls_creds, credential) = match proof {
            Proof::Svid => (self.creds.clone(), None),
            // No certificate in this handshake: an expired one would get it refused.
            Proof::JoinToken | Proof::ServiceAccountToken => (
                Credentials::new(TrustBundle::clone(&self.creds.bundle())),
                Some(Credential { kind }),
            ),
        };
        let channel = connect(&self.addr, &tls_creds, &self.server_id).await?;
        let mut client = IdentityClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
        let request = CertifyRequest {
            csr,
            credential,
            requested_id: self.id.to_string(),
            ttl_seconds: self.cert_ttl.as_secs(),
        };
        let rpc = "Identity.Certify";
        let CertifyResponse {
            leaf,
            chain,
            trust_bundle,
            valid_until_unix: _,
        } = tokio::time::timeout(CALL_TIMEOUT, client.certify(request))
            .await
            .map_err(|_| ControlError::Timeout(rpc))?
            .map_err(|status| ControlError::status(rpc, status))?
            .into_inner();
        let chain = std::iter::once(leaf)
            .chain(chain)
            .map(CertificateDer::from)
            .collect();
        let svid = Svid::new(chain, key.private_key_der()).map_err(ControlError::Certificate)?;
        if *svid.id() != self.id {
            return Err(ControlError::WrongId {
                expected: self.id.clone(),
                got: svid.id().clone(),
            });
        }
        // An empty bundle would make every peer unverifiable; keep the one we have.
        let bundle = match trust_bundle.is_empty() {
            true => None,
            false => Some(TrustBundle::new(
                trust_bundle.into_iter().map(CertificateDer::from).collect(),
            )?),
        };
        Ok(Issued {
            svid,
            bundle,
            proof,
        })
    }

    fn install(&self, issued: Issued, renew_in: Duration) {
        let Issued {
            svid,
            bundle,
            proof,
        } = issued;
        if let Some(bundle) = bundle {
            self.creds.set_bundle(bundle);
        }
        let first = self.creds.svid().is_none();
        let (id, serial, not_after) = (
            svid.id().to_string(),
            svid.serial().to_string(),
            telemetry::rfc3339(svid.not_after()),
        );
        // Handshakes from here on present the new certificate; established
        // connections keep the one they were made with.
        self.creds.set_svid(svid);
        metrics::counter!(telemetry::CERT_RENEWALS, "result" => "success").increment(1);
        let via = proof.as_str();
        if first {
            tracing::info!(id, serial, not_after, via, ?renew_in, "certificate issued");
        } else {
            tracing::info!(id, serial, not_after, via, ?renew_in, "certificate renewed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn renewal_is_at_seventy_percent_give_or_take_five() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let day = now + 24 * HOUR;
        let secs = |d: Duration| d.as_secs_f64();
        assert!((secs(renewal_delay(now, day, 0.5)) - 0.70 * 86_400.0).abs() < 1.0);
        assert!((secs(renewal_delay(now, day, 0.0)) - 0.65 * 86_400.0).abs() < 1.0);
        assert!((secs(renewal_delay(now, day, 1.0)) - 0.75 * 86_400.0).abs() < 1.0);
        for _ in 0..100 {
            let delay = renewal_delay(now, day, fastrand::f64());
            assert!(delay >= 24 * HOUR * 65 / 100 && delay <= 24 * HOUR * 75 / 100);
        }
    }

    #[test]
    fn renewal_counts_from_arrival_and_never_spins() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        // A 10 s certificate backdated a minute still gets ~7 s.
        let delay = renewal_delay(now, now + Duration::from_secs(10), 0.5);
        assert_eq!(delay, Duration::from_secs(7));
        // Very short lifetimes get the floor, but never past expiry.
        assert_eq!(
            renewal_delay(now, now + Duration::from_millis(1200), 0.5),
            Duration::from_secs(1)
        );
        assert_eq!(
            renewal_delay(now, now + Duration::from_millis(300), 0.5),
            Duration::from_millis(300)
        );
        // Already expired: now.
        assert_eq!(renewal_delay(now, now - HOUR, 0.5), Duration::ZERO);
    }

    #[test]
    fn retries_never_wait_past_expiry() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let thirty = Duration::from_secs(30);
        assert_eq!(retry_delay(thirty, now, Some(now + HOUR)), thirty);
        assert_eq!(
            retry_delay(thirty, now, Some(now + Duration::from_secs(4))),
            Duration::from_secs(4)
        );
        assert_eq!(retry_delay(thirty, now, Some(now - HOUR)), thirty);
        assert_eq!(retry_delay(thirty, now, Some(now)), thirty);
        assert_eq!(retry_delay(thirty, now, None), thirty);
    }
}
