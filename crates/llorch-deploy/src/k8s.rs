//! `cargo xtask k8s render`: plain Kubernetes YAML for each pool of a stack
//! or profile, applied with `kubectl apply -f DIR` (no templating engine).
//!
//! Per pool `<id>`, in `<id>.yaml`:
//! * a `Deployment` `llorch-<id>` running the image's entrypoint (`serve
//!   --in-image`, pool `<id>`): non-root, no privilege escalation, every
//!   capability dropped, `seccompProfile: RuntimeDefault`, a read-only root
//!   (the cache and run files live in an `emptyDir` at `/var/lib/llorch`),
//!   the model mounted read-only at `/models` (an image volume of the model
//!   pushed with `model push`, or a PersistentVolumeClaim), the API token
//!   from the Secret `llorch-api-token`, startup/readiness probes on
//!   `/readyz` and liveness on `/healthz`, `nvidia.com/gpu` for CUDA pools,
//!   Prometheus scrape annotations;
//! * a `Service` and a `PodDisruptionBudget` (one pod may go at a time);
//! * an `InferencePool` (`inference.networking.k8s.io/v1`) selecting the
//!   pool's pods, and a `ConfigMap` holding its endpoint picker's
//!   configuration: the `core-metrics-extractor` reads llama-orch's own
//!   gauges ([`METRICS`]) for queued requests, running requests and
//!   KV-cache utilization.
//!
//! Cross-host routing is the gateway's (the Gateway API Inference
//! Extension and its endpoint picker, llm-d-router): llama-orch renders
//! what they read, it runs no balancer of its own.

use crate::image::{DEFAULT_PORT, MODELS_DIR, STATE_DIR};
use crate::names::{check_pool_id, PREFIX};
use crate::DeployError;
use llorch_profile::stack::Stack;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The pod label that selects a pool's pods.
pub const POOL_LABEL: &str = "llorch.dev/pool";
/// The endpoint picker's engine-type label and our engine's name in its config.
pub const ENGINE_TYPE_LABEL: &str = "inference.networking.k8s.io/engine-type";
pub const ENGINE_TYPE: &str = "llorch";
/// The Secret and key holding the API token.
pub const TOKEN_SECRET: &str = "llorch-api-token";
pub const TOKEN_KEY: &str = "token";
/// The port of the endpoint picker's gRPC service (the extension's default).
pub const EPP_PORT: u16 = 9002;

/// The metric families the endpoint picker reads, by the meaning it gives
/// them: (its config key, our family). Each is a gauge labelled `pool`.
pub const METRICS: [(&str, &str); 3] = [
    ("queuedRequestsSpec", "llorch_pool_queue_depth"),
    ("runningRequestsSpec", "llorch_pool_running"),
    ("kvUsageSpec", "llorch_pool_kv_cache_utilization"),
];

#[derive(Clone, Debug)]
pub struct RenderOptions {
    /// The image the pods run (`image build --to` printed it).
    pub image: String,
    /// An OCI reference of the model (`model push`) mounted as an image
    /// volume; `None`: the PersistentVolumeClaim `claim`.
    pub model_image: Option<String>,
    pub claim: String,
    /// The model's file name in the volume (default: the name `model push`
    /// gives it, `<first 16 hex of its sha256>.gguf`, or `model.gguf`).
    pub model_file: Option<String>,
    /// Pods per pool (the hosts serving it).
    pub hosts: u32,
    pub namespace: Option<String>,
    pub out: PathBuf,
}

/// What was written.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Rendered {
    pub dir: PathBuf,
    pub files: Vec<PathBuf>,
    pub objects: Vec<String>,
}

/// The spec string the endpoint picker reads for `family` of pool `id`.
pub fn metric_spec(family: &str, id: &str) -> String {
    format!("{family}{{pool=\"{id}\"}}")
}

