//! The `kube` adapter against a scripted API server: `kube::Client` over a
//! `tower_test::mock` pair, with a verifier task that expects each request in order
//! (method, exact path and query, content type, JSON body) and answers the way the
//! Kubernetes API server does, errors included. Plus condition evaluation on recorded
//! Deployment, Pod and Job objects.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::client::Body;
use kube::Client;
use resource_plane::adapters::kube::KubeAdapter;
use resource_plane::domain::conditions::{evaluate, DesiredCondition, Verdict};
use resource_plane::ports::kube::{
    Baseline, DeployableSpec, GpuSpec, JobSpec, KubeError, KubeExecutor, ModelSpec, ModelToLoad,
    ObjectEvent, ObjectStatus, RequestLimit, ResourceKind, ResourceSpec, ScaleTarget,
};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tower_test::mock;

const NOW: &str = "2024-05-01T10:00:00.000Z";
const APPLY: &str = "application/apply-patch+yaml";
const MERGE: &str = "application/merge-patch+json";
const STRATEGIC: &str = "application/strategic-merge-patch+json";
const JSON: &str = "application/json";

/// One request the adapter must send, and the API server's answer.
struct Exchange {
    method: Method,
    uri: String,
    content_type: Option<&'static str>,
    body: Option<Value>,
    status: u16,
    response: Value,
}

fn exchange(method: Method, uri: &str) -> Exchange {
    Exchange {
        method,
        uri: uri.to_string(),
        content_type: None,
        body: None,
        status: 200,
        response: json!({}),
    }
}

impl Exchange {
    fn sends(mut self, content_type: &'static str, body: Value) -> Self {
        self.content_type = Some(content_type);
        self.body = Some(body);
        self
    }

    fn answers(mut self, status: u16, response: Value) -> Self {
        self.status = status;
        self.response = response;
        self
    }
}

/// A scripted API server: checks each request against the script, in order.
fn api_server(
    mut handle: mock::Handle<Request<Body>, Response<Body>>,
    script: Vec<Exchange>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        for (i, ex) in script.into_iter().enumerate() {
            let (request, send) = handle
                .next_request()
                .await
                .unwrap_or_else(|| panic!("request #{i} ({} {}) never sent", ex.method, ex.uri));
            assert_eq!(request.method(), ex.method, "method of request #{i}");
            assert_eq!(request.uri().to_string(), ex.uri, "uri of request #{i}");
            let content_type = request
                .headers()
                .get(http::header::CONTENT_TYPE)
                .map(|v| v.to_str().unwrap().to_string());
            assert_eq!(
                content_type.as_deref(),
                ex.content_type,
                "content type of request #{i}"
            );
            let bytes = request.into_body().collect_bytes().await.unwrap();
            match ex.body {
                Some(expected) => {
                    let got: Value = serde_json::from_slice(&bytes).unwrap();
                    assert_eq!(
                        got, expected,
                        "body of request #{i} ({} {})",
                        ex.method, ex.uri
                    );
                }
                None => assert!(bytes.is_empty(), "request #{i} has an unexpected body"),
            }
            let response = Response::builder()
                .status(StatusCode::from_u16(ex.status).unwrap())
                .header(http::header::CONTENT_TYPE, JSON)
                .body(Body::from(serde_json::to_vec(&ex.response).unwrap()))
                .unwrap();
            send.send_response(response);
        }
    })
}

/// Runs `op` on an adapter whose API server follows `script`, then checks the whole
/// script was consumed and nothing else was sent.
async fn run<T, F, Fut>(script: Vec<Exchange>, op: F) -> T
where
    F: FnOnce(Arc<KubeAdapter>) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let server = api_server(handle, script);
    let adapter = Arc::new(KubeAdapter::new(Client::new(service, "default")));
    let out = tokio::time::timeout(Duration::from_secs(10), op(adapter))
        .await
        .expect("operation sent a request the script does not answer");
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the script was not consumed")
        .expect("the API server script failed");
    out
}

fn status_error(code: u16, reason: &str, message: &str, details: Value) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": details,
        "code": code,
    })
}

/// A Deployment as the API server returns it after a write.
fn deployment_response(name: &str, generation: i64, template_annotations: Value) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": "int",
            "uid": format!("uid-{name}"),
            "resourceVersion": "88231",
            "generation": generation,
            "creationTimestamp": "2024-04-01T09:00:00Z",
            "labels": { "name": name },
        },
        "spec": {
            "replicas": 2,
            "selector": { "matchLabels": { "name": name } },
            "template": {
                "metadata": { "labels": { "name": name }, "annotations": template_annotations },
                "spec": { "containers": [{ "name": "main", "image": "registry.local/predator:1.4.2" }] },
            },
            "strategy": { "type": "RollingUpdate", "rollingUpdate": { "maxSurge": "25%", "maxUnavailable": "25%" } },
            "revisionHistoryLimit": 10,
            "progressDeadlineSeconds": 600,
        },
        "status": {
            "observedGeneration": generation - 1,
            "replicas": 2, "updatedReplicas": 2, "readyReplicas": 2, "availableReplicas": 2,
        },
    })
}

fn scale_response(name: &str, replicas: i32) -> Value {
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": { "name": name, "namespace": "int", "uid": format!("uid-{name}"), "resourceVersion": "88240" },
        "spec": { "replicas": replicas },
        "status": { "replicas": replicas, "selector": format!("name={name}") },
    })
}

fn hpa_response(name: &str, min: i32, max: i32) -> Value {
    json!({
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": { "name": name, "namespace": "int", "uid": "uid-hpa", "resourceVersion": "88235" },
        "spec": {
            "scaleTargetRef": { "apiVersion": "apps/v1", "kind": "Deployment", "name": name },
            "minReplicas": min,
            "maxReplicas": max,
        },
        "status": { "currentReplicas": 2, "desiredReplicas": 2 },
    })
}

const DEPLOYMENT_PATH: &str = "/apis/apps/v1/namespaces/int/deployments";
const HPA_PATH: &str = "/apis/autoscaling/v2/namespaces/int/horizontalpodautoscalers";

fn apply_uri(base: &str, name: &str) -> String {
    format!("{base}/{name}?&force=true&fieldManager=resource-plane")
}

fn patch_uri(base: &str, name: &str) -> String {
    format!("{base}/{name}?&fieldManager=resource-plane")
}

fn deployable(min: i32, max: i32) -> DeployableSpec {
    DeployableSpec {
        name: "predator".into(),
        namespace: "int".into(),
        image: "registry.local/predator:1.4.2".into(),
        node_selector: BTreeMap::from([("node_pool".into(), "g2-std-16".into())]),
        min_pod_count: min,
        max_pod_count: max,
        resources: ResourceSpec {
            cpu: RequestLimit {
                request: "2".into(),
                limit: "4".into(),
            },
            memory: RequestLimit {
                request: "8Gi".into(),
                limit: "16Gi".into(),
            },
            gpu: Some(GpuSpec {
                request: "1".into(),
                limit: "1".into(),
                memory: Some(RequestLimit {
                    request: "10Gi".into(),
                    limit: "16Gi".into(),
                }),
            }),
        },
        models_to_load: vec![ModelToLoad {
            name: "ranker".into(),
            version: "7".into(),
            runtime: "triton".into(),
            precision: "fp16".into(),
            batch_size: 32,
            artifact_version: "2024-04-30".into(),
        }],
    }
}

