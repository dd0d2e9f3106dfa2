//! One manifest file's text → its documents → typed, validated Kubernetes objects.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use serde_saphyr::Spanned;
use serde_saphyr::granit_parser::{Event, Parser};

use super::ManifestError;
use super::validate::{self, FieldError};
use crate::model::ObjRef;

/// The namespace of a namespaced object whose manifest names none, as `kubectl apply` does.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The kinds ferrovia keeps in a [`crate::model::ClusterState`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Pod,
    Namespace,
    NetworkPolicy,
}

impl Kind {
    fn parse(api_version: &str, kind: &str) -> Option<Self> {
        match (api_version, kind) {
            ("v1", "Service") => Some(Self::Service),
            ("discovery.k8s.io/v1", "EndpointSlice") => Some(Self::EndpointSlice),
            ("v1", "Pod") => Some(Self::Pod),
            ("v1", "Namespace") => Some(Self::Namespace),
            ("networking.k8s.io/v1", "NetworkPolicy") => Some(Self::NetworkPolicy),
            _ => None,
        }
    }

    fn namespaced(self) -> bool {
        self != Self::Namespace
    }
}

/// Real Kubernetes kinds that a manifests directory may hold but ferrovia does not read yet:
/// they are skipped with a debug log rather than rejected.
const IGNORED_KINDS: &[(&str, &str)] = &[
    // Nodes matter for NodePort frontends, a later issue.
    ("v1", "Node"),
];

/// A kind and namespace/name: what must be unique in a manifests directory. Namespaces have an
/// empty `key.namespace`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Identity {
    pub kind: Kind,
    pub key: ObjRef,
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.kind.namespaced() {
            write!(f, "{:?} {}", self.kind, self.key)
        } else {
            write!(f, "{:?} {}", self.kind, self.key.name)
        }
    }
}

/// A decoded, valid object.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Service(Arc<Service>),
    EndpointSlice(Arc<EndpointSlice>),
    Pod(Arc<Pod>),
    Namespace(Arc<Namespace>),
    NetworkPolicy(Arc<NetworkPolicy>),
}

/// What became of one document.
#[derive(Debug)]
pub enum Decoded {
    Valid(Identity, Object),
    /// Rejected; `identity` is known when the document at least names its object, so that a
    /// previous good version of it can be kept.
    Invalid(Option<Identity>, Vec<ManifestError>),
    /// A real kind that ferrovia does not read yet.
    Ignored,
}

/// Splits `text` into its YAML documents: (1-based index, content) for each non-empty one.
/// Empty documents are skipped but counted, so indices match what a reader counts in the file.
pub fn documents(file: &Path, text: &str) -> Result<Vec<(usize, Value)>, Box<ManifestError>> {
    // serde-saphyr skips empty documents without saying so: find where each document starts
    // with the parser underneath it, to give every value its true index.
    let mut starts = Vec::new();
    for event in Parser::new_from_str(text) {
        match event {
            Ok((Event::DocumentStart(..), span)) => starts.push(span.start.line() as u64),
            Ok(_) => {}
            Err(e) => {
                let line = Some(e.marker().line() as u64);
                return Err(Box::new(ManifestError::file(
                    file,
                    line,
                    format!("invalid YAML: {}", e.info()),
                )));
            }
        }
    }
    let values: Vec<Spanned<Value>> =
        serde_saphyr::from_multiple_with_options(text, yaml_options(text.len())).map_err(|e| {
            let line = e.location().map(|l| l.line()).filter(|&l| l > 0);
            Box::new(ManifestError::file(
                file,
                line,
                format!("invalid YAML: {}", e.without_snippet()),
            ))
        })?;
    Ok(values
        .into_iter()
        .map(|v| {
            let line = v.referenced.line();
            // The last document starting at or before the value's first line holds it.
            (
                starts.partition_point(|&start| start <= line).max(1),
                v.value,
            )
        })
        .collect())
}