/// Render every pool of `stack`; nothing is written unless every pool renders.
pub fn render(stack: &Stack, opts: &RenderOptions) -> Result<Rendered, DeployError> {
    if opts.hosts == 0 || opts.hosts > 1000 {
        return Err(DeployError::BadName {
            key: "--hosts".into(),
            value: opts.hosts.to_string(),
            why: "pods per pool must be 1 to 1000".into(),
        });
    }
    if let Some(ns) = &opts.namespace {
        if !crate::names::is_dns1123_label(ns) {
            return Err(DeployError::BadName {
                key: "--namespace".into(),
                value: llorch_types::excerpt(ns, 80),
                why: "a namespace is a DNS-1123 label".into(),
            });
        }
    }
    let mut docs: Vec<(String, Vec<Value>)> = Vec::new();
    for p in &stack.pools {
        check_pool_id(p.id.as_str())?;
    }
    for p in &stack.pools {
        docs.push((format!("{}.yaml", p.id), pool_objects(p, opts)?));
    }
    let staging = {
        if let Some(parent) = opts.out.parent() {
            fs_err::create_dir_all(parent)
                .map_err(llorch_io::io("create the manifests' directory"))?;
        }
        llorch_io::fsx::staging_dir_for(&opts.out).map_err(llorch_io::io("stage the manifests"))?
    };
    let mut files = Vec::new();
    let mut objects = Vec::new();
    for (name, objs) in &docs {
        let mut text = String::from(
            "# Rendered by `cargo xtask k8s render`; apply with `kubectl apply -f`.\n",
        );
        for o in objs {
            objects.push(format!(
                "{}/{}",
                o["kind"].as_str().unwrap_or(""),
                o["metadata"]["name"].as_str().unwrap_or("")
            ));
            text.push_str("---\n");
            text.push_str(&to_yaml(o)?);
        }
        fs_err::write(staging.path().join(name), text)
            .map_err(llorch_io::io("write a manifest"))?;
        files.push(opts.out.join(name));
    }
    llorch_io::fsx::commit_dir(staging, &opts.out)
        .map_err(llorch_io::io("publish the manifests"))?;
    Ok(Rendered {
        dir: opts.out.clone(),
        files,
        objects,
    })
}

/// One object as YAML.
pub fn to_yaml(v: &Value) -> Result<String, DeployError> {
    serde_saphyr::to_string(v).map_err(|e| DeployError::Yaml(e.to_string()))
}

fn meta(name: &str, opts: &RenderOptions, labels: &BTreeMap<&str, String>) -> Value {
    let mut m = json!({"name": name, "labels": labels});
    if let Some(ns) = &opts.namespace {
        m["namespace"] = json!(ns);
    }
    m
}

/// The objects of one pool: its Deployment, Service, PodDisruptionBudget,
/// InferencePool and the endpoint picker's ConfigMap.
fn pool_objects(
    p: &llorch_profile::stack::StackPool,
    opts: &RenderOptions,
) -> Result<Vec<Value>, DeployError> {
    let id = p.id.as_str();
    let name = format!("{PREFIX}{id}");
    let labels: BTreeMap<&str, String> = BTreeMap::from([
        ("app.kubernetes.io/name", "llama-orch".to_string()),
        ("app.kubernetes.io/instance", name.clone()),
        (POOL_LABEL, id.to_string()),
    ]);
    let mut pod_labels = labels.clone();
    pod_labels.insert(ENGINE_TYPE_LABEL, ENGINE_TYPE.into());
    let selector = json!({POOL_LABEL: id});
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(&name, opts, &labels),
        "spec": {
            "replicas": opts.hosts,
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": DEFAULT_PORT.to_string(),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": pod_spec(p, opts)?,
            },
        },
    });
    let service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(&name, opts, &labels),
        "spec": {
            "selector": selector,
            "ports": [{"name": "http", "port": DEFAULT_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    });
    let pdb = json!({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": meta(&name, opts, &labels),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector}},
    });
    let epp_name = format!("{name}-epp");
    let pool = json!({
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": meta(&name, opts, &labels),
        "spec": {
            "selector": {"matchLabels": selector},
            "targetPorts": [{"number": DEFAULT_PORT}],
            "endpointPickerRef": {"name": epp_name, "port": {"number": EPP_PORT}, "failureMode": "FailClose"},
        },
    });
    let config_map = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta(&format!("{name}-epp-config"), opts, &labels),
        "data": {"epp-config.yaml": to_yaml(&epp_config(id))?},
    });
    Ok(vec![deployment, service, pdb, pool, config_map])
}