fn expected_deployment_apply() -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "predator",
            "namespace": "int",
            "labels": { "name": "predator", "app.kubernetes.io/managed-by": "resource-plane" },
        },
        "spec": {
            "selector": { "matchLabels": { "name": "predator" } },
            "template": {
                "metadata": {
                    "labels": { "name": "predator" },
                    "annotations": {
                        "resource-plane/gpu-memory-request": "10Gi",
                        "resource-plane/gpu-memory-limit": "16Gi",
                    },
                },
                "spec": {
                    "nodeSelector": { "node_pool": "g2-std-16" },
                    "containers": [{
                        "name": "main",
                        "image": "registry.local/predator:1.4.2",
                        "resources": {
                            "requests": { "cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "1" },
                            "limits": { "cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1" },
                        },
                        "env": [{
                            "name": "MODELS_TO_LOAD",
                            "value": "[{\"name\":\"ranker\",\"version\":\"7\",\"runtime\":\"triton\",\"precision\":\"fp16\",\"batch_size\":32,\"artifact_version\":\"2024-04-30\"}]",
                        }],
                    }],
                },
            },
        },
    })
}

fn expected_hpa_apply(min: i32, max: i32) -> Value {
    json!({
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {
            "name": "predator",
            "namespace": "int",
            "labels": { "name": "predator", "app.kubernetes.io/managed-by": "resource-plane" },
        },
        "spec": {
            "scaleTargetRef": { "apiVersion": "apps/v1", "kind": "Deployment", "name": "predator" },
            "minReplicas": min,
            "maxReplicas": max,
        },
    })
}

#[tokio::test]
async fn apply_deployable_applies_deployment_and_hpa_then_scales_up_to_min() {
    let script = vec![
        exchange(Method::PATCH, &apply_uri(DEPLOYMENT_PATH, "predator"))
            .sends(APPLY, expected_deployment_apply())
            .answers(200, deployment_response("predator", 4, json!({}))),
        exchange(Method::PATCH, &apply_uri(HPA_PATH, "predator"))
            .sends(APPLY, expected_hpa_apply(3, 8))
            .answers(200, hpa_response("predator", 3, 8)),
        exchange(Method::GET, &format!("{DEPLOYMENT_PATH}/predator/scale"))
            .answers(200, scale_response("predator", 1)),
        exchange(Method::PATCH, &patch_uri(DEPLOYMENT_PATH, "predator/scale"))
            .sends(MERGE, json!({ "spec": { "replicas": 3 } }))
            .answers(200, scale_response("predator", 3)),
    ];
    let baseline = run(script, |k| async move {
        k.apply_deployable(&deployable(3, 8)).await
    })
    .await;
    assert_eq!(
        baseline,
        Ok(Baseline {
            generation: Some(4),
            uid: Some("uid-predator".into()),
            label_selector: Some("name=predator".into()),
            ..Baseline::new(ResourceKind::Deployment, "int", "predator")
        })
    );
}

#[tokio::test]
async fn apply_deployable_with_zero_min_scales_to_zero_and_keeps_hpa_min_one() {
    let script = vec![
        exchange(Method::PATCH, &apply_uri(DEPLOYMENT_PATH, "predator"))
            .sends(APPLY, expected_deployment_apply())
            .answers(201, deployment_response("predator", 1, json!({}))),
        exchange(Method::PATCH, &apply_uri(HPA_PATH, "predator"))
            .sends(APPLY, expected_hpa_apply(1, 4))
            .answers(201, hpa_response("predator", 1, 4)),
        exchange(Method::PATCH, &patch_uri(DEPLOYMENT_PATH, "predator/scale"))
            .sends(MERGE, json!({ "spec": { "replicas": 0 } }))
            .answers(200, scale_response("predator", 0)),
    ];
    let baseline = run(script, |k| async move {
        k.apply_deployable(&deployable(0, 4)).await
    })
    .await;
    assert_eq!(baseline.map(|b| b.generation), Ok(Some(1)));
}

#[tokio::test]
async fn apply_deployable_reports_422_with_the_servers_message() {
    let message = "Deployment.apps \"predator\" is invalid: spec.template.spec.containers[0].resources.requests: Invalid value: \"2\": must be less than or equal to cpu limit of 1";
    let script =
        vec![exchange(Method::PATCH, &apply_uri(DEPLOYMENT_PATH, "predator"))
        .sends(APPLY, expected_deployment_apply())
        .answers(
            422,
            status_error(
                422,
                "Invalid",
                message,
                json!({ "name": "predator", "group": "apps", "kind": "Deployment", "causes": [{
                    "reason": "FieldValueInvalid",
                    "message": "Invalid value: \"2\": must be less than or equal to cpu limit of 1",
                    "field": "spec.template.spec.containers[0].resources.requests",
                }] }),
            ),
        )];
    let err = run(script, |k| async move {
        k.apply_deployable(&deployable(3, 8)).await
    })
    .await;
    assert_eq!(err, Err(KubeError::Invalid(message.into())));
}

#[tokio::test]
async fn apply_deployable_refuses_bad_counts_without_calling_the_server() {
    let err = run(vec![], |k| async move {
        k.apply_deployable(&deployable(5, 2)).await
    })
    .await;
    assert!(matches!(err, Err(KubeError::Invalid(m)) if m.contains("below min")));
}

fn restart_patch() -> Value {
    json!({ "spec": { "template": { "metadata": { "annotations": { "kubectl.kubernetes.io/restartedAt": NOW } } } } })
}

#[tokio::test]
async fn restart_one_deployment_patches_the_restarted_at_annotation() {
    let script = vec![
        exchange(Method::PATCH, &patch_uri(DEPLOYMENT_PATH, "predator"))
            .sends(MERGE, restart_patch())
            .answers(
                200,
                deployment_response(
                    "predator",
                    9,
                    json!({ "kubectl.kubernetes.io/restartedAt": NOW }),
                ),
            ),
    ];
    let baselines = run(script, |k| async move {
        k.restart("int", Some("predator"), NOW).await
    })
    .await;
    assert_eq!(
        baselines,
        Ok(vec![Baseline {
            generation: Some(9),
            uid: Some("uid-predator".into()),
            label_selector: Some("name=predator".into()),
            template_annotation: Some("kubectl.kubernetes.io/restartedAt".into()),
            template_hash: Some(NOW.into()),
            ..Baseline::new(ResourceKind::Deployment, "int", "predator")
        }])
    );
}

