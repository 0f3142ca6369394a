//! Guest-side PV frontends that drive domio's backends, negotiating as Linux's frontends do.

pub mod blk;
pub mod console;
pub mod frame;
pub mod net;
pub mod netstack;

use std::time::{Duration, Instant};

use xen::DomId;
use xenbus::{XenbusState, XsClient, XsError, XsOps};

use crate::guest::{Guest, GuestError};

/// Errors of a frontend.
#[derive(Debug, thiserror::Error)]
pub enum FrontError {
    /// Guest-side resources.
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// xenstore.
    #[error("frontend {path}: {source}")]
    Xs {
        /// The frontend path.
        path: String,
        /// The error.
        #[source]
        source: XsError,
    },
    /// The backend did not reach the expected state in time.
    #[error("frontend {path}: backend {backend} still in state {state} after {waited:?} (wanted {wanted})")]
    Timeout {
        /// Frontend path.
        path: String,
        /// Backend path.
        backend: String,
        /// Last state seen.
        state: XenbusState,
        /// What we waited for.
        wanted: String,
        /// How long.
        waited: Duration,
    },
    /// The backend wrote something we cannot use.
    #[error("frontend {path}: {why}")]
    Protocol {
        /// Frontend path.
        path: String,
        /// What.
        why: String,
    },
}

/// The xenstore side of one frontend device: its paths and state switching.
#[derive(Debug, Clone)]
pub struct FrontendLink {
    guest: Guest,
    xs: XsClient,
    path: String,
    backend: String,
    backend_id: DomId,
}

impl FrontendLink {
    /// Opens the frontend `device/<kind>/<devid>` of `guest`, reading its `backend` and
    /// `backend-id` nodes (written by the toolstack).
    pub fn open(guest: &Guest, kind: &str, devid: u32) -> Result<FrontendLink, FrontError> {
        let path = format!("/local/domain/{}/device/{kind}/{devid}", guest.domid());
        let xs_err = |source| FrontError::Xs {
            path: path.clone(),
            source,
        };
        let stream = guest.xenstore()?;
        let xs = XsClient::from_unix(stream, &format!("dom{} frontend", guest.domid()))
            .map_err(xs_err)?;
        let backend = xs.read_string(&format!("{path}/backend")).map_err(xs_err)?;
        let backend_id = xs
            .read_string(&format!("{path}/backend-id"))
            .map_err(xs_err)?
            .parse::<DomId>()
            .map_err(|_| FrontError::Protocol {
                path: path.clone(),
                why: "backend-id is not a domid".into(),
            })?;
        Ok(FrontendLink {
            guest: guest.clone(),
            xs,
            path,
            backend,
            backend_id,
        })
    }

    /// The guest.
    pub fn guest(&self) -> &Guest {
        &self.guest
    }
    /// The guest's xenstore connection.
    pub fn xs(&self) -> &XsClient {
        &self.xs
    }
    /// The frontend path.
    pub fn path(&self) -> &str {
        &self.path
    }
    /// The backend path.
    pub fn backend(&self) -> &str {
        &self.backend
    }
    /// The backend domain.
    pub fn backend_id(&self) -> DomId {
        self.backend_id
    }

    fn xs_err(&self) -> impl Fn(XsError) -> FrontError + '_ {
        |source| FrontError::Xs {
            path: self.path.clone(),
            source,
        }
    }

    /// Writes our `state`.
    pub fn switch_state(&self, s: XenbusState) -> Result<(), FrontError> {
        self.xs
            .write(&format!("{}/state", self.path), s.as_str().as_bytes())
            .map_err(self.xs_err())
    }

    /// The backend's current state (Unknown if missing or invalid).
    pub fn backend_state(&self) -> Result<XenbusState, FrontError> {
        match self
            .xs
            .try_read(&format!("{}/state", self.backend))
            .map_err(self.xs_err())?
        {
            Some(v) => Ok(XenbusState::parse(&v).unwrap_or(XenbusState::Unknown)),
            None => Ok(XenbusState::Unknown),
        }
    }

    /// Waits (on a watch, not by polling) until the backend state satisfies `want`.
    pub fn wait_backend(
        &self,
        wanted: &str,
        timeout: Duration,
        want: impl Fn(XenbusState) -> bool,
    ) -> Result<XenbusState, FrontError> {
        let node = format!("{}/state", self.backend);
        let w = self.xs.watch(&node, "fe-wait").map_err(self.xs_err())?;
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.backend_state()?;
            if want(s) {
                return Ok(s);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || w.recv_timeout(left).is_err() {
                let state = self.backend_state()?;
                if want(state) {
                    return Ok(state);
                }
                return Err(FrontError::Timeout {
                    path: self.path.clone(),
                    backend: self.backend.clone(),
                    state,
                    wanted: wanted.to_string(),
                    waited: timeout,
                });
            }
        }
    }
}
