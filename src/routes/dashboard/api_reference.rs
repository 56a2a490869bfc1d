//! The API reference page of a project (`/projects/{id}/api`): every endpoint of the management
//! API with its parameters, bodies and answers, rendered from the generated OpenAPI document
//! (the one served at `/api/v1/openapi.json`), so the page and the API cannot drift apart.
//! Plain HTML: the dashboard's CSP allows no script, and none is needed.

use askama::Template;
use askama_web::WebTemplate;
use axum::extract::{Path, State};
use serde_json::{Map, Value};
use tollgate_core::projects::Project;

use super::error::WebError;
use super::projects::load_project;
use super::session::Member;
use crate::state::AppState;

/// A run of text, `code` when it was between backticks in the document.
pub struct Text {
    code: bool,
    text: String,
}

/// Text of the document with its `code` spans marked.
fn prose(text: &str) -> Vec<Text> {
    text.split('`')
        .enumerate()
        .filter(|(_, t)| !t.is_empty())
        .map(|(i, t)| Text { code: i % 2 == 1, text: t.to_owned() })
        .collect()
}

/// A piece of a type's name, linked to the schema it names.
pub struct TypePart {
    text: String,
    href: Option<String>,
}

impl TypePart {
    fn text(text: impl Into<String>) -> Self {
        TypePart { text: text.into(), href: None }
    }
}

pub struct Field {
    name: String,
    /// `query`, `path` or `header` for parameters; empty for properties.
    location: String,
    required: bool,
    kind: Vec<TypePart>,
    constraints: String,
    description: Vec<Text>,
}

pub struct Media {
    content_type: String,
    kind: Vec<TypePart>,
}

pub struct Answer {
    status: String,
    error: bool,
    description: Vec<Text>,
    media: Vec<Media>,
    headers: Vec<HeaderDoc>,
}

pub struct HeaderDoc {
    name: String,
    description: Vec<Text>,
}

pub struct Endpoint {
    anchor: String,
    method: String,
    path: String,
    summary: String,
    description: Vec<Text>,
    params: Vec<Field>,
    body: Vec<Media>,
    answers: Vec<Answer>,
    curl: String,
}

pub struct Section {
    name: String,
    description: Vec<Text>,
    endpoints: Vec<Endpoint>,
}

pub struct SchemaDoc {
    name: String,
    description: Vec<Text>,
    /// What it is when it is not a plain object: an enum's values, the schemas it extends.
    summary: Vec<TypePart>,
    fields: Vec<Field>,
}

#[derive(Template, WebTemplate)]
#[template(path = "api.html")]
pub struct ApiReferencePage {
    me: Member,
    project: Project,
    base_url: String,
    title: String,
    version: String,
    description: Vec<Text>,
    sections: Vec<Section>,
    schemas: Vec<SchemaDoc>,
}

pub async fn page(
    State(state): State<AppState>,
    me: Member,
    Path(id): Path<String>,
) -> Result<ApiReferencePage, WebError> {
    let project = load_project(&state, &me, &id).await?;
    let base_url = state.config.public_url.trim_end_matches('/').to_owned();
    let document = serde_json::to_value(crate::routes::api::openapi::document()).map_err(|e| {
        tracing::error!(error = %e, "the OpenAPI document does not serialize");
        WebError::Internal
    })?;
    let reference = Reference::new(&document, &base_url);
    Ok(ApiReferencePage {
        me,
        project,
        title: str_at(&document, "/info/title"),
        version: str_at(&document, "/info/version"),
        description: prose(&str_at(&document, "/info/description")),
        sections: reference.sections(),
        schemas: reference.schemas(),
        base_url,
    })
}

fn str_at(value: &Value, pointer: &str) -> String {
    value.pointer(pointer).and_then(Value::as_str).unwrap_or_default().to_owned()
}

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];
const SCHEMA_REF: &str = "#/components/schemas/";
const RESPONSE_REF: &str = "#/components/responses/";

/// Reads the OpenAPI document into the page's parts.
struct Reference<'a> {
    document: &'a Value,
    base_url: &'a str,
}

impl<'a> Reference<'a> {
    fn new(document: &'a Value, base_url: &'a str) -> Self {
        Reference { document, base_url }
    }