#[tokio::test]
async fn restart_all_lists_the_namespace_and_patches_each_deployment() {
    let list = json!({
        "kind": "DeploymentList",
        "apiVersion": "apps/v1",
        "metadata": { "resourceVersion": "88300" },
        "items": [
            deployment_response("predator", 3, json!({})),
            deployment_response("ranker", 12, json!({})),
        ],
    });
    let script = vec![
        exchange(Method::GET, &format!("{DEPLOYMENT_PATH}?")).answers(200, list),
        exchange(Method::PATCH, &patch_uri(DEPLOYMENT_PATH, "predator"))
            .sends(MERGE, restart_patch())
            .answers(200, deployment_response("predator", 4, json!({}))),
        exchange(Method::PATCH, &patch_uri(DEPLOYMENT_PATH, "ranker"))
            .sends(MERGE, restart_patch())
            .answers(200, deployment_response("ranker", 13, json!({}))),
    ];
    let baselines = run(script, |k| async move { k.restart("int", None, NOW).await })
        .await
        .unwrap();
    let summary: Vec<(Option<String>, Option<i64>)> = baselines
        .into_iter()
        .map(|b| (b.name, b.generation))
        .collect();
    assert_eq!(
        summary,
        vec![
            (Some("predator".into()), Some(4)),
            (Some("ranker".into()), Some(13))
        ]
    );
}

#[tokio::test]
async fn restart_of_an_empty_namespace_is_not_found() {
    let list = json!({ "kind": "DeploymentList", "apiVersion": "apps/v1", "metadata": { "resourceVersion": "1" }, "items": [] });
    let script = vec![exchange(Method::GET, &format!("{DEPLOYMENT_PATH}?")).answers(200, list)];
    let err = run(script, |k| async move { k.restart("int", None, NOW).await }).await;
    assert!(matches!(err, Err(KubeError::NotFound(m)) if m.contains("namespace int")));
}

#[tokio::test]
async fn restart_of_a_missing_deployment_is_not_found_with_the_servers_message() {
    let script = vec![exchange(Method::PATCH, &patch_uri(DEPLOYMENT_PATH, "nope"))
        .sends(MERGE, restart_patch())
        .answers(
            404,
            status_error(
                404,
                "NotFound",
                "deployments.apps \"nope\" not found",
                json!({ "name": "nope", "group": "apps", "kind": "deployments" }),
            ),
        )];
    let err = run(script, |k| async move {
        k.restart("int", Some("nope"), NOW).await
    })
    .await;
    assert_eq!(
        err,
        Err(KubeError::NotFound(
            "deployments.apps \"nope\" not found".into()
        ))
    );
}

fn model() -> ModelSpec {
    ModelSpec {
        name: "ranker".into(),
        version: "8".into(),
        artifact_location: "s3://models/ranker/8".into(),
    }
}

/// The Deployment as read before a model load, with the pod template's containers.
fn deployment_with_containers(resource_version: &str, containers: Value) -> Value {
    let mut d = deployment_response("predator", 5, json!({}));
    d["metadata"]["resourceVersion"] = json!(resource_version);
    d["spec"]["template"]["spec"]["containers"] = containers;
    d
}

/// The strategic merge patch of a model load: the annotations and the model's env vars
/// on `container` (merged by container name and env name), guarded by the
/// `resourceVersion` of the read it was built from.
fn model_patch(resource_version: &str, container: &str, env: Value) -> Value {
    json!({
        "metadata": { "resourceVersion": resource_version },
        "spec": { "template": {
            "metadata": { "annotations": {
                "resource-plane/model-name": "ranker",
                "resource-plane/model-version": "8",
                "resource-plane/model-artifact": "s3://models/ranker/8",
                "resource-plane/model-loaded-at": NOW,
            } },
            "spec": { "containers": [{ "name": container, "env": env }] },
        } },
    })
}

fn model_env() -> Value {
    json!([
        { "name": "MODEL_NAME", "value": "ranker" },
        { "name": "MODEL_VERSION", "value": "8" },
        { "name": "MODEL_ARTIFACT_LOCATION", "value": "s3://models/ranker/8" },
    ])
}

fn loaded_baseline() -> Result<Baseline, KubeError> {
    Ok(Baseline {
        kind: ResourceKind::Pod,
        generation: Some(6),
        uid: Some("uid-predator".into()),
        label_selector: Some("name=predator".into()),
        template_annotation: Some("resource-plane/model-loaded-at".into()),
        template_hash: Some(NOW.into()),
        ..Baseline::new(ResourceKind::Pod, "int", "predator")
    })
}

const PREDATOR_URI: &str = "/apis/apps/v1/namespaces/int/deployments/predator";

fn loaded() -> Value {
    deployment_response(
        "predator",
        6,
        json!({ "resource-plane/model-loaded-at": NOW }),
    )
}

#[tokio::test]
async fn load_model_sets_the_model_env_on_the_first_container_and_waits_on_pods() {
    let containers = json!([
        { "name": "server", "image": "registry.local/predator:1.4.2", "env": [{ "name": "LOG_LEVEL", "value": "info" }] },
        { "name": "metrics", "image": "registry.local/exporter:3" },
    ]);
    let script = vec![
        exchange(Method::GET, PREDATOR_URI)
            .answers(200, deployment_with_containers("88231", containers)),
        exchange(Method::PATCH, &patch_uri(DEPLOYMENT_PATH, "predator"))
            .sends(STRATEGIC, model_patch("88231", "server", model_env()))
            .answers(200, loaded()),
    ];
    let baseline = run(script, |k| async move {
        k.load_model("int", "predator", None, &model(), NOW).await
    })
    .await;
    assert_eq!(baseline, loaded_baseline());
}

#[tokio::test]
async fn load_model_sets_the_model_env_on_the_named_container() {
    // `ranker` takes MODEL_NAME from a ConfigMap today: the patch drops that source, as
    // a variable with both `value` and `valueFrom` is invalid.
    let containers = json!([
        { "name": "main", "image": "registry.local/predator:1.4.2" },
        { "name": "ranker", "image": "registry.local/ranker:2", "env": [
            { "name": "MODEL_NAME", "valueFrom": { "configMapKeyRef": { "name": "models", "key": "name" } } },
        ] },
    ]);
    let mut env = model_env();
    env[0]["valueFrom"] = Value::Null;
    let script = vec![
        exchange(Method::GET, PREDATOR_URI)
            .answers(200, deployment_with_containers("88231", containers)),
        exchange(Method::PATCH, &patch_uri(DEPLOYMENT_PATH, "predator"))
            .sends(STRATEGIC, model_patch("88231", "ranker", env))
            .answers(200, loaded()),
    ];
    let baseline = run(script, |k| async move {
        k.load_model("int", "predator", Some("ranker"), &model(), NOW)
            .await
    })
    .await;
    assert_eq!(baseline, loaded_baseline());
}

#[tokio::test]
async fn load_model_into_a_container_the_deployment_lacks_is_invalid_and_patches_nothing() {
    let containers = json!([
        { "name": "main", "image": "registry.local/predator:1.4.2" },
        { "name": "metrics", "image": "registry.local/exporter:3" },
    ]);
    let script = vec![exchange(Method::GET, PREDATOR_URI)
        .answers(200, deployment_with_containers("88231", containers))];
    let err = run(script, |k| async move {
        k.load_model("int", "predator", Some("gpu-server"), &model(), NOW)
            .await
    })
    .await;
    assert_eq!(
        err,
        Err(KubeError::Invalid(
            "deployment predator has no container \"gpu-server\" (its containers: main, metrics)"
                .into()
        ))
    );
}