/// The model file's name in the model volume: `--model-file`, or the
/// digest's name in a model image, or `model.gguf`.
fn model_file(
    p: &llorch_profile::stack::StackPool,
    opts: &RenderOptions,
) -> Result<String, DeployError> {
    let sha = p.profile.file.model.as_ref().and_then(|m| m.sha256.clone());
    let model_file = opts
        .model_file
        .clone()
        .unwrap_or_else(|| match (&opts.model_image, &sha) {
            (Some(_), Some(d)) => format!("{}.gguf", &d[..16.min(d.len())]),
            _ => "model.gguf".into(),
        });
    if model_file.contains('/') || model_file.starts_with('.') || model_file.is_empty() {
        return Err(DeployError::BadName {
            key: "--model-file".into(),
            value: llorch_types::excerpt(&model_file, 80),
            why: "a file name in the model volume (no `/`, not hidden)".into(),
        });
    }
    Ok(model_file)
}

/// One pool's pod: non-root, read-only root, no privilege, probes on
/// `/readyz` and `/healthz`, the model volume read-only, GPUs for CUDA.
fn pod_spec(
    p: &llorch_profile::stack::StackPool,
    opts: &RenderOptions,
) -> Result<Value, DeployError> {
    let prof = &p.profile;
    let cuda = prof.file.engine.backend == llorch_profile::Backend::Cuda;
    let model_file = model_file(p, opts)?;
    let model_volume = match &opts.model_image {
        Some(r) => {
            json!({"name": "models", "image": {"reference": r.trim_start_matches("oci://"), "pullPolicy": "IfNotPresent"}})
        }
        None => {
            json!({"name": "models", "persistentVolumeClaim": {"claimName": opts.claim, "readOnly": true}})
        }
    };
    let threads = prof.file.server.threads.max(1);
    let mut resources = json!({"requests": {"cpu": threads.to_string()}});
    if cuda {
        let gpus = p.devices.len().max(1);
        resources["limits"] = json!({"nvidia.com/gpu": gpus.to_string()});
        resources["requests"]["nvidia.com/gpu"] = json!(gpus.to_string());
    }
    // Startup: the model is hashed and the engine loads before /readyz is 200.
    let period = 5u64;
    let startup_failures = (prof.file.server.ready_timeout_s.max(60) * 2 / period).clamp(12, 720);
    let probe = |path: &str| json!({"httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "timeoutSeconds": 3});
    let mut startup = probe("/readyz");
    startup["failureThreshold"] = json!(startup_failures);
    let mut readiness = probe("/readyz");
    readiness["failureThreshold"] = json!(2);
    let mut liveness = probe("/healthz");
    liveness["failureThreshold"] = json!(3);
    let env = json!([
        {"name": "PORT", "value": DEFAULT_PORT.to_string()},
        {"name": "LLORCH_POOL", "value": p.id.as_str()},
        {"name": "LLORCH_MODEL", "value": format!("{MODELS_DIR}/{model_file}")},
        {"name": "LLORCH_OPEN_METRICS", "value": "true"},
        {"name": "LLORCH_API_TOKEN", "valueFrom": {"secretKeyRef": {"name": TOKEN_SECRET, "key": TOKEN_KEY}}},
    ]);
    let mut pod_spec = json!({
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "fsGroup": 65532,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [{
            "name": "llorch",
            "image": opts.image.trim_start_matches("oci://"),
            "ports": [{"name": "http", "containerPort": DEFAULT_PORT, "protocol": "TCP"}],
            "env": env,
            "resources": resources,
            "startupProbe": startup,
            "readinessProbe": readiness,
            "livenessProbe": liveness,
            "securityContext": {
                "runAsNonRoot": true,
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": true,
                "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "volumeMounts": [
                {"name": "models", "mountPath": MODELS_DIR, "readOnly": true},
                {"name": "state", "mountPath": STATE_DIR},
            ],
        }],
        "volumes": [model_volume, {"name": "state", "emptyDir": {}}],
        "terminationGracePeriodSeconds": 45,
    });
    if cuda {
        pod_spec["nodeSelector"] = json!({"nvidia.com/gpu.present": "true"});
        pod_spec["tolerations"] =
            json!([{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]);
    }
    Ok(pod_spec)
}

/// The endpoint picker's configuration (`EndpointPickerConfig`): its data
/// layer scrapes `/metrics` and reads llama-orch's gauges for this pool.
pub fn epp_config(id: &str) -> Value {
    let mut engine = serde_json::Map::new();
    engine.insert("name".into(), json!(ENGINE_TYPE));
    for (key, family) in METRICS {
        engine.insert(key.into(), json!(metric_spec(family, id)));
    }
    // No LoRA and no block-size info: llama.cpp's slots have neither.
    engine.insert("loraSpec".into(), json!(""));
    engine.insert("cacheInfoSpec".into(), json!(""));
    json!({
        "apiVersion": "inference.networking.x-k8s.io/v1alpha1",
        "kind": "EndpointPickerConfig",
        "featureGates": ["dataLayer"],
        "plugins": [
            {"type": "metrics-data-source", "parameters": {"scheme": "http", "path": "/metrics"}},
            {"name": "core-metrics-extractor", "type": "core-metrics-extractor", "parameters": {
                "engineLabelKey": ENGINE_TYPE_LABEL,
                "defaultEngine": ENGINE_TYPE,
                "engineConfigs": [Value::Object(engine)],
            }},
            {"type": "queue-scorer"},
            {"type": "kv-cache-utilization-scorer"},
            {"type": "max-score-picker"},
        ],
        "data": {"sources": [{"pluginRef": "metrics-data-source", "extractors": [{"pluginRef": "core-metrics-extractor"}]}]},
        "schedulingProfiles": [{"name": "default", "plugins": [
            {"pluginRef": "queue-scorer", "weight": 1},
            {"pluginRef": "kv-cache-utilization-scorer", "weight": 1},
            {"pluginRef": "max-score-picker"},
        ]}],
    })
}

/// The spec strings of the rendered endpoint picker configs in `dir`: what
/// a scraper will look for in `/metrics` (tests read them back to check
/// that the manifests and the metrics agree).
pub fn rendered_metric_specs(dir: &Path) -> Result<Vec<(String, String)>, DeployError> {
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = fs_err::read_dir(dir)
        .map_err(llorch_io::io("list the manifests"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    for f in files {
        let text = fs_err::read_to_string(&f).map_err(llorch_io::io("read a manifest"))?;
        let docs: Vec<Value> =
            serde_saphyr::from_multiple(&text).map_err(|e| DeployError::Yaml(e.to_string()))?;
        for d in docs.iter().filter(|d| d["kind"] == "ConfigMap") {
            let Some(cfg) = d["data"]["epp-config.yaml"].as_str() else {
                continue;
            };
            let epp: Value =
                serde_saphyr::from_str(cfg).map_err(|e| DeployError::Yaml(e.to_string()))?;
            for plugin in epp["plugins"].as_array().into_iter().flatten() {
                for ec in plugin["parameters"]["engineConfigs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    for (key, _) in METRICS {
                        if let Some(s) = ec[key].as_str() {
                            out.push((key.to_string(), s.to_string()));
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}
