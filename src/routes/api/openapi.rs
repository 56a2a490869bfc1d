//! The OpenAPI 3.1 document of the management API, generated from the code: each handler's
//! `#[utoipa::path]` (method, path, parameters, bodies, answers) and the types it reads and
//! writes (`ToSchema`). Served without auth at `GET /api/v1/openapi.json`; the dashboard's API
//! reference page is rendered from the same document.

use std::sync::LazyLock;

use axum::Json;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

use super::error::{
    CustomerNotFound, FieldError, IdempotencyInProgress, Problem, RateLimited, Unauthorized, UnsupportedMediaType,
};

/// The name of the security scheme (`security` above names it too): the project's secret key
/// as a bearer token.
pub const SECURITY_SCHEME: &str = "secret_key";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tollgate management API",
        description = "What a tenant's backend does about its customers and budgets without the \
            dashboard. Authenticate with a secret key of the project (`Authorization: Bearer tg_sk_…`); \
            bodies and answers are JSON, amounts are decimal strings in the project's currency (also \
            given in nano-units as `…_nanos`), times are Unix milliseconds unless named otherwise, and \
            every error is `application/problem+json`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    modifiers(&SecretKey),
    security(("secret_key" = [])),
    components(
        schemas(Problem, FieldError),
        responses(Unauthorized, RateLimited, UnsupportedMediaType, IdempotencyInProgress, CustomerNotFound),
    ),
    tags(
        (name = "Customers", description = "Your customers and their budgets, by your own id for them"),
        (name = "Customer tokens", description = "Short-lived tokens for calls made with a publishable key"),
        (name = "Usage", description = "The ledger, by day, customer and model"),
        (name = "Keys", description = "The project's keys"),
        (name = "Project", description = "The project's settings"),
    ),
)]
struct ApiDoc;

/// Adds the bearer scheme that `security` names.
struct SecretKey;

impl utoipa::Modify for SecretKey {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let scheme = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .description(Some(
                "A secret key of the project (`tg_sk_…`), made in the dashboard's Keys page or with \
                 `tollgate admin create-key`. Publishable keys are refused here.",
            ))
            .build();
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(SECURITY_SCHEME, SecurityScheme::Http(scheme));
    }
}

/// What the endpoints' operations are added to.
pub(super) fn base() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The whole document, built once.
pub fn document() -> &'static utoipa::openapi::OpenApi {
    static DOCUMENT: LazyLock<utoipa::openapi::OpenApi> = LazyLock::new(|| super::endpoints().into_openapi());
    &DOCUMENT
}

/// `GET /api/v1/openapi.json`: the document, for clients, code generators and schemathesis.
pub async fn serve() -> Json<&'static utoipa::openapi::OpenApi> {
    Json(document())
}