#[tokio::test]
async fn load_model_reads_again_and_repatches_after_a_conflict() {
    let containers = json!([{ "name": "main", "image": "registry.local/predator:1.4.2" }]);
    let modified = "Operation cannot be fulfilled on deployments.apps \"predator\": the object has been modified; please apply your changes to the latest version and try again";
    let script = vec![
        exchange(Method::GET, PREDATOR_URI)
            .answers(200, deployment_with_containers("88231", containers.clone())),
        exchange(Method::PATCH, &patch_uri(DEPLOYMENT_PATH, "predator"))
            .sends(STRATEGIC, model_patch("88231", "main", model_env()))
            .answers(
                409,
                status_error(
                    409,
                    "Conflict",
                    modified,
                    json!({ "name": "predator", "group": "apps", "kind": "deployments" }),
                ),
            ),
        exchange(Method::GET, PREDATOR_URI)
            .answers(200, deployment_with_containers("88232", containers)),
        exchange(Method::PATCH, &patch_uri(DEPLOYMENT_PATH, "predator"))
            .sends(STRATEGIC, model_patch("88232", "main", model_env()))
            .answers(200, loaded()),
    ];
    let baseline = run(script, |k| async move {
        k.load_model("int", "predator", None, &model(), NOW).await
    })
    .await;
    assert_eq!(baseline, loaded_baseline());
}

#[tokio::test]
async fn load_model_gives_up_with_the_conflict_after_five_attempts() {
    let containers = json!([{ "name": "main", "image": "registry.local/predator:1.4.2" }]);
    let modified = "Operation cannot be fulfilled on deployments.apps \"predator\": the object has been modified; please apply your changes to the latest version and try again";
    let mut script = Vec::new();
    for version in ["1", "2", "3", "4", "5"] {
        script.push(
            exchange(Method::GET, PREDATOR_URI)
                .answers(200, deployment_with_containers(version, containers.clone())),
        );
        script.push(
            exchange(Method::PATCH, &patch_uri(DEPLOYMENT_PATH, "predator"))
                .sends(STRATEGIC, model_patch(version, "main", model_env()))
                .answers(
                    409,
                    status_error(
                        409,
                        "Conflict",
                        modified,
                        json!({ "name": "predator", "group": "apps", "kind": "deployments" }),
                    ),
                ),
        );
    }
    let err = run(script, |k| async move {
        k.load_model("int", "predator", None, &model(), NOW).await
    })
    .await;
    assert_eq!(err, Err(KubeError::Conflict(modified.into())));
}

#[tokio::test]
async fn load_model_on_a_missing_deployable_is_not_found() {
    let script = vec![exchange(
        Method::GET,
        "/apis/apps/v1/namespaces/int/deployments/ghost",
    )
    .answers(
        404,
        status_error(
            404,
            "NotFound",
            "deployments.apps \"ghost\" not found",
            json!({ "name": "ghost", "group": "apps", "kind": "deployments" }),
        ),
    )];
    let err = run(script, |k| async move {
        k.load_model("int", "ghost", None, &model(), NOW).await
    })
    .await;
    assert_eq!(
        err,
        Err(KubeError::NotFound(
            "deployments.apps \"ghost\" not found".into()
        ))
    );
}

fn job_spec() -> JobSpec {
    JobSpec {
        job_name: "warmup-er5tdgsh".into(),
        namespace: "int".into(),
        image: "registry.local/warmup:2".into(),
        payload: json!({ "deployable": "predator", "requests": 1000 }),
        request_id: "op-7f3a".into(),
    }
}

fn expected_job() -> Value {
    json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": "warmup-er5tdgsh",
            "namespace": "int",
            "labels": {
                "name": "warmup-er5tdgsh",
                "app.kubernetes.io/managed-by": "resource-plane",
                "resource-plane/request-id": "op-7f3a",
            },
        },
        "spec": {
            "template": {
                "metadata": { "labels": { "name": "warmup-er5tdgsh" } },
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{
                        "name": "job",
                        "image": "registry.local/warmup:2",
                        "env": [{ "name": "JOB_PAYLOAD", "value": "{\"deployable\":\"predator\",\"requests\":1000}" }],
                    }],
                },
            },
        },
    })
}

const JOB_URI: &str = "/apis/batch/v1/namespaces/int/jobs?&fieldManager=resource-plane";

#[tokio::test]
async fn create_job_posts_a_batch_v1_job_with_the_payload_in_an_env_var() {
    let mut created = expected_job();
    created["metadata"]["uid"] = json!("uid-job");
    created["metadata"]["generation"] = json!(1);
    created["metadata"]["resourceVersion"] = json!("88400");
    created["spec"]["backoffLimit"] = json!(6);
    created["status"] = json!({});
    let script = vec![exchange(Method::POST, JOB_URI)
        .sends(JSON, expected_job())
        .answers(201, created)];
    let baseline = run(script, |k| async move { k.create_job(&job_spec()).await }).await;
    assert_eq!(
        baseline,
        Ok(Baseline {
            generation: Some(1),
            uid: Some("uid-job".into()),
            label_selector: Some("name=warmup-er5tdgsh".into()),
            ..Baseline::new(ResourceKind::Job, "int", "warmup-er5tdgsh")
        })
    );
}

fn already_exists() -> Value {
    status_error(
        409,
        "AlreadyExists",
        "jobs.batch \"warmup-er5tdgsh\" already exists",
        json!({ "name": "warmup-er5tdgsh", "group": "batch", "kind": "jobs" }),
    )
}

/// The Job as the API server has it, created by request `request_id`.
fn existing_job(request_id: &str) -> Value {
    let mut job = expected_job();
    job["metadata"]["labels"]["resource-plane/request-id"] = json!(request_id);
    job["metadata"]["uid"] = json!("uid-existing");
    job["metadata"]["generation"] = json!(1);
    job["status"] = json!({ "active": 1 });
    job
}

const JOB_GET_URI: &str = "/apis/batch/v1/namespaces/int/jobs/warmup-er5tdgsh";

#[tokio::test]
async fn create_job_that_exists_for_another_request_is_a_conflict() {
    let script = vec![
        exchange(Method::POST, JOB_URI)
            .sends(JSON, expected_job())
            .answers(409, already_exists()),
        exchange(Method::GET, JOB_GET_URI).answers(200, existing_job("op-someone-else")),
    ];
    let err = run(script, |k| async move { k.create_job(&job_spec()).await }).await;
    assert_eq!(
        err,
        Err(KubeError::Conflict(
            "jobs.batch \"warmup-er5tdgsh\" already exists".into()
        ))
    );
}

#[tokio::test]
async fn create_job_that_exists_for_the_same_request_counts_as_created() {
    let script = vec![
        exchange(Method::POST, JOB_URI)
            .sends(JSON, expected_job())
            .answers(409, already_exists()),
        exchange(Method::GET, JOB_GET_URI).answers(200, existing_job("op-7f3a")),
    ];
    let baseline = run(script, |k| async move { k.create_job(&job_spec()).await }).await;
    assert_eq!(
        baseline,
        Ok(Baseline {
            generation: Some(1),
            uid: Some("uid-existing".into()),
            label_selector: Some("name=warmup-er5tdgsh".into()),
            ..Baseline::new(ResourceKind::Job, "int", "warmup-er5tdgsh")
        })
    );
}