    /// The endpoints by tag, in the document's order of tags and paths.
    fn sections(&self) -> Vec<Section> {
        let empty = Map::new();
        let paths = self.document["paths"].as_object().unwrap_or(&empty);
        let mut endpoints: Vec<(String, Endpoint)> = Vec::new();
        for (path, item) in paths {
            for method in METHODS {
                if let Some(operation) = item.get(method) {
                    let tag = operation.pointer("/tags/0").and_then(Value::as_str).unwrap_or("Other").to_owned();
                    endpoints.push((tag, self.endpoint(method, path, operation)));
                }
            }
        }
        let mut sections: Vec<Section> = self.document["tags"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|tag| Section {
                name: str_at(tag, "/name"),
                description: prose(&str_at(tag, "/description")),
                endpoints: Vec::new(),
            })
            .collect();
        for (tag, endpoint) in endpoints {
            match sections.iter_mut().find(|s| s.name == tag) {
                Some(section) => section.endpoints.push(endpoint),
                None => sections.push(Section { name: tag, description: Vec::new(), endpoints: vec![endpoint] }),
            }
        }
        sections.retain(|s| !s.endpoints.is_empty());
        sections
    }

    fn endpoint(&self, method: &str, path: &str, operation: &Value) -> Endpoint {
        let params: Vec<Field> =
            operation["parameters"].as_array().into_iter().flatten().map(|p| self.parameter(p)).collect();
        let body = self.media(&operation["requestBody"]["content"]);
        let answers = operation["responses"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(status, answer)| self.answer(status, answer))
            .collect();
        Endpoint {
            anchor: str_at(operation, "/operationId"),
            method: method.to_uppercase(),
            path: path.to_owned(),
            summary: str_at(operation, "/summary"),
            description: prose(&str_at(operation, "/description")),
            curl: self.curl(method, path, operation),
            params,
            body,
            answers,
        }
    }

    fn parameter(&self, p: &Value) -> Field {
        Field {
            name: str_at(p, "/name"),
            location: str_at(p, "/in"),
            required: p["required"].as_bool().unwrap_or(false),
            kind: self.type_parts(&p["schema"]),
            constraints: constraints(&p["schema"]),
            description: prose(&str_at(p, "/description")),
        }
    }

    fn media(&self, content: &Value) -> Vec<Media> {
        content
            .as_object()
            .into_iter()
            .flatten()
            .map(|(content_type, media)| Media {
                content_type: content_type.clone(),
                kind: self.type_parts(&media["schema"]),
            })
            .collect()
    }

    fn answer(&self, status: &str, answer: &Value) -> Answer {
        let answer = self.resolve(answer, RESPONSE_REF, "responses");
        let headers = answer["headers"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(name, header)| HeaderDoc { name: name.clone(), description: prose(&str_at(header, "/description")) })
            .collect();
        Answer {
            status: status.to_owned(),
            error: !status.starts_with('2'),
            description: prose(&str_at(answer, "/description")),
            media: self.media(&answer["content"]),
            headers,
        }
    }

    /// `value`, or what it refers to when it is a `$ref` to `prefix…` (in `components/{kind}`).
    fn resolve<'v>(&'v self, value: &'v Value, prefix: &str, kind: &str) -> &'v Value {
        match value["$ref"].as_str().and_then(|r| r.strip_prefix(prefix)) {
            Some(name) => self.document["components"][kind].get(name).unwrap_or(value),
            None => value,
        }
    }

