//! The Kubernetes manifests in `config/kubernetes/`, parsed into `k8s-openapi` types and
//! checked against the code: the RBAC Roles grant exactly the requests the kube
//! adapter makes (as asserted by its mock tests in `tests/integration/kube.rs`, read at
//! test time), the environment is one the service reads and accepts, the probes hit
//! the health routes, and the selectors, ports and bindings line up.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, PodSpec, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use resource_plane::config::Config;
use serde::de::DeserializeOwned;
use serde::Deserialize;

/// The namespace every object but the per-environment RBAC lives in.
const NAMESPACE: &str = "resource-plane";

/// Env vars the Deployment may set although `src/config.rs` does not name them: the
/// log filter (read by `tracing_subscriber`'s `EnvFilter` in `src/telemetry.rs`), and
/// the callback signing secret (being moved into `src/config.rs`).
const ENV_ALSO_READ: &[&str] = &["RUST_LOG", "CALLBACK_SIGNING_SECRET"];

/// Every request the kube adapter's mock tests (`tests/integration/kube.rs`) assert,
/// normalized by [`request_key`]. Kept equal to what that file asserts by
/// `kube_mock_tests_assert_exactly_the_requests_in_the_table`.
const MOCK_TESTED_REQUESTS: &[&str] = &[
    "GET /apis/apps/v1/namespaces/{ns}/deployments",
    "GET /apis/apps/v1/namespaces/{ns}/deployments?watch",
    "GET /apis/apps/v1/namespaces/{ns}/deployments/{name}",
    "PATCH(apply) /apis/apps/v1/namespaces/{ns}/deployments/{name}",
    "PATCH(merge) /apis/apps/v1/namespaces/{ns}/deployments/{name}",
    "PATCH(strategic) /apis/apps/v1/namespaces/{ns}/deployments/{name}",
    "GET /apis/apps/v1/namespaces/{ns}/deployments/{name}/scale",
    "PATCH(merge) /apis/apps/v1/namespaces/{ns}/deployments/{name}/scale",
    "GET /apis/autoscaling/v2/namespaces/{ns}/horizontalpodautoscalers/{name}",
    "PATCH(apply) /apis/autoscaling/v2/namespaces/{ns}/horizontalpodautoscalers/{name}",
    "PATCH(merge) /apis/autoscaling/v2/namespaces/{ns}/horizontalpodautoscalers/{name}",
    "POST /apis/batch/v1/namespaces/{ns}/jobs",
    "GET /apis/batch/v1/namespaces/{ns}/jobs/{name}",
    "GET /api/v1/namespaces/{ns}/pods",
];

/// Requests the adapter issues that no mock test asserts yet, each with the call in
/// `src/adapters/kube.rs` that issues it (checked to be still there). The watch
/// requests come from the same generic `spawn_watch` whose list + watch the Deployment
/// watch test pins; `get_status` is the generic `get_opt` pinned for Deployments and
/// Jobs. Move an entry to [`MOCK_TESTED_REQUESTS`] when a mock test starts asserting it.
const UNASSERTED_ADAPTER_REQUESTS: &[(&str, &str)] = &[
    (
        "GET /apis/autoscaling/v2/namespaces/{ns}/horizontalpodautoscalers",
        "spawn_watch::<HorizontalPodAutoscaler>",
    ),
    (
        "GET /apis/autoscaling/v2/namespaces/{ns}/horizontalpodautoscalers?watch",
        "spawn_watch::<HorizontalPodAutoscaler>",
    ),
    (
        "GET /apis/batch/v1/namespaces/{ns}/jobs",
        "spawn_watch::<Job>",
    ),
    (
        "GET /apis/batch/v1/namespaces/{ns}/jobs?watch",
        "spawn_watch::<Job>",
    ),
    (
        "GET /api/v1/namespaces/{ns}/pods?watch",
        "spawn_watch::<Pod>",
    ),
];

/// The kinds the adapter builds `Api`s for, and their (apiGroup, resource).
const ADAPTER_KINDS: &[(&str, &str, &str)] = &[
    ("Deployment", "apps", "deployments"),
    (
        "HorizontalPodAutoscaler",
        "autoscaling",
        "horizontalpodautoscalers",
    ),
    ("Job", "batch", "jobs"),
    ("Pod", "", "pods"),
];

/// (apiGroup, resource, verb) as RBAC sees it.
type Grant = (String, String, String);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    let path = root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---- the manifests ----

#[derive(Default)]
struct Manifests {
    deployments: Vec<Deployment>,
    services: Vec<Service>,
    service_accounts: Vec<ServiceAccount>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    pdbs: Vec<PodDisruptionBudget>,
}