const HPA_GET_URI: &str = "/apis/autoscaling/v2/namespaces/int/horizontalpodautoscalers/predator";
const SCALE_GET_URI: &str = "/apis/apps/v1/namespaces/int/deployments/predator/scale";

#[tokio::test]
async fn observed_min_replicas_reads_the_hpa_and_the_scale() {
    let script = vec![
        exchange(Method::GET, HPA_GET_URI).answers(200, hpa_response("predator", 4, 8)),
        exchange(Method::GET, SCALE_GET_URI).answers(200, scale_response("predator", 5)),
    ];
    let got = run(script, |k| async move {
        k.observed_min_replicas("int", &ScaleTarget::same("predator"))
            .await
    })
    .await;
    assert_eq!(got, Ok(Some(4)));
    let script = vec![
        exchange(Method::GET, HPA_GET_URI).answers(200, hpa_response("predator", 1, 8)),
        exchange(Method::GET, SCALE_GET_URI).answers(200, scale_response("predator", 0)),
    ];
    let got = run(script, |k| async move {
        k.observed_min_replicas("int", &ScaleTarget::same("predator"))
            .await
    })
    .await;
    assert_eq!(got, Ok(Some(0)), "scaled to zero");
    let script = vec![exchange(Method::GET, HPA_GET_URI).answers(
        404,
        status_error(
            404,
            "NotFound",
            "horizontalpodautoscalers.autoscaling \"predator\" not found",
            json!({}),
        ),
    )];
    let got = run(script, |k| async move {
        k.observed_min_replicas("int", &ScaleTarget::same("predator"))
            .await
    })
    .await;
    assert_eq!(
        got,
        Ok(None),
        "not in the cluster is reported, not an error"
    );
}

#[tokio::test]
async fn a_silent_api_server_times_out_on_request_paths() {
    // accepts connections and reads requests, never answers
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    let uri: http::Uri = format!("http://127.0.0.1:{port}").parse().expect("uri");
    let timeouts = resource_plane::config::KubeClientSettings {
        connect_timeout: Duration::from_millis(500),
        read_timeout: Duration::from_millis(300),
        write_timeout: Duration::from_millis(500),
    };
    let adapter = KubeAdapter::from_config(kube::Config::new(uri), &timeouts).expect("client");
    let got = tokio::time::timeout(Duration::from_secs(20), adapter.create_job(&job_spec()))
        .await
        .expect("the request hung: no read timeout on the request path");
    assert!(matches!(got, Err(KubeError::Unavailable(_))), "{got:?}");
    server.abort();
}

#[tokio::test]
async fn create_job_forbidden_and_unavailable_map_to_their_variants() {
    let forbidden = "jobs.batch is forbidden: User \"system:serviceaccount:int:resource-plane\" cannot create resource \"jobs\" in API group \"batch\" in the namespace \"int\"";
    let script = vec![exchange(Method::POST, JOB_URI)
        .sends(JSON, expected_job())
        .answers(
            403,
            status_error(
                403,
                "Forbidden",
                forbidden,
                json!({ "group": "batch", "kind": "jobs" }),
            ),
        )];
    let err = run(script, |k| async move { k.create_job(&job_spec()).await }).await;
    assert_eq!(err, Err(KubeError::Forbidden(forbidden.into())));

    let script = vec![exchange(Method::POST, JOB_URI)
        .sends(JSON, expected_job())
        .answers(
            503,
            status_error(
                503,
                "ServiceUnavailable",
                "the server is currently unable to handle the request",
                json!({}),
            ),
        )];
    let err = run(script, |k| async move { k.create_job(&job_spec()).await }).await;
    assert!(matches!(err, Err(KubeError::Unavailable(_))));
}

#[tokio::test]
async fn set_min_replicas_patches_the_hpa_and_scales_up_from_zero() {
    let script = vec![
        exchange(Method::PATCH, &patch_uri(HPA_PATH, "predator"))
            .sends(MERGE, json!({ "spec": { "minReplicas": 4 } }))
            .answers(200, hpa_response("predator", 4, 8)),
        exchange(Method::GET, &format!("{DEPLOYMENT_PATH}/predator/scale"))
            .answers(200, scale_response("predator", 0)),
        exchange(Method::PATCH, &patch_uri(DEPLOYMENT_PATH, "predator/scale"))
            .sends(MERGE, json!({ "spec": { "replicas": 4 } }))
            .answers(200, scale_response("predator", 4)),
    ];
    let out = run(script, |k| async move {
        k.set_min_replicas("int", &ScaleTarget::same("predator"), 4)
            .await
    })
    .await;
    assert_eq!(out, Ok(()));
}

#[tokio::test]
async fn set_min_replicas_leaves_a_larger_deployment_alone() {
    let script = vec![
        exchange(Method::PATCH, &patch_uri(HPA_PATH, "predator"))
            .sends(MERGE, json!({ "spec": { "minReplicas": 2 } }))
            .answers(200, hpa_response("predator", 2, 8)),
        exchange(Method::GET, &format!("{DEPLOYMENT_PATH}/predator/scale"))
            .answers(200, scale_response("predator", 5)),
    ];
    let out = run(script, |k| async move {
        k.set_min_replicas("int", &ScaleTarget::same("predator"), 2)
            .await
    })
    .await;
    assert_eq!(out, Ok(()));
}

#[tokio::test]
async fn set_min_replicas_zero_sets_hpa_min_one_and_scales_to_zero() {
    let script = vec![
        exchange(Method::PATCH, &patch_uri(HPA_PATH, "predator"))
            .sends(MERGE, json!({ "spec": { "minReplicas": 1 } }))
            .answers(200, hpa_response("predator", 1, 8)),
        exchange(Method::PATCH, &patch_uri(DEPLOYMENT_PATH, "predator/scale"))
            .sends(MERGE, json!({ "spec": { "replicas": 0 } }))
            .answers(200, scale_response("predator", 0)),
    ];
    let out = run(script, |k| async move {
        k.set_min_replicas("int", &ScaleTarget::same("predator"), 0)
            .await
    })
    .await;
    assert_eq!(out, Ok(()));
}

#[tokio::test]
async fn set_min_replicas_above_max_is_invalid_and_missing_hpa_is_not_found() {
    let message = "HorizontalPodAutoscaler.autoscaling \"predator\" is invalid: spec.minReplicas: Invalid value: 9: must be less than or equal to maxReplicas";
    let script = vec![exchange(Method::PATCH, &patch_uri(HPA_PATH, "predator"))
        .sends(MERGE, json!({ "spec": { "minReplicas": 9 } }))
        .answers(422, status_error(422, "Invalid", message, json!({ "name": "predator", "group": "autoscaling", "kind": "HorizontalPodAutoscaler" })))];
    let out = run(script, |k| async move {
        k.set_min_replicas("int", &ScaleTarget::same("predator"), 9)
            .await
    })
    .await;
    assert_eq!(out, Err(KubeError::Invalid(message.into())));

    let missing = "horizontalpodautoscalers.autoscaling \"ghost\" not found";
    let script = vec![exchange(Method::PATCH, &patch_uri(HPA_PATH, "ghost"))
        .sends(MERGE, json!({ "spec": { "minReplicas": 1 } }))
        .answers(404, status_error(404, "NotFound", missing, json!({ "name": "ghost", "group": "autoscaling", "kind": "horizontalpodautoscalers" })))];
    let out = run(script, |k| async move {
        k.set_min_replicas("int", &ScaleTarget::same("ghost"), 1)
            .await
    })
    .await;
    assert_eq!(out, Err(KubeError::NotFound(missing.into())));

    let out = run(vec![], |k| async move {
        k.set_min_replicas("int", &ScaleTarget::same("predator"), -1)
            .await
    })
    .await;
    assert!(matches!(out, Err(KubeError::Invalid(_))));
}

