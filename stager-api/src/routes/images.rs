//! `/images`: search over staged images (the rules are `tailor::staging::search`'s).

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use tailor::code::Code;
use tailor::staging::search::{self, Cursor, DEFAULT_LIMIT, InvalidSearch, MAX_LIMIT, SearchQuery};

use crate::auth::Authenticated;
use crate::error::ApiError;
use crate::state::AppState;

fn bad_query(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, Code::InvalidQuery, message)
}

impl From<InvalidSearch> for ApiError {
    fn from(invalid: InvalidSearch) -> Self {
        bad_query(invalid.to_string())
    }
}

/// `GET /images?q=WORDS[&limit=N][&cursor=C]`
pub async fn search(
    _: Authenticated,
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let (mut q, mut limit, mut cursor) = (None, DEFAULT_LIMIT, None);
    let pairs = web::Query::<Vec<(String, String)>>::from_query(req.query_string())
        .map_err(|e| bad_query(format!("the query string does not parse: {e}")))?;
    for (name, value) in pairs.into_inner() {
        match name.as_str() {
            "q" if q.is_none() => q = Some(SearchQuery::parse(&value)?),
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        bad_query(format!(
                            "limit is a whole number from 1 to {MAX_LIMIT}, not {:?}",
                            tailor::text::clean(&value, 40)
                        ))
                    })?;
            }
            "cursor" => cursor = Some(Cursor::parse(&value)?),
            _ => {
                return Err(bad_query(format!(
                    "unexpected query parameter {:?}; q, limit and cursor are accepted, q once",
                    tailor::text::clean(&name, 40)
                )));
            }
        }
    }
    let q = q.ok_or_else(|| bad_query("q is required: the words to look for"))?;
    let page = search::search(&state.db, &q, limit, cursor)
        .await
        .map_err(|e| crate::error::database_error(&e))?;
    Ok(HttpResponse::Ok().json(page))
}