    /// A schema's type in words, its named schemas linked.
    fn type_parts(&self, schema: &Value) -> Vec<TypePart> {
        if let Some(name) = schema["$ref"].as_str().and_then(|r| r.strip_prefix(SCHEMA_REF)) {
            return vec![TypePart { text: name.to_owned(), href: Some(format!("#schema-{name}")) }];
        }
        for (key, word) in [("oneOf", " or "), ("anyOf", " or "), ("allOf", " and ")] {
            if let Some(items) = schema[key].as_array() {
                return self.joined(items.iter().map(|s| self.type_parts(s)), word);
            }
        }
        if let Some(values) = schema["enum"].as_array() {
            let values: Vec<String> = values.iter().map(Value::to_string).collect();
            return vec![TypePart::text(format!("one of {}", values.join(", ")))];
        }
        let types: Vec<&str> = match &schema["type"] {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        if types.is_empty() {
            return vec![TypePart::text("any")];
        }
        self.joined(
            types.into_iter().map(|t| match t {
                "array" => {
                    let mut parts = vec![TypePart::text("array of ")];
                    parts.extend(self.type_parts(&schema["items"]));
                    parts
                }
                other => vec![TypePart::text(other)],
            }),
            " or ",
        )
    }

    fn joined(&self, alternatives: impl Iterator<Item = Vec<TypePart>>, word: &str) -> Vec<TypePart> {
        let mut parts = Vec::new();
        for (i, alternative) in alternatives.enumerate() {
            if i > 0 {
                parts.push(TypePart::text(word));
            }
            parts.extend(alternative);
        }
        parts
    }

    /// Every named schema, in the document's order.
    fn schemas(&self) -> Vec<SchemaDoc> {
        let empty = Map::new();
        let schemas = self.document["components"]["schemas"].as_object().unwrap_or(&empty);
        schemas
            .iter()
            .map(|(name, schema)| {
                let mut doc = SchemaDoc {
                    name: name.clone(),
                    description: prose(&str_at(schema, "/description")),
                    summary: Vec::new(),
                    fields: Vec::new(),
                };
                match schema["allOf"].as_array() {
                    Some(parts) => {
                        let named: Vec<&Value> = parts.iter().filter(|p| p.get("$ref").is_some()).collect();
                        if !named.is_empty() {
                            doc.summary.push(TypePart::text("The fields of "));
                            doc.summary.extend(self.joined(named.into_iter().map(|p| self.type_parts(p)), " and "));
                            doc.summary.push(TypePart::text(", and:"));
                        }
                        for part in parts.iter().filter(|p| p.get("$ref").is_none()) {
                            doc.fields.extend(self.properties(part));
                        }
                    }
                    None if schema.get("properties").is_some() => doc.fields = self.properties(schema),
                    None => doc.summary = self.type_parts(schema),
                }
                doc
            })
            .collect()
    }

    /// The properties of an object schema: the required ones first, in the order the schema
    /// lists them (a JSON object here keeps no order of its own), then the others by name.
    fn properties(&self, schema: &Value) -> Vec<Field> {
        let required: Vec<&str> =
            schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        let mut fields: Vec<(usize, Field)> = schema["properties"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(name, property)| {
                let rank = required.iter().position(|r| r == name).unwrap_or(usize::MAX);
                let field = Field {
                    name: name.clone(),
                    location: String::new(),
                    required: rank != usize::MAX,
                    kind: self.type_parts(property),
                    constraints: constraints(property),
                    description: prose(&description_of(property)),
                };
                (rank, field)
            })
            .collect();
        fields.sort_by(|(a, fa), (b, fb)| a.cmp(b).then_with(|| fa.name.cmp(&fb.name)));
        fields.into_iter().map(|(_, field)| field).collect()
    }

    /// A curl command for the operation, with the examples of the document filled in.
    fn curl(&self, method: &str, path: &str, operation: &Value) -> String {
        let mut path = path.to_owned();
        let mut query = Vec::new();
        for p in operation["parameters"].as_array().into_iter().flatten() {
            let name = str_at(p, "/name");
            let example = p.get("example").or_else(|| p["schema"].get("example"));
            match (str_at(p, "/in").as_str(), example) {
                ("path", Some(example)) => {
                    path = path.replace(&format!("{{{name}}}"), example.as_str().unwrap_or_default());
                }
                ("query", Some(example)) if p["required"].as_bool().unwrap_or(false) => {
                    query
                        .push(format!("{name}={}", example.as_str().map(str::to_owned).unwrap_or(example.to_string())));
                }
                _ => {}
            }
        }
        let url = if query.is_empty() { path } else { format!("{path}?{}", query.join("&")) };
        let mut lines = vec![match method {
            "get" => format!("curl {}{url}", self.base_url),
            _ => format!("curl -X {} {}{url}", method.to_uppercase(), self.base_url),
        }];
        lines.push("-H \"Authorization: Bearer $TOLLGATE_KEY\"".to_owned());
        if let Some(schema) = operation.pointer("/requestBody/content/application~1json/schema") {
            let example = self.example(self.resolve(schema, SCHEMA_REF, "schemas"));
            lines.push("-H 'Content-Type: application/json'".to_owned());
            lines.push(format!("-d '{example}'"));
        }
        lines.join(" \\\n  ")
    }

    /// An example object from the examples of a schema's properties.
    fn example(&self, schema: &Value) -> Value {
        let mut example = Map::new();
        for (name, property) in schema["properties"].as_object().into_iter().flatten() {
            if let Some(value) = self.first_example(property) {
                example.insert(name.clone(), value.clone());
            }
        }
        Value::Object(example)
    }

    /// The first example a schema gives, else the first value of an enum it names.
    fn first_example<'v>(&'v self, schema: &'v Value) -> Option<&'v Value> {
        if let Some(example) = schema.get("example").or_else(|| schema.pointer("/examples/0")) {
            return Some(example);
        }
        if schema.get("$ref").is_some() {
            return self.first_example(self.resolve(schema, SCHEMA_REF, "schemas"));
        }
        if let Some(value) = schema.pointer("/enum/0") {
            return Some(value);
        }
        ["oneOf", "anyOf"]
            .iter()
            .flat_map(|key| schema[*key].as_array().into_iter().flatten())
            .find_map(|item| self.first_example(item))
    }
}

/// A schema's description; for an optional reference (`oneOf` null or the schema), utoipa
/// puts it on the reference.
fn description_of(schema: &Value) -> String {
    let own = str_at(schema, "/description");
    if !own.is_empty() {
        return own;
    }
    schema["oneOf"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|item| str_at(item, "/description"))
        .find(|d| !d.is_empty())
        .unwrap_or_default()
}

/// A schema's limits in words (`1 to 500`, `at most 200 characters`, …).
fn constraints(schema: &Value) -> String {
    let mut out = Vec::new();
    match (schema["minimum"].as_i64(), schema["maximum"].as_i64()) {
        (Some(min), Some(max)) => out.push(format!("{min} to {max}")),
        (Some(min), None) => out.push(format!("at least {min}")),
        (None, Some(max)) => out.push(format!("at most {max}")),
        (None, None) => {}
    }
    match (schema["minLength"].as_u64(), schema["maxLength"].as_u64()) {
        (Some(min), Some(max)) => out.push(format!("{min} to {max} characters")),
        (Some(min), None) => out.push(format!("at least {min} characters")),
        (None, Some(max)) => out.push(format!("at most {max} characters")),
        (None, None) => {}
    }
    if let Some(pattern) = schema["pattern"].as_str() {
        out.push(format!("matches {pattern}"));
    }
    out.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_spans_are_marked() {
        let parts = prose("Send `Authorization: Bearer` with a `secret` key.");
        let marked: Vec<(bool, &str)> = parts.iter().map(|p| (p.code, p.text.as_str())).collect();
        assert_eq!(
            marked,
            [
                (false, "Send "),
                (true, "Authorization: Bearer"),
                (false, " with a "),
                (true, "secret"),
                (false, " key.")
            ]
        );
    }

    #[test]
    fn every_operation_of_the_document_is_on_the_page() {
        let document = serde_json::to_value(crate::routes::api::openapi::document()).unwrap_or_default();
        let reference = Reference::new(&document, "https://gate.example.com");
        let sections = reference.sections();
        let endpoints: Vec<&Endpoint> = sections.iter().flat_map(|s| s.endpoints.iter()).collect();
        assert_eq!(endpoints.len(), 15);
        let upsert = endpoints.iter().find(|e| e.anchor == "upsert_customer").map(|e| e.curl.as_str());
        assert_eq!(
            upsert,
            Some(
                "curl -X POST https://gate.example.com/api/v1/customers \\\n  -H \"Authorization: Bearer $TOLLGATE_KEY\" \\\n  -H 'Content-Type: application/json' \\\n  -d '{\"budget\":\"10.00\",\"email\":\"grace@example.com\",\"id\":\"customer-42\",\"name\":\"Grace Hopper\",\"period\":\"month\"}'"
            )
        );
        let get = endpoints.iter().find(|e| e.anchor == "get_customer").map(|e| e.curl.as_str());
        assert_eq!(
            get,
            Some(
                "curl https://gate.example.com/api/v1/customers/customer-42 \\\n  -H \"Authorization: Bearer $TOLLGATE_KEY\""
            )
        );
        let schemas = reference.schemas();
        let customer = schemas.iter().find(|s| s.name == "Customer");
        assert!(customer.is_some_and(|c| c.fields.iter().any(|f| f.name == "remaining" && f.required)));
    }
}
