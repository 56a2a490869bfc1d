//! The admission rule: a call is admitted only when its worst case is bounded from above by
//! what Tollgate can see in the request. Each dialect names what it cannot bound — input it
//! cannot see (a document by URL, a file by id, a stored prompt), a tool the provider runs and
//! bills itself (web search, code execution…), a content type or a field it does not know —
//! as an [`Unbounded`]. Such a call is refused (400, `unbounded_input` / `unbounded_tool` /
//! `unbounded_output` / `unknown_field`, naming the field), unless the project set a per-call ceiling
//! (`unbounded_call_ceiling_nanos`): then the ceiling is reserved in full, and whatever the
//! provider bills is charged, even beyond it (the risk the tenant accepted).

use serde_json::{Map, Value};

use super::error::ProxyError;

/// Why Tollgate cannot bound a part of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Input whose tokens are not in the request.
    Input,
    /// A tool the provider runs (and bills) on its side.
    Tool,
    /// Output billed beyond (or at other rates than) the max output Tollgate reserves.
    Output,
    /// A request field Tollgate does not know.
    Field,
}

/// The first part of a request whose cost Tollgate cannot bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unbounded {
    pub kind: Kind,
    /// Where it is, as a path into the request (`messages[0].content[1]`).
    pub field: String,
    /// What it is, for the error message (`a document by URL`).
    pub what: String,
}

impl Unbounded {
    pub fn input(field: impl Into<String>, what: impl Into<String>) -> Self {
        Unbounded { kind: Kind::Input, field: field.into(), what: what.into() }
    }

    pub fn tool(field: impl Into<String>, what: impl Into<String>) -> Self {
        Unbounded { kind: Kind::Tool, field: field.into(), what: what.into() }
    }

    pub fn output(field: impl Into<String>, what: impl Into<String>) -> Self {
        Unbounded { kind: Kind::Output, field: field.into(), what: what.into() }
    }

    pub fn code(&self) -> &'static str {
        match self.kind {
            Kind::Input => "unbounded_input",
            Kind::Tool => "unbounded_tool",
            Kind::Output => "unbounded_output",
            Kind::Field => "unknown_field",
        }
    }

    /// The reason on the call's `refused` usage event.
    pub fn reason(&self) -> String {
        format!("{}: {}", self.code(), self.field)
    }

    /// The refusal, in words a developer can act on.
    pub fn error(&self) -> ProxyError {
        let cause = match self.kind {
            Kind::Input => "its tokens are not in the request",
            Kind::Tool => "the provider runs it and bills it on its side",
            Kind::Output => "the provider bills it beyond the output Tollgate reserves",
            Kind::Field => "Tollgate does not know whether it adds to what the provider bills",
        };
        ProxyError::invalid_at(
            format!(
                "`{}` is {}, whose cost Tollgate cannot bound before the call ({cause}), so the call is refused. \
                 Send the content inline, or ask the project's owner to allow such calls under a per-call ceiling \
                 (project setting `unbounded_call_ceiling`).",
                self.field, self.what
            ),
            self.code(),
            self.field.clone(),
        )
    }
}

/// The first top-level field of `request` that is not in `known` (a null one is as good as
/// absent: SDKs send nulls for what they were not given).
pub fn unknown_field(request: &Map<String, Value>, known: &[&str]) -> Option<Unbounded> {
    request.iter().find(|(k, v)| !v.is_null() && !known.contains(&k.as_str())).map(|(k, _)| Unbounded {
        kind: Kind::Field,
        field: k.clone(),
        what: "a field Tollgate does not know".to_owned(),
    })
}

/// The first of an OpenAI request's `tools` (chat and Responses) that the provider runs and
/// bills itself: anything but a client tool (`function`, `custom`), whose cost is only the
/// tokens of its definition and calls.
pub fn openai_hosted_tool(request: &Map<String, Value>) -> Option<Unbounded> {
    let tools = request.get("tools").and_then(Value::as_array).into_iter().flatten();
    tools.enumerate().find_map(|(i, tool)| match type_of(tool) {
        Some("function") | Some("custom") => None,
        Some(kind) => Some(Unbounded::tool(format!("tools[{i}]"), format!("the hosted tool `{kind}`"))),
        None => Some(Unbounded::tool(format!("tools[{i}]"), "a tool without a type")),
    })
}

/// A field that is present and not null.
pub fn present<'a>(request: &'a Map<String, Value>, field: &str) -> Option<&'a Value> {
    request.get(field).filter(|v| !v.is_null())
}

/// The `type` of a content part or item.
pub fn type_of(value: &Value) -> Option<&str> {
    value.get("type").and_then(Value::as_str)
}
