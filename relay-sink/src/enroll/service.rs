//! The enrollment calls: who may have a certificate, the security log of each decision, and
//! its count.
//!
//! The decisions themselves (token, request, ledger, signing) are [`Issuer`]'s; this module
//! adds what sits around them: the rate limit per source address, the renewing caller's
//! certificate checked against the policy in force now (revocation and allow-list, reloaded
//! with SIGHUP), the log line and the metric. Signing and the ledger's write-and-sync run on
//! the blocking pool, not on the runtime's threads.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::IntCounterVec;
use proto::enroll_pb::enrollment_server::Enrollment;
use proto::enroll_pb::{EnrollRequest, Issued, RenewRequest};
use tonic::{Request, Response, Status};

use super::Caller;
use super::issuer::{Granted, Issuer, Outcome, Refusal};
use super::limit::PerAddress;
use crate::Shared;
use crate::labels::{LOG_TARGET, RefusalKind};

/// Refusals logged at most this often (each line says how many were not).
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_millis(100);

/// The call, as a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Call {
    Enroll,
    Renew,
}

impl Call {
    const ALL: [Self; 2] = [Self::Enroll, Self::Renew];

    fn as_str(self) -> &'static str {
        match self {
            Self::Enroll => "enroll",
            Self::Renew => "renew",
        }
    }
}

/// What enrollment keeps: the issuing CA, the rate limit, the sink's policy, the counts.
#[derive(Debug)]
pub(crate) struct Enrollments {
    issuer: Issuer,
    limit: PerAddress,
    shared: Arc<Shared>,
    /// `relay_sink_enrollments_total{call,outcome}`.
    decisions: IntCounterVec,
    refusals_log: runtime::ratelimit::RateLimit,
}

impl Enrollments {
    /// Enrollment with `issuer`, checking renewals against `shared`'s policy, counted in
    /// `registry` (every call and outcome created at 0).
    pub(crate) fn new(
        issuer: Issuer,
        shared: Arc<Shared>,
        registry: &prometheus::Registry,
    ) -> Self {
        let decisions = runtime::observe::counter_vec(
            registry,
            "relay_sink_enrollments_total",
            "Enrollment and renewal requests on --enroll-listen, by call and outcome (issued, reissued, or why refused).",
            &["call", "outcome"],
        );
        for call in Call::ALL {
            for outcome in Outcome::ALL {
                if outcome.applies_to(call) {
                    decisions.with_label_values(&[call.as_str(), outcome.as_str()]);
                }
            }
        }
        Self {
            issuer,
            limit: PerAddress::default(),
            shared,
            decisions,
            refusals_log: runtime::ratelimit::RateLimit::new(REFUSAL_LOG_INTERVAL),
        }
    }

    /// The issuing CA.
    pub(crate) fn issuer(&self) -> &Issuer {
        &self.issuer
    }

    /// `Enroll`: a token and a request.
    fn enroll(&self, request: &EnrollRequest) -> Result<Granted, Refusal> {
        self.issuer.enroll(
            &request.token,
            &request.csr_der,
            time::OffsetDateTime::now_utc(),
        )
    }

    /// `Renew`: a request for the name of the certificate the caller presented.
    fn renew(&self, caller: &Caller, request: &RenewRequest) -> Result<Granted, Refusal> {
        let Some(chain) = &caller.chain else {
            return Err(Refusal::new(
                Outcome::NoCertificate,
                "renewal needs the agent's current certificate as its TLS client certificate \
                 (an agent without a valid one enrolls again with a new token)",
            ));
        };
        let info = chain
            .first()
            .and_then(|leaf| certs::CertInfo::from_der(leaf).ok())
            .ok_or_else(|| Refusal::new(Outcome::BadRequest, "unreadable client certificate"))?;
        let name = info.name().unwrap_or_default().to_owned();
        match self.shared.policy.get().check(&name, Some(&info)) {
            Ok(()) => {}
            Err(RefusalKind::Revoked) => {
                return Err(Refusal::new(
                    Outcome::Revoked,
                    format!(
                        "the certificate of {name} (serial {}) is revoked",
                        info.serial
                    ),
                ));
            }
            Err(_) => {
                return Err(Refusal::new(
                    Outcome::NotAllowed,
                    format!("{name} is not on the sink's --allowed-agents list"),
                ));
            }
        }
        self.issuer.renew(&name, &request.csr_der)
    }

