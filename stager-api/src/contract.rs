//! The error contract, checked on every answer: each `{"code", ...}` the API sends must be one
//! `specs/openapi.yaml` documents for that operation and status (`x-error-codes`).
//!
//! An answer outside the contract is still sent (refusing it would turn a documentation gap
//! into an outage) but logged as an error and counted in
//! `tailor_api_undocumented_answers_total`. The API tests fail on any such answer, so every
//! error path a test reaches keeps the contract honest; the unit tests below keep the contract's
//! code list equal to [`Code::ALL`].

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use actix_web::Error;
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use serde_json::Value;
use tailor::code::Code;

/// Answers whose code the contract does not document, since the process started.
static UNDOCUMENTED: AtomicU64 = AtomicU64::new(0);

/// How many answers so far carried a code the contract does not document for them.
pub fn undocumented_answers() -> u64 {
    UNDOCUMENTED.load(Ordering::Relaxed)
}

/// Which codes each operation may answer with, by status, as `specs/openapi.yaml` says.
#[derive(Debug)]
pub struct Contract {
    /// (method, path template) -> the (status, code) pairs documented for it.
    operations: HashMap<(String, String), HashSet<(u16, Code)>>,
    /// What a path no route matches may answer (`x-unrouted-error-codes`).
    unrouted: HashSet<(u16, Code)>,
}

/// Why the contract document cannot be read as one.
#[derive(Debug, thiserror::Error)]
#[error("specs/openapi.yaml: {0}")]
pub struct ContractError(String);

impl Contract {
    /// The contract this binary serves at `/openapi.json`.
    pub fn served() -> &'static Contract {
        static CONTRACT: OnceLock<Contract> = OnceLock::new();
        CONTRACT.get_or_init(|| {
            Contract::parse(crate::routes::openapi_document())
                .expect("specs/openapi.yaml's error codes parse (a unit test checks it)")
        })
    }

    /// Reads every operation's `x-error-codes` (`{status: [CODE, ...]}`).
    pub fn parse(document: &Value) -> Result<Self, ContractError> {
        let mut operations = HashMap::new();
        let paths = document["paths"]
            .as_object()
            .ok_or_else(|| ContractError("no paths".into()))?;
        for (path, item) in paths {
            let Some(item) = item.as_object() else {
                continue;
            };
            for (method, operation) in item {
                if !matches!(method.as_str(), "get" | "put" | "post" | "delete" | "patch") {
                    continue;
                }
                let codes = status_codes(
                    &operation["x-error-codes"],
                    &format!("{} {path}", method.to_uppercase()),
                )?;
                operations.insert((method.to_uppercase(), path.clone()), codes);
            }
        }
        let unrouted = status_codes(&document["x-unrouted-error-codes"], "unrouted paths")?;
        Ok(Self {
            operations,
            unrouted,
        })
    }

    /// Whether `code` with `status` is documented for the operation (`route`: the path template
    /// the request's path matches, `None` when it matches none). A method no operation of that
    /// path takes (`HEAD /_ping`, `GET /references`) is answered like a path no route matches.
    pub fn documents(&self, method: &str, route: Option<&str>, status: u16, code: Code) -> bool {
        let operation =
            route.and_then(|route| self.operations.get(&(method.to_owned(), route.to_owned())));
        operation
            .unwrap_or(&self.unrouted)
            .contains(&(status, code))
    }
}

/// Parses `{ "400": ["MALFORMED_JSON", ...], ... }`.
fn status_codes(value: &Value, what: &str) -> Result<HashSet<(u16, Code)>, ContractError> {
    let by_status = value
        .as_object()
        .ok_or_else(|| ContractError(format!("{what}: no x-error-codes map")))?;
    let mut pairs = HashSet::new();
    for (status, codes) in by_status {
        let status: u16 = status
            .parse()
            .map_err(|_| ContractError(format!("{what}: {status:?} is not an HTTP status")))?;
        let codes = codes
            .as_array()
            .ok_or_else(|| ContractError(format!("{what} {status}: not a list of codes")))?;
        for code in codes {
            let code = code
                .as_str()
                .unwrap_or_default()
                .parse::<Code>()
                .map_err(|e| ContractError(format!("{what} {status}: {e}")))?;
            pairs.insert((status, code));
        }
    }
    Ok(pairs)
}