#[tokio::test]
async fn observe_reads_the_deployment_and_its_pods() {
    let pods = json!({
        "kind": "PodList",
        "apiVersion": "v1",
        "metadata": { "resourceVersion": "88500" },
        "items": [recorded_pod("predator-7d9c-a", NOW, true)],
    });
    let script = vec![
        exchange(Method::GET, &format!("{DEPLOYMENT_PATH}/predator"))
            .answers(200, recorded_deployment(6, 6, 1, 1, 1, 1)),
        exchange(
            Method::GET,
            "/api/v1/namespaces/int/pods?&labelSelector=name%3Dpredator",
        )
        .answers(200, pods),
    ];
    let baseline = Baseline {
        kind: ResourceKind::Pod,
        generation: Some(6),
        label_selector: Some("name=predator".into()),
        template_annotation: Some("resource-plane/model-loaded-at".into()),
        template_hash: Some(NOW.into()),
        ..Baseline::new(ResourceKind::Pod, "int", "predator")
    };
    let b = baseline.clone();
    let obs = run(script, |k| async move { k.observe(&b).await })
        .await
        .unwrap();
    assert_eq!(obs.objects.len(), 2);
    assert_eq!(
        evaluate(
            &baseline,
            DesiredCondition::PodsReadyOnNewTemplate,
            &obs.objects
        ),
        Verdict::Satisfied
    );
}

#[tokio::test]
async fn observe_of_a_job_that_does_not_exist_yet_is_empty_and_pending() {
    let script = vec![
        exchange(Method::GET, "/apis/batch/v1/namespaces/int/jobs/warmup").answers(
            404,
            status_error(
                404,
                "NotFound",
                "jobs.batch \"warmup\" not found",
                json!({ "name": "warmup", "group": "batch", "kind": "jobs" }),
            ),
        ),
    ];
    let baseline = Baseline::new(ResourceKind::Job, "int", "warmup");
    let b = baseline.clone();
    let obs = run(script, |k| async move { k.observe(&b).await })
        .await
        .unwrap();
    assert!(obs.objects.is_empty());
    assert!(matches!(
        evaluate(&baseline, DesiredCondition::JobComplete, &obs.objects),
        Verdict::Pending { reason } if reason.contains("does not exist yet")
    ));
}

#[tokio::test]
async fn one_shared_watch_per_kind_feeds_every_subscriber() {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let adapter = KubeAdapter::new(Client::new(service, "default"));
    let mut first = adapter.subscribe(ResourceKind::Deployment, "int");
    let mut second = adapter.subscribe(ResourceKind::Deployment, "int");

    // The initial list of the watcher.
    let (request, send) = handle.next_request().await.expect("no list request");
    assert_eq!(request.method(), Method::GET);
    assert_eq!(
        request.uri().to_string(),
        format!("{DEPLOYMENT_PATH}?&limit=500")
    );
    let list = json!({
        "kind": "DeploymentList",
        "apiVersion": "apps/v1",
        "metadata": { "resourceVersion": "100" },
        "items": [recorded_deployment(3, 2, 2, 2, 2, 2)],
    });
    send.send_response(Response::new(Body::from(
        serde_json::to_vec(&list).unwrap(),
    )));

    // Then the watch from the list's resourceVersion: one change, one deletion.
    let (request, send) = handle.next_request().await.expect("no watch request");
    assert_eq!(
        request.uri().to_string(),
        format!("{DEPLOYMENT_PATH}?&watch=true&timeoutSeconds=290&allowWatchBookmarks=true&resourceVersion=100")
    );
    let modified = json!({ "type": "MODIFIED", "object": recorded_deployment(3, 3, 2, 2, 2, 2) });
    let deleted = json!({ "type": "DELETED", "object": recorded_deployment(3, 3, 2, 2, 2, 2) });
    let body = format!("{modified}\n{deleted}\n");
    send.send_response(Response::new(Body::from(body.into_bytes())));

    for rx in [&mut first, &mut second] {
        let mut events = Vec::new();
        for _ in 0..3 {
            let event = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("no event")
                .expect("channel closed");
            events.push(event);
        }
        let observed: Vec<(&str, Option<i64>)> = events
            .iter()
            .map(|e| {
                let tag = match e {
                    ObjectEvent::Applied(_) => "applied",
                    ObjectEvent::Deleted(_) => "deleted",
                };
                let gen = match &e.object().detail {
                    resource_plane::domain::conditions::StatusDetail::Deployment(d) => {
                        d.observed_generation
                    }
                    _ => None,
                };
                (tag, gen)
            })
            .collect();
        assert_eq!(
            observed,
            vec![
                ("applied", Some(2)),
                ("applied", Some(3)),
                ("deleted", Some(3))
            ]
        );
        assert!(events
            .iter()
            .all(|e| e.kind() == ResourceKind::Deployment && e.name() == "predator"));
    }
}

// ---- condition evaluation on recorded objects ----

/// A Deployment as `kubectl get deployment predator -o json` shows it.
fn recorded_deployment(
    generation: i64,
    observed: i64,
    replicas: i32,
    status_replicas: i32,
    updated: i32,
    available: i32,
) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "annotations": { "deployment.kubernetes.io/revision": "5" },
            "creationTimestamp": "2024-04-01T09:00:00Z",
            "generation": generation,
            "labels": { "name": "predator" },
            "name": "predator",
            "namespace": "int",
            "resourceVersion": "88231",
            "uid": "uid-predator",
        },
        "spec": {
            "progressDeadlineSeconds": 600,
            "replicas": replicas,
            "revisionHistoryLimit": 10,
            "selector": { "matchLabels": { "name": "predator" } },
            "strategy": { "rollingUpdate": { "maxSurge": "25%", "maxUnavailable": "25%" }, "type": "RollingUpdate" },
            "template": {
                "metadata": { "labels": { "name": "predator" }, "annotations": { "kubectl.kubernetes.io/restartedAt": NOW } },
                "spec": {
                    "containers": [{ "image": "registry.local/predator:1.4.2", "imagePullPolicy": "IfNotPresent", "name": "main" }],
                    "dnsPolicy": "ClusterFirst",
                    "restartPolicy": "Always",
                    "terminationGracePeriodSeconds": 30,
                },
            },
        },
        "status": {
            "availableReplicas": available,
            "conditions": [
                {
                    "lastTransitionTime": "2024-04-01T09:01:00Z",
                    "lastUpdateTime": "2024-04-01T09:01:00Z",
                    "message": "Deployment has minimum availability.",
                    "reason": "MinimumReplicasAvailable",
                    "status": if available >= replicas { "True" } else { "False" },
                    "type": "Available",
                },
                {
                    "lastTransitionTime": "2024-04-01T09:00:00Z",
                    "lastUpdateTime": "2024-05-01T10:00:05Z",
                    "message": "ReplicaSet \"predator-7d9c6f5b8\" has successfully progressed.",
                    "reason": "NewReplicaSetAvailable",
                    "status": "True",
                    "type": "Progressing",
                },
            ],
            "observedGeneration": observed,
            "readyReplicas": available,
            "replicas": status_replicas,
            "updatedReplicas": updated,
        },
    })
}

