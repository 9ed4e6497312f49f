//! Errors to HTTP: every failure becomes `{"error": "..."}` with the right status; a
//! store outage becomes 503 with `Retry-After`.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;
use tracing::error;

use crate::actors::shadow::ExecError;
use crate::domain::shadow::ShadowError;
use crate::idempotency::IdemError;
use crate::ports::store::StoreError;

/// An error answered to an HTTP client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 400.
    #[error("{0}")]
    BadRequest(String),
    /// 401.
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// 404.
    #[error("{0}")]
    NotFound(String),
    /// 405.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 409.
    #[error("{0}")]
    Conflict(String),
    /// 413.
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// 415.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 422.
    #[error("{0}")]
    Unprocessable(String),
    /// 503 with `Retry-After`.
    #[error("{message}")]
    Unavailable {
        /// What is unavailable.
        message: String,
        /// Seconds for `Retry-After`.
        retry_after: u64,
    },
    /// 500.
    #[error("internal error")]
    Internal(String),
    /// 500: the store refused the request as invalid (etcd `InvalidArgument` or
    /// `FailedPrecondition`, e.g. a transaction too large); retrying the same request
    /// cannot help, so no `Retry-After`.
    #[error("the state store refused the request as invalid (retrying will not help): {0}")]
    StoreRefused(String),
    /// An upstream (Kubernetes API server) error passed through with its status.
    #[error("{1}")]
    Upstream(u16, String),
}

impl ApiError {
    /// Maps a store failure: an outage (or a lost lease, or a compacted watch) is 503
    /// with `Retry-After`; a request the store refused as invalid is 500.
    pub fn from_store(e: StoreError, retry_after: u64) -> Self {
        match e {
            StoreError::Other(m) => Self::StoreRefused(m),
            StoreError::Unavailable(m) => Self::Unavailable {
                message: format!("state store unavailable: {m}"),
                retry_after,
            },
            other => Self::Unavailable {
                message: format!("state store error: {other}"),
                retry_after,
            },
        }
    }

    /// Maps an actor failure; `retry_after` is used for store outages.
    pub fn from_exec(e: ExecError, retry_after: u64) -> Self {
        match e {
            ExecError::Domain(d) => match d {
                ShadowError::NotFound => Self::NotFound(d.to_string()),
                ShadowError::NotOwner
                | ShadowError::NotProcured
                | ShadowError::StillProcured
                | ShadowError::NoLease
                | ShadowError::HoldGone => Self::Conflict(d.to_string()),
                ShadowError::CountTooLarge | ShadowError::BadLease => {
                    Self::BadRequest(d.to_string())
                }
            },
            ExecError::Store(e) => Self::from_store(e, retry_after),
            ExecError::Idempotency(IdemError::Mismatch) => {
                Self::Unprocessable(IdemError::Mismatch.to_string())
            }
            ExecError::Contention => Self::Unavailable {
                message: e.to_string(),
                retry_after,
            },
            ExecError::Mailbox => Self::Unavailable {
                message: "actor unavailable; retry".into(),
                retry_after,
            },
            ExecError::Busy => Self::Unavailable {
                message: format!("{e}; retry (with the same idempotency key)"),
                retry_after,
            },
            other => Self::Internal(other.to_string()),
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) | Self::StoreRefused(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Upstream(code, _) => {
                StatusCode::from_u16(*code).unwrap_or(StatusCode::BAD_GATEWAY)
            }
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut resp = HttpResponse::build(self.status_code());
        match self {
            Self::Unavailable { retry_after, .. } => {
                resp.insert_header((header::RETRY_AFTER, retry_after.to_string()));
            }
            Self::Unauthorized => {
                resp.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
            }
            Self::Internal(detail) => error!(detail = %detail, "internal error"),
            Self::StoreRefused(detail) => error!(detail = %detail, "store refused a request"),
            _ => {}
        }
        resp.json(json!({ "error": self.to_string() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_refusal_is_not_a_retryable_outage() {
        let refused = ApiError::from_exec(
            ExecError::Store(StoreError::Other(
                "etcdserver: too many operations in txn request".into(),
            )),
            2,
        );
        assert_eq!(refused.status_code(), StatusCode::INTERNAL_SERVER_ERROR);
        let shown = refused.to_string();
        assert!(
            shown.contains("refused") && shown.contains("too many operations"),
            "{shown}"
        );
        assert!(!refused
            .error_response()
            .headers()
            .contains_key(header::RETRY_AFTER));
        let outage = ApiError::from_exec(ExecError::Store(StoreError::Unavailable("x".into())), 2);
        assert_eq!(outage.status_code(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