impl Manifests {
    fn deployment(&self) -> &Deployment {
        assert_eq!(self.deployments.len(), 1, "exactly one Deployment");
        &self.deployments[0]
    }

    fn pod_spec(&self) -> &PodSpec {
        self.deployment()
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("Deployment has a pod template spec")
    }

    fn pod_labels(&self) -> BTreeMap<String, String> {
        self.deployment()
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.labels.clone())
            .expect("pod template has labels")
    }

    fn container(&self) -> &Container {
        let containers = &self.pod_spec().containers;
        assert_eq!(containers.len(), 1, "one container in the pod");
        &containers[0]
    }

    /// The port the container serves HTTP on.
    fn container_port(&self) -> i32 {
        let ports = self.container().ports.as_deref().unwrap_or_default();
        assert_eq!(ports.len(), 1, "one container port");
        ports[0].container_port
    }

    /// A probe's or Service's target port as a number (named ports resolved).
    fn resolve_port(&self, port: &IntOrString) -> i32 {
        match port {
            IntOrString::Int(n) => *n,
            IntOrString::String(name) => {
                self.container()
                    .ports
                    .as_deref()
                    .unwrap_or_default()
                    .iter()
                    .find(|p| p.name.as_deref() == Some(name.as_str()))
                    .unwrap_or_else(|| panic!("no container port named {name:?}"))
                    .container_port
            }
        }
    }
}

fn manifest_files() -> Vec<PathBuf> {
    let dir = root().join("config/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    files
}

/// Deserializes one document into its `k8s-openapi` type, and checks nothing was lost
/// on the way: a misspelt or misplaced field (which the type would silently ignore)
/// makes the re-serialized object differ from the document.
fn typed<K>(doc: serde_yaml::Value, origin: &str) -> K
where
    K: DeserializeOwned + serde::Serialize,
{
    let object: K = serde_yaml::from_value(doc.clone()).unwrap_or_else(|e| panic!("{origin}: {e}"));
    let written = serde_json::to_value(&object).expect("serialize");
    let original = serde_json::to_value(&doc).expect("document as JSON");
    assert_eq!(
        written, original,
        "{origin}: fields were dropped or changed by the typed round trip (a typo?)"
    );
    object
}

fn load() -> Manifests {
    let mut m = Manifests::default();
    for path in manifest_files() {
        let text = std::fs::read_to_string(&path).expect("manifest file");
        for (i, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let doc = serde_yaml::Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{} document #{i}: {e}", path.display()));
            if doc.is_null() {
                continue;
            }
            let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
            let name = doc["metadata"]["name"].as_str().unwrap_or_default();
            let origin = format!("{} #{i} ({kind} {name})", path.display());
            match kind.as_str() {
                "Deployment" => m.deployments.push(typed(doc, &origin)),
                "Service" => m.services.push(typed(doc, &origin)),
                "ServiceAccount" => m.service_accounts.push(typed(doc, &origin)),
                "Role" => m.roles.push(typed(doc, &origin)),
                "RoleBinding" => m.role_bindings.push(typed(doc, &origin)),
                "PodDisruptionBudget" => m.pdbs.push(typed(doc, &origin)),
                other => panic!("{origin}: unexpected kind {other:?}"),
            }
        }
    }
    m
}

fn namespace_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or_default()
}

/// Whether `selector` selects pods labelled `labels` (matchLabels only; expressions
/// are not used here and are refused).
fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    assert!(
        selector
            .match_expressions
            .as_deref()
            .unwrap_or_default()
            .is_empty(),
        "matchExpressions are not used in these manifests"
    );
    let wanted = selector.match_labels.clone().unwrap_or_default();
    !wanted.is_empty() && wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The service configuration the Deployment's environment produces, with stand-ins for
/// the values that come from the Secret and the downward API.
fn deployment_config(m: &Manifests) -> Config {
    let mut env = HashMap::new();
    for var in m.container().env.as_deref().unwrap_or_default() {
        let value = match (&var.value, &var.value_from) {
            (Some(v), None) => v.clone(),
            (None, Some(from)) if from.secret_key_ref.is_some() => {
                format!("stand-in-{}", var.name.to_lowercase())
            }
            (None, Some(from)) if from.field_ref.is_some() => "resource-plane-7d9c-a".into(),
            _ => panic!("env {}: a value or a secret/field reference", var.name),
        };
        env.insert(var.name.clone(), value);
    }
    Config::from_map(&env).unwrap_or_else(|e| panic!("the Deployment's env is rejected: {e}"))
}