/// Decodes and validates one document of `file`.
pub fn decode(file: &Path, document: usize, value: &Value) -> Decoded {
    let err = |object: Option<String>, field: Option<String>, message: String| ManifestError {
        file: file.to_owned(),
        line: None,
        document: Some(document),
        object,
        field,
        message,
    };
    let Value::Object(map) = value else {
        return Decoded::Invalid(
            None,
            vec![err(
                None,
                None,
                "not a Kubernetes object (a mapping)".into(),
            )],
        );
    };
    let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or_default().to_owned();
    let api_version = text(map.get("apiVersion"));
    let kind_name = text(map.get("kind"));
    let metadata = map.get("metadata");
    let name = text(metadata.and_then(|m| m.get("name")));
    let namespace = Some(text(metadata.and_then(|m| m.get("namespace"))))
        .filter(|ns| !ns.is_empty())
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());

    let Some(kind) = Kind::parse(&api_version, &kind_name) else {
        if IGNORED_KINDS.contains(&(api_version.as_str(), kind_name.as_str())) {
            tracing::debug!(file = %file.display(), document, "{api_version} {kind_name} {name}: not read yet, ignored");
            return Decoded::Ignored;
        }
        let object = Some(if name.is_empty() {
            "<unnamed>".to_owned()
        } else {
            format!("{kind_name} {name}")
        });
        let (field, message) = unknown_kind(&api_version, &kind_name);
        return Decoded::Invalid(None, vec![err(object, Some(field.to_owned()), message)]);
    };
    let identity = (!name.is_empty()).then(|| Identity {
        kind,
        key: ObjRef::new(
            if kind.namespaced() {
                namespace.as_str()
            } else {
                ""
            },
            name.as_str(),
        ),
    });
    let object = Some(match &identity {
        Some(id) => id.to_string(),
        None => format!("{kind:?} <unnamed>"),
    });
    let decoded = match kind {
        Kind::Service => {
            typed(value, &namespace, validate::service).map(|o| Object::Service(Arc::new(o)))
        }
        Kind::EndpointSlice => typed(value, &namespace, validate::endpoint_slice)
            .map(|o| Object::EndpointSlice(Arc::new(o))),
        Kind::Pod => typed(value, &namespace, validate::pod).map(|o| Object::Pod(Arc::new(o))),
        Kind::Namespace => {
            typed(value, "", |_: &Namespace| Vec::new()).map(|o| Object::Namespace(Arc::new(o)))
        }
        Kind::NetworkPolicy => typed(value, &namespace, validate::network_policy)
            .map(|o| Object::NetworkPolicy(Arc::new(o))),
    };
    let mut problems = match decoded {
        Ok(object) => match identity {
            Some(identity) => return Decoded::Valid(identity, object),
            None => Vec::new(),
        },
        Err(problems) => problems,
    };
    if identity.is_none() {
        problems.insert(0, FieldError::new("metadata.name", "required"));
    }
    let errors = problems
        .into_iter()
        .map(|p| {
            err(
                object.clone(),
                Some(p.field).filter(|f| !f.is_empty()),
                p.message,
            )
        })
        .collect();
    Decoded::Invalid(identity, errors)
}

fn unknown_kind(api_version: &str, kind: &str) -> (&'static str, String) {
    const READ: &str = "ferrovia reads v1 Service, discovery.k8s.io/v1 EndpointSlice, v1 Pod, \
        v1 Namespace and networking.k8s.io/v1 NetworkPolicy";
    match (api_version, kind) {
        (_, "") => ("kind", "required".to_owned()),
        ("", _) => ("apiVersion", "required".to_owned()),
        // kube-proxy reads EndpointSlices only; in a cluster a controller mirrors Endpoints.
        ("v1", "Endpoints") => (
            "kind",
            "v1 Endpoints is not read: write a discovery.k8s.io/v1 EndpointSlice".to_owned(),
        ),
        (_, "Service" | "EndpointSlice" | "Pod" | "Namespace" | "NetworkPolicy") => (
            "apiVersion",
            format!("{api_version} {kind} is not supported: {READ}"),
        ),
        _ => ("kind", format!("unknown kind {api_version} {kind}: {READ}")),
    }
}

/// Decodes `value` into `T` strictly (unknown fields are errors, as `kubectl apply`'s default
/// strict validation), defaults its namespace, and validates it.
fn typed<T>(
    value: &Value,
    namespace: &str,
    validate: impl Fn(&T) -> Vec<FieldError>,
) -> Result<T, Vec<FieldError>>
where
    T: DeserializeOwned + Serialize + k8s_openapi::Metadata<Ty = ObjectMeta>,
{
    let mut object: T = serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        let field = if field == "." { String::new() } else { field };
        vec![FieldError::new(field, e.into_inner().to_string())]
    })?;
    // A round trip drops whatever the type does not know: those are the unknown fields.
    let known = serde_json::to_value(&object).unwrap_or(Value::Null);
    let mut problems = Vec::new();
    unknown_fields(value, &known, &mut String::new(), &mut problems);
    if !namespace.is_empty() {
        object.metadata_mut().namespace = Some(namespace.to_owned());
    }
    problems.extend(validate(&object));
    if problems.is_empty() {
        Ok(object)
    } else {
        Err(problems)
    }
}

fn unknown_fields(given: &Value, known: &Value, path: &mut String, out: &mut Vec<FieldError>) {
    let len = path.len();
    match (given, known) {
        (Value::Object(given), Value::Object(known)) => {
            for (key, value) in given {
                if value.is_null() {
                    continue; // `field:` with no value: dropped by the round trip, harmless
                }
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
                match known.get(key) {
                    Some(known) => unknown_fields(value, known, path, out),
                    None => out.push(FieldError::new(path.clone(), "unknown field")),
                }
                path.truncate(len);
            }
        }
        (Value::Array(given), Value::Array(known)) => {
            for (i, (value, known)) in given.iter().zip(known).enumerate() {
                let _ = write!(path, "[{i}]"); // writing to a String cannot fail
                unknown_fields(value, known, path, out);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

/// The parser's resource budget for a file of `len` bytes. serde-saphyr's defaults (1,024
/// documents, 250,000 nodes per input) are meant for untrusted input and would reject a
/// manifests file of a few thousand services; the manifests directory is root-owned
/// configuration, so the budget grows with the file instead: every document, node and event
/// takes at least a byte of input, so nothing is amplified beyond the file's own size.
/// Aliases and anchors — the "billion laughs" amplification — keep their default caps.
fn yaml_options(len: usize) -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_documents = budget.max_documents.max(len);
    budget.max_nodes = budget.max_nodes.max(len);
    budget.max_events = budget.max_events.max(len.saturating_mul(2));
    budget.max_total_scalar_bytes = budget.max_total_scalar_bytes.max(len);
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options
}
