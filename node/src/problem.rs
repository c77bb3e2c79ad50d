//! Errors as the API reports them: RFC 9457 problem+json, Japanese first, English on request.

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use protocol::validation::CaptureError;
use serde::Serialize;

/// A refused request: what, where, and why, in both languages.
#[derive(Debug, Clone)]
pub struct Problem {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine code, e.g. `coupon_revoked`.
    pub code: String,
    /// The request field at fault, if one is.
    pub field: Option<String>,
    /// English message.
    pub message_en: String,
    /// Japanese message.
    pub message_ja: String,
}

impl Problem {
    /// A problem with both messages.
    pub fn new(
        status: StatusCode,
        code: &str,
        field: Option<&str>,
        en: impl Into<String>,
        ja: impl Into<String>,
    ) -> Self {
        Self {
            status,
            code: code.to_owned(),
            field: field.map(str::to_owned),
            message_en: en.into(),
            message_ja: ja.into(),
        }
    }

    /// 404 for something looked up by id.
    pub fn not_found(what_en: &str, what_ja: &str, id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            None,
            format!("no {what_en} {id}"),
            format!("{what_ja} {id} は見つかりません"),
        )
    }

    /// 400 for a malformed field.
    pub fn bad_field(field: &str, en: impl Into<String>, ja: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_field", Some(field), en, ja)
    }

    /// 500: the detail goes to the log, never to the caller.
    pub fn internal(error: &anyhow::Error) -> Self {
        tracing::error!(error = format!("{error:#}"), "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            None,
            "internal error; nothing was recorded, please retry",
            "内部エラーが発生しました。記録されていません。再度お試しください",
        )
    }

    /// The response in the language the caller asked for.
    pub fn into_response_for(self, headers: &HeaderMap) -> Response {
        let english = prefers_english(headers);
        let extension = self.clone();
        let body = ProblemBody {
            r#type: format!("urn:vrs:problem:{}", self.code),
            title: if english { self.message_en.clone() } else { self.message_ja.clone() },
            status: self.status.as_u16(),
            code: self.code.clone(),
            field: self.field.clone(),
            detail_ja: self.message_ja,
            detail_en: self.message_en,
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        response.extensions_mut().insert(extension);
        response
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        self.into_response_for(&HeaderMap::new())
    }
}

#[derive(Serialize)]
struct ProblemBody {
    r#type: String,
    title: String,
    status: u16,
    code: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<String>,
    detail_ja: String,
    detail_en: String,
}

/// Whether `Accept-Language` puts English before Japanese.
pub fn prefers_english(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::ACCEPT_LANGUAGE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    for part in value.split(',') {
        let tag = part.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        if tag.starts_with("ja") {
            return false;
        }
        if tag.starts_with("en") {
            return true;
        }
    }
    false
}

impl From<CaptureError> for Problem {
    fn from(error: CaptureError) -> Self {
        let status = if error.is_conflict() {
            StatusCode::CONFLICT
        } else if matches!(error, CaptureError::CouponNotIssued { .. } | CaptureError::DoseNotFound { .. }) {
            StatusCode::NOT_FOUND
        } else if matches!(error, CaptureError::MalformedCoupon(_) | CaptureError::MalformedVial(_)) {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::UNPROCESSABLE_ENTITY
        };
        Problem::new(status, error.code(), Some(error.field()), error.to_string(), error.message_ja())
    }
}