// ---- requests the kube adapter makes, and the RBAC they need ----

const APPLY_PATCH: &str = "application/apply-patch+yaml";
const MERGE_PATCH: &str = "application/merge-patch+json";

/// A namespaced API path split into its parts.
struct ApiPath {
    /// `/api/v1` or `/apis/{group}/{version}`.
    prefix: String,
    group: String,
    resource: String,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_api_path(path: &str) -> ApiPath {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (prefix, group, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => (format!("/api/{version}"), String::new(), rest),
        ["apis", group, version, rest @ ..] => (
            format!("/apis/{group}/{version}"),
            (*group).to_owned(),
            rest,
        ),
        _ => panic!("{path}: not a Kubernetes API path"),
    };
    match rest {
        ["namespaces", _ns, resource, tail @ ..] if tail.len() <= 2 => ApiPath {
            prefix,
            group,
            resource: (*resource).to_owned(),
            name: tail.first().map(|s| (*s).to_owned()),
            subresource: tail.get(1).map(|s| (*s).to_owned()),
        },
        _ => panic!("{path}: the adapter only makes namespaced resource requests"),
    }
}

/// The normalized form of a request: `METHOD[(patch type)] path-pattern[?watch]`, with
/// the namespace and object name replaced by `{ns}` and `{name}`.
fn request_key(method: &str, content_type: Option<&str>, uri: &str) -> String {
    let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
    let p = parse_api_path(path);
    let mut pattern = format!("{}/namespaces/{{ns}}/{}", p.prefix, p.resource);
    if p.name.is_some() {
        pattern.push_str("/{name}");
    }
    if let Some(sub) = &p.subresource {
        pattern.push('/');
        pattern.push_str(sub);
    }
    if query
        .split('&')
        .any(|pair| pair == "watch=true" || pair == "watch=1")
    {
        pattern.push_str("?watch");
    }
    let method = match (method, content_type) {
        ("PATCH", Some(APPLY_PATCH)) => "PATCH(apply)".to_owned(),
        ("PATCH", Some(MERGE_PATCH)) => "PATCH(merge)".to_owned(),
        ("PATCH", Some("application/json-patch+json")) => "PATCH(json)".to_owned(),
        ("PATCH", Some("application/strategic-merge-patch+json")) => "PATCH(strategic)".into(),
        ("PATCH", other) => panic!("PATCH {uri} with content type {other:?}"),
        (m, _) => m.to_owned(),
    };
    format!("{method} {pattern}")
}

/// The RBAC grants a normalized request needs: GET on an object is `get`, on a
/// collection `list`, with `watch=true` `watch`; POST `create`; PUT `update`; PATCH
/// `patch`; DELETE `delete` (`deletecollection` on a collection). A server-side apply
/// (PATCH with the apply content type) on an object that does not exist yet creates
/// it, and the API server authorizes that as `create` too (the mock tests replay such
/// a 201). A subresource is `resource/subresource`.
fn grants_for(request: &str) -> Vec<Grant> {
    let (method, pattern) = request
        .split_once(' ')
        .unwrap_or_else(|| panic!("{request:?}: METHOD path"));
    let (path, watch) = match pattern.strip_suffix("?watch") {
        Some(path) => (path, true),
        None => (pattern, false),
    };
    let p = parse_api_path(path);
    let named = p.name.is_some();
    let verbs: &[&str] = match (method, named, watch) {
        ("GET", _, true) => &["watch"],
        ("GET", true, false) => &["get"],
        ("GET", false, false) => &["list"],
        ("POST", false, false) => &["create"],
        ("PUT", true, false) => &["update"],
        ("DELETE", true, false) => &["delete"],
        ("DELETE", false, false) => &["deletecollection"],
        ("PATCH(apply)", true, false) if p.subresource.is_none() => &["patch", "create"],
        (m, true, false) if m.starts_with("PATCH") => &["patch"],
        _ => panic!("{request:?}: no RBAC verb for this request"),
    };
    let resource = match &p.subresource {
        Some(sub) => format!("{}/{sub}", p.resource),
        None => p.resource.clone(),
    };
    verbs
        .iter()
        .map(|v| (p.group.clone(), resource.clone(), (*v).to_owned()))
        .collect()
}

/// Everything the adapter needs: the mock-tested requests and the unasserted ones.
fn needed_grants() -> BTreeSet<Grant> {
    MOCK_TESTED_REQUESTS
        .iter()
        .copied()
        .chain(UNASSERTED_ADAPTER_REQUESTS.iter().map(|(r, _)| *r))
        .flat_map(grants_for)
        .collect()
}

/// What a Role grants, flattened; wildcards and name/URL restrictions are refused.
fn granted(role: &Role) -> BTreeSet<Grant> {
    let name = role.metadata.name.as_deref().unwrap_or_default();
    let ns = namespace_of(&role.metadata);
    let mut out = BTreeSet::new();
    for (i, rule) in role.rules.as_deref().unwrap_or_default().iter().enumerate() {
        let at = format!("Role {ns}/{name} rule #{i}");
        let groups = rule.api_groups.clone().unwrap_or_default();
        let resources = rule.resources.clone().unwrap_or_default();
        assert!(
            !groups.is_empty() && !resources.is_empty() && !rule.verbs.is_empty(),
            "{at}: apiGroups, resources and verbs must all be listed"
        );
        for list in [&groups, &resources, &rule.verbs] {
            assert!(
                list.iter().all(|s| !s.contains('*')),
                "{at}: wildcard in {list:?}"
            );
        }
        assert!(
            rule.resource_names
                .as_deref()
                .unwrap_or_default()
                .is_empty(),
            "{at}: resourceNames would break list, watch and create"
        );
        assert!(
            rule.non_resource_urls
                .as_deref()
                .unwrap_or_default()
                .is_empty(),
            "{at}: nonResourceURLs do not belong in a Role"
        );
        for g in &groups {
            for r in &resources {
                for v in &rule.verbs {
                    out.insert((g.clone(), r.clone(), v.clone()));
                }
            }
        }
    }
    out
}

// ---- reading the expectations out of tests/integration/kube.rs ----

/// The string literal starting at `s[0]` (`"`), unescaped, and the bytes it spans.
fn string_literal(s: &str) -> (String, usize) {
    assert!(s.starts_with('"'), "not a string literal: {s:.40}");
    let mut out = String::new();
    let mut chars = s.char_indices().skip(1);
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return (out, i + 1),
            '\\' => match chars.next() {
                Some((_, 'n')) => out.push('\n'),
                Some((_, other)) => out.push(other),
                None => break,
            },
            c => out.push(c),
        }
    }
    panic!("unterminated string literal: {s:.40}")
}

