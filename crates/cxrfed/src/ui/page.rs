//! The page frame (header, navigation, "research use only"), error pages, and the mapping of
//! gRPC statuses onto HTTP ones.

use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use cxrfed_auth::Role;
use maud::{DOCTYPE, Markup, html};

use super::security::Csrf;
use super::{Backend, Ui};

/// Whether the request came from htmx (answer with a fragment, not a whole page).
pub fn is_htmx(headers: &HeaderMap) -> bool {
    headers.contains_key("hx-request")
}

fn nav(ui: &Ui) -> Vec<(&'static str, &'static str)> {
    match (&ui.backend, ui.role()) {
        (Backend::Node(_), Some(Role::Researcher | Role::Coordinator)) => {
            vec![("/dp", "DP statistics")]
        }
        (Backend::Node(_), _) => vec![
            ("/", "Status"),
            ("/records", "Records"),
            ("/upload", "Upload"),
            ("/fields", "Fields"),
            ("/label", "Label"),
            ("/stats", "Statistics"),
            ("/dp", "DP statistics"),
            ("/export", "Export"),
            ("/privacy", "Privacy"),
            ("/audit", "Audit"),
        ],
        (Backend::Coordinator(_), Some(Role::Researcher)) => {
            vec![("/", "Sites"), ("/query", "Federated query")]
        }
        (Backend::Coordinator(_), _) => vec![
            ("/", "Sites"),
            ("/query", "Federated query"),
            ("/jobs", "Jobs"),
            ("/models", "Registry"),
        ],
    }
}

/// A whole page: `title`, the body, the navigation with `current` marked.
pub fn frame(ui: &Ui, csrf: &Csrf, current: &str, title: &str, body: Markup) -> Response {
    // htmx sends the CSRF token with every request it makes (an attribute, not a script, so
    // the CSP holds).
    let hx_headers = serde_json::json!({ "X-CSRF-Token": csrf.0 }).to_string();
    let who = ui
        .me
        .as_ref()
        .map_or("no certificate (insecure dev)".to_string(), |m| {
            format!("{} ({})", m.uri(), m.role)
        });
    let kind = match ui.backend {
        Backend::Node(_) => "node",
        Backend::Coordinator(_) => "coordinator",
    };
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                // No inline styles from htmx (the CSP refuses them); errors are swapped in.
                meta name="htmx-config" content=(r#"{"includeIndicatorStyles":false,"allowEval":false,"allowScriptTags":false,"responseHandling":[{"code":"204","swap":false},{"code":"...","swap":true}]}"#);
                title { (title) " · cxrfed" }
                link rel="stylesheet" href="/static/console.css";
                script src="/static/htmx.min.js" defer {}
                script src="/static/console.js" defer {}
            }
            body hx-headers=(hx_headers) {
                a class="skip" href="#main" { "Skip to content" }
                header {
                    p class="brand" { "cxrfed" }
                    p class="who" { (kind) " " code { (ui.target) } " · " (who) }
                    p class="ruo" role="note" { "Research use only — not for diagnosis." }
                    nav aria-label="Main" {
                        ul {
                            @for (href, label) in nav(ui) {
                                li {
                                    @if href == current {
                                        a href=(href) aria-current="page" { (label) }
                                    } @else {
                                        a href=(href) { (label) }
                                    }
                                }
                            }
                        }
                    }
                }
                main id="main" tabindex="-1" {
                    h1 { (title) }
                    (body)
                }
            }
        }
    };
    Html(markup.into_string()).into_response()
}

/// The HTTP status for a gRPC one.
pub fn http_status(code: tonic::Code) -> StatusCode {
    use tonic::Code;
    match code {
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted | Code::FailedPrecondition => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::BAD_GATEWAY,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// What went wrong, as a box a page or fragment shows.
pub fn error_box(heading: &str, detail: &str) -> Markup {
    html! {
        div class="error" role="alert" {
            p { strong { (heading) } }
            p { (detail) }
        }
    }
}

/// A refused or failed call: the server's words, with the matching HTTP status.
pub fn status_markup(status: &tonic::Status) -> Markup {
    let heading = match status.code() {
        tonic::Code::PermissionDenied => {
            "Refused: your certificate's role may not do this".to_string()
        }
        tonic::Code::ResourceExhausted => "Refused: a limit or budget is reached".to_string(),
        code => format!("The server said {code:?}"),
    };
    error_box(&heading, status.message())
}

/// An error as the answer to a page or an htmx request.
pub fn grpc_error(
    ui: &Ui,
    csrf: &Csrf,
    headers: &HeaderMap,
    current: &str,
    title: &str,
    status: &tonic::Status,
) -> Response {
    let code = http_status(status.code());
    let body = status_markup(status);
    let mut response = if is_htmx(headers) {
        Html(body.into_string()).into_response()
    } else {
        frame(ui, csrf, current, title, body)
    };
    *response.status_mut() = code;
    response
}

/// A local error (bad form input) with a status.
pub fn local_error(code: StatusCode, heading: &str, detail: &str) -> Response {
    (code, Html(error_box(heading, detail).into_string())).into_response()
}

/// A bare page for errors outside a session.
pub fn error_page(_ui: &Ui, code: StatusCode, heading: &str, detail: &str) -> Response {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head { meta charset="utf-8"; title { (heading) " · cxrfed" } link rel="stylesheet" href="/static/console.css"; }
            body { main { h1 { (heading) } p { (detail) } } }
        }
    };
    (code, Html(markup.into_string())).into_response()
}

/// A table of text cells.
pub fn table(caption: &str, columns: &[String], rows: &[Vec<String>]) -> Markup {
    html! {
        div class="table-wrap" tabindex="0" role="region" aria-label=(caption) {
            table {
                caption { (caption) }
                thead { tr { @for c in columns { th scope="col" { (c) } } } }
                tbody {
                    @for row in rows {
                        tr { @for cell in row { td { (cell) } } }
                    }
                }
            }
        }
    }
}