/// A Pod of the Deployment as `kubectl get pod -o json` shows it.
fn recorded_pod(name: &str, loaded_at: &str, ready: bool) -> Value {
    let ready_status = if ready { "True" } else { "False" };
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "annotations": { "resource-plane/model-loaded-at": loaded_at, "resource-plane/model-version": "8" },
            "creationTimestamp": "2024-05-01T10:00:01Z",
            "generateName": "predator-7d9c6f5b8-",
            "labels": { "name": "predator", "pod-template-hash": "7d9c6f5b8" },
            "name": name,
            "namespace": "int",
            "ownerReferences": [{
                "apiVersion": "apps/v1", "blockOwnerDeletion": true, "controller": true,
                "kind": "ReplicaSet", "name": "predator-7d9c6f5b8", "uid": "uid-rs",
            }],
            "resourceVersion": "88260",
            "uid": format!("uid-{name}"),
        },
        "spec": { "containers": [{ "image": "registry.local/predator:1.4.2", "name": "main" }], "nodeName": "node-a" },
        "status": {
            "conditions": [
                { "lastTransitionTime": "2024-05-01T10:00:01Z", "status": "True", "type": "PodScheduled" },
                { "lastTransitionTime": "2024-05-01T10:00:03Z", "status": "True", "type": "Initialized" },
                { "lastTransitionTime": "2024-05-01T10:00:09Z", "status": ready_status, "type": "ContainersReady" },
                { "lastTransitionTime": "2024-05-01T10:00:09Z", "status": ready_status, "type": "Ready" },
            ],
            "containerStatuses": [if ready {
                json!({ "name": "main", "ready": true, "restartCount": 0, "image": "registry.local/predator:1.4.2", "imageID": "", "state": { "running": { "startedAt": "2024-05-01T10:00:05Z" } } })
            } else {
                json!({ "name": "main", "ready": false, "restartCount": 3, "image": "registry.local/predator:1.4.2", "imageID": "", "state": { "waiting": { "reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container=main" } } })
            }],
            "phase": "Running",
            "podIP": "10.1.2.3",
            "qosClass": "Burstable",
            "startTime": "2024-05-01T10:00:01Z",
        },
    })
}

fn recorded_job(conditions: Value, active: i32, succeeded: i32, failed: i32) -> Value {
    json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "creationTimestamp": "2024-05-01T10:00:00Z",
            "generation": 1,
            "labels": { "name": "warmup", "batch.kubernetes.io/job-name": "warmup" },
            "name": "warmup",
            "namespace": "int",
            "resourceVersion": "88600",
            "uid": "uid-job",
        },
        "spec": {
            "backoffLimit": 6,
            "completionMode": "NonIndexed",
            "completions": 1,
            "parallelism": 1,
            "template": { "spec": { "containers": [{ "name": "job", "image": "registry.local/warmup:2" }], "restartPolicy": "Never" } },
        },
        "status": {
            "active": active,
            "succeeded": succeeded,
            "failed": failed,
            "conditions": conditions,
            "startTime": "2024-05-01T10:00:00Z",
        },
    })
}

fn deployment_status(json: Value) -> ObjectStatus {
    let d: Deployment = serde_json::from_value(json).unwrap();
    ObjectStatus::from(&d)
}

fn pod_status(json: Value) -> ObjectStatus {
    let p: Pod = serde_json::from_value(json).unwrap();
    ObjectStatus::from(&p)
}

fn job_status(json: Value) -> ObjectStatus {
    let j: Job = serde_json::from_value(json).unwrap();
    ObjectStatus::from(&j)
}

fn deployment_baseline(generation: i64) -> Baseline {
    Baseline {
        generation: Some(generation),
        uid: Some("uid-predator".into()),
        ..Baseline::new(ResourceKind::Deployment, "int", "predator")
    }
}

#[test]
fn condition_already_true_before_the_change_is_pending() {
    // Fully available at generation 6; our patch produced generation 7.
    let before = deployment_status(recorded_deployment(7, 6, 3, 3, 3, 3));
    for desired in [
        DesiredCondition::Available,
        DesiredCondition::RolloutComplete,
    ] {
        let verdict = evaluate(
            &deployment_baseline(7),
            desired,
            std::slice::from_ref(&before),
        );
        assert!(
            matches!(&verdict, Verdict::Pending { reason } if reason.contains("generation 7")),
            "{verdict:?}"
        );
    }
}

#[test]
fn condition_on_a_deployment_that_does_not_exist_yet_is_pending() {
    let verdict = evaluate(&deployment_baseline(1), DesiredCondition::Available, &[]);
    assert!(
        matches!(&verdict, Verdict::Pending { reason } if reason.contains("does not exist yet"))
    );
}

#[test]
fn condition_rollout_in_progress_then_complete() {
    let b = deployment_baseline(7);
    let surging = deployment_status(recorded_deployment(7, 7, 3, 4, 1, 3));
    assert!(matches!(
        evaluate(&b, DesiredCondition::RolloutComplete, &[surging]),
        Verdict::Pending { reason } if reason.contains("1 of 3 replicas updated")
    ));
    let old_terminating = deployment_status(recorded_deployment(7, 7, 3, 4, 3, 3));
    assert!(matches!(
        evaluate(&b, DesiredCondition::RolloutComplete, std::slice::from_ref(&old_terminating)),
        Verdict::Pending { reason } if reason.contains("old replicas")
    ));
    assert_eq!(
        evaluate(&b, DesiredCondition::Available, &[old_terminating]),
        Verdict::Satisfied
    );
    let done = deployment_status(recorded_deployment(7, 7, 3, 3, 3, 3));
    assert_eq!(
        evaluate(&b, DesiredCondition::RolloutComplete, &[done]),
        Verdict::Satisfied
    );
}

#[test]
fn condition_progress_deadline_exceeded_fails() {
    let mut json = recorded_deployment(7, 7, 3, 4, 1, 3);
    json["status"]["conditions"][1] = json!({
        "lastTransitionTime": "2024-05-01T10:10:00Z",
        "lastUpdateTime": "2024-05-01T10:10:00Z",
        "message": "ReplicaSet \"predator-5f7d\" has timed out progressing.",
        "reason": "ProgressDeadlineExceeded",
        "status": "False",
        "type": "Progressing",
    });
    let verdict = evaluate(
        &deployment_baseline(7),
        DesiredCondition::RolloutComplete,
        &[deployment_status(json)],
    );
    assert!(
        matches!(verdict, Verdict::Failed { reason } if reason.contains("timed out progressing"))
    );
}