/// Middleware: checks each answer's code (left in the response's extensions by
/// [`crate::error::ApiError`]) against the contract.
pub async fn check(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    let response = next.call(req).await?;
    let code = response.response().extensions().get::<Code>().copied();
    if let Some(code) = code {
        let request = response.request();
        let method = request.method().as_str();
        let route = request.match_pattern();
        let status = response.status().as_u16();
        if !Contract::served().documents(method, route.as_deref(), status, code) {
            UNDOCUMENTED.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                %code,
                status,
                method,
                route = route.as_deref().unwrap_or("(none)"),
                "an answer specs/openapi.yaml does not document for this operation"
            );
        }
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn document() -> &'static Value {
        crate::routes::openapi_document()
    }

    #[test]
    fn the_contract_lists_every_code_in_order_with_its_meaning() {
        let schema = &document()["components"]["schemas"]["ErrorCode"];
        let listed: Vec<&str> = schema["enum"]
            .as_array()
            .expect("ErrorCode.enum")
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let codes: Vec<&str> = Code::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(listed, codes, "ErrorCode.enum must equal Code::ALL");
        for code in Code::ALL {
            assert_eq!(
                schema["x-enum-descriptions"][code.as_str()].as_str(),
                Some(code.meaning()),
                "{code}: its description in specs/openapi.yaml"
            );
        }
        assert_eq!(
            schema["x-enum-descriptions"].as_object().unwrap().len(),
            Code::ALL.len()
        );
    }

    #[test]
    fn every_operation_documents_its_codes_and_every_code_is_answered_somewhere() {
        let contract = Contract::parse(document()).unwrap();
        let mut used: BTreeSet<&str> = BTreeSet::new();
        for ((method, path), pairs) in &contract.operations {
            let operation = &document()["paths"][path][method.to_lowercase()];
            for (status, code) in pairs {
                assert!(
                    operation["responses"][status.to_string()].is_object(),
                    "{method} {path}: x-error-codes names {status}, which its responses lack"
                );
                used.insert(code.as_str());
            }
            for (status, _) in operation["responses"].as_object().unwrap() {
                let status: u16 = status.parse().unwrap();
                if status >= 400 && path != "/_status" {
                    assert!(
                        pairs.iter().any(|(s, _)| *s == status),
                        "{method} {path}: a {status} response with no code in x-error-codes"
                    );
                }
            }
        }
        used.extend(contract.unrouted.iter().map(|(_, code)| code.as_str()));
        let schemas = &document()["components"]["schemas"];
        for list in [
            &schemas["Staging"]["properties"]["error"]["x-error-codes"],
            &schemas["ErrorCode"]["x-cli-codes"],
        ] {
            for code in list.as_array().expect("a list of codes") {
                let code = code.as_str().unwrap();
                assert!(code.parse::<Code>().is_ok(), "{code} is not a code");
                used.insert(code);
            }
        }
        let all: BTreeSet<&str> = Code::ALL.iter().map(|c| c.as_str()).collect();
        let unused: Vec<_> = all.difference(&used).collect();
        assert!(
            unused.is_empty(),
            "codes no operation, staging outcome or CLI list names: {unused:?}"
        );
    }

    #[test]
    fn an_undocumented_pair_is_not_documented() {
        let contract = Contract::served();
        assert!(contract.documents("POST", Some("/stage"), 422, Code::InvalidReference));
        assert!(!contract.documents("POST", Some("/stage"), 400, Code::InvalidReference));
        assert!(!contract.documents(
            "GET",
            Some("/stage/{staging_guid}"),
            409,
            Code::StagingConflict
        ));
        assert!(contract.documents("GET", None, 404, Code::NotFound));
        // A method the path's operations do not take gets the unrouted answer.
        assert!(contract.documents("HEAD", Some("/_ping"), 404, Code::NotFound));
        assert!(!contract.documents("HEAD", Some("/_ping"), 409, Code::StagingConflict));
    }

    #[actix_web::test]
    async fn the_middleware_counts_an_undocumented_answer_and_only_that() {
        use actix_web::http::StatusCode;
        use actix_web::{App, test, web};

        use crate::error::ApiError;

        let app = test::init_service(
            App::new()
                .wrap(actix_web::middleware::from_fn(check))
                .route(
                    "/stage/{staging_guid}",
                    web::get().to(|path: web::Path<String>| async move {
                        let code = if path.as_str() == "conflict" {
                            Code::StagingConflict
                        } else {
                            Code::NotFound
                        };
                        let status = if code == Code::NotFound { 404 } else { 409 };
                        Err::<String, _>(ApiError::new(
                            StatusCode::from_u16(status).unwrap(),
                            code,
                            "for the test",
                        ))
                    }),
                ),
        )
        .await;
        let before = undocumented_answers();
        let documented = test::TestRequest::get().uri("/stage/missing").to_request();
        assert_eq!(test::call_service(&app, documented).await.status(), 404);
        assert_eq!(undocumented_answers(), before);
        let undocumented = test::TestRequest::get().uri("/stage/conflict").to_request();
        assert_eq!(test::call_service(&app, undocumented).await.status(), 409);
        assert_eq!(undocumented_answers(), before + 1);
    }
}