/// The text between the parenthesis at `s[open]` and its match (strings respected).
fn parenthesized(s: &str, open: usize) -> &str {
    assert_eq!(s.as_bytes()[open], b'(');
    let mut depth = 0;
    let mut i = open;
    while i < s.len() {
        match s.as_bytes()[i] {
            b'"' => i += string_literal(&s[i..]).1 - 1,
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => {
                depth -= 1;
                if depth == 0 {
                    return &s[open + 1..i];
                }
            }
            _ => {}
        }
        i += 1;
    }
    panic!("unbalanced parentheses: {:.60}", &s[open..])
}

/// Top-level comma-separated arguments, trimmed.
fn arguments(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start, mut i) = (0, 0, 0);
    while i < s.len() {
        match s.as_bytes()[i] {
            b'"' => i += string_literal(&s[i..]).1 - 1,
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth -= 1,
            b',' if depth == 0 => {
                out.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    if !s[start..].trim().is_empty() {
        out.push(s[start..].trim());
    }
    out
}

/// Evaluates the small expressions the kube tests build URIs and content types from:
/// string literals, `&str` constants, `format!("...{IDENT}...")` and one-line helper
/// functions `fn f(a: &str, b: &str) -> String { format!("...") }`. Anything else
/// panics, so a new way of writing an expectation is noticed rather than skipped.
struct RustSource {
    text: String,
}

impl RustSource {
    fn eval(&self, expr: &str, locals: &HashMap<String, String>) -> String {
        let expr = expr.trim().trim_start_matches('&').trim();
        if expr.starts_with('"') {
            return string_literal(expr).0;
        }
        if let Some(rest) = expr.strip_prefix("format!") {
            let args = arguments(parenthesized(rest, 0));
            assert_eq!(args.len(), 1, "format! with positional args: {expr}");
            return self.interpolate(&string_literal(args[0]).0, locals);
        }
        if let Some(open) = expr.find('(') {
            let name = &expr[..open];
            let args: Vec<String> = arguments(parenthesized(expr, open))
                .into_iter()
                .map(|a| self.eval(a, locals))
                .collect();
            return self.call(name, &args);
        }
        if let Some(v) = locals.get(expr) {
            return v.clone();
        }
        self.constant(expr)
    }

    fn interpolate(&self, template: &str, locals: &HashMap<String, String>) -> String {
        let mut out = String::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let close = rest[open..].find('}').expect("closing brace") + open;
            let ident = &rest[open + 1..close];
            assert!(
                !ident.is_empty() && ident.chars().all(|c| c.is_alphanumeric() || c == '_'),
                "format placeholder {{{ident}}} is not a plain identifier"
            );
            out.push_str(&self.eval(ident, locals));
            rest = &rest[close + 1..];
        }
        out.push_str(rest);
        out
    }

    fn constant(&self, name: &str) -> String {
        let decl = format!("const {name}: &str = ");
        let at = self
            .text
            .find(&decl)
            .unwrap_or_else(|| panic!("no `{decl}` in the kube tests"));
        string_literal(&self.text[at + decl.len()..]).0
    }

    fn call(&self, name: &str, args: &[String]) -> String {
        let decl = format!("fn {name}(");
        let at = self
            .text
            .find(&decl)
            .unwrap_or_else(|| panic!("no `{decl}` in the kube tests"));
        let params = arguments(parenthesized(&self.text, at + decl.len() - 1));
        assert_eq!(params.len(), args.len(), "arguments of {name}");
        let locals: HashMap<String, String> = params
            .iter()
            .map(|p| p.split(':').next().expect("param name").trim().to_owned())
            .zip(args.iter().cloned())
            .collect();
        // A one-expression body: from the `{` after the signature to the `}` closing
        // the item at the start of a line.
        let body_at = at + self.text[at..].find('{').expect("fn body") + 1;
        let body_end = body_at + self.text[body_at..].find("\n}").expect("end of fn");
        let body = &self.text[body_at..body_end];
        self.eval(body.trim(), &locals)
    }
}

/// The requests `tests/integration/kube.rs` asserts, normalized by [`request_key`]:
/// every scripted `exchange(Method::X, uri)` (with the content type of its `.sends`),
/// and every request checked by hand with `assert_eq!(request.uri().to_string(), ..)`.
fn requests_asserted_by_the_kube_tests() -> BTreeSet<String> {
    let src = RustSource {
        text: read("tests/integration/kube.rs"),
    };
    let text = src.text.as_str();
    let none = HashMap::new();
    let mut keys = BTreeSet::new();
    let mut scripted = 0;
    for (at, _) in text.match_indices("exchange(") {
        if text[..at].ends_with("fn ") || text[..at].ends_with(|c: char| c.is_alphanumeric()) {
            continue;
        }
        let open = at + "exchange".len();
        let inner = parenthesized(text, open);
        let args = arguments(inner);
        let method = args[0]
            .strip_prefix("Method::")
            .unwrap_or_else(|| panic!("exchange with method {:?}", args[0]));
        let uri = src.eval(args[1], &none);
        let after = text[open + inner.len() + 2..].trim_start();
        let content_type = after.strip_prefix(".sends(").map(|rest| {
            let ct = &rest[..rest.find(',').expect("sends(content_type, body)")];
            src.eval(ct, &none)
        });
        keys.insert(request_key(method, content_type.as_deref(), &uri));
        scripted += 1;
    }
    assert!(
        scripted > 0,
        "no scripted exchanges found in the kube tests"
    );

    let mut by_hand = 0;
    for (at, _) in text.match_indices("assert_eq!(") {
        let open = at + "assert_eq!".len();
        let args = arguments(parenthesized(text, open));
        if args.first() != Some(&"request.uri().to_string()") || args[1].starts_with("ex.") {
            continue;
        }
        let uri = src.eval(args[1], &none);
        // The method asserted for the same request (since its `next_request()`), if any.
        let since = text[..at].rfind("next_request()").unwrap_or(0);
        let method = text[since..at]
            .match_indices("assert_eq!(")
            .map(|(i, _)| arguments(parenthesized(text, since + i + "assert_eq!".len())))
            .find(|a| a.first() == Some(&"request.method()"))
            .map(|a| a[1].trim_start_matches("Method::").to_owned());
        let method = match method {
            Some(m) => m,
            // A watch is a GET by protocol; anything else must say which method.
            None if uri.contains("watch=true") => "GET".to_owned(),
            None => panic!("{uri}: asserted without its method"),
        };
        keys.insert(request_key(&method, None, &uri));
        by_hand += 1;
    }
    assert!(
        by_hand > 0,
        "no hand-checked requests found in the kube tests"
    );
    keys
}

// ---- the tests ----

#[test]
fn manifests_parse_into_kubernetes_types() {
    let m = load();
    assert_eq!(m.deployments.len(), 1, "one Deployment");
    assert_eq!(m.services.len(), 1, "one Service");
    assert_eq!(m.service_accounts.len(), 1, "one ServiceAccount");
    assert_eq!(m.pdbs.len(), 1, "one PodDisruptionBudget");
    assert!(!m.roles.is_empty(), "at least one Role");
    assert_eq!(
        m.roles.len(),
        m.role_bindings.len(),
        "a RoleBinding per Role"
    );
    let metas = m
        .deployments
        .iter()
        .map(|o| &o.metadata)
        .chain(m.services.iter().map(|o| &o.metadata))
        .chain(m.service_accounts.iter().map(|o| &o.metadata))
        .chain(m.pdbs.iter().map(|o| &o.metadata));
    for meta in metas {
        assert_eq!(
            namespace_of(meta),
            NAMESPACE,
            "{:?} must be in namespace {NAMESPACE}",
            meta.name
        );
    }
    for meta in m
        .roles
        .iter()
        .map(|r| &r.metadata)
        .chain(m.role_bindings.iter().map(|b| &b.metadata))
    {
        assert!(
            !namespace_of(meta).is_empty(),
            "{:?} has a namespace",
            meta.name
        );
    }
}

#[test]
fn kube_mock_tests_assert_exactly_the_requests_in_the_table() {
    let asserted = requests_asserted_by_the_kube_tests();
    let table: BTreeSet<String> = MOCK_TESTED_REQUESTS.iter().map(|s| s.to_string()).collect();
    let new: Vec<_> = asserted.difference(&table).collect();
    let gone: Vec<_> = table.difference(&asserted).collect();
    assert!(
        new.is_empty() && gone.is_empty(),
        "tests/integration/kube.rs asserts requests not in MOCK_TESTED_REQUESTS: {new:?}; \
         the table lists requests no test asserts any more: {gone:?}. Update the table and \
         the Roles in config/kubernetes/ together."
    );
    assert_eq!(
        table.len(),
        MOCK_TESTED_REQUESTS.len(),
        "duplicates in the table"
    );

    // The unasserted requests are still made, and are really not asserted.
    let adapter = read("src/adapters/kube.rs");
    for (request, call) in UNASSERTED_ADAPTER_REQUESTS {
        assert!(
            adapter.contains(call),
            "{request}: the adapter no longer has `{call}`; drop it (and its RBAC)"
        );
        assert!(
            !table.contains(*request),
            "{request} is mock-tested now; remove it from UNASSERTED_ADAPTER_REQUESTS"
        );
    }

    // Every kind the adapter builds an `Api` for is one whose requests are accounted for.
    let needed = needed_grants();
    for call in ["api::<", "spawn_watch::<", "get_status::<"] {
        for (at, _) in adapter.match_indices(call) {
            let rest = &adapter[at + call.len()..];
            let kind = &rest[..rest.find('>').expect("closing >")];
            let (_, group, resource) = ADAPTER_KINDS
                .iter()
                .find(|(k, _, _)| *k == kind)
                .unwrap_or_else(|| panic!("the adapter uses {kind}, which has no RBAC entry"));
            assert!(
                needed.iter().any(|(g, r, _)| g == group && r == resource),
                "the adapter uses {kind} but no request for {group}/{resource} is listed"
            );
        }
    }
}

#[test]
fn request_mapping_follows_the_rbac_verb_rules() {
    let g = |group: &str, resource: &str, verb: &str| {
        (group.to_owned(), resource.to_owned(), verb.to_owned())
    };
    let key = |method: &str, ct: Option<&str>, uri: &str| grants_for(&request_key(method, ct, uri));
    let deployments = "/apis/apps/v1/namespaces/int/deployments";
    assert_eq!(
        key("GET", None, deployments),
        vec![g("apps", "deployments", "list")]
    );
    assert_eq!(
        key(
            "GET",
            None,
            &format!("{deployments}?&watch=true&resourceVersion=1")
        ),
        vec![g("apps", "deployments", "watch")]
    );
    assert_eq!(
        key("GET", None, &format!("{deployments}/x")),
        vec![g("apps", "deployments", "get")]
    );
    assert_eq!(
        key(
            "PATCH",
            Some(MERGE_PATCH),
            &format!("{deployments}/x/scale?&fieldManager=f")
        ),
        vec![g("apps", "deployments/scale", "patch")]
    );
    assert_eq!(
        key(
            "PATCH",
            Some(APPLY_PATCH),
            &format!("{deployments}/x?&force=true")
        ),
        vec![
            g("apps", "deployments", "patch"),
            g("apps", "deployments", "create")
        ]
    );
    assert_eq!(
        key(
            "POST",
            Some("application/json"),
            "/apis/batch/v1/namespaces/int/jobs"
        ),
        vec![g("batch", "jobs", "create")]
    );
    assert_eq!(
        key("PUT", None, "/api/v1/namespaces/int/pods/p"),
        vec![g("", "pods", "update")]
    );
    assert_eq!(
        key("DELETE", None, "/api/v1/namespaces/int/pods/p"),
        vec![g("", "pods", "delete")]
    );
}

#[test]
fn every_role_grants_exactly_what_the_kube_adapter_needs() {
    let m = load();
    let needed = needed_grants();
    for role in &m.roles {
        let at = format!(
            "Role {}/{}",
            namespace_of(&role.metadata),
            role.metadata.name.as_deref().unwrap_or_default()
        );
        let granted = granted(role);
        let missing: Vec<_> = needed.difference(&granted).collect();
        let extra: Vec<_> = granted.difference(&needed).collect();
        assert!(
            missing.is_empty(),
            "{at} lacks (apiGroup, resource, verb) the kube adapter needs: {missing:?}"
        );
        assert!(
            extra.is_empty(),
            "{at} grants (apiGroup, resource, verb) the kube adapter never uses: {extra:?}"
        );
    }
}

#[test]
fn role_bindings_bind_each_environments_role_to_the_deployments_service_account() {
    let m = load();
    let pod = m.pod_spec();
    let account = pod
        .service_account_name
        .as_deref()
        .expect("the Deployment names its ServiceAccount");
    let deployment_ns = namespace_of(&m.deployment().metadata);
    assert!(
        m.service_accounts.iter().any(|sa| {
            sa.metadata.name.as_deref() == Some(account)
                && namespace_of(&sa.metadata) == deployment_ns
        }),
        "the ServiceAccount {account} is defined next to the Deployment"
    );
    assert_ne!(
        pod.automount_service_account_token,
        Some(false),
        "the kube client needs the service account token"
    );

    let roles: BTreeSet<(String, String)> = m
        .roles
        .iter()
        .map(|r| {
            (
                namespace_of(&r.metadata).to_owned(),
                r.metadata.name.clone().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        roles.len(),
        m.roles.len(),
        "one Role per namespace and name"
    );
    let mut bound = BTreeSet::new();
    for binding in &m.role_bindings {
        let ns = namespace_of(&binding.metadata).to_owned();
        let r = &binding.role_ref;
        assert_eq!(
            (r.api_group.as_str(), r.kind.as_str()),
            ("rbac.authorization.k8s.io", "Role"),
            "RoleBinding in {ns} refers to a Role"
        );
        assert!(
            roles.contains(&(ns.clone(), r.name.clone())),
            "RoleBinding in {ns} refers to Role {}, which is not in {ns}",
            r.name
        );
        let subjects = binding.subjects.as_deref().unwrap_or_default();
        assert_eq!(subjects.len(), 1, "RoleBinding in {ns}: one subject");
        let s = &subjects[0];
        assert_eq!(
            (s.kind.as_str(), s.name.as_str(), s.namespace.as_deref()),
            ("ServiceAccount", account, Some(deployment_ns)),
            "RoleBinding in {ns} binds the Deployment's ServiceAccount"
        );
        bound.insert((ns, r.name.clone()));
    }
    assert_eq!(bound, roles, "every Role is bound");

    // One Role per namespace the service works in: RM_ENVS through KUBE_NAMESPACES.
    let config = deployment_config(&m);
    let wanted: BTreeSet<String> = config
        .envs
        .iter()
        .map(|env| config.operations.namespace(env))
        .collect();
    let have: BTreeSet<String> = roles.iter().map(|(ns, _)| ns.clone()).collect();
    assert_eq!(
        have, wanted,
        "Roles must exist in exactly the namespaces of the configured environments"
    );
}

#[test]
fn deployment_runs_two_probed_non_root_replicas_with_resources() {
    let m = load();
    let d = m.deployment();
    let spec = d.spec.as_ref().expect("Deployment spec");
    assert!(spec.replicas.unwrap_or(1) >= 2, "at least two replicas");
    assert!(
        selects(&spec.selector, &m.pod_labels()),
        "the Deployment's selector matches its pod template"
    );

    let c = m.container();
    assert_eq!(c.image.as_deref(), Some("resource-plane:latest"));
    let port = m.container_port();
    let config = deployment_config(&m);
    assert_eq!(
        i32::from(config.port),
        port,
        "the service listens on the container port"
    );

    for (probe, path) in [
        (c.liveness_probe.as_ref(), "/health"),
        (c.readiness_probe.as_ref(), "/health/ready"),
    ] {
        let get = probe
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("an HTTP GET probe on {path}"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            m.resolve_port(&get.port),
            port,
            "probe of {path} on the container port"
        );
    }
    // The routes exist where the probes point.
    let ops = read("src/api/ops.rs");
    for route in [
        "web::resource(\"/health\")",
        "web::resource(\"/health/ready\")",
    ] {
        assert!(ops.contains(route), "src/api/ops.rs has no {route}");
    }

    let resources = c.resources.as_ref().expect("resources");
    for (what, map) in [
        ("requests", &resources.requests),
        ("limits", &resources.limits),
    ] {
        let map = map.as_ref().unwrap_or_else(|| panic!("resource {what}"));
        for r in ["cpu", "memory"] {
            assert!(map.contains_key(r), "resource {what} of {r}");
        }
    }

    let pod_sc = m
        .pod_spec()
        .security_context
        .as_ref()
        .expect("pod securityContext");
    let sc = c
        .security_context
        .as_ref()
        .expect("container securityContext");
    assert_eq!(pod_sc.run_as_non_root, Some(true));
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.run_as_user.or(pod_sc.run_as_user), Some(10001));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
}

#[test]
fn deployment_env_is_read_by_the_service_and_accepted() {
    let m = load();
    let config_rs = read("src/config.rs");
    let env = m.container().env.clone().unwrap_or_default();
    let mut names = BTreeSet::new();
    for var in &env {
        assert!(names.insert(var.name.as_str()), "{} is set twice", var.name);
        assert!(
            config_rs.contains(&format!("\"{}\"", var.name))
                || ENV_ALSO_READ.contains(&var.name.as_str()),
            "{} is not an env var the service reads (not in src/config.rs)",
            var.name
        );
    }
    let by_name = |n: &str| {
        env.iter()
            .find(|v| v.name == n)
            .unwrap_or_else(|| panic!("{n} is set"))
    };
    for secret in ["API_AUTH_TOKEN", "CALLBACK_SIGNING_SECRET", "ETCD_PASSWORD"] {
        let var = by_name(secret);
        assert!(var.value.is_none(), "{secret} must not be inline");
        assert!(
            var.value_from
                .as_ref()
                .and_then(|f| f.secret_key_ref.as_ref())
                .is_some(),
            "{secret} comes from a Secret"
        );
    }
    let instance = by_name("CONTROLLER_INSTANCE_ID")
        .value_from
        .as_ref()
        .and_then(|f| f.field_ref.as_ref())
        .expect("CONTROLLER_INSTANCE_ID from the downward API");
    assert_eq!(instance.field_path, "metadata.name");
    for (n, v) in [("USE_MOCK_ADAPTERS", "false"), ("LOG_FORMAT", "json")] {
        assert_eq!(by_name(n).value.as_deref(), Some(v), "{n}");
    }
    for n in ["ETCD_PREFIX", "RM_ENVS", "AWS_REGION"] {
        assert!(by_name(n).value.is_some(), "{n} has a value");
    }

    // The service accepts this environment, in the real (etcd) mode, on three members.
    let config = deployment_config(&m);
    assert!(!config.use_mock_adapters);
    assert_eq!(config.etcd.endpoints.len(), 3, "an external 3-member etcd");
    assert!(config.api_token.is_some());
    assert!(config.operations.callback_signing_secret.is_some());
}

#[test]
fn service_and_pdb_select_the_deployments_pods() {
    let m = load();
    let labels = m.pod_labels();
    let port = m.container_port();

    let spec = m.services[0].spec.as_ref().expect("Service spec");
    let selector = spec.selector.clone().unwrap_or_default();
    assert!(
        !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
        "the Service selects the Deployment's pods"
    );
    let ports = spec.ports.as_deref().unwrap_or_default();
    assert_eq!(ports.len(), 1, "one Service port");
    assert_eq!(ports[0].port, 80);
    let target = ports[0].target_port.as_ref().expect("targetPort");
    assert_eq!(
        m.resolve_port(target),
        port,
        "the Service forwards to the container port"
    );

    let pdb = m.pdbs[0].spec.as_ref().expect("PDB spec");
    assert_eq!(pdb.min_available, Some(IntOrString::Int(1)));
    assert!(
        pdb.max_unavailable.is_none(),
        "minAvailable or maxUnavailable, not both"
    );
    let selector = pdb.selector.as_ref().expect("PDB selector");
    assert!(
        selects(selector, &labels),
        "the PDB selects the Deployment's pods"
    );
    let replicas = m
        .deployment()
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    assert!(
        replicas > 1,
        "a PDB of minAvailable 1 needs more than one replica"
    );
}
