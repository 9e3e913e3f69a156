//! Authorization: one tower layer in front of every service of a server. It turns the
//! connection's verified certificate into an [`Identity`], re-checks it against the current
//! CRL and the clock, looks the method up in the server's [`Policy`] (every RPC declares the
//! roles that may call it; a method without a rule is refused), logs every denial with the
//! identity and the method, and hands the identity to the handler in the request extensions.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::Status;

use crate::identity::{Identity, Role};
use crate::listener::{PeerAuth, PeerInfo};
use crate::tls::ReloadingTls;

/// Who may call one RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Only an admin of this server's own site.
    SiteAdmin,
    /// Any identity with one of these roles (and the site admin, who may call everything).
    Roles(&'static [Role]),
    /// Any verified identity of the study (health checks, reflection).
    AnyIdentity,
}

/// The rules of one server, keyed by full method path (`/package.Service/Method`).
#[derive(Debug, Clone)]
pub struct Policy {
    site: Option<String>,
    rules: HashMap<String, Rule>,
}

impl Policy {
    /// A policy for a server of `site` (`None` for the coordinator, which has no site admin).
    pub fn new(site: Option<&str>) -> Policy {
        Policy {
            site: site.map(str::to_string),
            rules: HashMap::new(),
        }
    }

    /// Declares the rule of every method of `service` (`package.Service`).
    pub fn service(mut self, service: &str, methods: &[(&str, Rule)]) -> Policy {
        for (method, rule) in methods {
            self.rules.insert(format!("/{service}/{method}"), *rule);
        }
        self
    }

    /// gRPC health checking and server reflection: any identity of the study.
    pub fn with_health_and_reflection(self) -> Policy {
        self.service(
            "grpc.health.v1.Health",
            &[("Check", Rule::AnyIdentity), ("Watch", Rule::AnyIdentity)],
        )
        .service(
            "grpc.reflection.v1.ServerReflection",
            &[("ServerReflectionInfo", Rule::AnyIdentity)],
        )
        .service(
            "grpc.reflection.v1alpha.ServerReflection",
            &[("ServerReflectionInfo", Rule::AnyIdentity)],
        )
    }

    pub fn rule(&self, path: &str) -> Option<Rule> {
        self.rules.get(path).copied()
    }

    pub fn methods(&self) -> impl Iterator<Item = &str> {
        self.rules.keys().map(String::as_str)
    }

    fn is_site_admin(&self, identity: &Identity) -> bool {
        identity.role == Role::Admin
            && self.site.is_some()
            && identity.site.as_deref() == self.site.as_deref()
    }

    /// Whether `identity` may call `path`; the error names the role needed.
    pub fn authorize(&self, path: &str, identity: &Identity) -> Result<(), String> {
        let Some(rule) = self.rule(path) else {
            return Err(format!("{path} has no authorization rule and is refused"));
        };
        if self.is_site_admin(identity) {
            return Ok(());
        }
        let site_admin = || match &self.site {
            Some(site) => format!("admin of site {site}"),
            None => "admin".to_string(),
        };
        let allowed = match rule {
            Rule::AnyIdentity => true,
            Rule::Roles(roles) => roles.contains(&identity.role),
            Rule::SiteAdmin => false,
        };
        if allowed {
            return Ok(());
        }
        let needed = match rule {
            Rule::SiteAdmin => site_admin(),
            Rule::Roles(roles) => roles
                .iter()
                .map(|r| r.as_str().to_string())
                // A server without a site (the coordinator) has no site admin to name.
                .chain(self.site.is_some().then(site_admin))
                .collect::<Vec<_>>()
                .join(" or "),
            Rule::AnyIdentity => "any identity".into(),
        };
        Err(format!(
            "{path} requires role {needed}; the caller is {} {} of {}",
            identity.role,
            identity.name,
            identity
                .site
                .as_deref()
                .map(|s| format!("site {s}"))
                .unwrap_or_else(|| "no site".into())
        ))
    }
}

/// The method an admitted request calls (`Extract` of `/cxrfed.v1.NodeService/Extract`), set
/// in the request's extensions with the caller's [`Identity`], so handlers log and trace it
/// without repeating their own name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcMethod(pub String);

impl RpcMethod {
    pub fn from_path(path: &str) -> RpcMethod {
        RpcMethod(path.rsplit('/').next().unwrap_or(path).to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The tower layer; add it with `tonic::transport::Server::builder().layer(...)`.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    policy: Arc<Policy>,
    tls: Option<Arc<ReloadingTls>>,
}

impl AuthLayer {
    /// `tls` is the server's reloading TLS material (for per-request revocation checks);
    /// `None` under `--insecure-dev`.
    pub fn new(policy: Policy, tls: Option<Arc<ReloadingTls>>) -> AuthLayer {
        AuthLayer {
            policy: Arc::new(policy),
            tls,
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    layer: AuthLayer,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl AuthLayer {
    /// The caller's identity for `path`, or the status to answer with.
    fn check(&self, path: &str, peer: Option<&PeerInfo>) -> Result<Identity, Status> {
        let remote = peer
            .and_then(|p| p.remote)
            .map(|r| r.to_string())
            .unwrap_or_default();
        let identity = match peer.map(|p| p.auth.as_ref()) {
            Some(PeerAuth::Verified(identity)) => {
                let still_valid = match &self.tls {
                    Some(tls) => tls.current().still_valid(identity),
                    None => Ok(()),
                };
                if let Err(reason) = still_valid {
                    tracing::warn!(
                        method = path,
                        identity = %identity,
                        remote = remote.as_str(),
                        reason = reason.as_str(),
                        "request denied: UNAUTHENTICATED"
                    );
                    return Err(Status::unauthenticated(reason));
                }
                identity.clone()
            }
            Some(PeerAuth::InsecureDev(identity)) => identity.clone(),
            Some(PeerAuth::Rejected(rejection)) => {
                tracing::warn!(
                    method = path,
                    claimed_identity = rejection.claimed.as_deref().unwrap_or("-"),
                    cert_fingerprint = rejection.fingerprint.as_deref().unwrap_or("-"),
                    remote = remote.as_str(),
                    reason = rejection.reason.as_str(),
                    "request denied: UNAUTHENTICATED"
                );
                return Err(Status::unauthenticated(rejection.reason.clone()));
            }
            None => {
                tracing::warn!(
                    method = path,
                    "request denied: connection has no peer information"
                );
                return Err(Status::unauthenticated("unauthenticated connection"));
            }
        };
        if let Err(reason) = self.policy.authorize(path, &identity) {
            tracing::warn!(
                method = path,
                identity = %identity,
                remote = remote.as_str(),
                reason = reason.as_str(),
                "request denied: PERMISSION_DENIED"
            );
            return Err(Status::permission_denied(reason));
        }
        Ok(identity)
    }
}

impl<S, B, RB> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let path = request.uri().path().to_string();
        match self
            .layer
            .check(&path, request.extensions().get::<PeerInfo>())
        {
            Ok(identity) => {
                request.extensions_mut().insert(identity);
                request.extensions_mut().insert(RpcMethod::from_path(&path));
                // The service that was polled ready serves this call; a fresh clone takes its
                // place for the next one (tower's usual pattern).
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(async move { inner.call(request).await })
            }
            Err(status) => Box::pin(async move { Ok(status.into_http()) }),
        }
    }
}
