//! Errors as OpenAI's API writes them (`{"error": {"message", "type", "param",
//! "code"}}`) with the HTTP status that fits, so that clients raise the error they
//! know (`openai.BadRequestError`, `RateLimitError`...).
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
    pub message: String,
    /// Seconds, for a 429.
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            kind,
            param: None,
            code: None,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 400: a request that cannot be answered as it is.
    pub fn invalid(param: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            param: Some(param),
            ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    /// 400 with a machine-readable code.
    pub fn invalid_code(
        param: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            code: Some(code),
            ..ApiError::invalid(param, message)
        }
    }

    pub fn unknown_model(model: &str, known: &[String]) -> ApiError {
        ApiError {
            param: Some("model"),
            code: Some("model_not_found"),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("the model {model:?} is not served here; these are: {known:?}"),
            )
        }
    }

    pub fn too_large(limit: usize) -> ApiError {
        ApiError {
            code: Some("request_too_large"),
            ..ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("the request body is larger than the limit of {limit} bytes"),
            )
        }
    }

    pub fn unauthorized() -> ApiError {
        ApiError {
            code: Some("invalid_api_key"),
            ..ApiError::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "a valid bearer token is required (Authorization: Bearer <key>)",
            )
        }
    }

    pub fn busy(message: impl Into<String>) -> ApiError {
        ApiError {
            code: Some("rate_limit_exceeded"),
            retry_after: Some(1),
            ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
        }
    }

    pub fn timeout(ms: u64) -> ApiError {
        ApiError {
            code: Some("timeout"),
            ..ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout_error",
                format!("not answered within the server's {ms} ms"),
            )
        }
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    pub fn not_found(path: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("no such endpoint: {path}"),
        )
    }

    /// The body, also sent as an event when a streamed reply fails after it began.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl From<paligemma_stream::Error> for ApiError {
    fn from(e: paligemma_stream::Error) -> ApiError {
        use paligemma_stream::Error as E;
        match e {
            E::Prompts(m) => ApiError::invalid("messages[0].content", format!("the task: {m}")),
            E::Frame(m) => ApiError::invalid_code("image_url", "invalid_image", m),
            E::Busy(n) => ApiError::busy(format!("{n} requests are waiting already")),
            E::Timeout(ms) => ApiError::timeout(ms),
            e @ (E::Engine(_) | E::Stopped | E::NoFrame) => ApiError::internal(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