    /// Counts and logs a decision.
    fn record(&self, call: Call, caller: &Caller, decision: &Result<Granted, Refusal>) {
        let outcome = match decision {
            Ok(granted) => granted.outcome(),
            Err(refusal) => refusal.outcome,
        };
        self.decisions
            .with_label_values(&[call.as_str(), outcome.as_str()])
            .inc();
        match decision {
            Ok(granted) => tracing::info!(
                target: LOG_TARGET,
                security_event = "enrollment",
                call = call.as_str(),
                outcome = outcome.as_str(),
                remote = %caller.remote,
                agent = %granted.name,
                serial = %granted.serial,
                token_id = granted.token_id.as_deref().unwrap_or("-"),
                not_after = %granted.not_after_text(),
                "certificate issued"
            ),
            Err(refusal) => {
                if let Some(more) = self.refusals_log.check() {
                    tracing::warn!(
                        target: LOG_TARGET,
                        security_event = "enrollment",
                        call = call.as_str(),
                        outcome = outcome.as_str(),
                        remote = %caller.remote,
                        agent = refusal.name.as_deref().unwrap_or("-"),
                        token_id = refusal.token_id.as_deref().unwrap_or("-"),
                        earlier_refusals_not_logged = more,
                        "refused: {}",
                        refusal.message
                    );
                }
            }
        }
    }

    /// Runs `decide` for `caller`, rate-limited, on the blocking pool; counted and logged.
    async fn call(
        self: &Arc<Self>,
        call: Call,
        caller: Caller,
        decide: impl FnOnce(&Self, &Caller) -> Result<Granted, Refusal> + Send + 'static,
    ) -> Result<Response<Issued>, Status> {
        let decision = if self.limit.allow(caller.remote.ip(), Instant::now()) {
            let this = self.clone();
            let who = caller.clone();
            tokio::task::spawn_blocking(move || decide(&this, &who))
                .await
                .unwrap_or_else(|_| {
                    Err(Refusal::new(
                        Outcome::Unavailable,
                        "the sink failed to decide",
                    ))
                })
        } else {
            Err(Refusal::new(
                Outcome::RateLimited,
                format!(
                    "too many requests from {}: at most {} at once, then one every {:?}",
                    caller.remote.ip(),
                    super::limit::BURST,
                    super::limit::REFILL
                ),
            ))
        };
        self.record(call, &caller, &decision);
        decision
            .map(|granted| Response::new(granted.into_issued()))
            .map_err(|refusal| Status::new(refusal.outcome.code(), refusal.message))
    }
}

/// The tonic service over [`Enrollments`].
pub(super) struct Service {
    enrollments: Arc<Enrollments>,
}

impl Service {
    pub(super) fn new(enrollments: Arc<Enrollments>) -> Self {
        Self { enrollments }
    }
}

fn caller_of<T>(request: &Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::internal("connection without its caller"))
}

#[tonic::async_trait]
impl Enrollment for Service {
    async fn enroll(&self, request: Request<EnrollRequest>) -> Result<Response<Issued>, Status> {
        let caller = caller_of(&request)?;
        let body = request.into_inner();
        self.enrollments
            .call(Call::Enroll, caller, move |e, _| e.enroll(&body))
            .await
    }

    async fn renew(&self, request: Request<RenewRequest>) -> Result<Response<Issued>, Status> {
        let caller = caller_of(&request)?;
        let body = request.into_inner();
        self.enrollments
            .call(Call::Renew, caller, move |e, who| e.renew(who, &body))
            .await
    }
}