#[test]
fn condition_pods_ready_on_new_template() {
    let earlier = "2024-05-01T09:00:00.000Z";
    let b = Baseline {
        kind: ResourceKind::Pod,
        generation: Some(6),
        uid: Some("uid-predator".into()),
        label_selector: Some("name=predator".into()),
        template_annotation: Some("resource-plane/model-loaded-at".into()),
        template_hash: Some(NOW.into()),
        ..Baseline::new(ResourceKind::Pod, "int", "predator")
    };
    let deployment = deployment_status(recorded_deployment(6, 6, 2, 2, 2, 2));
    let check = |pods: Vec<Value>| {
        let mut observed = vec![deployment.clone()];
        observed.extend(pods.into_iter().map(pod_status));
        evaluate(&b, DesiredCondition::PodsReadyOnNewTemplate, &observed)
    };
    // Every pod Ready, but on the template from before the load.
    assert!(matches!(
        check(vec![recorded_pod("p-1", earlier, true), recorded_pod("p-2", earlier, true)]),
        Verdict::Pending { reason } if reason.contains("previous template")
    ));
    // New pods, one crash-looping.
    assert!(matches!(
        check(vec![recorded_pod("p-3", NOW, true), recorded_pod("p-4", NOW, false)]),
        Verdict::Pending { reason } if reason.contains("CrashLoopBackOff")
    ));
    // Not yet as many as the Deployment wants.
    assert!(matches!(
        check(vec![recorded_pod("p-3", NOW, true)]),
        Verdict::Pending { .. }
    ));
    assert_eq!(
        check(vec![
            recorded_pod("p-3", NOW, true),
            recorded_pod("p-4", NOW, true)
        ]),
        Verdict::Satisfied
    );
    // A terminating old pod does not hold the verdict back.
    let mut terminating = recorded_pod("p-1", earlier, true);
    terminating["metadata"]["deletionTimestamp"] = json!("2024-05-01T10:00:20Z");
    assert_eq!(
        check(vec![
            terminating,
            recorded_pod("p-3", NOW, true),
            recorded_pod("p-4", NOW, true)
        ]),
        Verdict::Satisfied
    );
}

#[test]
fn condition_job_complete_and_failed() {
    let b = Baseline {
        uid: Some("uid-job".into()),
        ..Baseline::new(ResourceKind::Job, "int", "warmup")
    };
    let running = job_status(recorded_job(json!([]), 1, 0, 0));
    assert!(matches!(
        evaluate(&b, DesiredCondition::JobComplete, &[running]),
        Verdict::Pending { .. }
    ));
    let complete = job_status(recorded_job(
        json!([
            { "type": "SuccessCriteriaMet", "status": "True", "reason": "CompletionsReached", "message": "Reached expected number of succeeded pods", "lastProbeTime": "2024-05-01T10:01:00Z", "lastTransitionTime": "2024-05-01T10:01:00Z" },
            { "type": "Complete", "status": "True", "reason": "CompletionsReached", "message": "Reached expected number of succeeded pods", "lastProbeTime": "2024-05-01T10:01:00Z", "lastTransitionTime": "2024-05-01T10:01:00Z" },
        ]),
        0,
        1,
        0,
    ));
    assert_eq!(
        evaluate(&b, DesiredCondition::JobComplete, &[complete]),
        Verdict::Satisfied
    );
    let failed = job_status(recorded_job(
        json!([
            { "type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit", "lastProbeTime": "2024-05-01T10:05:00Z", "lastTransitionTime": "2024-05-01T10:05:00Z" },
            { "type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit", "lastProbeTime": "2024-05-01T10:05:00Z", "lastTransitionTime": "2024-05-01T10:05:00Z" },
        ]),
        0,
        0,
        7,
    ));
    assert_eq!(
        evaluate(&b, DesiredCondition::JobComplete, std::slice::from_ref(&failed)),
        Verdict::Failed {
            reason: "job int/warmup failed: BackoffLimitExceeded: Job has reached the specified backoff limit".into()
        }
    );
    // A job of the same name from before (another uid) is not ours.
    let other = Baseline {
        uid: Some("uid-new".into()),
        ..b
    };
    assert!(matches!(
        evaluate(&other, DesiredCondition::JobComplete, &[failed]),
        Verdict::Pending { reason } if reason.contains("does not exist yet")
    ));
}

#[tokio::test]
async fn an_https_client_builds_with_rustls_and_ring() {
    // Building the TLS connector needs a rustls crypto provider; only ring is compiled
    // in, so this fails loudly if a feature change brings a second one (or none).
    let config = kube::Config::new("https://127.0.0.1:6443".parse().unwrap());
    let client = Client::try_from(config).expect("https client");
    let adapter = KubeAdapter::new(client);
    assert_eq!(adapter.name(), "kube");
}

/// A shadow deployable registered with its own Deployment and HPA names.
fn mapped() -> ScaleTarget {
    ScaleTarget {
        deployment: "predator-v2".into(),
        hpa: "predator-autoscaler".into(),
    }
}

#[tokio::test]
async fn min_replicas_act_on_the_mapped_deployment_and_hpa() {
    // scale up: the HPA is patched under its name, the Deployment scaled under its own
    let script = vec![
        exchange(Method::PATCH, &patch_uri(HPA_PATH, "predator-autoscaler"))
            .sends(MERGE, json!({ "spec": { "minReplicas": 3 } }))
            .answers(200, hpa_response("predator-autoscaler", 3, 8)),
        exchange(Method::GET, &format!("{DEPLOYMENT_PATH}/predator-v2/scale"))
            .answers(200, scale_response("predator-v2", 0)),
        exchange(
            Method::PATCH,
            &patch_uri(DEPLOYMENT_PATH, "predator-v2/scale"),
        )
        .sends(MERGE, json!({ "spec": { "replicas": 3 } }))
        .answers(200, scale_response("predator-v2", 3)),
    ];
    let out = run(script, |k| async move {
        k.set_min_replicas("int", &mapped(), 3).await
    })
    .await;
    assert_eq!(out, Ok(()));
    // min pod count 0 scales the mapped Deployment to zero
    let script = vec![
        exchange(Method::PATCH, &patch_uri(HPA_PATH, "predator-autoscaler"))
            .sends(MERGE, json!({ "spec": { "minReplicas": 1 } }))
            .answers(200, hpa_response("predator-autoscaler", 1, 8)),
        exchange(
            Method::PATCH,
            &patch_uri(DEPLOYMENT_PATH, "predator-v2/scale"),
        )
        .sends(MERGE, json!({ "spec": { "replicas": 0 } }))
        .answers(200, scale_response("predator-v2", 0)),
    ];
    let out = run(script, |k| async move {
        k.set_min_replicas("int", &mapped(), 0).await
    })
    .await;
    assert_eq!(out, Ok(()));
    // the read-back reads the same two objects
    let script = vec![
        exchange(Method::GET, &format!("{HPA_PATH}/predator-autoscaler"))
            .answers(200, hpa_response("predator-autoscaler", 3, 8)),
        exchange(Method::GET, &format!("{DEPLOYMENT_PATH}/predator-v2/scale"))
            .answers(200, scale_response("predator-v2", 4)),
    ];
    let got = run(script, |k| async move {
        k.observed_min_replicas("int", &mapped()).await
    })
    .await;
    assert_eq!(got, Ok(Some(3)));
}
